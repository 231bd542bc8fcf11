"""Worker code for tests/test_distributed.py: runs in each of 2 spawned `gloo` ranks on CPU (importable by name,
as `torch.multiprocessing` spawn needs)."""
import os, sys, traceback
import torch, torch.distributed as dist

N_ROWS, N_IN, N_HID, N_OUT, STEPS = 32, 6, 8, 3, 5

def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, N_IN, generator=g), torch.randint(0, N_OUT, (N_ROWS,), generator=g)

def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.Tanh(), torch.nn.Linear(N_HID, N_OUT))

def loss_fn(m, x, y): return torch.nn.functional.cross_entropy(m(x), y)

def optimizers():
    "name -> opt_func(params): every fastopts optimizer (one hyper set each)."
    from fastopts.optimizer import SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion, Lookahead
    return {'sgd_mom': lambda ps: SGD(ps, lr=0.1, mom=0.9), 'momentum': lambda ps: Momentum(ps, lr=0.1),
            'rmsprop': lambda ps: RMSProp(ps, lr=1e-2, mom=0.5), 'adam': lambda ps: Adam(ps, lr=1e-2),
            'adamw': lambda ps: AdamW(ps, lr=1e-2, wd=0.1), 'radam': lambda ps: RAdam(ps, lr=1e-2),
            'lamb': lambda ps: Lamb(ps, lr=1e-2, wd=0.1), 'lion': lambda ps: Lion(ps, lr=1e-3, wd=0.1),
            'lookahead': lambda ps: Lookahead(RAdam(ps, lr=1e-2), k=2)}

def reference(name, steps=STEPS):
    "One process, the whole batch."
    m = model(); opt = optimizers()[name](list(m.parameters()))
    x, y = data()
    for _ in range(steps):
        opt.zero_grad(); loss_fn(m, x, y).backward(); opt.step()
    return [p.detach().clone() for p in m.parameters()]

def _full(p):
    from torch.distributed.tensor import DTensor
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()

def train(mode, name, rank, world, steps=STEPS):
    "The same training in this rank: its half of the batch, gradients averaged by `mode`."
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    m, make = model(), optimizers()[name]
    if mode == 'ddp':
        net = torch.nn.parallel.DistributedDataParallel(m); opt = make(list(net.parameters()))
    elif mode == 'zero':
        from torch.distributed.optim import ZeroRedundancyOptimizer
        net = torch.nn.parallel.DistributedDataParallel(m)
        opt = ZeroRedundancyOptimizer(list(net.parameters()), optimizer_class=lambda ps, **kw: make(ps))
    elif mode == 'fsdp2':
        from torch.distributed.fsdp import fully_shard
        for layer in m:
            if isinstance(layer, torch.nn.Linear): fully_shard(layer)
        net = fully_shard(m); opt = make(list(net.parameters()))
    for _ in range(steps):
        opt.zero_grad(); loss_fn(net, x, y).backward(); opt.step()
    return [_full(p) for p in m.parameters()]

def job(rank, world, init_file, out_file, mode, names):
    "Entry point of a rank: train each named optimizer in `mode`, rank 0 saves {name: params or error text}."
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = {}
    try:
        for name in names:
            try: res[name] = train(mode, name, rank, world)
            except Exception as e: res[name] = f'{type(e).__name__}: {e}'
            dist.barrier()
        if rank == 0: torch.save(res, out_file)
    finally: dist.destroy_process_group()

def _clone(tree):
    from torch.utils._pytree import tree_map
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)

def ckpt_job(rank, world, init_file, out_file, names):
    """FSDP2: train 3 steps, save model and optimizer with torch's distributed-checkpoint helpers, train 3 more;
    a fresh model and optimizer loaded from the save must take the same 3 steps."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    def build(name):
        m = model()
        for layer in m:
            if isinstance(layer, torch.nn.Linear): fully_shard(layer)
        fully_shard(m)
        return m, optimizers()[name](list(m.parameters()))
    def steps(m, opt, n):
        for _ in range(n): opt.zero_grad(); loss_fn(m, x, y).backward(); opt.step()
    res = {}
    try:
        for name in names:
            try:
                m1, o1 = build(name); steps(m1, o1, 3)
                msd, osd = _clone(get_model_state_dict(m1)), _clone(get_optimizer_state_dict(m1, o1))
                steps(m1, o1, 3)
                m2, o2 = build(name)
                set_model_state_dict(m2, msd); set_optimizer_state_dict(m2, o2, osd)
                steps(m2, o2, 3)
                res[name] = ([_full(p) for p in m1.parameters()], [_full(p) for p in m2.parameters()])
            except Exception as e: res[name] = f'{type(e).__name__}: {e}'
            dist.barrier()
        if rank == 0: torch.save(res, out_file)
    finally: dist.destroy_process_group()

def learner(rank=None, world=1, n_acc=0):
    """A fastai Learner on 64 rows, fastopts Adam, fastopts' OneCycle and StepDecay... as callbacks. With `rank`: the
    model wrapped in DDP and this rank's half of every global batch of 8 (no shuffling, so one process with bs 8
    sees the same batches)."""
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.callback.training import GradientAccumulation
    from fastopts.data import XYDataset
    from fastopts.optimizer import Adam
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, N_IN, generator=g), torch.randint(0, N_OUT, (64,), generator=g)
    bs = 8 // world
    if rank is not None:   # rank r: rows [8k + r*bs, 8k + (r+1)*bs) of each global batch k
        idx = torch.cat([torch.arange(8*k + rank*bs, 8*k + (rank+1)*bs) for k in range(8)])
        x, y = x[idx], y[idx]
    dls = DataLoaders(DataLoader(XYDataset(x, y), bs=bs, shuffle=False, drop_last=True),
                      DataLoader(XYDataset(x[:16], y[:16]), bs=bs, shuffle=False))
    m = model()
    net = m if rank is None else torch.nn.parallel.DistributedDataParallel(m)
    cbs = [GradientAccumulation(n_acc // world)] if n_acc else []
    return Learner(dls, net, opt_func=Adam, cbs=cbs), m

def fit_record(learn, m):
    from fastopts.schedule import OneCycle
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2, cbs=OneCycle())
    return dict(lrs=[float(v) for v in learn.recorder.lrs], moms=[float(v) for v in learn.recorder.moms],
                weights=[p.detach().clone() for p in m.parameters()])

def learner_job(rank, world, init_file, out_file, n_acc):
    "A fastai Learner per rank (model in DDP, data sharded by hand: fastai's launcher needs CUDA), each rank saves."
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        learn, m = learner(rank, world, n_acc)
        torch.save(fit_record(learn, m), f'{out_file}.{rank}')
    finally: dist.destroy_process_group()
