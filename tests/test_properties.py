"Property-based checks (hypothesis) of the optimizers against closed forms and of the hyper checks."
from functools import partial
import math, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from fastopts.optimizer import Adam, Momentum
from registry import OPTIMIZERS

finite = dict(allow_nan=False, allow_infinity=False)
unit = st.floats(0, 0.999, **finite)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

def _param(vals): 
    p = torch.nn.Parameter(torch.tensor(vals, dtype=torch.float64))
    return p

@SETTINGS
@given(lr=st.floats(0, 1, **finite), mom=unit, sqr_mom=unit, eps=st.floats(1e-12, 1, **finite),
       g=st.lists(st.floats(-1e3, 1e3, **finite), min_size=1, max_size=5))
def test_adam_first_step_is_lr_times_g_over_abs_g_plus_eps(lr, mom, sqr_mom, eps, g):
    "Bias correction makes Adam's first step exactly lr*g/(|g|+eps), whatever mom and sqr_mom (Kingma & Ba, sec. 3)."
    p = _param([0.5] * len(g)); g = torch.tensor(g, dtype=torch.float64)
    opt = Adam([p], lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps)
    p.grad = g.clone(); opt.step()
    torch.testing.assert_close(p.detach(), 0.5 - lr * g / (g.abs() + eps), rtol=1e-9, atol=1e-12)

@SETTINGS
@given(lr=st.floats(0, 1, **finite), mom=unit, g=st.lists(st.floats(-1e3, 1e3, **finite), min_size=1, max_size=5),
       steps=st.integers(1, 6))
def test_momentum_with_constant_gradient_is_a_geometric_sum(lr, mom, g, steps):
    "The lecture's EMA momentum under a constant gradient: V_t = (1-mom^t) g, so p moves by lr*g*sum_t(1-mom^t)."
    p = _param([0.] * len(g)); g = torch.tensor(g, dtype=torch.float64)
    opt = Momentum([p], lr=lr, mom=mom)
    for _ in range(steps): p.grad = g.clone(); opt.step()
    moved = sum(1 - mom**t for t in range(1, steps + 1))
    torch.testing.assert_close(p.detach(), -lr * moved * g, rtol=1e-9, atol=1e-9)

OPTS = {o.name: o.make for o in OPTIMIZERS}

@pytest.mark.parametrize('name', list(OPTS))
@SETTINGS
@given(g=st.lists(st.floats(-1e3, 1e3, **finite), min_size=1, max_size=4), wd=st.floats(0, 1, **finite))
def test_zero_lr_never_moves_the_weights(name, g, wd):
    p = _param([1.] * len(g))
    opt = OPTS[name]([p], lr=0., wd=wd)
    for _ in range(3): p.grad = torch.tensor(g, dtype=torch.float64); opt.step()
    assert torch.equal(p.detach(), torch.ones(len(g), dtype=torch.float64))

bad = st.one_of(st.floats(max_value=-1e-12, **finite), st.just(math.nan), st.just(math.inf), st.just(-math.inf))
@pytest.mark.parametrize('hyper', ['lr', 'wd', 'mom', 'sqr_mom', 'eps'])
@SETTINGS
@given(neg=bad)
def test_out_of_range_hypers_are_refused_by_name(hyper, neg):
    opt = Adam([_param([1.])], lr=1e-3)
    with pytest.raises(ValueError, match=f'`{hyper}`'): opt.set_hyper(hyper, neg)
    with pytest.raises(ValueError, match=f'`{hyper}`'): Adam([_param([1.])], **{'lr': 1e-3, hyper: neg})
    if hyper in ('mom', 'sqr_mom'):
        with pytest.raises(ValueError, match=f'`{hyper}`'): opt.set_hyper(hyper, 1. + abs(neg) if math.isfinite(neg) else neg)
