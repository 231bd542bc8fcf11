"""Gradient release: stepping each param inside backward equals the ordinary step, exactly; what cannot work is refused.

The reference is the same optimizer stepped the ordinary way (backward, then `opt.step()`), on a copy of the model.
"""
import copy, warnings
from functools import partial
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.callback.training import GradientClip, GradientAccumulation
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.core import Callback, CancelBackwardException
from fastai.losses import MSELossFlat
import fastai.callback.schedule  # noqa: F401 (fit_one_cycle)
from fastopts.optimizer import Adam, AdamW, Optimizer, ParamGroupView
from fastopts.release import GradientRelease, release_gradients
from registry import ALL, RELEASE, RELEASE_REFUSED, ids

def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)) for _ in range(n)]

def _train(spec, release:bool):
    m = _model()
    opt = spec.make(list(m.parameters()))
    h = release_gradients(opt) if release else None
    for x, y in _batches():
        nn.functional.mse_loss(m(x), y).backward()
        if release: assert all(p.grad is None for p in m.parameters())   # stepped and freed inside backward
        opt.step(); opt.zero_grad()
    if h: h.remove()
    return [p.detach().clone() for p in m.parameters()], h

@pytest.mark.parametrize('spec', RELEASE, ids=ids)
def test_release_equals_ordinary_step(spec):
    ref, _ = _train(spec, False)
    got, h = _train(spec, True)
    assert h.steps == len(ref) * len(_batches())
    for i, (a, b) in enumerate(zip(got, ref)): assert torch.equal(a, b), f"{spec.name}: param {i} differs by {(a - b).abs().max()}"

@pytest.mark.parametrize('spec', [o for o in ALL if o.name in RELEASE_REFUSED], ids=ids)
def test_release_refused_by_name_before_a_param_moves(spec):
    "An optimizer whose step couples its params (Schedule-Free's weight schedule, Prodigy's d) refuses gradient release by name."
    m = _model()
    opt = spec.make(list(m.parameters()))
    if hasattr(opt, 'train_mode'): opt.train()
    w = [p.detach().clone() for p in m.parameters()]
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=RELEASE_REFUSED[spec.name]), release_gradients(opt):
        nn.functional.mse_loss(m(x), y).backward()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), w))

def test_release_composes_with_precision():
    "bf16 weights, Kahan summation and int8 state, stepped one param at a time: the same numbers as the ordinary step."
    out = []
    for release in (False, True):
        m = _model().to(torch.bfloat16)
        opt = AdamW(list(m.parameters()), lr=1e-3, kahan_sum=True, state_dtype='int8')
        h = release_gradients(opt) if release else None
        for x, y in _batches():
            nn.functional.mse_loss(m(x.bfloat16()).float(), y).backward()
            opt.step(); opt.zero_grad()
        out.append(([p.detach().clone() for p in m.parameters()], [copy.deepcopy(opt.state[p]) for p in m.parameters()]))
    (p1, s1), (p2, s2) = out
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(s.keys() == t.keys() and all(torch.equal(s[k], t[k]) if isinstance(s[k], torch.Tensor) else s[k] == t[k] for k in s)
               for s, t in zip(s1, s2))
    assert any('kahan_comp' in s for s in s1)

def _learner(cbs=(), opt_func=partial(Adam, lr=1e-2)):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 6, generator=g), torch.randn(256, 3, generator=g)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:192], ds[192:], bs=32, device='cpu', num_workers=0, shuffle=False)
    learn = Learner(dls, _model(), loss_func=MSELossFlat(), opt_func=opt_func, cbs=list(cbs))
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    return learn

def test_fastai_one_cycle_equal():
    "Under fit_one_cycle (lr and mom move every batch), GradientRelease gives the ordinary fit's weights exactly."
    a, b = _learner(), _learner([GradientRelease()])
    with a.no_logging(), b.no_logging():
        a.fit_one_cycle(2, 1e-2); b.fit_one_cycle(2, 1e-2)
    for p, q in zip(a.model.parameters(), b.model.parameters()): assert torch.equal(p, q)
    assert not any(p._post_accumulate_grad_hooks for p in b.model.parameters())   # hooks gone after fit
    x = torch.randn(4, 6); w = [p.clone() for p in b.model.parameters()]
    b.model(x).sum().backward()                                                   # a backward outside fit steps nothing
    assert all(torch.equal(p, q) for p, q in zip(b.model.parameters(), w))

class UserClip(Callback):
    def before_step(self): nn.utils.clip_grad_norm_(self.learn.model.parameters(), 1.)

@pytest.mark.parametrize('cb,name', [(GradientClip(), 'GradientClip'), (GradientAccumulation(64), 'GradientAccumulation'),
                                     (MixedPrecision(), 'MixedPrecision'), (UserClip(), 'UserClip')])
def test_fit_refuses(cb, name):
    learn = _learner([GradientRelease(), cb])
    with pytest.raises(ValueError, match=f"`{name}`"), learn.no_logging(): learn.fit(1)
    w = [p.clone() for p in learn.model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), w))

def test_refuses_grad_scaler_and_torch_optimizers():
    class Scaled(Callback):
        def __init__(self): self.scaler = torch.amp.GradScaler('cpu')
    with pytest.raises(ValueError, match='`Scaled`.*GradScaler'):
        learn = _learner([GradientRelease(), Scaled()])
        with learn.no_logging(): learn.fit(1)
    with pytest.raises(ValueError, match='step_params'): release_gradients(torch.optim.SGD(_model().parameters(), lr=0.1))

def test_refuses_rules_needing_all_grads():
    def global_clip(grp, **_): pass
    global_clip.needs_all_grads = True
    opt = Optimizer(list(_model().parameters()), [global_clip], lr=0.1)
    with pytest.raises(ValueError, match='global_clip'): release_gradients(opt)

def test_release_checks_every_chain_of_a_multi_chain_optimizer():
    "A chain callback that needs all gradients is found in any chain of a per-group-chains optimizer (Muon's hybrid shape)."
    from fastopts.optimizer import Optimizer, sgd_step
    def global_norm(grp, **_): pass
    global_norm.needs_all_grads = True
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = Optimizer([{'params': [a], 'chain': 'x'}, {'params': [b], 'chain': 'y'}], {'x': [sgd_step], 'y': [global_norm, sgd_step]}, lr=0.1)
    with pytest.raises(ValueError, match='global_norm'): release_gradients(opt)

def test_bf16_mixed_precision_is_accepted():
    "bf16 autocast has no loss scaler (fastai's `MixedPrecision(amp_mode='bf16')`): gradient release runs with it, equal to the plain fit."
    a, b = _learner([MixedPrecision(amp_mode='bf16')]), _learner([MixedPrecision(amp_mode='bf16'), GradientRelease()])
    with a.no_logging(), b.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)   # on CPU, fastai's autocast('cuda') switches itself off, saying so
        a.fit(1); b.fit(1)
    for p, q in zip(a.model.parameters(), b.model.parameters()): assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), _model().parameters()))

def test_refuses_rules_needing_all_grads_inside_lookahead():
    "The needs-all-grads check reads the chains of the optimizer a `Lookahead` wraps."
    from fastopts.lookahead import Lookahead
    from fastopts.optimizer import sgd_step
    def global_clip(grp, **_): pass
    global_clip.needs_all_grads = True
    opt = Lookahead(Optimizer(list(_model().parameters()), [global_clip, sgd_step], lr=0.1))
    with pytest.raises(ValueError, match='global_clip'): release_gradients(opt)
    release_gradients(Lookahead(Adam(list(_model().parameters()), lr=0.1))).remove()   # a per-param rule inside: accepted

class CancelledBackward(Callback):
    "Cancels every backward (after GradientRelease switched release on), then runs a backward of its own in `after_cancel_backward`."
    order = GradientRelease.order + 1
    def before_fit(self): self.stepped, self.kept = [], []
    def before_backward(self): raise CancelBackwardException()
    def after_cancel_backward(self):
        ps = list(self.learn.model.parameters()); w = [p.detach().clone() for p in ps]
        self.learn.model(self.learn.xb[0]).pow(2).mean().backward()
        self.stepped.append(any(not torch.equal(p, q) for p, q in zip(ps, w)))
        self.kept.append(all(p.grad is not None for p in ps))
        for p in ps: p.grad = None

def test_cancelled_backward_switches_release_off():
    "A backward cancelled by a callback ends gradient release for that batch: a later backward leaves its grads in place, steps nothing."
    cb = CancelledBackward()
    learn = _learner([GradientRelease(), cb])
    with learn.no_logging(): learn.fit(1)
    assert cb.stepped and not any(cb.stepped) and all(cb.kept)
