"Checks of `fastopts.lr_finder` against independent references: closed forms, fastai's own helpers, a plain `fit`."
import math, warnings
from functools import partial
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st
from fastai.basics import Learner, set_seed, CrossEntropyLossFlat, noop, Callback
from fastai.callback.progress import ProgressCallback
from fastai.optimizer import Adam as FastaiAdam
from fastai.torch_core import even_mults
import fastopts.optimizer as fo
from fastopts.lookahead import Lookahead
from fastopts.data import sklearn_dls, dls_mlp
from fastopts.lr_finder import LRFinder, LearnerState, sugg_half_min
from fastopts.lr_sweep import _as_lr
from fastopts.core import ema

torch.set_num_threads(1)

def _learner(name='wine', seed=0, opt_func=fo.Adam, **kw):
    set_seed(seed, reproducible=True)
    dls = sklearn_dls(name, seed=seed)
    for dl in dls.loaders: dl.fake_l.num_workers = 0
    learn = Learner(dls, dls_mlp(dls), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, **kw)
    learn.remove_cb(ProgressCallback); learn.logger = noop
    return learn

def _weights(learn): return [p.detach().clone() for p in learn.model.parameters()]

@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.floats(0., 0.999))
def test_ema_closed_form(ys, beta):
    "v_t / (1 - beta^t) with v_t = (1-beta) sum_i beta^(t-i) y_i: the bias-corrected EMA written out."
    t = len(ys)
    v = (1 - beta) * sum(beta ** (t - i) * y for i, y in enumerate(ys, 1))
    want = v / (1 - beta ** t)
    assert math.isclose(ema(ys, beta, bias_correction=True)[-1], want, rel_tol=1e-9, abs_tol=1e-9)

class _GroupLrs(Callback):
    order = 61
    def before_fit(self): self.lrs = []
    def before_step(self): self.lrs.append([h['lr'] for h in self.opt.hypers])   # the lrs the step uses

@pytest.mark.parametrize('n', [1, 2, 3])
def test_sweep_spreads_groups_as_fastai(n):
    "Every step of a sweep spreads a slice over the groups as fastai's `even_mults` does (`slice(None, hi)`: hi/10 before the last)."
    splits = {1: lambda m: [list(m.parameters())], 2: lambda m: [list(m[0].parameters()), list(m[2:].parameters())],
              3: lambda m: [list(m[0].parameters()), list(m[2].parameters()), list(m[4].parameters())]}
    for start, end, want in [(slice(1e-7, 1e-4), slice(1e-2, 10.), even_mults(1e-3, 1., n) if n > 1 else [1.]),
                             (slice(None, 1e-4), slice(None, 10.), [0.1] * (n - 1) + [1.])]:
        learn = _learner('iris', splitter=splits[n])
        rec = _GroupLrs(); learn.add_cb(rec)
        res = learn.find_lr(start_lr=start, end_lr=end, num_it=10, stop_div=False, show_plot=False)
        lrs = np.array(rec.lrs)
        np.testing.assert_allclose(lrs / lrs[:, -1:], np.tile(want, (10, 1)), rtol=1e-6)
        np.testing.assert_allclose(lrs[:, -1], res.lrs, rtol=1e-9)

def test_find_lr_rejects_a_falling_slice_at_the_call():
    "A slice must rise to its stop; the error names `start_lr` and quotes the value given, before anything runs."
    learn = _learner('iris')
    w0 = _weights(learn)
    with pytest.raises(ValueError, match=r'start_lr.*slice\(1e-05, 1e-06'): learn.find_lr(start_lr=slice(1e-5, 1e-6), show_plot=False)
    with pytest.raises(ValueError, match=r'end_lr.*slice\(1e-05, 1e-06'): learn.find_lr(end_lr=slice(1e-5, 1e-6), show_plot=False)
    for a, b in zip(w0, learn.model.parameters()): assert torch.equal(a, b)
    assert learn.opt is None

def test_as_lr_keeps_spread():
    s = _as_lr(0.3, slice(1e-5, 1e-3))
    assert math.isclose(s.stop, 0.3) and math.isclose(s.stop / s.start, 100.)
    assert _as_lr(0.3, 1e-3) == 0.3

def test_half_min():
    lrs = np.logspace(-5, 0, 11); sm = (np.log10(lrs) + 2) ** 2 + 1.   # lowest at 1e-2
    assert math.isclose(sugg_half_min(lrs, sm), 5e-3)
    sm[7:] = np.nan                                                  # ignore what follows a non-finite value
    assert math.isclose(sugg_half_min(lrs, sm), 5e-3)

def test_half_min_spike_cap():
    "A raw loss that jumps 5% above the start-up worst, once the smoothed loss is falling, caps the lr."
    lrs = np.logspace(-6, 1, 50)
    sm = np.r_[np.ones(20), np.linspace(1., 0.5, 30)]    # flat, then falling to the end: lowest at 10
    raw = sm.copy(); raw[:5] = [1., 1.02, 0.98, 1.01, 0.99]
    assert math.isclose(sugg_half_min(lrs, sm, num_it=50, losses=raw), 5.)
    raw[30] = 1.02 * 1.06                                 # a spike at lrs[30]
    assert math.isclose(sugg_half_min(lrs, sm, num_it=50, losses=raw), lrs[30] / 2)
    raw[30] = 1.02 * 1.04                                 # within 5%: no cap
    assert math.isclose(sugg_half_min(lrs, sm, num_it=50, losses=raw), 5.)
    raw[30] = sm[30]; raw[12] = 2.                        # a spike before the smoothed loss fell a tenth: noise
    assert math.isclose(sugg_half_min(lrs, sm, num_it=50, losses=raw), 5.)

def test_linear_mode_lrs():
    learn = _learner('iris')
    res = learn.find_lr(start_lr=1e-3, end_lr=1e-1, num_it=12, mode='linear', stop_div=False, show_plot=False)
    np.testing.assert_allclose(res.lrs, np.linspace(1e-3, 1e-1, 12))

@pytest.mark.parametrize('opt_func', [partial(fo.SGD, mom=0.9), lambda ps, lr: Lookahead(fo.RAdam(ps, lr)), FastaiAdam],
                         ids=['sgd', 'lookahead', 'fastai_adam'])
def test_find_lr_then_fit_one_cycle_is_bit_identical(opt_func):
    "With trials (`epochs`) too, on a warm optimizer: `find_lr(); fit_one_cycle()` == `fit_one_cycle()`."
    out = []
    for find in (False, True):
        learn = _learner('wine', seed=3, opt_func=opt_func)
        learn.fit(1, 1e-3)
        if find: learn.find_lr(epochs=2, show_plot=False)
        learn.fit_one_cycle(2, 1e-2)
        out.append(_weights(learn))
    for a, b in zip(*out): assert torch.equal(a, b)

def test_snapshot_restores_repeatedly():
    "Restoring twice, with training in between, comes back to the same point each time."
    learn = _learner('iris')
    learn.fit(1, 1e-2)
    st_ = LearnerState(learn)
    ws = []
    for lr in (1e-1, 1.):
        learn.fit(1, lr); st_.restore(); ws.append(_weights(learn))
    for a, b in zip(*ws): assert torch.equal(a, b)

def test_lr_finder_stops_on_divergence():
    "With a sweep up to 1e4 the smoothed loss leaves 4x its best (or turns non-finite) before the end."
    learn = _learner('iris', opt_func=partial(fo.SGD, mom=0.9))
    res = learn.find_lr(end_lr=1e4, num_it=100, show_plot=False)
    assert res.stop_reason in ('diverged', 'non-finite') and len(res.lrs) < 100
    # each way of stopping is checked against its own definition, on the curve the sweep recorded
    if res.stop_reason == 'diverged': assert res.smoothed[-1] > 4 * res.smoothed.min() and np.isfinite(res.smoothed).all()
    else: assert not np.isfinite(res.smoothed[-1]) and np.isfinite(res.smoothed[:-1]).all()
    assert (res.smoothed[:-1] <= 4 * np.minimum.accumulate(res.smoothed[:-1])).all()   # it did not stop late

def test_trials_grow_the_ladder_past_its_edge():
    "A one-step plan on iris wants a larger lr than the sweep's edge: the ladder grows upwards, and the winner is exact."
    learn = _learner('iris', seed=0, opt_func=fo.Adam)
    res = learn.find_lr(epochs=1, show_plot=False)
    assert max(t['lr'] for t in res.trials) > res.reading['lr_edge'] * 1.01   # beyond the ladder's top rung, the edge
    assert all(t['iters'] == 1 for t in res.trials)                  # every trial is the whole plan
    assert min(t['loss'] for t in res.trials) == [t['loss'] for t in res.trials if t['lr'] == res.suggested][0]
    learn.fit_one_cycle(1, res.suggested)
    assert float(learn.validate()[0]) == min(t['loss'] for t in res.trials)

def test_edge_rule_suggests_where_a_flat_curve_first_moves():
    "A noise-free flat curve (band: 1% of its level) that rises from step 70: `edge` with factor 1 finds the first lr whose"
    " bias-corrected EMA left the band, so no lr below the suggestion moved the loss, and none at or above it is flat."
    from fastopts.lr_sweep import sugg_edge
    lrs, level = np.logspace(-7, 1, 100), math.log(10)
    raw = np.full(100, level); raw[70:] += 0.05 * np.arange(30) ** 2
    sm = ema(raw, 0.98, bias_correction=True)
    first = next(i for i in range(100) if sm[i] > level * 1.01)
    lr = sugg_edge(lrs, sm, 100, raw, factor=1)
    assert math.isclose(lr, lrs[first])
    assert math.isclose(sugg_edge(lrs, sm, 100, raw), lrs[first] / 10)   # the default: a decade below the edge
    assert (sm[lrs < lr] <= level * 1.01).all() and (sm[lrs >= lr] > level * 1.01).all()
