"""Schedule-Free AdamW/SGD, Prodigy, ADOPT and AdEMAMix against their installed reference packages (schedulefree 1.4.1,
prodigyopt 1.1.2, torch-adopt 0.1.0) and, for AdEMAMix, the paper's update written here; then in a fastai Learner."""
import math, warnings
import pytest, torch
from torch.testing import assert_close
from fastopts.lr_free import (ScheduleFreeAdamW, ScheduleFreeSGD, Prodigy, ADOPT, AdEMAMix, ScheduleFreeCallback,
                              recalibrate_bn)

schedulefree = pytest.importorskip('schedulefree')
prodigyopt = pytest.importorskip('prodigyopt')
adopt = pytest.importorskip('adopt')

SHAPES = [(5, 4), (7,), (2, 3, 4)]   # a matrix, a vector and a 3-D tensor
STEPS = 20
TOL = dict(rtol=1e-9, atol=1e-12)

def _params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in SHAPES]

def _grads(step, ps):
    "A loss whose gradients change with the params (a quartic bowl plus a step-dependent tilt)."
    g = torch.Generator().manual_seed(1000 + step)
    return [p**3 - 0.5*p + 0.3*torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps]

def _run(opt, ps, steps=STEPS, start=0):
    for t in range(start, start + steps):
        with torch.no_grad(): gs = _grads(t, ps)
        for p, g in zip(ps, gs): p.grad = g.clone()
        opt.step()

def _same(a, b, **tol):
    for x, y in zip(a, b): assert_close(x.detach(), y.detach(), **(tol or TOL))

# ------------------------------------------------------------------------------------------------ Schedule-Free
SF_CASES = [dict(), dict(warmup_steps=5), dict(r=1.0), dict(weight_lr_power=0.), dict(weight_decay=0.05),
            dict(warmup_steps=4, r=0.5, weight_decay=0.01)]

@pytest.mark.parametrize('kw', SF_CASES, ids=lambda kw: '-'.join(kw) or 'default')
def test_schedule_free_adamw_equals_reference(kw):
    ps, qs = _params(), _params()
    ours = ScheduleFreeAdamW(ps, lr=0.05, betas=(0.9, 0.99), **kw)
    ref = schedulefree.AdamWScheduleFree(qs, lr=0.05, betas=(0.9, 0.99), foreach=False, **kw)
    ours.train(); ref.train()
    _run(ours, ps); _run(ref, qs)
    assert not torch.equal(ps[0], _params()[0])
    _same(ps, qs)                            # y, after training
    for s, p in zip(ours.state.values(), qs): assert_close(s['z'], ref.state[p]['z'], **TOL)
    ours.eval(); ref.eval(); _same(ps, qs)   # x
    ours.train(); ref.train(); _same(ps, qs) # y again
    _run(ours, ps, 5, STEPS); _run(ref, qs, 5, STEPS); _same(ps, qs)

@pytest.mark.parametrize('kw', [dict(), dict(warmup_steps=5), dict(r=2.0, weight_decay=0.1), dict(momentum=0.5)],
                         ids=lambda kw: '-'.join(kw) or 'default')
def test_schedule_free_sgd_equals_reference(kw):
    ps, qs = _params(), _params()
    ours, ref = ScheduleFreeSGD(ps, lr=0.02, **kw), schedulefree.SGDScheduleFree(qs, lr=0.02, foreach=False, **kw)
    ours.train(); ref.train()
    _run(ours, ps); _run(ref, qs); _same(ps, qs)
    ours.eval(); ref.eval(); _same(ps, qs)
    ours.train(); ref.train(); _same(ps, qs)

def test_schedule_free_defaults_are_the_references():
    ps = _params()
    o, r = ScheduleFreeAdamW(ps), schedulefree.AdamWScheduleFree(_params())
    g, rg = o.param_groups[0], r.param_groups[0]
    assert (g['lr'], (g['mom'], g['sqr_mom']), g['eps'], g['wd'], g['warmup_steps'], g['r'], g['weight_lr_power']) == \
           (rg['lr'], rg['betas'], rg['eps'], rg['weight_decay'], rg['warmup_steps'], rg['r'], rg['weight_lr_power'])
    o, r = ScheduleFreeSGD(ps), schedulefree.SGDScheduleFree(_params())
    g, rg = o.param_groups[0], r.param_groups[0]
    assert (g['lr'], g['mom'], g['wd'], g['warmup_steps'], g['r'], g['weight_lr_power']) == \
           (rg['lr'], rg['momentum'], rg['weight_decay'], rg['warmup_steps'], rg['r'], rg['weight_lr_power'])

def test_schedule_free_refuses_a_step_in_eval_mode():
    ps = _params(); opt = ScheduleFreeAdamW(ps)
    for p in ps: p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r'eval mode.*opt.train\(\)'): opt.step()
    opt.train(); opt.step(); opt.eval()
    with pytest.raises(RuntimeError, match='eval mode'): opt.step()

def _moving_mom_reference(ps0, lrs, moms, wd=0.):
    """Schedule-Free AdamW in the paper's form with x and z explicit, `mom` (beta) changing every step: the gradient is
    taken at y = (1-b)z + b x with the b of the previous step (the one y was formed with)."""
    x = [p.detach().clone() for p in ps0]; z = [p.clone() for p in x]; v = [torch.zeros_like(p) for p in x]
    b_prev, wsum, lr_max = moms[0], 0., -1.
    for t, (lr, b) in enumerate(zip(lrs, moms)):
        y = [(1 - b_prev)*zi + b_prev*xi for zi, xi in zip(z, x)]
        gs = _grads(t, y)
        lr_max = max(lr_max, lr); w = lr_max**2; wsum += w; c = w/wsum
        for i in range(len(x)):
            v[i] = 0.999*v[i] + 0.001*gs[i]**2
            u = gs[i]/((v[i]/(1 - 0.999**(t+1))).sqrt() + 1e-8) + wd*y[i]
            z[i] = z[i] - lr*u
            x[i] = (1 - c)*x[i] + c*z[i]
        b_prev = b
    return x, [(1 - b_prev)*zi + b_prev*xi for zi, xi in zip(z, x)]

def test_schedule_free_follows_a_moving_mom_exactly():
    "fit_one_cycle moves `mom` (beta): x stays the weighted average of the z's, and eval()/train() stay inverse."
    lrs = [0.01 + 0.002*t for t in range(STEPS)]; moms = [0.95 - 0.005*t for t in range(STEPS)]
    ps = _params(); ps0 = [p.detach().clone() for p in ps]
    opt = ScheduleFreeAdamW(ps, lr=lrs[0], mom=moms[0], wd=0.01); opt.train()
    for t in range(STEPS):
        opt.set_hypers(lr=lrs[t], mom=moms[t])
        with torch.no_grad(): gs = _grads(t, ps)
        for p, g in zip(ps, gs): p.grad = g
        opt.step()
    x, y = _moving_mom_reference(ps0, lrs, moms, wd=0.01)
    _same(ps, y)
    opt.eval(); _same(ps, x)
    opt.set_hyper('mom', 0.5); opt.train(); opt.eval(); _same(ps, x)   # a swap pair is the identity whatever mom is

def test_schedule_free_adamw_falling_lr_equals_reference():
    "A falling lr (one-cycle's second half, a decay): the average's weight uses the running `lr_max`, as schedulefree does."
    ps, qs = _params(), _params()
    ours = ScheduleFreeAdamW(ps, lr=0.05, betas=(0.9, 0.99), warmup_steps=3)
    ref = schedulefree.AdamWScheduleFree(qs, lr=0.05, betas=(0.9, 0.99), warmup_steps=3, foreach=False)
    ours.train(); ref.train()
    for t in range(STEPS):
        lr = 0.05 * (1 - t/STEPS) + 1e-3    # rises through the warm-up, then falls at every step
        ours.set_hyper('lr', lr); ref.param_groups[0]['lr'] = lr
        _run(ours, ps, 1, t); _run(ref, qs, 1, t)
    _same(ps, qs)
    ours.eval(); ref.eval(); _same(ps, qs)

def test_schedule_free_eval_after_a_mom_change_unmixes_with_the_mom_of_y():
    """`mom` set after the last step and before `eval()` (fit_one_cycle moves it between the last batch and validation):
    x comes out of y with the mom y was formed with. (schedulefree's own `eval()` uses the current beta here, so the
    reference is the paper's form with x and z explicit.)"""
    ps = _params(); ps0 = [p.detach().clone() for p in ps]
    opt = ScheduleFreeAdamW(ps, lr=0.02, mom=0.9); opt.train()
    _run(opt, ps)
    x, y = _moving_mom_reference(ps0, [0.02]*STEPS, [0.9]*STEPS)
    _same(ps, y)
    opt.set_hyper('mom', 0.5); opt.eval()
    _same(ps, x)

@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_schedule_free_state_dict_round_trips_in_either_mode(mode, tmp_path):
    ps = _params(); opt = ScheduleFreeAdamW(ps, lr=0.05, warmup_steps=3); opt.train(); _run(opt, ps, 6)
    getattr(opt, mode)()
    torch.save({'model': [p.detach().clone() for p in ps], 'opt': opt.state_dict()}, tmp_path/'ck.pt')
    _run(opt, ps, 6, 6) if mode == 'train' else (opt.train(), _run(opt, ps, 6, 6))
    ck = torch.load(tmp_path/'ck.pt', weights_only=True)
    qs = [torch.nn.Parameter(t) for t in ck['model']]
    new = ScheduleFreeAdamW(qs, lr=0.05, warmup_steps=3)
    new.load_state_dict(ck['opt'])
    assert new.train_mode == (mode == 'train')
    new.train(); _run(new, qs, 6, 6)
    _same(qs, ps, rtol=1e-12, atol=1e-14)

def test_schedule_free_weight_decay_skips_do_wd_false():
    "fastai marks biases and norm params `do_wd=False`: they step as the reference steps them without weight decay."
    ps, qs, rs = _params(), _params(), _params()
    ours = ScheduleFreeAdamW(ps, lr=0.05, weight_decay=0.1); ours.state[ps[1]]['do_wd'] = False
    ref = schedulefree.AdamWScheduleFree([dict(params=[qs[0], qs[2]]), dict(params=[qs[1]], weight_decay=0.)], lr=0.05, weight_decay=0.1)
    ours.train(); ref.train(); _run(ours, ps); _run(ref, qs); _same(ps, qs)

# ------------------------------------------------------------------------------------------------ Prodigy
PRODIGY_CASES = [dict(), dict(use_bias_correction=True), dict(safeguard_warmup=True), dict(weight_decay=0.1),
                 dict(weight_decay=0.1, decouple=False), dict(slice_p=3), dict(betas=(0.0, 0.99)), dict(beta3=0.9, d_coef=2.0),
                 dict(growth_rate=1.02, d0=1e-4), dict(lr=0.5, safeguard_warmup=True, slice_p=2),
                 dict(use_bias_correction=True, safeguard_warmup=True, d0=1e-3)]

@pytest.mark.parametrize('kw', PRODIGY_CASES, ids=lambda kw: '-'.join(kw) or 'default')
def test_prodigy_equals_reference(kw):
    ps, qs = _params(), _params()
    ours = Prodigy([dict(params=ps[:2]), dict(params=ps[2:])], **kw)
    ref = prodigyopt.Prodigy([dict(params=qs[:2]), dict(params=qs[2:])], **kw)
    ds = []
    for t in range(STEPS):
        for ps_, opt in ((ps, ours), (qs, ref)):
            with torch.no_grad(): gs = _grads(t, ps_)
            for p, g in zip(ps_, gs): p.grad = g.clone()
            opt.step()
        ds.append(ours.d)
        assert ours.d == pytest.approx(ref.param_groups[0]['d'], rel=1e-9)
    assert len(set(ds)) > 3   # d moved
    _same(ps, qs)

def test_prodigy_defaults_are_the_references():
    o, r = Prodigy(_params()), prodigyopt.Prodigy(_params())
    g, rg = o.param_groups[0], r.param_groups[0]
    for ours, theirs in [('lr', 'lr'), ('beta3', 'beta3'), ('eps', 'eps'), ('wd', 'weight_decay'), ('d0', 'd0'),
                         ('d_coef', 'd_coef'), ('slice_p', 'slice_p'), ('use_bias_correction', 'use_bias_correction'),
                         ('safeguard_warmup', 'safeguard_warmup')]: assert g[ours] == rg[theirs], ours
    assert (g['mom'], g['sqr_mom']) == rg['betas'] and o.decouple == rg['decouple'] and math.isinf(rg['growth_rate'])
    assert g['growth_rate'] is None   # inf: no limit

def test_prodigy_discriminative_lrs_are_multipliers_of_one_d():
    "Groups with lrs 0.5 and 1: one d, and in the first step group 0 moves half as far as with lrs 1 and 1."
    runs = {}
    for lrs in [(1., 1.), (0.5, 1.)]:
        ps = _params(); ps0 = [p.detach().clone() for p in ps]
        opt = Prodigy([dict(params=ps[:2], lr=lrs[0]), dict(params=ps[2:], lr=lrs[1])], lr=1., d0=1e-3)
        _run(opt, ps, 1)
        runs[lrs] = (opt.d, [p.detach() - q for p, q in zip(ps, ps0)])
        _run(opt, ps, 5, 1)
        assert len({g['d'] for g in opt.param_groups}) == 1 and opt.d > 1e-3
    (d1, m1), (d2, m2) = runs[(1., 1.)], runs[(0.5, 1.)]
    assert d1 == d2
    _same(m2, [0.5*m1[0], 0.5*m1[1], m1[2]], rtol=1e-12, atol=1e-16)
    with pytest.raises(RuntimeError, match='different lr'):   # what the reference does with them
        ref = prodigyopt.Prodigy([dict(params=_params()[:2], lr=0.5), dict(params=_params()[2:], lr=1.)])
        for p in ref.param_groups[0]['params'] + ref.param_groups[1]['params']: p.grad = torch.ones_like(p)
        ref.step()

def test_prodigy_group_at_lr_0_equals_reference():
    "The one lr split the reference takes: a group at lr 0 is left out of d's sums and does not move."
    ps, qs = _params(), _params()
    ours = Prodigy([dict(params=ps[:1], lr=0.), dict(params=ps[1:])])
    ref = prodigyopt.Prodigy([dict(params=qs[:1], lr=0.), dict(params=qs[1:])])
    _run(ours, ps); _run(ref, qs)
    assert ours.d == pytest.approx(ref.param_groups[0]['d'], rel=1e-9) and ours.d > 1e-6
    _same(ps, qs); assert torch.equal(ps[0], _params()[0])

def test_prodigy_d_round_trips_in_the_state_dict():
    ps = _params(); opt = Prodigy(ps); _run(opt, ps, 5)
    new = Prodigy(_params()); new.load_state_dict(opt.state_dict())
    assert new.d == opt.d and new.param_groups[0]['d_numerator'] == opt.param_groups[0]['d_numerator']

# ------------------------------------------------------------------------------------------------ ADOPT
@pytest.mark.parametrize('kw', [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decouple=True), dict(clip_lambda=None),
                                dict(betas=(0.5, 0.99), eps=1e-3), dict(clip_lambda=lambda s: 0.1*s)],
                         ids=['default', 'l2', 'decoupled', 'no_clip', 'betas', 'clip_fn'])
def test_adopt_equals_reference(kw):
    ps, qs = _params(), _params()
    ours, ref = ADOPT(ps, lr=0.01, **kw), adopt.ADOPT(qs, lr=0.01, **kw)
    _run(ours, ps); _run(ref, qs); _same(ps, qs)

def test_adopt_defaults_are_the_references():
    g, rg = ADOPT(_params()).param_groups[0], adopt.ADOPT(_params()).param_groups[0]
    assert (g['lr'], (g['mom'], g['sqr_mom']), g['eps'], g['wd']) == (rg['lr'], rg['betas'], rg['eps'], rg['weight_decay'])
    assert rg['decouple'] is False

# ------------------------------------------------------------------------------------------------ AdEMAMix
def _ademamix_paper(ps0, steps, lr, b1, b2, b3_final, alpha_final, eps, wd, T_b3=None, T_alpha=None):
    """Algorithm 1 of Pagliardini, Ablin & Grangier 2024 (The AdEMAMix Optimizer), with its schedulers: alpha rises
    linearly, beta3 so that the half-life ln(0.5)/ln(beta) - 1 rises linearly from beta1's to beta3's."""
    half = lambda b: math.log(0.5)/math.log(b + 1e-8) - 1
    theta = [p.detach().clone() for p in ps0]
    m1 = [torch.zeros_like(p) for p in theta]; m2 = [torch.zeros_like(p) for p in theta]; nu = [torch.zeros_like(p) for p in theta]
    for t in range(1, steps + 1):
        alpha = alpha_final if T_alpha is None else min(t*alpha_final/T_alpha, alpha_final)
        b3 = b3_final if T_b3 is None or t >= T_b3 else \
            0.5**(1/((1 - t/T_b3)*half(b1) + (t/T_b3)*half(b3_final) + 1))
        gs = _grads(t - 1, theta)
        for i, g in enumerate(gs):
            m1[i] = b1*m1[i] + (1 - b1)*g
            m2[i] = b3*m2[i] + (1 - b3)*g
            nu[i] = b2*nu[i] + (1 - b2)*g*g
            m1h, nuh = m1[i]/(1 - b1**t), nu[i]/(1 - b2**t)
            theta[i] = theta[i] - lr*((m1h + alpha*m2[i])/(nuh.sqrt() + eps) + wd*theta[i])
    return theta

@pytest.mark.parametrize('kw', [dict(), dict(weight_decay=0.1), dict(beta3_warmup=12, alpha_warmup=8),
                                dict(betas=(0.5, 0.99, 0.999), alpha=5.0, eps=1e-6, beta3_warmup=30, alpha_warmup=40)],
                         ids=['default', 'wd', 'warmups', 'betas_long_warmups'])
def test_ademamix_equals_the_papers_update(kw):
    ps = _params(); ps0 = [p.detach().clone() for p in ps]
    opt = AdEMAMix(ps, lr=0.01, **kw); _run(opt, ps)
    b1, b2, b3 = kw.get('betas', (0.9, 0.999, 0.9999))
    ref = _ademamix_paper(ps0, STEPS, 0.01, b1, b2, b3, kw.get('alpha', 2.0), kw.get('eps', 1e-8), kw.get('weight_decay', 0.),
                          kw.get('beta3_warmup'), kw.get('alpha_warmup'))
    _same(ps, ref)

def test_ademamix_refuses_two_betas():
    with pytest.raises(ValueError, match='betas'): AdEMAMix(_params(), betas=(0.9, 0.999))

# ------------------------------------------------------------------------------------------------ common
from registry import LR_FREE, LR_FREE_STATE_BYTES

@pytest.mark.parametrize('spec', LR_FREE, ids=lambda s: s.name)
def test_bad_input_is_refused_by_name(spec):
    with pytest.raises(ValueError, match='compiled'): spec.make(_params(), compiled='yes')   # compiled=True works: tests/test_compiled.py
    with pytest.raises(ValueError, match='fused'): spec.make(_params(), fused=True)
    with pytest.raises(ValueError, match='nonsense'): spec.make(_params(), nonsense=1)
    with pytest.raises(ValueError, match='lr'): spec.make(_params(), lr=-1.)

@pytest.mark.parametrize('spec', LR_FREE, ids=lambda s: s.name)
def test_state_bytes_per_parameter(spec):
    "float32 state per parameter after a step, as the README's table says (Adam: 8)."
    m = torch.nn.Linear(100, 100)
    opt = spec.make(m.parameters())
    if hasattr(opt, 'train_mode'): opt.train()
    for p in m.parameters(): p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in m.parameters())
    nbytes = sum(v.numel()*v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())
    assert nbytes / n == pytest.approx(LR_FREE_STATE_BYTES[spec.name], rel=0.01)

@pytest.mark.parametrize('spec', [s for s in LR_FREE if s.torch_cls is not None], ids=lambda s: s.name)
def test_float32_close_to_reference(spec):
    "float32, 30 steps: within float32 rounding of the reference package."
    ps, qs = _params(dtype=torch.float32), _params(dtype=torch.float32)
    ours, ref = spec.make(ps), spec.torch_make(qs)
    if hasattr(ours, 'train_mode'): ours.train(); ref.train()
    _run(ours, ps, 30); _run(ref, qs, 30)
    _same(ps, qs, rtol=1e-5, atol=1e-6)

# ------------------------------------------------------------------------------------------------ fastai
from functools import partial
from fastai.callback.core import Callback
from fastai.optimizer import OptimWrapper
from fastai.callback.schedule import *   # fit_one_cycle, lr_find, fine_tune

class _RefModes(Callback):
    "The hand-written callback a user of `schedulefree` in fastai needs: train mode to train, eval mode to validate and after fit."
    order = -5
    def before_train(self): self.learn.opt.opt.train()
    def before_validate(self): self.learn.opt.opt.eval()
    def after_fit(self): self.learn.opt.opt.eval()

def _ref_sf(params, lr, **kw): return OptimWrapper(params, schedulefree.AdamWScheduleFree, lr=lr, **kw)

def _two_groups(m): return [list(m[0].parameters()), [p for l in list(m)[1:] for p in l.parameters()]]

def _weights(model): return [p.detach().clone() for p in model.parameters()]

def _fit(learn, how, *args, **kw):
    "`learn.fit(...)` (or `how`) with the shared DataLoaders' shuffling seeded: two Learners see the same batches."
    import random
    learn.dls.train.rng = random.Random(0)
    getattr(learn, how)(*args, **kw)

def test_learner_schedule_free_needs_nothing_added(make_learner, tmp_path):
    "fit(3, 1e-2): epoch by epoch the validation losses of schedulefree's AdamW in OptimWrapper with a hand-written callback."
    ref = make_learner(opt_func=_ref_sf, cbs=_RefModes(), path=tmp_path)
    _fit(ref, 'fit', 3, 1e-2)
    learn = make_learner(opt_func=ScheduleFreeAdamW, path=tmp_path)
    _fit(learn, 'fit', 3, 1e-2)
    assert sum(isinstance(c, ScheduleFreeCallback) for c in learn.cbs) == 1
    ours_v, ref_v = [v[1] for v in learn.recorder.values], [v[1] for v in ref.recorder.values]
    assert ours_v == pytest.approx(ref_v, rel=1e-5) and ref_v[2] < ref_v[0]
    x = _weights(ref.model)   # the reference's weights after fit: x (its callback ended in eval mode)
    _same(_weights(learn.model), x, rtol=1e-5, atol=1e-6)
    assert learn.validate()[0] == pytest.approx(ref_v[-1], rel=1e-5)   # validate outside fit: at x
    learn.save('sf')
    _same(list(torch.load(tmp_path/'models'/'sf.pth', weights_only=True)['model'].values()), x, rtol=1e-5, atol=1e-6)
    learn.export(tmp_path/'sf.pkl')
    from fastai.learner import load_learner
    _same(_weights(load_learner(tmp_path/'sf.pkl').model), x, rtol=1e-5, atol=1e-6)
    assert sum(isinstance(c, ScheduleFreeCallback) for c in learn.cbs) == 1 and learn.opt.train_mode is False
    # load puts back the optimizer's mode with the weights; training goes on at y
    learn.load('sf'); _fit(learn, 'fit', 1, 1e-2); _fit(ref, 'fit', 1, 1e-2)
    assert learn.recorder.values[-1][1] == pytest.approx(ref.recorder.values[-1][1], rel=1e-5)

def test_learner_discriminative_lrs(make_learner, tmp_path):
    "Schedule-Free with two groups at lrs 1e-3 and 1e-2 equals the reference (which takes per-group lrs)."
    ref = make_learner(opt_func=_ref_sf, cbs=_RefModes(), splitter=_two_groups)
    _fit(ref, 'fit', 2, slice(1e-3, 1e-2))
    learn = make_learner(opt_func=ScheduleFreeAdamW, splitter=_two_groups)
    _fit(learn, 'fit', 2, slice(1e-3, 1e-2))
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-3, 1e-2])
    assert [v[1] for v in learn.recorder.values] == pytest.approx([v[1] for v in ref.recorder.values], rel=1e-5)

def test_learner_fit_one_cycle_keeps_x(make_learner):
    "fit_one_cycle moves mom (Schedule-Free's beta) every batch: after it the params are x, and a train/eval pair leaves them there."
    learn = make_learner(opt_func=ScheduleFreeAdamW)
    with learn.no_bar(): start = learn.validate()[0]   # the untrained model's validation loss
    _fit(learn, 'fit_one_cycle', 2, 1e-2)
    moms = learn.recorder.moms
    assert max(moms) - min(moms) > 0.05
    x = _weights(learn.model)
    learn.opt.train(); assert any(not torch.equal(a, b) for a, b in zip(_weights(learn.model), x))
    learn.opt.eval(); _same(_weights(learn.model), x, rtol=1e-6, atol=1e-7)
    assert learn.recorder.values[-1][1] < start / 4   # it learnt: x validates far below the untrained model

def test_learner_lr_find_and_fine_tune(make_learner):
    learn = make_learner(opt_func=ScheduleFreeAdamW, splitter=_two_groups)
    w0 = _weights(learn.model)
    res = learn.lr_find(show_plot=False)
    assert res.valley > 0
    _same(_weights(learn.model), w0, rtol=0, atol=0)   # lr_find restores the weights
    assert learn.opt.train_mode is False and not any(len(s) > 1 for s in learn.opt.state.values())
    v0 = learn.validate()[0]
    _fit(learn, 'fine_tune', 1, 1e-2, freeze_epochs=1)
    last = learn.recorder.values[-1][1]
    x = _weights(learn.model); learn.opt.train(); learn.opt.eval(); _same(_weights(learn.model), x, rtol=1e-6, atol=1e-7)
    assert last < 0.7*v0 and learn.validate()[0] == pytest.approx(last, rel=1e-5)

def test_learner_prodigy(make_learner):
    "Prodigy in a Learner equals prodigyopt in OptimWrapper at one lr; with discriminative lrs one d; fastai's default lr warned."
    ref = make_learner(opt_func=lambda ps, lr: OptimWrapper(ps, prodigyopt.Prodigy, lr=lr))
    _fit(ref, 'fit', 2, 1.0)
    learn = make_learner(opt_func=Prodigy)
    _fit(learn, 'fit', 2, 1.0)
    assert sum(isinstance(c, ScheduleFreeCallback) for c in learn.cbs) == 1
    assert [v[1] for v in learn.recorder.values] == pytest.approx([v[1] for v in ref.recorder.values], rel=1e-5)
    assert learn.opt.d == pytest.approx(ref.opt.opt.param_groups[0]['d'], rel=1e-5) and learn.opt.d > 1e-4
    learn = make_learner(opt_func=Prodigy, splitter=_two_groups)
    _fit(learn, 'fit', 1, slice(0.1, 1.0))
    assert len({g['d'] for g in learn.opt.param_groups}) == 1 and learn.opt.d > 1e-4
    with pytest.warns(UserWarning, match='lr=0.001'): make_learner(opt_func=Prodigy).fit(1)
    with warnings.catch_warnings():   # one-cycle sets lr before each batch: before the fit the groups still hold fastai's default
        warnings.simplefilter('error', UserWarning)
        make_learner(opt_func=Prodigy).fit_one_cycle(1, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        make_learner(opt_func=Prodigy).lr_find(show_plot=False, num_it=20)   # the finder sweeps lr: no warning

def test_recalibrate_bn_is_the_exact_average():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    xs = [torch.randn(8, 4) for _ in range(5)]
    assert recalibrate_bn(m, ([x] for x in xs), n=3) == 3 and m.training
    h = torch.cat([m[0](x) for x in xs[:3]]).detach()
    assert_close(m[1].running_mean, h.mean(0).detach(), rtol=1e-5, atol=1e-6)
    assert_close(m[1].running_var, torch.stack([m[0](x).detach().var(0, unbiased=True) for x in xs[:3]]).mean(0), rtol=1e-5, atol=1e-6)
    assert m[1].momentum == 0.1

def test_learner_bn_recalibration_at_x(digits_dls):
    "ScheduleFreeCallback(bn_batches=n) given by the user: not added twice; BatchNorm's statistics recomputed at x before validating."
    import torch.nn.functional as F
    from fastai.learner import Learner
    from fastai.callback.progress import ProgressCallback
    from fastcore.basics import noop
    def make(**kw):
        torch.manual_seed(0)
        n_in = digits_dls.train_ds[0][0].shape[-1]
        m = torch.nn.Sequential(torch.nn.Linear(n_in, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        l = Learner(digits_dls, m, loss_func=F.cross_entropy, opt_func=ScheduleFreeAdamW, **kw)
        l.remove_cb(ProgressCallback); l.logger = noop
        return l
    learn = make(cbs=ScheduleFreeCallback(bn_batches=4))
    _fit(learn, 'fit', 1, 1e-2)
    assert sum(isinstance(c, ScheduleFreeCallback) for c in learn.cbs) == 1 and learn.schedule_free.bn_batches == 4
    bn = learn.model[1]
    assert bn.num_batches_tracked.item() == 4   # reset, then 4 batches at x
    # the recalibrated statistics are the exact average at x over those batches: recompute with the same batches
    plain = make(); _fit(plain, 'fit', 1, 1e-2)
    assert not torch.allclose(plain.model[1].running_mean, bn.running_mean)

def test_learner_bn_recalibration_is_the_average_at_x():
    """BatchNorm's statistics recomputed before validation are those of the model at x (the params after `eval()`): an
    explicit recompute at the final weights over the same (unshuffled) training batches, mean and unbiased variance."""
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.losses import MSELossFlat
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(192, 6, generator=g), torch.randn(192, 3, generator=g)
    ds = list(zip(xs, ys))
    dls = DataLoaders.from_dsets(ds[:160], ds[160:], bs=32, shuffle=False, device='cpu', num_workers=0)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    learn = Learner(dls, m, loss_func=MSELossFlat(), opt_func=ScheduleFreeAdamW, cbs=ScheduleFreeCallback(bn_batches=3))
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-2)
    assert not learn.opt.train_mode   # the params hold x: validation and after_fit left them there, and nothing stepped since
    with torch.no_grad(): h = [m[0](xb) for xb, _ in list(dls.train)[:3]]
    assert_close(m[1].running_mean, torch.cat(h).mean(0), rtol=1e-5, atol=1e-6)
    assert_close(m[1].running_var, torch.stack([t.var(0, unbiased=True) for t in h]).mean(0), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('state_dtype', ['int8', torch.bfloat16])
def test_schedule_free_modes_with_low_precision_state(state_dtype):
    "eval()/train() read `z` through the precision layer (int8 codes, bf16 storage): the swaps stay inverse."
    from fastopts.lr_free import ScheduleFreeAdamW
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 80, generator=g))
    opt = ScheduleFreeAdamW([p], lr=1e-2, state_dtype=state_dtype); opt.train()
    for _ in range(3): p.grad = torch.randn(p.shape, generator=g); opt.step()
    assert opt.state[p]['z'].dtype == (torch.int8 if state_dtype == 'int8' else torch.bfloat16)
    y = p.detach().clone(); opt.eval()
    assert not torch.allclose(p, y)
    opt.train()
    torch.testing.assert_close(p.detach(), y, rtol=0, atol=1e-6)
