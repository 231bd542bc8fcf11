"""Structural hypers (`STRUCTURAL_HYPERS`: Prodigy's `slice_p`, `safeguard_warmup`, `use_bias_correction`): their value
picks the code a step runs, so a compiled step keeps them Python values (a new value compiles again) and no schedule may
move them. Changed by hand between steps they give prodigyopt's numbers, eager and compiled; `slice_p` is refused once
the state is made. Prodigy's eager passes work a param in tiles (`TILE` entries): a param larger than a tile against
prodigyopt too."""
import pytest, torch
from torch.testing import assert_close
from fastai.callback.schedule import ParamScheduler, SchedLin
from fastopts.hypers import STRUCTURAL_HYPERS, check_hyper
from fastopts.prodigy import TILE
from fastopts.lr_free import Prodigy

prodigyopt = pytest.importorskip('prodigyopt')
TOL = dict(rtol=1e-9, atol=1e-12)

def _params(shapes=((5, 4), (7,), (2, 3, 4)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]

def _grads(step, ps):
    g = torch.Generator().manual_seed(1000 + step)
    return [p**3 - 0.5*p + 0.3*torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]

def _step(opt, ps, t):
    with torch.no_grad(): gs = _grads(t, ps)
    for p, g in zip(ps, gs): p.grad = g.clone()
    opt.step()

def _same(a, b):
    for x, y in zip(a, b): assert_close(x.detach(), y.detach(), **TOL)

@pytest.mark.parametrize('name', sorted(STRUCTURAL_HYPERS))
def test_a_schedule_cannot_move_a_structural_hyper(name):
    "fastai's schedules set hypers with `set_hyper`: refused by name for a structural one; the group keeps its value."
    opt = Prodigy(_params())
    before = opt.param_groups[0][name]
    with pytest.raises(ValueError, match=f"`{name}` is a structural hyper.*schedule"): opt.set_hyper(name, 2)
    assert opt.param_groups[0][name] == before

def test_fastai_param_scheduler_on_slice_p_is_refused(make_learner):
    learn = make_learner(opt_func=Prodigy)
    with pytest.raises(ValueError, match="`slice_p` is a structural hyper"):
        learn.fit(1, 1.0, cbs=ParamScheduler({'slice_p': SchedLin(1, 4)}))

def test_structural_hypers_are_checked_and_kept_python_values():
    assert check_hyper('slice_p', 3) == 3 and type(check_hyper('slice_p', 3.0)) is int   # 3.0: an old checkpoint's float
    assert check_hyper('safeguard_warmup', 1) is True
    for name, bad in [('slice_p', 0), ('slice_p', 2.5), ('safeguard_warmup', 0.5), ('use_bias_correction', 'yes')]:
        with pytest.raises(ValueError, match=f"`{name}`"): check_hyper(name, bad)
    opt = Prodigy(_params(), slice_p=2)
    assert type(opt.param_groups[0]['slice_p']) is int
    with pytest.raises(ValueError, match='`slice_p`'): opt.hypers[0]['slice_p'] = 0

BY_HAND = {4: dict(safeguard_warmup=True), 7: dict(use_bias_correction=True), 10: dict(mom=0.),  # mom 0: no moment
           13: dict(wd=0.1), 16: dict(safeguard_warmup=False, wd=0.)}
_TORCH = dict(mom=lambda g, v: ('betas', (v, g['betas'][1])), wd=lambda g, v: ('weight_decay', v))

@pytest.mark.parametrize('compiled', [False, dict(backend='aot_eager')], ids=['eager', 'compiled'])
def test_structural_and_flag_hypers_changed_by_hand_equal_reference(compiled):
    "Structural hypers, and `mom` and `wd` crossing 0 (they pick Prodigy's branches), changed by hand between steps: prodigyopt's numbers."
    ps, qs = _params(), _params()
    ours = Prodigy([dict(params=ps[:2]), dict(params=ps[2:])], compiled=compiled)
    ref = prodigyopt.Prodigy([dict(params=qs[:2]), dict(params=qs[2:])])
    for t in range(20):
        for k, v in BY_HAND.get(t, {}).items():
            for g, rg in zip(ours.param_groups, ref.param_groups):
                g[k] = v
                rk, rv = _TORCH[k](rg, v) if k in _TORCH else (k, v)
                rg[rk] = rv
        _step(ours, ps, t); _step(ref, qs, t)
        assert ours.d == pytest.approx(ref.param_groups[0]['d'], rel=1e-9)
    _same(ps, qs)
    if compiled: assert ours._compiled_fns, 'nothing was compiled'

@pytest.mark.parametrize('compiled', [False, dict(backend='aot_eager')], ids=['eager', 'compiled'])
def test_slice_p_changed_after_the_state_is_made_is_refused(compiled):
    ps = _params()
    opt = Prodigy(ps, slice_p=2, compiled=compiled)
    opt.param_groups[0]['slice_p'] = 3   # before the first step: the state is made with 3
    for t in range(3): _step(opt, ps, t)
    opt.param_groups[0]['slice_p'] = 1
    with pytest.raises(ValueError, match='`slice_p`=1.*state was made with another'): _step(opt, ps, 3)

@pytest.mark.parametrize('kw', [dict(), dict(weight_decay=0.1, safeguard_warmup=True), dict(betas=(0.0, 0.99))],
                         ids=['default', 'wd-safeguard', 'no-mom'])
def test_prodigy_in_tiles_equals_reference(kw):
    "Params larger than a tile (one of them not contiguous: worked whole), float64: prodigyopt's numbers."
    shapes = ((TILE // 500 + 7, 500), (300, 3), (7,))
    ps, qs = _params(shapes), _params(shapes)
    t = torch.randn(TILE // 500 + 3, 500, dtype=torch.float64)
    for xs in (ps, qs): xs.append(torch.nn.Parameter(t.clone().t()))
    assert ps[0].numel() > TILE and ps[-1].numel() > TILE and not ps[-1].is_contiguous()
    ours, ref = Prodigy(ps, **kw), prodigyopt.Prodigy(qs, **kw)
    for t in range(4): _step(ours, ps, t); _step(ref, qs, t)
    assert ours.d == pytest.approx(ref.param_groups[0]['d'], rel=1e-9) and ours.d > 1e-6
    _same(ps, qs)

@pytest.mark.parametrize('compiled', [False, True, dict(backend='aot_eager')], ids=['eager', 'compiled', 'aot_eager'])
def test_a_step_with_no_sliced_gradient_moves_the_emas_as_reference(compiled):
    """A first step whose sliced gradient is all 0 (`slice_p`=2, the gradient only on odd entries): `s` stays 0, so there
    is nothing to learn `d` from and prodigyopt takes no step, but its first pass has moved the EMAs (and not `k`, the
    bias correction's count). Compiled, those EMAs move in the step's pass: it must still move them, and only them."""
    ps, qs = _params(), _params()
    kw = dict(slice_p=2, use_bias_correction=True)
    ours, ref = Prodigy(ps, compiled=compiled, **kw), prodigyopt.Prodigy(qs, **kw)
    for t in range(6):
        for opt, xs in ((ours, ps), (ref, qs)):
            with torch.no_grad(): gs = _grads(t, xs)
            if t == 0:
                for g in gs: g.view(-1)[::2] = 0   # the entries slice_p=2 keeps
            for p, g in zip(xs, gs): p.grad = g.clone()
            opt.step()
        if t == 0:
            assert ref.param_groups[0]['d'] == 1e-6 and ref.param_groups[0]['k'] == 0   # the reference did skip its step
            _same(ps, qs)
            assert all(ref.state[q]['exp_avg'].abs().sum() > 0 for q in qs)
            for p, q in zip(ps, qs): assert_close(ours.state[p]['grad_avg'], ref.state[q]['exp_avg'], **TOL)
        assert ours.d == pytest.approx(ref.param_groups[0]['d'], rel=1e-9)
    assert ours.param_groups[0]['k'] == ref.param_groups[0]['k'] == 5
    _same(ps, qs)
