"""Worker code for tests/test_distributed_lr_free.py: Schedule-Free, Prodigy, ADOPT and AdEMAMix in each of 2
spawned `gloo` ranks on CPU, under DDP and ZeroRedundancyOptimizer (the model, data and loss of distributed_worker)."""
import torch, torch.distributed as dist
from distributed_worker import train_all, exits_cleanly, data, model, loss_fn, N_ROWS, STEPS

def optimizers(sharded=False):
    "name -> opt_func(params); `sharded`: the local optimizer of ZeRO (Prodigy then all-reduces d's sums)."
    from fastopts.lr_free import ScheduleFreeAdamW, ScheduleFreeSGD, Prodigy, ADOPT, AdEMAMix
    return {'sf_adamw': lambda ps: ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=2, weight_decay=0.01),
            'sf_sgd': lambda ps: ScheduleFreeSGD(ps, lr=0.1),
            'prodigy': lambda ps: Prodigy(ps, d0=1e-3, fsdp_in_use=sharded),
            'adopt': lambda ps: ADOPT(ps, lr=1e-2), 'ademamix': lambda ps: AdEMAMix(ps, lr=1e-2, alpha_warmup=3)}

def _run(net, opt, x, y, set_mode=None):
    "STEPS steps; returns (params after training, params in eval mode, Prodigy's d or None)."
    from fastopts.lr_free import set_schedule_free_mode, ProdigyOptimizer
    inner = getattr(opt, 'optim', opt)
    modal = hasattr(inner, 'train_mode')
    if modal: set_schedule_free_mode(opt, True)
    for _ in range(STEPS):
        opt.zero_grad(); loss_fn(net, x, y).backward(); opt.step()
    m = getattr(net, 'module', net)
    trained = [p.detach().clone() for p in m.parameters()]
    if modal: set_schedule_free_mode(opt, False)
    evald = [p.detach().clone() for p in m.parameters()]
    return trained, evald, (inner.d if isinstance(inner, ProdigyOptimizer) else None)

def reference(name):
    "One process, the whole batch."
    m = model(); x, y = data()
    return _run(m, optimizers()[name](list(m.parameters())), x, y)

def train(mode, name, rank, world):
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    net = torch.nn.parallel.DistributedDataParallel(model())
    if mode == 'ddp': opt = optimizers()[name](list(net.parameters()))
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        make = optimizers(sharded=True)[name]
        opt = ZeroRedundancyOptimizer(list(net.parameters()), optimizer_class=lambda ps, **kw: make(ps))
        assert len(opt.optim.param_groups[0]['params']) < len(list(net.parameters()))   # a shard
    return _run(net, opt, x, y)

@exits_cleanly
def job(rank, world, init_file, out_file, modes, names):
    "Entry point of a rank: train each named optimizer in each mode; every rank saves {'mode/name': result or error text}."
    res = train_all(rank, world, init_file, train, modes, names, key=lambda mode, name: f'{mode}/{name}')
    torch.save(res, f'{out_file}.{rank}')
