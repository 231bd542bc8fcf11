"""Reference tests for `fastopts.optimizer`: 200 steps on a random problem, checked against independent references.

References: `torch.optim` (SGD, Adam, AdamW, RMSprop, RAdam), fastai's `Lamb`, and updates written out here
(the lecture's dampened momentum, the Lion paper's update, Lookahead). The problem has two parameter groups with
different hypers, a frozen parameter (`requires_grad=False`) and parameters whose `grad` is `None` at some steps.
The gradient is a seeded noise term plus a pull towards zero (`g = noise_t + 0.5 p`), so every step depends on the
parameters themselves and an error anywhere shows in the trajectory.
"""
import pytest, torch
from functools import partial
from torch.testing import assert_close
import fastai.optimizer as fo
from fastopts.optimizer import SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion, Lookahead
from registry import seeded_params

SHAPES = [(5, 3), (7,), (2, 3, 4), (4,), (3, 3), (6,)]
GROUPS = [[0, 1, 2], [3, 4, 5]]       # indices of SHAPES in each param group
FROZEN = {4}                          # requires_grad=False: never gets a grad
SKIP = {1: 3, 3: 4}                   # param index -> its grad is None at steps t with t % k == 0
STEPS, CHECK_EVERY = 200, 50
# float64: every rule reaches max |ours - ref| <= 8.9e-16 and max elementwise |ours - ref|/|ref| <= 1.5e-13 over 200
# steps (momentum, on entries near 0; the others <= 8e-15; measured with `trajectory` on every case, both builds):
# atol 1e-13 and rtol 1e-12 keep a ~100x margin and still catch a float32 step anywhere in the chain (~1e-8 relative)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=1e-5, atol=1e-6)}

def make_params(dtype, seed=0): return seeded_params(SHAPES, dtype, seed, FROZEN)

def make_noise(dtype, seed=1, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)]

def set_grads(ps, t, noise):
    "Gradients for step `t` (1-based): none for frozen params, `None` on skipped steps, else noise + 0.5 p."
    for i, p in enumerate(ps):
        if i in FROZEN: continue
        p.grad = None if (i in SKIP and t % SKIP[i] == 0) else noise[t-1][i] + 0.5 * p.detach()

def trajectory(build, dtype, steps=STEPS):
    "Run `build(groups_of_params)` for `steps` steps; parameter snapshots every `CHECK_EVERY` steps."
    ps, noise = make_params(dtype), make_noise(dtype, steps=steps)
    opt = build([[ps[i] for i in idx] for idx in GROUPS])
    snaps = []
    for t in range(1, steps+1):
        set_grads(ps, t, noise)
        opt.step()
        if t % CHECK_EVERY == 0 or t == steps: snaps.append([p.detach().clone() for p in ps])
    return snaps, ps

def assert_same_trajectory(ours, ref, dtype):
    for k, (a, b) in enumerate(zip(ours, ref)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.dtype == dtype
            assert_close(x, y, **TOL[dtype], msg=lambda m: f"checkpoint {k}, param {i} {tuple(x.shape)}: {m}")

# ---------------------------------------------------------------- how to build the fastopts side
def build_fastopts(fn, hps, mode, **kw):
    """fastopts optimizer on the groups, per-group hypers `hps` given as torch-style dicts or set by `set_hyper`.
    The constructor gets the first group's hypers as defaults (SGD and RMSProp choose their callbacks from `mom`)."""
    def _build(groups):
        if mode == 'dicts': return fn([{'params': g, **hp} for g, hp in zip(groups, hps)], **hps[0], **kw)
        opt = fn(groups, **hps[0], **kw)
        for k in hps[0]: opt.set_hyper(k, [hp[k] for hp in hps])
        return opt
    return _build

# ---------------------------------------------------------------- the references
def torch_groups(groups, hps, names):
    "Torch-style group dicts; `names` maps a torch key to a function of the fastopts hypers of that group."
    return [{'params': g, **{k: f(hp) for k, f in names.items()}} for g, hp in zip(groups, hps)]

class DecoupledWD:
    "Decoupled weight decay p *= 1 - lr*wd on params with a grad, then `opt.step()` (lr read from `opt` per group)."
    def __init__(self, opt, wds): self.opt, self.wds = opt, wds
    @torch.no_grad()
    def step(self):
        for g, wd in zip(self.opt.param_groups, self.wds):
            for p in g['params']:
                if p.grad is not None: p.mul_(1 - g['lr'] * wd)
        self.opt.step()

class RefMomentum:
    "The lecture's momentum: V_0 = 0; V = mom V + (1-mom) g; p -= lr V (decoupled wd first)."
    def __init__(self, groups, hps): self.groups, self.hps, self.V = groups, hps, {}
    @torch.no_grad()
    def step(self):
        for g, hp in zip(self.groups, self.hps):
            for p in g:
                if p.grad is None: continue
                p.mul_(1 - hp['lr'] * hp.get('wd', 0.))
                V = self.V.get(p, torch.zeros_like(p))
                V = hp['mom'] * V + (1 - hp['mom']) * p.grad
                self.V[p] = V
                p.sub_(hp['lr'] * V)

class RefLion:
    """Lion (Chen et al. 2023, Algorithm 2): c = b1 m + (1-b1) g; p -= lr (sign(c) + wd p); m = b2 m + (1-b2) g.
    The decay is written p *= 1 - lr wd before the sign step (the same update; in float32 the product form rounds
    differently from p - lr wd p by a bias of ~1e-7 per step, which 200 steps would pile above rtol 1e-5)."""
    def __init__(self, groups, hps): self.groups, self.hps, self.m = groups, hps, {}
    @torch.no_grad()
    def step(self):
        for g, hp in zip(self.groups, self.hps):
            b1, b2, lr, wd = hp['mom'], hp['sqr_mom'], hp['lr'], hp['wd']
            for p in g:
                if p.grad is None: continue
                m = self.m.get(p, torch.zeros_like(p))
                c = b1 * m + (1 - b1) * p.grad
                p.mul_(1 - lr * wd)
                p.sub_(lr * torch.sign(c))
                self.m[p] = b2 * m + (1 - b2) * p.grad

class RefLookahead:
    "Lookahead (Zhang et al. 2019): every k steps slow += alpha (fast - slow); fast = slow. Slow starts as the params."
    def __init__(self, opt, k, alpha): self.opt, self.k, self.alpha, self.count, self.slow = opt, k, alpha, 0, None
    @torch.no_grad()
    def step(self):
        params = [p for g in self.opt.param_groups for p in g['params']]
        if self.slow is None: self.slow = [p.detach().clone() for p in params]
        self.opt.step()
        self.count += 1
        if self.count % self.k: return
        for s, p in zip(self.slow, params):
            s.add_(self.alpha * (p - s))
            p.copy_(s)

def fastai_lamb(groups, hps):
    "fastai's Lamb (decoupled wd), every hyper passed explicitly since fastai's defaults differ."
    opt = fo.Lamb(groups, lr=hps[0]['lr'], mom=hps[0]['mom'], sqr_mom=hps[0]['sqr_mom'], eps=hps[0]['eps'],
                  wd=hps[0]['wd'], decouple_wd=True)
    for k in hps[0]: opt.set_hyper(k, [hp[k] for hp in hps])
    return opt

SGD_NAMES = dict(lr=lambda h: h['lr'], momentum=lambda h: h['mom'])
ADAM_NAMES = dict(lr=lambda h: h['lr'], betas=lambda h: (h['mom'], h['sqr_mom']), eps=lambda h: h['eps'])
RMS_NAMES = dict(lr=lambda h: h['lr'], alpha=lambda h: h['sqr_mom'], eps=lambda h: h['eps'],
                 momentum=lambda h: h['mom'])
WD = dict(weight_decay=lambda h: h['wd'])

def torch_ref(cls, names, **kw): return lambda hps: (lambda groups: cls(torch_groups(groups, hps, names), **kw))
def decoupled_ref(cls, names, **kw):
    return lambda hps: (lambda groups: DecoupledWD(cls(torch_groups(groups, hps, names), **kw), [h['wd'] for h in hps]))

# ---------------------------------------------------------------- the cases
# name: (fastopts fn, fixed kwargs, per-group hypers in fastopts names, reference builder taking the hypers)
CASES = {
    'sgd': (SGD, {}, [dict(lr=0.1, mom=0.), dict(lr=0.03, mom=0.)], torch_ref(torch.optim.SGD, SGD_NAMES)),
    'sgd_mom': (SGD, {}, [dict(lr=0.1, mom=0.9), dict(lr=0.03, mom=0.5)], torch_ref(torch.optim.SGD, SGD_NAMES)),
    'sgd_nesterov': (SGD, dict(nesterov=True), [dict(lr=0.1, mom=0.9), dict(lr=0.03, mom=0.5)],
                     torch_ref(torch.optim.SGD, SGD_NAMES, nesterov=True, momentum=0.9)),
    'sgd_l2': (SGD, dict(decouple_wd=False), [dict(lr=0.1, mom=0.9, wd=0.01), dict(lr=0.03, mom=0.5, wd=0.1)],
               torch_ref(torch.optim.SGD, {**SGD_NAMES, **WD})),
    'sgd_l2_nesterov': (SGD, dict(decouple_wd=False, nesterov=True),
                        [dict(lr=0.1, mom=0.9, wd=0.01), dict(lr=0.03, mom=0.5, wd=0.1)],
                        torch_ref(torch.optim.SGD, {**SGD_NAMES, **WD}, nesterov=True, momentum=0.9)),
    'sgd_decoupled': (SGD, {}, [dict(lr=0.1, mom=0.9, wd=0.01), dict(lr=0.03, mom=0.5, wd=0.1)],
                      decoupled_ref(torch.optim.SGD, SGD_NAMES)),
    'sgd_plain_decoupled': (SGD, {}, [dict(lr=0.1, mom=0., wd=0.05), dict(lr=0.03, mom=0., wd=0.2)],
                            decoupled_ref(torch.optim.SGD, SGD_NAMES)),
    'momentum': (Momentum, {}, [dict(lr=0.1, mom=0.9), dict(lr=0.05, mom=0.7)],
                 lambda hps: (lambda groups: RefMomentum(groups, hps))),
    'momentum_wd': (Momentum, {}, [dict(lr=0.1, mom=0.9, wd=0.01), dict(lr=0.05, mom=0.7, wd=0.1)],
                    lambda hps: (lambda groups: RefMomentum(groups, hps))),
    'rmsprop': (RMSProp, {}, [dict(lr=1e-2, sqr_mom=0.99, mom=0., eps=1e-8), dict(lr=3e-3, sqr_mom=0.9, mom=0., eps=1e-3)],
                torch_ref(torch.optim.RMSprop, RMS_NAMES)),
    'rmsprop_mom': (RMSProp, {}, [dict(lr=1e-2, sqr_mom=0.99, mom=0.9, eps=1e-8),
                                  dict(lr=3e-3, sqr_mom=0.9, mom=0.5, eps=1e-3)],
                    torch_ref(torch.optim.RMSprop, RMS_NAMES)),
    'rmsprop_wd': (RMSProp, {}, [dict(lr=1e-2, sqr_mom=0.99, mom=0.9, eps=1e-8, wd=0.01),
                                 dict(lr=3e-3, sqr_mom=0.9, mom=0., eps=1e-3, wd=0.1)],
                   decoupled_ref(torch.optim.RMSprop, RMS_NAMES)),
    'adam': (Adam, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8), dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4)],
             torch_ref(torch.optim.Adam, ADAM_NAMES)),
    'adam_l2': (Adam, dict(decouple_wd=False), [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01),
                                                dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.1)],
                torch_ref(torch.optim.Adam, {**ADAM_NAMES, **WD})),
    'adam_decoupled': (Adam, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01),
                                  dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.1)],
                       torch_ref(torch.optim.AdamW, {**ADAM_NAMES, **WD})),
    'adamw': (AdamW, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01),
                          dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.1)],
              torch_ref(torch.optim.AdamW, {**ADAM_NAMES, **WD})),
    'radam': (RAdam, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8), dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4)],
              torch_ref(torch.optim.RAdam, ADAM_NAMES)),
    'radam_l2': (RAdam, dict(decouple_wd=False), [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01),
                                                  dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.1)],
                 torch_ref(torch.optim.RAdam, {**ADAM_NAMES, **WD})),
    'radam_decoupled': (RAdam, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01),
                                    dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.1)],
                        torch_ref(torch.optim.RAdam, {**ADAM_NAMES, **WD}, decoupled_weight_decay=True)),
    'lamb': (Lamb, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-6, wd=0.), dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.)],
             lambda hps: (lambda groups: fastai_lamb(groups, hps))),
    'lamb_wd': (Lamb, {}, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-6, wd=0.01),
                           dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4, wd=0.1)],
                lambda hps: (lambda groups: fastai_lamb(groups, hps))),
    'lion': (Lion, {}, [dict(lr=1e-3, mom=0.9, sqr_mom=0.99, wd=0.), dict(lr=3e-4, mom=0.95, sqr_mom=0.98, wd=0.)],
             lambda hps: (lambda groups: RefLion(groups, hps))),
    'lion_wd': (Lion, {}, [dict(lr=1e-3, mom=0.9, sqr_mom=0.99, wd=0.1), dict(lr=3e-4, mom=0.95, sqr_mom=0.98, wd=1.)],
                lambda hps: (lambda groups: RefLion(groups, hps))),
}

# construction by fastai's list of lists + `set_hyper`, in both dtypes; by torch-style group dicts in float64 only
# (that path differs in construction, not in the arithmetic, and the suite has a time budget)
MODES = [pytest.param('lists', torch.float64, id='lists-f64'), pytest.param('lists', torch.float32, id='lists-f32'),
         pytest.param('dicts', torch.float64, id='dicts-f64'), pytest.param('callbacks', torch.float32, id='callbacks-f32')]
# 'callbacks': the list-of-lists build with `fused=False`, so chains that have a fused kernel are checked on both paths
FUSED_MODE = {'lists': {}, 'dicts': {}, 'callbacks': {'fused': False}}

@pytest.mark.parametrize('mode,dtype', MODES)
@pytest.mark.parametrize('case', list(CASES))
def test_matches_reference(case, mode, dtype):
    fn, kw, hps, ref = CASES[case]
    ours, ps_ours = trajectory(build_fastopts(fn, hps, mode, **kw), dtype)
    theirs, ps_ref = trajectory(ref(hps), dtype)
    assert_same_trajectory(ours, theirs, dtype)
    # the frozen param never moved; the problem really moved the others
    init = make_params(dtype)
    for i in FROZEN: assert torch.equal(ps_ours[i], init[i])
    assert all(not torch.equal(ps_ours[i], init[i]) for i in range(len(SHAPES)) if i not in FROZEN)

LOOKAHEAD_CASES = {
    'sgd_k5': (SGD, [dict(lr=0.1, mom=0.9), dict(lr=0.03, mom=0.5)], torch.optim.SGD, SGD_NAMES, 5, 0.5),
    'adam_k6': (Adam, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8), dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4)],
                torch.optim.Adam, ADAM_NAMES, 6, 0.5),
    'radam_k3': (RAdam, [dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8), dict(lr=3e-3, mom=0.8, sqr_mom=0.99, eps=1e-4)],
                 torch.optim.RAdam, ADAM_NAMES, 3, 0.8),
}

@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('case', list(LOOKAHEAD_CASES))
def test_lookahead_matches_direct(case, dtype):
    fn, hps, tcls, names, k, alpha = LOOKAHEAD_CASES[case]
    inner = build_fastopts(fn, hps, 'lists')
    ours, _ = trajectory(lambda groups: Lookahead(inner(groups), k=k, alpha=alpha), dtype)
    theirs, _ = trajectory(lambda groups: RefLookahead(tcls(torch_groups(groups, hps, names)), k, alpha), dtype)
    assert_same_trajectory(ours, theirs, dtype)

def test_lookahead_is_not_the_inner_optimizer():
    "Lookahead really pulls back: with k=5 it differs from the bare inner optimizer (so the test above can fail)."
    la, _ = trajectory(lambda groups: Lookahead(SGD(groups, lr=0.1, mom=0.9), k=5, alpha=0.5), torch.float64, steps=20)
    bare, _ = trajectory(lambda groups: SGD(groups, lr=0.1, mom=0.9), torch.float64, steps=20)
    assert not torch.allclose(la[-1][0], bare[-1][0])

@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('name', ['sgd_mom', 'adam', 'rmsprop_mom'])
def test_flat_param_list_is_one_group(name, dtype):
    "A flat list of params (and a generator) gives one group with the defaults, as torch's optimizers do."
    fn, kw, hps, ref = CASES[name]
    hp = hps[0]
    flat = lambda groups: [p for g in groups for p in g]
    ours, _ = trajectory(lambda groups: fn(flat(groups), **hp, **kw), dtype, steps=50)
    gen, _ = trajectory(lambda groups: fn((p for p in flat(groups)), **hp, **kw), dtype, steps=50)
    theirs, _ = trajectory(lambda groups: ref([hp])([flat(groups)]), dtype, steps=50)
    assert_same_trajectory(ours, theirs, dtype)
    assert_same_trajectory(gen, theirs, dtype)

def test_reference_tests_can_fail():
    "The harness notices a wrong hyper: Adam with sqr_mom 0.99 is not torch Adam with beta2 0.999."
    hps = CASES['adam'][2]
    ours, _ = trajectory(build_fastopts(Adam, [{**h, 'sqr_mom': 0.99} for h in hps], 'lists'), torch.float64, steps=20)
    theirs, _ = trajectory(torch_ref(torch.optim.Adam, ADAM_NAMES)(hps), torch.float64, steps=20)
    with pytest.raises(AssertionError): assert_same_trajectory(ours, theirs, torch.float64)

@pytest.mark.parametrize('fn,tcls,names,hps', [
    (SGD, torch.optim.SGD, SGD_NAMES, [dict(lr=0.1, mom=0.9), dict(lr=0.03, mom=0.5)]),
    (RMSProp, torch.optim.RMSprop, RMS_NAMES, [dict(lr=1e-2, sqr_mom=0.99, mom=0.9, eps=1e-8),
                                               dict(lr=3e-3, sqr_mom=0.9, mom=0.5, eps=1e-3)])],
    ids=['sgd', 'rmsprop'])
def test_group_dict_hypers_are_honoured(fn, tcls, names, hps):
    "torch-style group dicts that ask for momentum get it, although the optimizer's default `mom` is 0 (as in torch)."
    ours, _ = trajectory(lambda groups: fn([{'params': g, **hp} for g, hp in zip(groups, hps)], lr=hps[0]['lr']),
                         torch.float64, steps=50)
    theirs, _ = trajectory(lambda groups: tcls(torch_groups(groups, hps, names), lr=hps[0]['lr']), torch.float64, steps=50)
    assert_same_trajectory(ours, theirs, torch.float64)

def test_group_dicts_fill_missing_hypers_from_defaults():
    "A group dict with only `lr` takes the other hypers from the optimizer's defaults (Adam: 0.9, 0.999, 1e-8)."
    hps = [dict(lr=1e-2), dict(lr=3e-3)]
    ours, _ = trajectory(lambda groups: Adam([{'params': g, **hp} for g, hp in zip(groups, hps)], lr=1.), torch.float64)
    theirs, _ = trajectory(lambda groups: torch.optim.Adam([{'params': g, **hp} for g, hp in zip(groups, hps)], lr=1.,
                                                            betas=(0.9, 0.999), eps=1e-8), torch.float64)
    assert_same_trajectory(ours, theirs, torch.float64)

# ---------------------------------------------------------------- Lamb in float64 (issue 23)
LAMB_F64 = dict(lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)

def lamb_f64_gap(steps=50):
    "Max elementwise |ours - fastai's| / |fastai's| of `Lamb` in float64 over `steps` steps, both groups with `LAMB_F64`."
    hps = [LAMB_F64, LAMB_F64]
    ours, _ = trajectory(build_fastopts(Lamb, hps, 'lists'), torch.float64, steps=steps)
    theirs, _ = trajectory(lambda groups: fastai_lamb(groups, hps), torch.float64, steps=steps)
    return max(float(((x - y).abs() / y.abs()).max()) for a, b in zip(ours, theirs) for x, y in zip(a, b))

def test_lamb_f64_equals_fastai():
    "float64 Lamb computes its trust ratio in float64: fastai's Lamb to 1e-12 relative over 50 steps (measured 3.2e-15)."
    assert lamb_f64_gap() <= 1e-12

def test_lamb_f64_gate_rejects_a_float32_trust_ratio(monkeypatch):
    "The gate above can fail: norms upcast with `.float()` (the bug it was written for) put Lamb 6.8e-8 away."
    import fastopts.optimizer as fopt
    full_norms = fopt._full_norms
    monkeypatch.setattr(fopt, '_full_norms', lambda xs: full_norms(xs).float())
    assert lamb_f64_gap() > 1e-12
    # and the 200-step reference test's float64 tolerance rejects it too
    fn, kw, hps, ref = CASES['lamb_wd']
    ours, _ = trajectory(build_fastopts(fn, hps, 'lists', **kw), torch.float64, steps=50)
    theirs, _ = trajectory(ref(hps), torch.float64, steps=50)
    with pytest.raises(AssertionError, match='Tensor-likes are not close'): assert_same_trajectory(ours, theirs, torch.float64)
