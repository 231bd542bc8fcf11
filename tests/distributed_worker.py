"""Worker code for tests/test_distributed.py: runs in each of 2 spawned `gloo` ranks on CPU (importable by name,
as `torch.multiprocessing` spawn needs)."""
import functools, os, sys, traceback
import torch, torch.distributed as dist

N_ROWS, N_IN, N_HID, N_OUT, STEPS = 32, 6, 8, 3, 5

def exits_cleanly(job):
    """A rank's entry point that ends with `os._exit(0)` once its work is done and saved: the normal `sys.exit` of a
    spawned process runs the interpreter's finalisation, where gloo's C++ worker threads are sometimes still
    joinable and the process aborts ("terminate called without an active exception", SIGABRT) after it finished
    its work. An exception still propagates, so spawn reports it with its traceback."""
    @functools.wraps(job)
    def run(*args):
        job(*args)
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
    return run

COLLECTIVE_TIMEOUT = 90   # seconds a collective waits for a rank that never joins (then it raises): under the test's own timeout

def init_group(rank, world, init_file):
    "Join the 2-rank gloo group with a collective timeout (a rank that fails alone ends the job, not a wait forever), one torch thread."
    from datetime import timedelta
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    torch.set_num_threads(1)

def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, N_IN, generator=g), torch.randint(0, N_OUT, (N_ROWS,), generator=g)

def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.Tanh(), torch.nn.Linear(N_HID, N_OUT))

def loss_fn(m, x, y): return torch.nn.functional.cross_entropy(m(x), y)

def optimizers():
    "name -> opt_func(params): every fastopts optimizer (one hyper set each)."
    from fastopts.optimizer import SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion
    from fastopts.lookahead import Lookahead
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

def train_all(rank, world, init_file, train, modes, names, key=lambda mode, name: name, refusals=None) -> dict:
    """Join the gloo group, train each of `names` in each of `modes` ({key: params}), leave the group. An exception ends
    the job at once with its message (spawn reports it and stops the other rank, which may be waiting in a collective:
    a barrier after it would hang). Only an expected refusal, `refusals[key]` in its message, is kept as the key's
    result (text) and the job goes on: a refusal at construction, raised on every rank alike before any collective."""
    init_group(rank, world, init_file)
    res = {}
    try:
        for mode in modes:
            for name in names:
                k = key(mode, name)
                try: res[k] = train(mode, name, rank, world)
                except Exception as e:
                    msg = f'{type(e).__name__}: {e}'
                    if refusals and k in refusals and refusals[k] in msg: res[k] = msg; continue
                    raise RuntimeError(f'rank {rank}, {k}: {msg}') from e
    finally: dist.destroy_process_group()
    return res

@exits_cleanly
def job(rank, world, init_file, out_file, mode, names):
    "Entry point of a rank: train each named optimizer in `mode`, rank 0 saves {name: params or error text}."
    res = train_all(rank, world, init_file, train, [mode], names)
    if rank == 0: torch.save(res, out_file)

def _clone(tree):
    from torch.utils._pytree import tree_map
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)

@exits_cleanly
def ckpt_job(rank, world, init_file, out_file, names):
    """FSDP2: train 3 steps, save model and optimizer with torch's distributed-checkpoint helpers, train 3 more;
    a fresh model and optimizer loaded from the save must take the same 3 steps."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    init_group(rank, world, init_file)
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
        for name in names:   # an exception ends the job with its message (no barrier after it: the other rank may be in a collective)
            try:
                m1, o1 = build(name); steps(m1, o1, 3)
                msd, osd = _clone(get_model_state_dict(m1)), _clone(get_optimizer_state_dict(m1, o1))
                steps(m1, o1, 3)
                m2, o2 = build(name)
                set_model_state_dict(m2, msd); set_optimizer_state_dict(m2, o2, osd)
                steps(m2, o2, 3)
            except Exception as e: raise RuntimeError(f'rank {rank}, {name}: {type(e).__name__}: {e}') from e
            res[name] = ([_full(p) for p in m1.parameters()], [_full(p) for p in m2.parameters()])
        if rank == 0: torch.save(res, out_file)
    finally: dist.destroy_process_group()

def sharded_dls(rank=None, world=1):
    """DataLoaders on 64 rows in global batches of 8; with `rank`: this rank's half of every global batch (no shuffling,
    so one process with bs 8 sees the same batches)."""
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastopts.data import XYDataset
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, N_IN, generator=g), torch.randint(0, N_OUT, (64,), generator=g)
    bs = 8 // world
    if rank is not None:   # rank r: rows [8k + r*bs, 8k + (r+1)*bs) of each global batch k
        idx = torch.cat([torch.arange(8*k + rank*bs, 8*k + (rank+1)*bs) for k in range(8)])
        x, y = x[idx], y[idx]
    return DataLoaders(DataLoader(XYDataset(x, y), bs=bs, shuffle=False, drop_last=True),
                       DataLoader(XYDataset(x[:16], y[:16]), bs=bs, shuffle=False))

def learner(rank=None, world=1, n_acc=0):
    """A fastai Learner on `sharded_dls`, fastopts Adam, fastopts' OneCycle and StepDecay... as callbacks. With `rank`:
    the model wrapped in DDP and this rank's half of every global batch."""
    from fastai.learner import Learner
    import fastai.callback.progress, fastai.callback.schedule, fastopts.lr_finder  # noqa: F401 (no_bar, fit_one_cycle, find_lr)
    from fastai.callback.training import GradientAccumulation
    from fastopts.optimizer import Adam
    m = model()
    net = m if rank is None else torch.nn.parallel.DistributedDataParallel(m)
    cbs = [GradientAccumulation(n_acc // world)] if n_acc else []
    return Learner(sharded_dls(rank, world), net, opt_func=Adam, cbs=cbs), m

def fit_record(learn, m):
    from fastopts.schedule import OneCycle
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2, cbs=OneCycle())
    return dict(lrs=[float(v) for v in learn.recorder.lrs], moms=[float(v) for v in learn.recorder.moms],
                weights=[p.detach().clone() for p in m.parameters()])

@exits_cleanly
def learner_job(rank, world, init_file, out_file, n_acc):
    "A fastai Learner per rank (model in DDP, data sharded by hand: fastai's launcher needs CUDA), each rank saves."
    init_group(rank, world, init_file)
    try:
        learn, m = learner(rank, world, n_acc)
        torch.save(fit_record(learn, m), f'{out_file}.{rank}')
    finally: dist.destroy_process_group()

def lr_learner(rank, world, n_batches=6):
    """A Learner per rank on its own data (different seeds: the ranks' losses differ on purpose), model in DDP."""
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    import fastai.callback.progress, fastai.callback.schedule, fastopts.lr_finder  # noqa: F401 (no_bar, fit_one_cycle, find_lr)
    from fastopts.data import XYDataset
    from fastopts.optimizer import Adam
    g = torch.Generator().manual_seed(10 + rank)
    n = 8 * n_batches
    x, y = torch.randn(n, N_IN, generator=g) * (1 + 29 * rank), torch.randint(0, N_OUT, (n,), generator=g)   # rank 1 diverges first
    dls = DataLoaders(DataLoader(XYDataset(x, y), bs=8, shuffle=True, drop_last=True),
                      DataLoader(XYDataset(x[:16], y[:16]), bs=8, shuffle=False))
    net = torch.nn.parallel.DistributedDataParallel(model())
    return Learner(dls, net, opt_func=Adam)

def _state(learn):
    w = [p.detach().clone() for p in learn.model.parameters()]
    st = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in learn.opt.state[p].items()}
          for i, p in enumerate(learn.model.parameters()) if p in learn.opt.state}
    return w, st, [dict(h) for h in learn.opt.hypers]

@exits_cleanly
def find_lr_job(rank, world, init_file, out_file, epochs):
    """find_lr (with trials if `epochs`) under DDP on ranks whose losses differ; then fit_one_cycle. Also the same
    fit without find_lr, and a rank with one batch fewer (which must fail on both ranks, not hang)."""
    import warnings
    from fastai.torch_core import set_seed
    init_group(rank, world, init_file)
    out = {}
    try:
        def fit(find):
            set_seed(0, reproducible=True)
            learn = lr_learner(rank, world)
            with learn.no_bar(), learn.no_logging():
                learn.fit(1, 1e-3)                         # a warm optimizer: state to restore
                if find:
                    before = _state(learn)
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore')
                        res = learn.find_lr(epochs=epochs, show_plot=False)
                    after = _state(learn)
                    out.update(suggested=res.suggested, n_sweep=len(res.lrs), restored=all(
                        torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[2] == after[2] and all(
                        all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(before[1][i].values(), after[1][i].values()))
                        for i in before[1]))
                learn.fit_one_cycle(1, 1e-2)
            return [p.detach().clone() for p in learn.model.parameters()]
        out['with_find'], out['without'] = fit(True), fit(False)
        learn = lr_learner(rank, world, n_batches=6 - rank)   # rank 1 has one batch fewer
        try: learn.find_lr(show_plot=False); out['mismatch'] = 'no error'
        except ValueError as e: out['mismatch'] = str(e)
        torch.save(out, f'{out_file}.{rank}')
    finally: dist.destroy_process_group()

@exits_cleanly
def fail_alone_job(rank, world, init_file):
    "For the harness's own test: rank 1 raises while rank 0 waits in an all-reduce that rank 1 never joins."
    init_group(rank, world, init_file)
    if rank == 1: raise ValueError('rank 1 fails alone')   # no barrier, no clean-up collective: the job ends here
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()

def run_code(code:str, out_file:str):
    "A process's entry point for tests/test_capabilities.py: run the Python source `code`, its stdout (or, if it raises, its traceback) into `out_file`."
    import contextlib, traceback
    with open(out_file, 'w') as f:
        try:
            with contextlib.redirect_stdout(f): exec(compile(code, '<one rank>', 'exec'), {'__name__': '__main__'})
        except BaseException:
            f.write(traceback.format_exc()); f.flush(); os._exit(1)
        f.flush()
    os._exit(0)   # as `exits_cleanly`: no interpreter finalisation beside gloo's threads

def abort_job(rank, world, init_file, marker, times):
    "For the harness's own test: rank 1 aborts (SIGABRT, as gloo's threads once did) on its first `times` runs."
    import pathlib
    m = pathlib.Path(f'{marker}.{rank}')
    n = int(m.read_text()) if m.exists() else 0
    m.write_text(str(n + 1))
    if rank == 1 and n < times: os.abort()
