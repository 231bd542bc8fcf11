"""Worker code for tests/test_distributed_groups.py: the 2026 optimizers under `ZeroRedundancyOptimizer` built the
plain way, `ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Muon, lr=...)`, in 2 spawned `gloo` ranks.
ZeRO builds each rank's optimizer on its share of the params and asserts that it has ZeRO's own param groups: an
optimizer that split groups (Muon's hybrid once did) failed there on one rank while the other waited."""
import datetime
import torch, torch.distributed as dist
from distributed_worker import exits_cleanly, data, loss_fn, N_ROWS, N_IN, N_OUT
from distributed_matrix_worker import mean_grad_fit

STEPS = 4
PG_TIMEOUT = datetime.timedelta(seconds=60)   # a rank that fails alone ends the others' collectives, not a hang

def model():
    """A 3-layer MLP with biases; square hidden weights (SOAP's eigenbases of a non-square factor's null space are
    picked by last-bit rounding, which differs between 2 ranks' averaged gradients and one process's)."""
    torch.manual_seed(1)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(N_IN, N_IN), torch.nn.Tanh(), L(N_IN, N_IN), torch.nn.Tanh(), L(N_IN, N_OUT))

def optimizers() -> dict:
    "name -> (factory, keywords): the eight 2026 optimizers. Muon's Newton-Schulz in float32 (bfloat16 would magnify the ranks' last-bit differences)."
    from fastopts.matrix import Muon, SOAP, Adafactor
    from fastopts.lr_free import ScheduleFreeAdamW, ScheduleFreeSGD, Prodigy, ADOPT, AdEMAMix
    return {'muon': (Muon, dict(lr=0.05, ns_dtype=torch.float32, adamw_lr_ratio=0.1)),
            'soap': (SOAP, dict(lr=1e-2, precondition_frequency=2, eps=1e-4)),
            'adafactor': (Adafactor, dict(lr=1e-2, weight_decay=0.1)),
            'sf_adamw': (ScheduleFreeAdamW, dict(lr=1e-2)), 'sf_sgd': (ScheduleFreeSGD, dict(lr=0.1)),
            'prodigy': (Prodigy, dict(lr=1., d0=1e-3)), 'adopt': (ADOPT, dict(lr=1e-2)), 'ademamix': (AdEMAMix, dict(lr=1e-2))}

ZERO_KW = {'prodigy': dict(fsdp_in_use=True)}   # as prodigyopt: `d`'s sums over each rank's share of the params, summed over ranks

def _train_mode(opt):
    "Schedule-Free's protocol (as the `schedulefree` package's): `train()` before training steps."
    if hasattr(opt, 'train'): opt.train()

def reference(name, steps=STEPS, world=2) -> list:
    "One process, the whole batch; its gradient the mean of the `world` slices' gradients, as DDP forms it."
    f, kw = optimizers()[name]
    m = model(); opt = f(m.parameters(), **kw)
    _train_mode(opt)
    return mean_grad_fit(m, opt, steps, world)

def train_zero(name, rank, world, steps=STEPS) -> dict:
    "This rank's half of the batch under DDP + ZeRO, the optimizer given as torch's recipe gives it; the params and the group count."
    from torch.distributed.optim import ZeroRedundancyOptimizer
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    f, kw = optimizers()[name]
    m = model()
    net = torch.nn.parallel.DistributedDataParallel(m)
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=f, **kw, **ZERO_KW.get(name, {}))
    _train_mode(opt.optim)
    for _ in range(steps):
        opt.zero_grad(); loss_fn(net, x, y).backward(); opt.step()
    return {'params': [p.detach().clone() for p in m.parameters()], 'groups': [len(opt.param_groups), len(opt.optim.param_groups)]}

@exits_cleanly
def job(rank, world, init_file, out_file, names):
    "A rank: each optimizer under ZeRO ({name: result}); rank 0 saves them. An exception ends the job with its message (no barrier after it)."
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world, timeout=PG_TIMEOUT)
    torch.set_num_threads(1)
    res = {}
    try:
        for name in names:
            try: res[name] = train_zero(name, rank, world)
            except Exception as e: raise RuntimeError(f'rank {rank}, {name}: {type(e).__name__}: {e}') from e
        if rank == 0: torch.save(res, out_file)
    finally: dist.destroy_process_group()
