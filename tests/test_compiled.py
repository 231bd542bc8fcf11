"""The compiled step (`compiled=True`): the callbacks' numbers, one graph for a whole schedule, fastai and torch around it.

The reference is always the same optimizer running its callbacks (`fused=False`), which other tests tie to torch.optim
and to closed-form updates. Graphs are counted with dynamo's own counter: a schedule that changes `lr` and `mom` at every
step must not compile again. The default backend (inductor, generated C++) is used where the numbers matter; the
whole registry also runs on `aot_eager`, which traces exactly what inductor would compile, at a fraction of the time.
"""
import functools, pickle, random, shutil
from functools import partial
import pytest, torch
from torch._dynamo.utils import counters
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.schedule import fit_one_cycle  # noqa: F401
from fastai.losses import CrossEntropyLossFlat
import fastopts.optimizer as fo
from fastopts.optimizer import Adam, SGD, RAdam, Lion, Optimizer, average_grad, momentum_step
from fastopts.data import sklearn_dls, dls_mlp
from registry import OPTIMIZERS, BY_NAME, LR_FREE, ids, assert_same, seeded_params

SHAPES = [(5, 3), (7,), (2, 3, 4), (4,)]

def graphs() -> int: return counters['stats']['unique_graphs']

def have_cxx() -> bool:
    "Whether inductor finds a C++ compiler for CPU code (a machine with only Python has none)."
    from torch._inductor import config
    return any(c and shutil.which(c) for c in config.cpp.cxx)

def compiled_or_named_failure(run):
    "`run()` where inductor can compile; without a C++ compiler, the step must say so clearly instead (then a reported skip)."
    if have_cxx(): return run()
    with pytest.raises(RuntimeError, match=r"torch.compile failed on the chain .*C\+\+ compiler.*compiled=False"): run()
    pytest.skip("no C++ compiler for inductor: checked that the step says so; the compiled numbers are not checked here")

def drive(make, dtype=torch.float32, steps=8, no_grad_at=None, schedule=True):
    "Two groups; `lr`, `mom` (and `sqr_mom`) change at every step when `schedule`; the final params and the optimizer."
    ps, g = seeded_params(SHAPES, dtype), torch.Generator().manual_seed(1)
    opt = make([ps[:2], ps[2:]])
    opt.state[ps[3]]['do_wd'] = False
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (i == 1 and t == no_grad_at) else (torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) + 0.5*p.detach())
        if schedule:
            opt.set_hyper('lr', opt.param_groups[0]['lr'] * 0.9)
            for k, lo in (('mom', 0.5), ('sqr_mom', 0.9)):
                if k in opt.param_groups[0] and opt.param_groups[0][k] > lo: opt.set_hyper(k, opt.param_groups[0][k] - 0.01)
        opt.step()
    return ps, opt

@pytest.mark.parametrize('spec', OPTIMIZERS, ids=ids)
def test_traced_chain_equals_callbacks(spec):
    "Every registry optimizer, traced as the compiler sees it: the callbacks' numbers, and 2 graphs for 8 scheduled steps."
    eager, _ = drive(lambda gs: spec.make(gs, fused=False))
    before = graphs()
    traced, opt = drive(lambda gs: spec.make(gs, compiled=dict(backend='aot_eager')))
    assert_same(traced, eager)
    assert graphs() - before == 2, f"{graphs() - before} graphs for 2 groups over a schedule of 8 steps"

def _modal(opt): return opt.train() if hasattr(opt, 'train_mode') else opt   # Schedule-Free starts in eval mode

def breaks() -> int: return sum(counters['graph_break'].values())

@functools.cache
def lr_free_traced(name:str):
    """The scheduled float64 run of LR_FREE's `name` traced on `aot_eager`: (params, optimizer, graphs made, graph breaks)
    during it. Run once per process: the two tests below check its numbers and its graphs (each tracing costs seconds)."""
    spec = {s.name: s for s in LR_FREE}[name]
    before, broken = graphs(), breaks()
    traced, opt = drive(lambda gs: _modal(spec.make(gs, compiled=dict(backend='aot_eager'))), dtype=torch.float64)
    return traced, opt, graphs() - before, breaks() - broken

@pytest.mark.parametrize('spec', LR_FREE, ids=ids)
def test_lr_free_traced_equals_callbacks(spec):
    "Schedule-Free, Prodigy (a hyper and a reduce stage), ADOPT and AdEMAMix compiled: the callbacks' numbers under a schedule."
    eager, _ = drive(lambda gs: _modal(spec.make(gs, fused=False)), dtype=torch.float64)
    traced, opt, _, _ = lr_free_traced(spec.name)
    assert_same(traced, eager, torch.float64)
    assert opt._compiled_fns, 'nothing was compiled'

@pytest.mark.parametrize('spec', LR_FREE, ids=ids)
def test_lr_free_compiles_to_one_graph_per_group(spec):
    """Schedule-Free, Prodigy, ADOPT and AdEMAMix under a schedule that moves `lr` and `mom` at every step: one graph per
    group and segment (Prodigy's reduce stage cuts its chain in two), no graph break (a break per tensor, on `mom` as a
    0-d tensor, made compiled Schedule-Free 4x slower; `int(slice_p)` and `if mom > 0` broke Prodigy's), no recompile."""
    _, _, made, broken = lr_free_traced(spec.name)
    want = 2 * (2 if spec.name == 'prodigy' else 1)   # two groups, times the segments
    assert (made, broken) == (want, 0), f"{made} graphs, {broken} graph breaks"

@pytest.mark.slow
@pytest.mark.parametrize('name', ['sf_adamw', 'prodigy', 'adopt', 'ademamix'])
def test_lr_free_compiled_equals_callbacks(name):
    "The same through inductor's generated code (float32)."
    spec = {s.name: s for s in LR_FREE}[name]
    eager, _ = drive(lambda gs: _modal(spec.make(gs, fused=False)))
    compiled, _ = compiled_or_named_failure(lambda: drive(lambda gs: _modal(spec.make(gs, compiled=True))))
    assert_same(compiled, eager)

@pytest.mark.parametrize('spec', OPTIMIZERS + LR_FREE, ids=ids)
def test_torch_compile_of_step_equals_eager(spec):
    "torch's recipe `torch.compile(opt.step)` runs (the driver is a graph break) and gives the eager step's numbers."
    eager, _ = drive(lambda gs: _modal(spec.make(gs)), steps=3)
    def compiled_step(gs):
        opt = _modal(spec.make(gs))
        opt.step = torch.compile(opt.step)
        return opt
    compiled, _ = drive(compiled_step, steps=3)
    assert_same(compiled, eager)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['f32', 'f64'])
@pytest.mark.parametrize('name', ['adamw', 'radam', 'lion', 'sgd_nesterov_l2'])
def test_compiled_equals_callbacks(name, dtype):
    "The default backend's generated code gives the callbacks' numbers (float32 rtol 1e-5, float64 1e-10)."
    spec = BY_NAME[name]
    eager, _ = drive(lambda gs: spec.make(gs, fused=False), dtype)
    out = compiled_or_named_failure(lambda: drive(lambda gs: spec.make(gs, compiled=True), dtype))
    compiled, opt = out
    assert_same(compiled, eager, dtype)
    assert opt._compiled_fns, "the compiled step never ran"

def test_schedule_compiles_once_with_a_torch_scheduler():
    "OneCycleLR cycles lr and momentum (torch's names for `mom`) at every step: one graph, the callbacks' numbers."
    def make(gs, **kw):
        opt = Adam(gs, lr=0.01, **kw)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, cycle_momentum=True)
    out = []
    for kw in (dict(fused=False), dict(compiled=dict(backend='aot_eager'))):
        ps = [torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)]
        opt, sched = make(ps, **kw)
        before, moms = graphs(), []
        for t in range(10):
            ps[0].grad = torch.full_like(ps[0], 0.1 * (t + 1)) + ps[0].detach()
            opt.step(); sched.step(); moms.append(opt.param_groups[0]['mom'])
        out.append((ps[0].detach(), graphs() - before))
        assert len(set(moms)) > 5   # the momentum did change at every step
    assert_same([out[1][0]], [out[0][0]])
    assert out[1][1] == 1

def test_a_param_without_grad_and_cleared_state():
    "A step where a param has no grad is another graph (fewer tensors); `clear_state` runs the callbacks once, then compiles on."
    eager, _ = drive(lambda gs: Adam(gs, lr=0.01, fused=False), no_grad_at=4)
    traced, opt = drive(lambda gs: Adam(gs, lr=0.01, compiled=dict(backend='aot_eager')), no_grad_at=4)
    assert_same(traced, eager)
    opt.clear_state()
    ps = [p for g in opt.param_groups for p in g['params']]
    for p in ps: p.grad = torch.ones_like(p)
    opt.step()   # the callbacks make the state afresh
    assert all(opt.state[p]['step'] == 1 for p in ps)
    opt.step()
    assert all(opt.state[p]['step'] == 2 for p in ps)

def test_pickled_optimizer_compiles_again():
    "The compiled functions are not pickled: a copy rebuilds them and continues with the same numbers."
    ps, opt = drive(lambda gs: Lion(gs, lr=1e-3, compiled=dict(backend='aot_eager')), steps=3)
    ps2, opt2 = pickle.loads(pickle.dumps((ps, opt)))
    assert opt2.compiled == opt.compiled and not opt2._compiled_fns
    for a, b in zip(ps, ps2): a.grad = b.grad = torch.ones_like(a)
    opt.step(); opt2.step()
    assert_same(ps2, ps)
    assert opt2._compiled_fns

def test_fastai_fit_one_cycle():
    "fit_one_cycle on iris (lr and mom change at every batch): same weights as the callbacks, one graph per group."
    def fit(**kw):
        dls = sklearn_dls('iris', bs=16); random.seed(0)
        dls = DataLoaders(*[dl.new(num_workers=0) for dl in dls.loaders])
        torch.manual_seed(0)
        learn = Learner(dls, dls_mlp(dls), loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, **kw))
        before = graphs()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 0.01)
        return [p.detach() for p in learn.model.parameters()], graphs() - before, learn
    eager, _, _ = fit(fused=False)
    out = compiled_or_named_failure(lambda: fit(compiled=True))
    compiled, n, learn = out
    assert_same(compiled, eager)
    assert n == 1, n
    assert learn.opt._compiled_fns

def test_refusals():
    ps = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match='pick one'): Adam(ps, compiled=True, fused=True)
    with pytest.raises(ValueError, match=r"`compiled` must be True, False or a dict.*'fast'"): SGD(ps, compiled='fast')
    with pytest.raises(ValueError, match="torch.compile does not take"): Adam(ps, compiled=dict(modes='max-autotune'))
    Adam(ps, compiled=dict(mode='max-autotune'))   # a real keyword is fine

def test_no_cxx_compiler_is_named():
    "Where inductor finds no C++ compiler, the second step (the first compiled one) says so; the params are untouched."
    from torch._inductor import config
    # config.patch, not pytest's monkeypatch: monkeypatch's undo deletes the option from inductor's config proxy
    with config.patch({'cpp.cxx': (None, '/nonexistent/g++')}):
        p = torch.ones(3, requires_grad=True)
        opt = Adam([p], compiled=True)
        p.grad = torch.ones(3); opt.step()
        before = p.detach().clone()
        with pytest.raises(RuntimeError, match=r"torch.compile failed on the chain .*C\+\+ compiler.*compiled=False"): opt.step()
        assert torch.equal(p.detach(), before)
    assert config.cpp.cxx != (None, '/nonexistent/g++')

def test_compiler_failure_is_named(monkeypatch):
    "If torch.compile fails, the error says which chain and how to step around it; the params are untouched."
    def broken(f, **kw):
        def run(*a, **k): raise torch._dynamo.exc.Unsupported("no C++ compiler")
        return run
    monkeypatch.setattr(torch, 'compile', broken)
    p = torch.ones(3, requires_grad=True)
    opt = Optimizer([p], [average_grad, momentum_step], compiled=True, lr=0.1, mom=0.9)
    p.grad = torch.ones(3); opt.step()   # the first step runs the callbacks
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"torch.compile failed on the chain \['average_grad', 'momentum_step'\].*compiled=False"):
        opt.step()
    assert torch.equal(p.detach(), before)

@pytest.mark.parametrize('name', ['adam', 'radam', 'sgd_mom'])
def test_complex_params(name):
    "Complex params step as real pairs on both paths (the state stays complex), compiled too."
    spec, runs = BY_NAME[name], []
    for kw in (dict(fused=False), dict(compiled=dict(backend='aot_eager'))):
        g = torch.Generator().manual_seed(0)
        p = torch.randn(4, 3, dtype=torch.complex64, generator=g).requires_grad_()
        opt = spec.make([p], **kw)
        for t in range(4):
            p.grad = torch.randn(4, 3, dtype=torch.complex64, generator=g)
            opt.set_hyper('lr', 0.01 * (t + 1)); opt.step()
        runs.append(p.detach())
        assert all(v.is_complex() for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim())
    assert opt._compiled_fns
    assert_same([runs[1]], [runs[0]])

def test_without_a_compiler_the_numeric_tests_skip():
    "Without a C++ compiler `compiled_or_named_failure` checks the step's named error, then skips (reported), never passes."
    from torch._inductor import config
    with config.patch({'cpp.cxx': (None, '/nonexistent/g++')}):
        with pytest.raises(pytest.skip.Exception, match=r'no C\+\+ compiler'):
            compiled_or_named_failure(lambda: drive(lambda gs: Adam(gs, lr=0.01, compiled=True), steps=2))
