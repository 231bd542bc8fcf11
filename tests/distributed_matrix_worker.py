"""Worker code for tests/test_distributed_matrix.py: Muon, SOAP and Adafactor in 2 spawned `gloo` ranks on CPU, with
the model, data and rank helpers of tests/distributed_worker.py."""
import torch, torch.distributed as dist
from distributed_worker import train_all, N_ROWS, N_IN, N_HID, N_OUT, STEPS, exits_cleanly, data, loss_fn, _full

def model(bias=True, square=False):
    """The MLP of distributed_worker (biases optional); `square`: 6 x 6 weights. SOAP's factors of a non-square gradient are
    rank-deficient, and the eigenvectors of their null space (which Adam's per-coordinate scaling then sees) are picked by
    last-bit rounding, which differs between 2 ranks' averaged gradients and one process's: square weights have none.
    (Cross-entropy's output gradient sums to 0 over the classes, so the output layer's factor keeps one null direction,
    along which the gradient is rounding noise: SOAP's `eps` is raised above it in `optimizers`.)"""
    torch.manual_seed(1)
    hid, out = (N_IN, N_IN) if square else (N_HID, N_OUT)
    return torch.nn.Sequential(torch.nn.Linear(N_IN, hid, bias=bias), torch.nn.Tanh(), torch.nn.Linear(hid, out, bias=bias))

def optimizers():
    "name -> (opt_func(params), `model` keywords). Muon's Newton-Schulz in float32: the ranks' averaged gradients differ from one process's in the last bits, which bfloat16 rounding would magnify."
    from fastopts.matrix import Muon, SOAP, Adafactor
    return {'muon': (lambda ps: Muon(ps, lr=0.05, ns_dtype=torch.float32, adamw_lr_ratio=0.1), dict(bias=MUON_BIAS)),
            'muon_nesterov_off': (lambda ps: Muon(ps, lr=0.05, nesterov=False, adjust_lr_fn='match_rms_adamw', ns_dtype=torch.float32, adamw_lr_ratio=0.1), dict(bias=MUON_BIAS)),
            'soap': (lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=2, eps=1e-4), dict(square=True)),
            'adafactor': (lambda ps: Adafactor(ps, lr=1e-2, weight_decay=0.1), {})}

MUON_BIAS = True   # the hybrid: weights take Muon, biases AdamW

def reference(name, steps=STEPS, world=2):
    """One process, the whole batch, its gradient the mean of the `world` slices' gradients as DDP forms it. (Muon and
    SOAP magnify the last bits in which that mean differs from the whole batch's gradient: after 5 steps 2.3e-6 and
    2.4e-5 apart, Adafactor 1.5e-8.)"""
    make, kw = optimizers()[name]
    m = model(**kw)
    return mean_grad_fit(m, make(list(m.parameters())), steps, world)

def mean_grad_fit(m, opt, steps, world) -> list:
    "`steps` of `opt` on `m` with the whole batch, its gradient the mean of the `world` slices' gradients; the params."
    x, y = data()
    per = N_ROWS // world
    for _ in range(steps):
        opt.zero_grad()
        for r in range(world): (loss_fn(m, x[r*per:(r+1)*per], y[r*per:(r+1)*per])/world).backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]

def train(mode, name, rank, world, steps=STEPS):
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    make, kw = optimizers()[name]
    m = model(**kw)
    if mode == 'ddp':
        net = torch.nn.parallel.DistributedDataParallel(m); opt = make(list(net.parameters()))
    elif mode == 'zero':
        from torch.distributed.optim import ZeroRedundancyOptimizer
        net = torch.nn.parallel.DistributedDataParallel(m)
        # the model's params as they are: each rank's optimizer keeps ZeRO's groups (Muon routes inside them)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=lambda ps, **kw: make(ps))
    elif mode == 'fsdp2':
        from torch.distributed.fsdp import fully_shard
        for layer in m:
            if isinstance(layer, torch.nn.Linear): fully_shard(layer)
        net = fully_shard(m); opt = make(list(net.named_parameters()))   # named: a refusal names the parameter
    for _ in range(steps):
        opt.zero_grad(); loss_fn(net, x, y).backward(); opt.step()
    return [_full(p) for p in m.parameters()]

@exits_cleanly
def job(rank, world, init_file, out_file, modes, names, refusals):
    "Entry point of a rank: train each named optimizer in each mode, rank 0 saves {'mode name': params, or the expected refusal's text}."
    res = train_all(rank, world, init_file, train, modes, names, key=lambda mode, name: f'{mode} {name}', refusals=refusals)
    if rank == 0: torch.save(res, out_file)

# Muon under ZeroRedundancyOptimizer given plain `model.parameters()` (not `muon_groups`): a 3-layer MLP with biases
MUON_KW = dict(lr=0.05, ns_dtype=torch.float32, adamw_lr_ratio=0.1)

def mlp3():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.Tanh(), torch.nn.Linear(N_HID, N_HID), torch.nn.Tanh(),
                               torch.nn.Linear(N_HID, N_OUT))

def muon_zero_reference(steps=STEPS, world=2):
    "One process, the whole batch as `world` slices' mean gradient (as DDP forms it)."
    from fastopts.matrix import Muon
    m = mlp3()
    return mean_grad_fit(m, Muon(m.parameters(), **MUON_KW), steps, world)

@exits_cleanly
def muon_zero_job(rank, world, init_file, out_file, steps=STEPS):
    "`ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Muon, ...)` on a DDP MLP; rank 0 saves the params."
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from fastopts.matrix import Muon
    from distributed_worker import init_group
    init_group(rank, world, init_file)
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    m = mlp3(); net = torch.nn.parallel.DistributedDataParallel(m)
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=Muon, **MUON_KW)
    for _ in range(steps):
        opt.zero_grad(); loss_fn(net, x, y).backward(); opt.step()
    if rank == 0: torch.save([p.detach().clone() for p in m.parameters()], out_file)
    dist.destroy_process_group()
