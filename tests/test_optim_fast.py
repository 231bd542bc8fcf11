"""The fast path (torch's fused kernels for the chains that compute them) and the declared callback contract.

The chain is the definition: the fused step must give the callbacks' numbers (float32 rtol 1e-5, float64 1e-10) and
torch's own fused and foreach results; it must step aside by itself when a callback is added, a hyper asks for
something the kernel cannot do, or the device has no fused kernel. Kernel calls are counted by wrapping torch's
kernels, so a test can tell which path ran.
"""
from functools import partial
import pytest, torch
from torch.testing import assert_close
import fastopts.optimizer as fo
from fastopts.optimizer import (Optimizer, SGD, Momentum, RMSProp, Adam, AdamW, RAdam, contract, average_grad, average_sqr_grad,
                                step_stat, adam_step, momentum_step, sgd_step, weight_decay, check_chain)
from registry import FUSED, BY_NAME, ids, SAME_TOL as TOL, assert_same, seeded_params

SHAPES = [(5, 3), (7,), (2, 3, 4), (4,), (3, 3), (6,)]
GROUPS = [[0, 1, 2], [3, 4, 5]]
FROZEN, SKIP, NO_WD = {4}, {1: 3}, {2, 3}   # frozen param; param 1 has no grad every 3rd step; fastai's do_wd=False

def make_params(dtype, seed=0): return seeded_params(SHAPES, dtype, seed, FROZEN)

def run(build, dtype, steps=20, no_wd=True):
    "Build on two groups, mark `NO_WD` params do_wd=False, take `steps` steps with seeded grads; the final params."
    ps, g = make_params(dtype), torch.Generator().manual_seed(1)
    opt = build([[ps[i] for i in idx] for idx in GROUPS])
    if no_wd:
        for i in NO_WD: opt.state[ps[i]]['do_wd'] = False
    for t in range(1, steps + 1):
        for i, p in enumerate(ps):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            if i in FROZEN: continue
            p.grad = None if (i in SKIP and t % SKIP[i] == 0) else noise + 0.5 * p.detach()
        opt.step()
    return ps, opt

@pytest.fixture
def kernel_calls(monkeypatch):
    "Counts of torch's fused kernel calls made during the test."
    calls = {}
    for name in ('_fused_adam_', '_fused_adamw_', '_fused_sgd_'):
        real = getattr(torch, name)
        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)
        monkeypatch.setattr(torch, name, counted)
    return calls

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['f32', 'f64'])
@pytest.mark.parametrize('spec', FUSED, ids=ids)
def test_fused_equals_callbacks(spec, dtype, kernel_calls):
    "Two groups, a frozen param, a param without grad, do_wd=False params: the kernel gives the chain's numbers."
    fused, opt = run(lambda gs: spec.make(gs), dtype)
    assert sum(kernel_calls.values()) > 0 and opt._fast is not None
    n = sum(kernel_calls.values())
    chain, _ = run(lambda gs: spec.make(gs, fused=False), dtype)
    assert sum(kernel_calls.values()) == n          # fused=False never calls a kernel
    assert_same(fused, chain, dtype)
    assert any(not torch.equal(p, q) for p, q in zip(fused, make_params(dtype)))

import inspect
# every fused chain with a torch counterpart, against torch's fused implementation (where torch has one) and foreach
TORCH_IMPLS = [pytest.param(spec, impl, id=f'{spec.name}-{impl}') for spec in FUSED if spec.torch_cls is not None
               for impl in ('fused', 'foreach') if impl == 'foreach' or 'fused' in inspect.signature(spec.torch_cls).parameters]

@pytest.mark.parametrize('spec,impl', TORCH_IMPLS)
def test_fused_equals_torch(spec, impl):
    "fastopts' fused step against torch's fused and foreach implementations of the same rule (float32, 20 steps)."
    ours, _ = run(lambda gs: spec.make(gs), torch.float32, no_wd=False)
    kw = {'fused': True} if impl == 'fused' else {'foreach': True}
    theirs, _ = run(lambda gs: spec.torch_cls([{'params': g} for g in gs], **spec.torch_kwargs, **kw), torch.float32, no_wd=False)
    assert_same(ours, theirs, torch.float32)

def test_momentum_is_fused_sgd_with_dampening(kernel_calls):
    "The lecture's Momentum (EMA from V=0) runs as torch's fused SGD kernel with dampening=mom from a zero buffer."
    ps = [torch.zeros(3, requires_grad=True)]
    opt = Momentum(ps, lr=0.1, mom=0.9)
    g = torch.tensor([1., -2., 3.])
    for t in range(1, 4):
        ps[0].grad = g.clone(); opt.step()
    # V_t = (1 - 0.9^t) g, p = -lr * sum_t V_t
    expected = -0.1 * sum(1 - 0.9**t for t in range(1, 4)) * g
    assert_close(ps[0].detach(), expected)
    assert kernel_calls == {'_fused_sgd_': 3}

def test_added_callback_falls_back(kernel_calls):
    "A user callback appended to the chain: the next step runs the callbacks (and the new one), with the same numbers."
    seen = []
    def spy(grp, **_): seen.append(len(grp.params))
    a, _ = run(lambda gs: Adam(gs, lr=1e-2), torch.float64, steps=3)
    n = sum(kernel_calls.values())
    def build(gs):
        opt = Adam(gs, lr=1e-2); opt.cbs.append(spy); return opt
    b, opt = run(build, torch.float64, steps=3)
    assert sum(kernel_calls.values()) == n and opt._fast is None and len(seen) == 6   # 2 groups x 3 steps
    assert_same(a, b, torch.float64)

def test_chain_change_is_checked_at_the_next_step():
    opt = Adam([torch.zeros(2, requires_grad=True)], lr=1e-2)
    opt.cbs.insert(0, momentum_step)
    opt.param_groups[0]['params'][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match='momentum_step'): opt.step()

def test_zero_momentum_falls_back(kernel_calls):
    """mom=0 in a momentum chain: the SGD kernel would leave its buffer stale (so does torch.optim.SGD), where the chain
    writes V = g; the callbacks run, so the default step equals the chain's."""
    sched = [0.9, 0.0, 0.0, 0.9, 0.5]
    def drive(opt, ps):
        g = torch.Generator().manual_seed(3)
        for m in sched:
            for grp in opt.param_groups: grp['mom'] = m
            ps[0].grad = torch.randn(4, generator=g, dtype=torch.float64); opt.step()
        return ps
    ours = drive(SGD(p := [torch.ones(4, dtype=torch.float64, requires_grad=True)], lr=0.1, mom=0.9), p)
    assert kernel_calls == {'_fused_sgd_': 3}     # the two mom=0 steps ran the callbacks
    theirs = drive(SGD(q := [torch.ones(4, dtype=torch.float64, requires_grad=True)], lr=0.1, mom=0.9, fused=False), q)
    assert_same(ours, theirs, torch.float64)

def test_device_without_fused_kernel_falls_back(monkeypatch, kernel_calls):
    "A device torch has no fused kernel for (simulated by emptying the supported set) runs the callbacks."
    import fastopts.fused as ff   # where the kernels look it up
    monkeypatch.setattr(ff, '_FUSED_DEVICES', set())
    a, _ = run(lambda gs: Adam(gs, lr=1e-2), torch.float64)
    assert kernel_calls == {}
    b, _ = run(lambda gs: Adam(gs, lr=1e-2, fused=False), torch.float64)
    assert_same(a, b, torch.float64)

@pytest.mark.parametrize('fused', [None, False])
@pytest.mark.parametrize('name', ['adam', 'sgd_mom', 'rmsprop_mom', 'lamb'])
def test_mixed_dtypes_in_one_group(name, fused):
    "float32 and float64 params in one group are stepped as separate lists, each as torch steps it."
    spec = BY_NAME[name]
    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_(),
                torch.randn(4, generator=g, dtype=torch.float64).float().requires_grad_()]
    def drive(opt, ps):
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in ps: p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            opt.step()
        return ps
    ours = drive(spec.make(ps := params(), fused=fused), ps)
    ref = params()
    singles = [spec.make([r]) for r in ref]    # each param alone: one dtype per optimizer
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        for r in ref: r.grad = torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype)
        for o in singles: o.step()
    assert [p.dtype for p in ours] == [torch.float64, torch.float32]
    for p, r in zip(ours, ref): assert_close(p, r, rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------- the declared contract
@pytest.mark.parametrize('cbs,producer', [
    ([momentum_step], '`average_grad`'), ([average_sqr_grad, adam_step], '`average_grad`, `step_stat`'),
    ([partial(average_grad, dampening=True), adam_step], '`average_sqr_grad`'),
], ids=['momentum_alone', 'no_grad_avg', 'no_sqr_avg'])
def test_chain_missing_a_producer_is_refused(cbs, producer):
    with pytest.raises(ValueError, match=producer.replace('`', '.')): Optimizer([torch.zeros(2, requires_grad=True)], cbs, lr=0.1)

def test_misordered_chain_names_the_fix():
    with pytest.raises(ValueError, match=r"comes after, at \['average_grad'\]: move it before"):
        check_chain([momentum_step, average_grad])

def test_user_callback_with_a_contract():
    "A user's stat declared with `contract` satisfies a stepper that reads it; undeclared callbacks keep working."
    @contract(writes='grad_avg', hypers='')
    def copy_grad(grp, **_):
        for a, g in zip(grp.state('grad_avg'), grp.grads): a.copy_(g)
    p = torch.ones(3, requires_grad=True)
    opt = Optimizer([p], [copy_grad, momentum_step], lr=0.5)
    assert opt._fast is None                       # no role: never mistaken for a fused chain
    p.grad = torch.tensor([1., 2., 3.]); opt.step()
    assert_close(p.detach(), torch.tensor([0.5, 0., -0.5]))

def test_partial_with_unknown_keyword_has_no_fast_path():
    opt = Optimizer([torch.zeros(2, requires_grad=True)],
                    [partial(average_grad, dampening=True), partial(momentum_step, foo=1)], lr=0.1, mom=0.9)
    assert opt._fast is None

def test_fused_true_refused_where_no_kernel():
    with pytest.raises(ValueError, match='`fused=True`'): RAdam([torch.zeros(2, requires_grad=True)], fused=True)
    with pytest.raises(ValueError, match='`fused` must be None, True or False'): Adam([torch.zeros(2, requires_grad=True)], fused='yes')
    Adam([torch.zeros(2, requires_grad=True)], fused=True)   # Adam has one

def test_state_dict_is_the_same_on_both_paths():
    "Step counts stay ints and state names stay ours whichever path ran, so checkpoints move between them."
    _, a = run(lambda gs: Adam(gs, lr=1e-2), torch.float32, steps=3)
    _, b = run(lambda gs: Adam(gs, lr=1e-2, fused=False), torch.float32, steps=3)
    sa, sb = a.state_dict()['state'], b.state_dict()['state']
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys() and type(sa[k].get('step')) is type(sb[k].get('step'))

def test_rmsprop_runs_on_adams_kernel_and_leaves_the_grads(kernel_calls):
    "RMSProp without momentum is Adam's kernel with beta1=0 and no bias correction; it writes g onto g: grads unchanged."
    p = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt, ref = RMSProp([p], lr=1e-2), torch.optim.RMSprop([q], lr=1e-2, alpha=0.99, eps=1e-8)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        p.grad = torch.randn(5, 3, generator=g, dtype=torch.float64); q.grad = p.grad.clone(); before = p.grad.clone()
        opt.step(); ref.step()
        assert torch.equal(p.grad, before)
    assert kernel_calls == {'_fused_adam_': 10}
    assert_close(p, q, **TOL[torch.float64])
    l2 = RMSProp([p], lr=1e-2, wd=0.1, decouple_wd=False)
    p.grad = torch.ones(5, 3, dtype=torch.float64); l2.step()
    assert kernel_calls == {'_fused_adam_': 10}       # L2 would be written into the grads: the callbacks run
