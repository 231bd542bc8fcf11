"A sweep that knows nothing must not hurt: flat-then-diverging curves, sweeps cut short at their start, and the plot's y-range."
import math, warnings
import numpy as np, pytest, torch
import torch.nn as nn, torch.nn.functional as F
from fastai.basics import Learner, set_seed, noop
from fastai.callback.progress import ProgressCallback
import fastopts.optimizer as fo
from fastopts.data import sklearn_dls
from fastopts.lr_finder import LRFindResult, read_sweep
from fastopts.core import ema

torch.set_num_threads(1)

class Hidden(nn.Module):
    "Logits from a fixed random projection (nothing to learn), and one parameter `w` that only the loss sees."
    def __init__(self, n_in, n_out, w0):
        super().__init__()
        self.register_buffer('proj', 0.1 * torch.randn(n_in, n_out)); self.w = nn.Parameter(torch.tensor(float(w0)))
    def forward(self, x): return x @ self.proj

def flat_learner(seed, k=10., w0=0.02, reverse=False):
    """breast cancer (6 batches) with a model that cannot learn: the loss is cross-entropy plus k w^2. SGD on k w^2 is stable for lr < 1/k
    and blows up above it, so the sweep is flat (k w0^2 = 0.004 is inside its noise band) until it diverges. With
    `reverse` the gradient's sign is turned round (value k w^2, gradient -2kw): every step grows w."""
    set_seed(seed, reproducible=True)
    dls = sklearn_dls('breast_cancer', seed=seed)
    for dl in dls.loaders: dl.fake_l.num_workers = 0
    model = Hidden(30, 2, w0)
    def loss(out, y):
        w = model.w
        pen = (w.detach() ** 2 + (w ** 2).detach() - w ** 2) if reverse else w ** 2
        return F.cross_entropy(out, y) + k * pen
    learn = Learner(dls, model, loss_func=loss, opt_func=fo.SGD)
    learn.remove_cb(ProgressCallback); learn.logger = noop
    return learn

def _trained(seed, lr, **kw):
    learn = flat_learner(seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(5, lr)
    v = float(learn.validate()[0])
    return v if math.isfinite(v) else math.inf

def test_flat_then_diverging_sweep_suggests_no_worse_than_untrained():
    "Found with seed 0, trained with seeds 1 and 2: the suggestion ends no worse than the untrained model; the edge itself would not."
    learn = flat_learner(0)
    w0 = learn.model.w.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        res = learn.find_lr(show_plot=False)
    assert not res.reading['fell'] and res.reading['edge_seen'] and res.stop_reason in ('diverged', 'non-finite', 'num_it')
    assert torch.equal(learn.model.w.detach(), w0)                     # restored
    if res.suggested is None:                                           # the other safe answer: nothing, and say why
        assert 'epochs=' in res.message; return
    assert res.method == 'edge' and 'epochs=' in res.message
    assert any('epochs=' in str(w.message) for w in caught)
    edge = res.reading['lr_edge']
    assert res.suggested < edge
    for seed in (1, 2):
        l0 = float(flat_learner(seed).validate()[0])
        assert _trained(seed, res.suggested) <= l0, seed
        assert _trained(seed, edge) > l0 + 1, seed                      # a rule that suggested the edge would fail here

def test_sweep_cut_short_at_its_start_suggests_nothing():
    "A loss that blows up within the sweep's first steps reads nothing: no suggestion, a message naming `epochs=`, state restored."
    learn = flat_learner(0, k=1e8, w0=1e-3, reverse=True)   # each step at lr 1e-7 multiplies w by 21
    w0 = learn.model.w.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        res = learn.find_lr(show_plot=False)
    assert res.stop_reason in ('diverged', 'non-finite') and len(res.lrs) <= 11
    assert res.suggested is None and res.method is None and res.suggestions == {}
    assert 'diverged in its first' in res.message and 'epochs=' in res.message
    assert any('diverged in its first' in str(w.message) for w in caught)
    assert torch.equal(learn.model.w.detach(), w0)

def test_plot_y_range_is_not_set_by_the_divergence_spike():
    "A curve that falls, then blows up to 1e3: the y-range covers the smoothed curve up to its edge, not the spike."
    import matplotlib; matplotlib.use('Agg')
    rng = np.random.default_rng(0)
    lrs = np.logspace(-7, 1, 100)
    raw = 2.3 - 2. / (1 + np.exp(-(np.log10(lrs) + 3) * 3)) + 0.02 * rng.standard_normal(100)
    raw[85:] = np.geomspace(1, 1e3, 15)
    sm = ema(raw, 0.98, bias_correction=True)
    r = read_sweep(lrs, raw, sm, 100, 0.98)
    res = LRFindResult(lrs, raw, sm, {}, None, None, reading=r)
    lo, hi = res.plot().axes[0].get_ylim()
    assert hi < 10 < raw.max()                                    # the spike is clipped
    assert hi >= sm[:r['i_edge'] + 1].max() and lo <= sm[:r['i_edge'] + 1].min()   # the curve up to its edge is shown
    res = LRFindResult(lrs, raw, sm, {}, None, None)             # without a reading: fastai's rule, the last five points dropped
    lo, hi = res.plot().axes[0].get_ylim()
    assert hi >= sm[:-5].max() and hi < 1.3 * sm[:-5].max() + 1
