"""Worker code for tests/test_owners.py: owner-based Muon in 2 spawned `gloo` ranks on CPU (DDP, FSDP2, a fastai Learner
under DDP). A rank's exception is not caught (no barrier, no `destroy_process_group` after it, either of which could wait on
the other rank): it ends the rank with its message, and the harness ends the job."""
import functools
from datetime import timedelta
import torch, torch.distributed as dist
from distributed_worker import exits_cleanly, loss_fn, _full, N_IN, N_OUT

N_ROWS, STEPS, TIMEOUT_S = 32, 3, 60
WIDTHS = [N_IN, 16, 16, 16, 24, N_OUT]   # matrices 16x6, 16x16, 16x16, 24x16, 3x24: owners get 3 and 2 of them

def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, N_IN, generator=g), torch.randint(0, N_OUT, (N_ROWS,), generator=g)

def model():
    torch.manual_seed(1)
    layers = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]): layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])

def n_matrices(m=None): return sum(p.ndim == 2 for p in (m or model()).parameters())

def muon(ps, lr=0.05, ns_dtype=torch.float32, **kw):
    from fastopts.matrix import Muon
    return Muon(ps, lr=lr, ns_dtype=ns_dtype, adamw_lr_ratio=0.1, **kw)

def reference(steps=STEPS, world=2, ns_dtype=torch.float32):
    "One process, the whole batch, its gradient the mean of the `world` slices' gradients as DDP forms it."
    m = model(); opt = muon(list(m.parameters()), ns_dtype=ns_dtype)
    x, y = data(); per = N_ROWS // world
    for _ in range(steps):
        opt.zero_grad()
        for r in range(world): (loss_fn(m, x[r*per:(r+1)*per], y[r*per:(r+1)*per])/world).backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]

class Counter:
    "Counts the matrices `fastopts.matrix.newton_schulz` is given, the largest batch, and calls of `DTensor.full_tensor`."
    def __init__(self):
        import fastopts.matrix as fm
        from torch.distributed.tensor import DTensor
        self.matrices, self.largest, self.gathers, ns, full = 0, 0, 0, fm.newton_schulz, DTensor.full_tensor
        def counted_ns(X, *a, **kw):
            self.matrices += X.shape[0]; self.largest = max(self.largest, X.numel()); return ns(X, *a, **kw)
        def counted_full(t, *a, **kw):
            self.gathers += 1; return full(t, *a, **kw)
        fm.newton_schulz, DTensor.full_tensor = counted_ns, counted_full
    def read(self): return dict(matrices=self.matrices, largest=self.largest, gathers=self.gathers)

def train(mode, rank, world, owners=None, ns_dtype=torch.float32):
    "STEPS steps of this rank's half of the batch; (params, Newton-Schulz counts, owner stats)."
    from fastopts.owners import OWNER_STATS
    x, y = data(); per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    m = model()
    if mode == 'ddp': net = torch.nn.parallel.DistributedDataParallel(m)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in m:
            if isinstance(layer, torch.nn.Linear): fully_shard(layer)
        net = fully_shard(m)
    opt = muon(list(net.parameters()), ns_dtype=ns_dtype, owners=owners)
    counter = Counter(); OWNER_STATS.clear()
    for _ in range(STEPS): opt.zero_grad(); loss_fn(net, x, y).backward(); opt.step()
    counts = counter.read()
    return [_full(p) for p in m.parameters()], counts, dict(OWNER_STATS)

def _muon_bf16(ps): return muon(ps, ns_dtype=torch.bfloat16)

def _adafactor(ps):
    from fastopts.matrix import Adafactor
    return Adafactor(ps, **ADAFACTOR)

def resume(rank, world, make=_muon_bf16, dtype=torch.float32, net=None, to_disk=None):
    """FSDP2 (`make`: owner-based Muon, or Adafactor): 2 steps, save model and optimizer with torch's distributed-checkpoint helpers, 2 more; a fresh model
    and optimizer loaded from the save take the same 2 steps. `to_disk` (a directory): through `dcp.save` and `dcp.load`
    there, into the fresh optimizer's own state dict, as a job resumes. (params straight, params resumed)"""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from distributed_worker import _clone
    x, y = data(); per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per].to(dtype), y[rank*per:(rank+1)*per]
    def build():
        m = (net or (af_model if make is _adafactor else model))().to(dtype)
        for layer in m:
            if isinstance(layer, (torch.nn.Linear, Mix3)): fully_shard(layer)
        fully_shard(m)
        return m, make(list(m.parameters()))
    def steps(m, opt, n):
        for _ in range(n): opt.zero_grad(); loss_fn(m, x, y).backward(); opt.step()
    m1, o1 = build(); steps(m1, o1, 2)
    msd, osd = _clone(get_model_state_dict(m1)), _clone(get_optimizer_state_dict(m1, o1))
    steps(m1, o1, 2)
    m2, o2 = build()
    if to_disk:
        import torch.distributed.checkpoint as dcp
        dcp.save({'model': msd, 'optim': osd}, checkpoint_id=to_disk)
        msd, osd = get_model_state_dict(m2), get_optimizer_state_dict(m2, o2)
        dcp.load({'model': msd, 'optim': osd}, checkpoint_id=to_disk)
    set_model_state_dict(m2, msd); set_optimizer_state_dict(m2, o2, osd)
    steps(m2, o2, 2)
    return [_full(p) for p in m1.parameters()], [_full(p) for p in m2.parameters()]

ADAFACTOR = dict(lr=0.05, weight_decay=0.1)   # torch.optim.Adafactor's keywords, which fastopts' Adafactor takes too

class Mix3(torch.nn.Module):
    "A layer with a 3-D weight (out x 4 x 4) on 16 features: under FSDP2 only its leading dim is split."
    def __init__(self, n_out):
        super().__init__(); self.weight = torch.nn.Parameter(torch.randn(n_out, 4, 4) / 4)
    def forward(self, x): return torch.einsum('oij,bij->bo', self.weight, x.view(-1, 4, 4))

def af_model():
    "The first three layers of `model`, a 3-D weight (5 x 4 x 4: split 3 and 2 rows) and a 3 x 5 head (2 and 1 rows), in float64."
    m = model()
    torch.manual_seed(2)
    return torch.nn.Sequential(*m[:-3], Mix3(5), torch.nn.Tanh(), torch.nn.Linear(5, N_OUT)).double()

def adafactor_reference(steps=STEPS, world=2):
    "torch.optim.Adafactor in one process on the whole batch (float64), its gradient the mean of the `world` slices' as FSDP2's."
    m = af_model()
    return whole_batch(m, torch.optim.Adafactor(m.parameters(), **ADAFACTOR), steps, world)

def whole_batch(m, opt, steps, world):
    "`steps` of `opt` on `m` (float64) with the whole batch, its gradient the mean of the `world` slices' as FSDP2's; the params."
    x, y = data(); x = x.double(); per = N_ROWS // world
    for _ in range(steps):
        opt.zero_grad()
        for r in range(world): (loss_fn(m, x[r*per:(r+1)*per], y[r*per:(r+1)*per])/world).backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]

def adafactor_fsdp2(rank, world, steps=STEPS):
    "fastopts' Adafactor on FSDP2 shards of rows (`af_model`: float64, uneven shards, a 3-D weight): the whole params."
    return fsdp2_run(rank, world, _adafactor, steps)[0]

PRODIGY = dict(lr=1.0, weight_decay=0.1, d0=1e-2, d_coef=5.0)   # prodigyopt's keywords, which fastopts' Prodigy takes too

def _prodigy(slice_p):
    def make(ps):
        from fastopts.lr_free import Prodigy
        return Prodigy(ps, slice_p=slice_p, **PRODIGY)
    return make

def prodigy_reference(slice_p, steps=STEPS, world=2):
    "prodigyopt.Prodigy in one process on the whole batch (`af_model`, float64), its gradient the mean of the `world` slices'."
    import prodigyopt
    m = af_model(); opt = prodigyopt.Prodigy(m.parameters(), slice_p=slice_p, **PRODIGY)
    return whole_batch(m, opt, steps, world), opt.param_groups[0]['d']

def fsdp2_run(rank, world, make, steps=STEPS):
    "`make`'s optimizer on FSDP2 shards of rows of `af_model` (float64, uneven shards, a 3-D weight): the whole params, the optimizer."
    from torch.distributed.fsdp import fully_shard
    x, y = data(); per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per].double(), y[rank*per:(rank+1)*per]
    m = af_model()
    for layer in m:
        if isinstance(layer, (torch.nn.Linear, Mix3)): fully_shard(layer)
    fully_shard(m)
    opt = make(list(m.parameters()))
    for _ in range(steps): opt.zero_grad(); loss_fn(m, x, y).backward(); opt.step()
    return [_full(p) for p in m.parameters()], opt

def prodigy_fsdp2(rank, world):
    "Prodigy under FSDP2 at slice_p 1 and 3 (params, d), and a DCP resume at each (params straight, resumed)."
    out = {}
    for sp in (1, 3):
        ps, opt = fsdp2_run(rank, world, _prodigy(sp))
        out[f'fsdp2_prodigy_{sp}'] = (ps, opt.d)
        out[f'fsdp2_prodigy_{sp}_resume'] = resume(rank, world, _prodigy(sp), torch.float64, net=af_model)
    return out

SOAP_KW = dict(lr=0.02, weight_decay=0.1, precondition_frequency=2)   # the authors' keywords; bases refreshed at steps 2 and 4
SOAP_STEPS = 5   # the first builds the factors, then 4 that move the weights

def _soap(**kw):
    def make(ps):
        from fastopts.soap import SOAP
        return SOAP(ps, **SOAP_KW, **kw)
    return make

def soap_reference(steps=SOAP_STEPS, world=2):
    "fastopts' SOAP (tested against the authors' rule) in one process on the whole batch (`af_model`, float64)."
    m = af_model()
    return whole_batch(m, _soap()(list(m.parameters())), steps, world)

def soap_fsdp2(rank, world, ckpt_dir):
    "SOAP under FSDP2 with owners (params, owner stats, gathers) and without (params, gathers); a DCP resume with owners through `ckpt_dir`."
    from fastopts.owners import OWNER_STATS
    counter = Counter(); OWNER_STATS.clear()
    ps, opt = fsdp2_run(rank, world, _soap(), steps=SOAP_STEPS)
    owned = dict(OWNER_STATS); gathers = counter.read()['gathers']
    off, _ = fsdp2_run(rank, world, _soap(owners=False), steps=SOAP_STEPS)
    return {'fsdp2_soap': (ps, owned, gathers, counter.read()['gathers'] - gathers), 'fsdp2_soap_off': off,
            'fsdp2_soap_resume': resume(rank, world, _soap(), torch.float64, net=af_model, to_disk=ckpt_dir)}

def _two_dtypes(k:int) -> list:
    "The params (`k` -1) or step `k`'s gradients of `soap_two_dtypes`: a 5x4 float32 and a 3x6 float64 matrix (uneven shards)."
    torch.manual_seed(10 + k)
    return [torch.randn(5, 4), torch.randn(3, 6, dtype=torch.float64)]

def soap_two_dtypes(rank=None, world=2, steps=SOAP_STEPS):
    """SOAP with owners on one group of FSDP2 shards of rows in two dtypes, the same gradients on every rank (`rank` None:
    one process on whole tensors, the reference): the whole params. The optimizer hands the callback one dtype at a time."""
    from torch.distributed.tensor import distribute_tensor, Shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = None if rank is None else init_device_mesh('cpu', (world,))
    as_p = (lambda t: t) if mesh is None else (lambda t: distribute_tensor(t, mesh, [Shard(0)]))
    ps = [torch.nn.Parameter(as_p(t)) for t in _two_dtypes(-1)]
    opt = _soap()(ps)
    assert (getattr(opt.chains['default'].cbs[0], 'keywords', {}).get('owners') is not None) == (mesh is not None)   # owners under FSDP2
    for k in range(steps):
        for p, g in zip(ps, _two_dtypes(k)): p.grad = as_p(g)
        opt.step()
    return [_full(p).detach() for p in ps]

@exits_cleanly
def adafactor_job(rank, world, init_file, out_file):
    "Adafactor under FSDP2 alone (the module's `job` runs it too)."
    _join(rank, world, init_file)
    torch.save({'fsdp2_adafactor': adafactor_fsdp2(rank, world), 'fsdp2_adafactor_resume': resume(rank, world, _adafactor, torch.float64)},
               f'{out_file}.{rank}')
    dist.destroy_process_group()   # not in a `finally`: after an exception it could wait on the other rank

def _join(rank, world, init_file, timeout=TIMEOUT_S):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    torch.set_num_threads(1)

@exits_cleanly
def job(rank, world, init_file, out_file):
    "DDP (float32 against one process; bf16 owners against bf16 without owners) and FSDP2; each rank saves its results."
    _join(rank, world, init_file)
    res = {'ddp': train('ddp', rank, world), 'ddp_bf16': train('ddp', rank, world, ns_dtype=torch.bfloat16),
           'ddp_bf16_off': train('ddp', rank, world, owners=False, ns_dtype=torch.bfloat16),
           'fsdp2': train('fsdp2', rank, world), 'fsdp2_off': train('fsdp2', rank, world, owners=False),
           'fsdp2_resume': resume(rank, world), 'fsdp2_adafactor': adafactor_fsdp2(rank, world),
           'fsdp2_adafactor_resume': resume(rank, world, _adafactor, torch.float64), **prodigy_fsdp2(rank, world), **soap_fsdp2(rank, world, f'{out_file}.soap_ckpt'),
           'fsdp2_soap_two_dtypes': soap_two_dtypes(rank, world)}
    torch.save(res, f'{out_file}.{rank}')
    dist.destroy_process_group()   # not in a `finally`: after an exception it could wait on the other rank

def learner(rank=None, world=1):
    "A fastai Learner with Muon on distributed_worker's `sharded_dls`; with `rank`: the model in DDP and this rank's half of each batch."
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401 (no_bar)
    from distributed_worker import sharded_dls
    m = model()
    net = m if rank is None else torch.nn.parallel.DistributedDataParallel(m)
    return Learner(sharded_dls(rank, world), net, loss_func=torch.nn.functional.cross_entropy,
                   opt_func=functools.partial(muon, ns_dtype=torch.float32)), m

def fit(learn, m):
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    return [p.detach().clone() for p in m.parameters()]

@exits_cleanly
def learner_job(rank, world, init_file, out_file):
    "A fastai Learner per rank, model in DDP (fastai's launcher needs CUDA: the data is sharded by hand)."
    _join(rank, world, init_file)
    learn, m = learner(rank, world)
    counter = Counter()
    weights = fit(learn, m)
    torch.save(dict(weights=weights, counts=counter.read(), owners=repr(learn.opt.chains['muon'].cbs[-1])),
               f'{out_file}.{rank}')
    dist.destroy_process_group()   # not in a `finally`: after an exception it could wait on the other rank

@exits_cleanly
def failing_job(rank, world, init_file, out_file):
    """Rank 1 fails (a bad hyper) before the owners' all-gather, in which rank 0 then waits: the job fails with rank 1's
    message; the process group's short timeout bounds rank 0's wait."""
    _join(rank, world, init_file, timeout=8)
    x, y = data()
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = muon(list(net.parameters()))
    if rank == 1: opt.set_hyper('ns_steps', 0)
    loss_fn(net, x, y).backward(); opt.step()
    dist.destroy_process_group()   # not in a `finally`: after an exception it could wait on the other rank
