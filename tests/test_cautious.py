"""Updates, then apply: cautious updates (Liang et al. 2024, "Cautious Optimizers") and torch's `maximize`, each one
callback on any chain. References: `pytorch_optimizer` (test-only, the `dev` extra) for Lion and AdEMAMix, plain and
`cautious=True`; the authors' C-AdamW (kyleliang919/C-Optim) and the paper's rule on ADOPT written out below; torch's
own `maximize=True`."""
import pytest, torch
from fastopts.optimizer import Adam, AdamW, SGD, Lion
from fastopts.lr_free import ADOPT, AdEMAMix, ScheduleFreeAdamW, ScheduleFreeSGD
from registry import seeded_params

po = pytest.importorskip('pytorch_optimizer')
SHAPES, STEPS, TOL = [(5, 4), (7,), (3, 2, 2)], 20, dict(rtol=1e-9, atol=1e-12)

def _grads(ps, step):
    "The same seeded gradients for every run (float64)."
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ps]

def _run(make, steps=STEPS):
    ps = seeded_params(SHAPES, torch.float64)
    opt = make(ps)
    for t in range(steps):
        for p, g in zip(ps, _grads(ps, t)): p.grad = g
        opt.step()
    return [p.detach() for p in ps]

def _close(xs, ys):
    for x, y in zip(xs, ys): torch.testing.assert_close(x, y, **TOL)

@pytest.mark.parametrize('cautious', [False, True])
def test_lion_equals_pytorch_optimizer(cautious):
    kw = dict(cautious=True) if cautious else {}
    ref = _run(lambda ps: po.Lion(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False, **kw))
    _close(_run(lambda ps: Lion(ps, lr=1e-2, mom=0.9, sqr_mom=0.99, wd=0.1, cautious=cautious)), ref)

@pytest.mark.parametrize('cautious', [False, True])
def test_ademamix_equals_pytorch_optimizer(cautious):
    "pytorch_optimizer's cautious AdEMAMix masks the fast EMA (not the slow one, not the whole update): ours does the same."
    kw = dict(cautious=True) if cautious else {}
    ref = _run(lambda ps: po.AdEMAMix(ps, lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=5.0, weight_decay=0.1,
                                      weight_decouple=True, eps=1e-8, **kw))
    _close(_run(lambda ps: AdEMAMix(ps, lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=5.0, wd=0.1, eps=1e-8, cautious=cautious)), ref)

def _mask(u, g):
    "The authors' mask: where the update (as subtracted from p) has the gradient's sign, scaled by numel/(kept+1)."
    m = (u * g > 0).to(u.dtype)
    return m * (m.numel() / (m.sum() + 1))

def _c_adamw(ps, lr, b1, b2, eps, wd):
    "C-AdamW as kyleliang919/C-Optim's `AdamW` with `cautious`: decoupled decay unmasked, the mask on exp_avg vs grad."
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in ps]
    def step(t):
        for p, s in zip(ps, state):
            g = p.grad
            p.data.mul_(1 - lr * wd)
            s['m'].mul_(b1).add_(g, alpha=1 - b1); s['v'].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (s['v'] / (1 - b2**t)).sqrt() + eps
            p.data.add_(s['m'] * _mask(s['m'], g) / denom, alpha=-lr / (1 - b1**t))
    return step

def test_cautious_adamw_equals_the_authors_algorithm():
    ps = seeded_params(SHAPES, torch.float64)
    step = _c_adamw(ps, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    for t in range(STEPS):
        for p, g in zip(ps, _grads(ps, t)): p.grad = g
        step(t + 1)
    _close(_run(lambda qs: AdamW(qs, lr=1e-2, wd=0.1, cautious=True)), [p.detach() for p in ps])

def test_cautious_adopt_equals_the_paper_rule():
    "ADOPT (Taniguchi et al. 2024, torch-adopt's defaults: L2 decay, clip t^0.25) with the update masked by the paper's rule."
    ps = seeded_params(SHAPES, torch.float64)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.9999, 1e-6, 0.01
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in ps]
    for t in range(STEPS):
        for p, g in zip(ps, _grads(ps, t)): p.grad = g
        for p, s in zip(ps, state):
            g = p.grad + wd * p.detach()
            if t == 0: s['v'].addcmul_(g, g); continue
            c = t ** 0.25
            s['m'].lerp_((g / s['v'].sqrt().clamp(min=eps)).clamp(-c, c), 1 - b1)
            p.data.add_(s['m'] * _mask(s['m'], g), alpha=-lr)
            s['v'].mul_(b2).addcmul_(g, g, value=1 - b2)
    _close(_run(lambda qs: ADOPT(qs, lr=lr, mom=b1, sqr_mom=b2, eps=eps, wd=wd, cautious=True)), [p.detach() for p in ps])

@pytest.mark.parametrize('make, ref', [
    (lambda ps: Adam(ps, lr=1e-2, wd=0.01, decouple_wd=False, maximize=True),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01, maximize=True, foreach=False)),
    (lambda ps: AdamW(ps, lr=1e-2, maximize=True), lambda ps: torch.optim.AdamW(ps, lr=1e-2, maximize=True, foreach=False)),
    (lambda ps: SGD(ps, lr=0.1, mom=0.9, maximize=True), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, maximize=True)),
], ids=['adam_l2', 'adamw', 'sgd_mom'])
def test_maximize_equals_torch(make, ref):
    _close(_run(make), _run(ref))

def test_a_transformer_leaves_the_fused_kernel_and_is_refused_where_there_is_no_one_update():
    ps = seeded_params([(3,)], torch.float32)
    assert AdamW(ps).chains['default'].fast is not None
    assert AdamW(ps, cautious=True).chains['default'].fast is None
    assert AdamW(ps, maximize=True).chains['default'].fast is None
    for make in (ScheduleFreeAdamW, ScheduleFreeSGD):
        with pytest.raises(ValueError, match='`cautious=True`.*schedule_free_.*_step'): make(ps, cautious=True)
    with pytest.raises(ValueError, match='`cautious` must be True or False'): AdamW(ps, cautious='yes')
    with pytest.raises(ValueError, match='`maximize` must be True or False'): AdamW(ps, maximize=1)
