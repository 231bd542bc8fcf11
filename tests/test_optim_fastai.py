"""fastopts optimizers as drop-in `opt_func`s for fastai's Learner, and in plain PyTorch loops.

Mechanics run on iris (tiny, fast); the accuracy bar runs on scikit-learn's digits. Every check compares against
something outside fastopts: fastai's own bookkeeping (frozen groups, schedules, `do_wd` flags), torch's optimizers,
or values written out in the test.
"""
import copy, math, random, warnings
import numpy as np, pytest, torch
from functools import partial
from torch import nn
import torch.nn.functional as F
from torch.testing import assert_close
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.schedule import *          # fit_one_cycle, fine_tune, lr_find
from fastai.callback.tracker import ReduceLROnPlateau
from fastai.callback.training import GradientAccumulation
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import params, norm_bias_params
from fastopts.data import sklearn_dls, dls_mlp
from fastopts.optimizer import Optimizer, SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion
from fastopts.lookahead import Lookahead

def seeded_dls(name, **kw):
    """fastai's DataLoader draws its shuffling RNG from `random` when it is made: seed it, so each test is repeatable.
    No worker processes: the data are a few hundred rows in memory, and spawning workers costs ~0.5 s an epoch."""
    dls = sklearn_dls(name, **kw)
    random.seed(0)
    return DataLoaders(*[dl.new(num_workers=0) for dl in dls.loaders])

@pytest.fixture
def iris(): return seeded_dls('iris', bs=16)        # 112 training rows: 7 batches an epoch

@pytest.fixture
def digits(): return seeded_dls('digits')

def two_groups(m): return [params(m[:2]), params(m[2:])]

def learner(dls, opt_func=Adam, model=None, seed=0, **kw):
    torch.manual_seed(seed)
    return Learner(dls, model if model is not None else dls_mlp(dls), loss_func=CrossEntropyLossFlat(),
                   opt_func=opt_func, metrics=accuracy, **kw)

def fit(learn, how, *args, **kw):
    with learn.no_bar(), learn.no_logging(): getattr(learn, how)(*args, **kw)
    return learn

def snap(m): return [p.detach().clone() for p in m.parameters()]

class RecordGroups(Callback):
    "The hypers each optimizer step reads (from `param_groups`) and the `hypers` fastai sees, per training batch."
    order = 60
    def __init__(self): self.groups, self.hypers, self.frozen = [], [], []
    def before_step(self):
        self.groups.append([{k: v for k, v in g.items() if k != 'params'} for g in self.opt.param_groups])
        self.hypers.append([dict(h) for h in self.opt.hypers])
        self.frozen.append(self.opt.frozen_idx)

# ---------------------------------------------------------------- fit, fit_one_cycle, fine_tune
def test_fit(iris):
    learn = learner(iris, Adam)
    before = snap(learn.model)
    fit(learn, 'fit', 2, 1e-2)
    assert isinstance(learn.opt, Optimizer) and isinstance(learn.opt, torch.optim.Optimizer)
    assert learn.opt.hypers[0]['lr'] == 1e-2 and learn.opt.param_groups[0]['lr'] == 1e-2
    assert all(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    assert np.isfinite(learn.recorder.values[-1][0]) and learn.recorder.values[-1][-1] > 0.6

@pytest.mark.parametrize('opt_func,lr', [(Adam, 1e-2), (partial(SGD, mom=0.), 0.5)], ids=['adam', 'sgd_no_mom'])
def test_fit_one_cycle_schedules_lr_and_mom(iris, opt_func, lr):
    "fit_one_cycle sets `lr` and `mom` each batch; the steps read those values; SGD without momentum accepts `mom`."
    rec = RecordGroups()
    learn = fit(learner(iris, opt_func), 'fit_one_cycle', 3, lr, cbs=rec)
    lrs = [g[0]['lr'] for g in rec.groups]
    moms = [g[0]['mom'] for g in rec.groups]
    assert len(lrs) == 21
    # what fastai sees in `hypers` is what the step reads from `param_groups`
    assert all(g[k] == v for gs, hs in zip(rec.groups, rec.hypers) for g, h in zip(gs, hs) for k, v in h.items())
    assert max(lrs) == pytest.approx(lr, rel=0.05) and lrs[0] == pytest.approx(lr / 25, rel=0.05)
    assert lrs[-1] < lr / 100
    assert moms[0] == pytest.approx(0.95, abs=1e-3) and min(moms) == pytest.approx(0.85, abs=5e-3)
    assert moms[-1] == pytest.approx(0.95, abs=1e-2)
    assert np.argmax(lrs) == np.argmin(moms)
    assert learn.recorder.values[-1][-1] > 0.6

def test_fine_tune(iris):
    rec = RecordGroups()
    learn = learner(iris, Adam, splitter=two_groups)
    fit(learn, 'fit', 1, 1e-2)                 # a "pretrained" body
    body = snap(learn.model[:2])
    fit(learn, 'fine_tune', 1, base_lr=1e-2, freeze_epochs=1, cbs=rec)
    frozen_phase = [gs for gs, f in zip(rec.groups, rec.frozen) if f == 1]
    unfrozen_phase = [gs for gs, f in zip(rec.groups, rec.frozen) if f == 0]
    assert len(frozen_phase) == len(unfrozen_phase) == 7
    # phase 1 (frozen): slice(base_lr) = base_lr/10 on the body, base_lr on the head
    for gs in frozen_phase: assert gs[0]['lr'] == pytest.approx(gs[1]['lr'] / 10)
    # phase 2 (unfrozen): slice(base_lr/2/100, base_lr/2): lr_mult 100 between the groups at every step
    for gs in unfrozen_phase: assert gs[1]['lr'] == pytest.approx(gs[0]['lr'] * 100)
    assert max(gs[1]['lr'] for gs in unfrozen_phase) == pytest.approx(5e-3, rel=0.05)
    assert learn.opt.frozen_idx == 0 and all(p.requires_grad for p in learn.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(body, learn.model[:2].parameters()))

def test_freeze_unfreeze_discriminative_lr(iris):
    learn = learner(iris, partial(SGD, mom=0.9), splitter=two_groups)
    learn.create_opt()
    learn.freeze()
    assert learn.opt.frozen_idx == 1
    assert [p.requires_grad for p in learn.model[:2].parameters()] == [False, False]
    assert all(p.requires_grad for p in learn.model[2:].parameters())
    body, head = snap(learn.model[:2]), snap(learn.model[2:])
    rec = RecordGroups()
    fit(learn, 'fit', 1, slice(1e-4, 1e-2), cbs=rec)
    assert all([g['lr'] for g in gs] == pytest.approx([1e-4, 1e-2]) for gs in rec.groups)
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx([1e-4, 1e-2])
    assert all(torch.equal(a, b) for a, b in zip(body, learn.model[:2].parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(head, learn.model[2:].parameters()))
    learn.unfreeze()
    assert learn.opt.frozen_idx == 0 and all(p.requires_grad for p in learn.model.parameters())
    fit(learn, 'fit', 1, slice(1e-3))
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx([1e-4, 1e-3])
    assert all(not torch.equal(a, b) for a, b in zip(body, learn.model[:2].parameters()))

# ---------------------------------------------------------------- lr_find, save/load
def opt_state(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g['params']]

def assert_same_state(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k in sa:
            if torch.is_tensor(sa[k]): assert torch.equal(sa[k], sb[k]), k
            else: assert sa[k] == sb[k], k

def test_lr_find(iris, tmp_path):
    "fastai's own lr_find runs, suggests a finite lr, and restores model, optimizer state and hypers afterwards."
    learn = learner(iris, Adam, path=tmp_path)
    fit(learn, 'fit', 1, 1e-2)
    model, state, hypers = snap(learn.model), opt_state(learn.opt), [dict(h) for h in learn.opt.hypers]
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)        # fastai turns a failed optimizer load into a warning
        with learn.no_bar(), learn.no_logging(): res = learn.lr_find(num_it=30, show_plot=False)
    assert len(learn.recorder.lrs) > 6 and learn.recorder.lrs[-1] > learn.recorder.lrs[0] * 10
    # the suggestion is a point of the sweep that ran on our optimizer (not just any number in its range)
    i = int(np.argmin([abs(math.log(lr / res.valley)) for lr in learn.recorder.lrs]))
    assert math.isclose(learn.recorder.lrs[i], res.valley, rel_tol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model, learn.model.parameters()))
    assert_same_state(state, opt_state(learn.opt))
    # fastai's lr_find calls fit(), which sets lr to learn.lr before LRFinder saves: that is what comes back
    assert [dict(h) for h in learn.opt.hypers] == [{**h, 'lr': learn.lr} for h in hypers]

@pytest.mark.parametrize('opt_func', [Adam, partial(SGD, mom=0.9), lambda ps, lr: Lookahead(RAdam(ps, lr), k=4)],
                         ids=['adam', 'sgd_mom', 'lookahead_radam'])
def test_save_load_with_opt(iris, tmp_path, opt_func):
    learn = learner(iris, opt_func, path=tmp_path, splitter=two_groups)
    fit(learn, 'fit', 1, slice(1e-3, 1e-2))
    learn.save('m', with_opt=True)
    fresh = learner(iris, opt_func, path=tmp_path, splitter=two_groups, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)        # "Could not load the optimizer state" must not happen
        fresh.load('m', with_opt=True)
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), fresh.model.parameters()))
    assert [dict(h) for h in fresh.opt.hypers] == [dict(h) for h in learn.opt.hypers]
    assert [h['lr'] for h in fresh.opt.hypers] == pytest.approx([1e-3, 1e-2])
    assert_same_state(opt_state(learn.opt), opt_state(fresh.opt))
    assert any(torch.is_tensor(v) for s in opt_state(fresh.opt) for v in s.values())
    # both continue identically on the same batch
    xb, yb = iris.one_batch()
    for l in (learn, fresh):
        l.model.train()
        loss = F.cross_entropy(l.model(xb), yb)
        loss.backward(); l.opt.step(); l.opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), fresh.model.parameters()))

# ---------------------------------------------------------------- weight decay flags, train_bn
def bn_model(dls):
    n_in = dls.train_ds[0][0].shape[-1]
    return nn.Sequential(nn.Linear(n_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

@pytest.mark.parametrize('decouple_wd', [True, False], ids=['decoupled', 'l2'])
def test_wd_bn_bias_false(iris, decouple_wd):
    learn = learner(iris, partial(SGD, mom=0., decouple_wd=decouple_wd), model=bn_model(iris), wd=0.1,
                    wd_bn_bias=False)
    fit(learn, 'fit', 1, 1e-2)
    m = learn.model
    no_wd = {id(p) for p in norm_bias_params(m, with_bias=True)}
    assert no_wd == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[3].bias)}
    for p in m.parameters():
        assert learn.opt.state[p].get('do_wd', True) == (id(p) not in no_wd)
    assert learn.opt.hypers[0]['wd'] == 0.1
    # a step with zero gradients: only weight decay moves anything
    learn.opt.set_hypers(lr=0.5, wd=0.1)
    before = snap(m)
    for p in m.parameters(): p.grad = torch.zeros_like(p)
    learn.opt.step()
    for b, p in zip(before, m.parameters()):
        if id(p) in no_wd: assert torch.equal(b, p), 'a bn/bias param was decayed'
        else: assert_close(p.detach(), b * (1 - 0.5 * 0.1))

@pytest.mark.parametrize('train_bn', [True, False])
def test_train_bn(iris, train_bn):
    "With train_bn, a frozen group's BatchNorm params keep training (state `force_train`); its Linear does not."
    splitter = lambda m: [params(m[:2]), params(m[2:])]
    learn = learner(iris, Adam, model=bn_model(iris), splitter=splitter, train_bn=train_bn)
    learn.create_opt()
    learn.freeze()
    m = learn.model
    assert [p.requires_grad for p in m[0].parameters()] == [False, False]
    assert [p.requires_grad for p in m[1].parameters()] == [train_bn] * 2
    assert all(learn.opt.state[p].get('force_train', False) == train_bn for p in m[1].parameters())
    lin, bn = snap(m[0]), snap(m[1])
    fit(learn, 'fit', 1, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(lin, m[0].parameters()))
    assert all(torch.equal(a, b) != train_bn for a, b in zip(bn, m[1].parameters()))
    learn.opt.clear_state()
    assert all(learn.opt.state[p].get('force_train', False) == train_bn for p in m[1].parameters())

# ---------------------------------------------------------------- fastai callbacks that write hypers or skip steps
def test_reduce_lr_on_plateau(iris):
    "fastai's ReduceLROnPlateau writes `hypers[i]['lr']` directly; the optimizer's steps then use it."
    learn = learner(iris, partial(SGD, mom=0.), splitter=two_groups)
    rec = RecordGroups()
    # min_delta=100: no epoch after the first counts as an improvement, so epochs 2 and 3 each divide lr by 10
    fit(learn, 'fit', 3, slice(1e-2, 1e-1), cbs=[ReduceLROnPlateau(monitor='valid_loss', min_delta=100, patience=1),
                                                 rec])
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx([1e-4, 1e-3])
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-4, 1e-3])
    assert [g['lr'] for g in rec.groups[-1]] == pytest.approx([1e-3, 1e-2])     # epoch 3 ran after one reduction
    # the next step reads the reduced lr: p -= lr*g with lr 1e-4 / 1e-3
    m = learn.model
    before = snap(m)
    for i, p in enumerate(m.parameters()): p.grad = torch.full_like(p, float(i + 1))
    learn.opt.step()
    lrs = [1e-4] * len(params(m[:2])) + [1e-3] * len(params(m[2:]))
    for i, (b, p, lr) in enumerate(zip(before, m.parameters(), lrs)): assert_close(p.detach(), b - lr * (i + 1))

def test_gradient_accumulation(iris):
    "GradientAccumulation skips steps: with n_acc = 2 batches, Adam takes 3 steps over iris' 7 batches."
    class CountSteps(Callback):
        def before_fit(self): self.n = 0
        def after_step(self): self.n += 1
    count = CountSteps()
    learn = learner(iris, Adam)
    before = snap(learn.model)
    fit(learn, 'fit', 1, 1e-2, cbs=[GradientAccumulation(n_acc=32), count])
    assert count.n == 3
    assert all(learn.opt.state[p]['step'] == 3 for p in learn.model.parameters())     # step_stat's count
    assert all(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))

# ---------------------------------------------------------------- plain PyTorch
def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    return X, y, m, copy.deepcopy(m)

@pytest.mark.parametrize('which', ['adam', 'sgd_nesterov'])
def test_plain_pytorch_loop(which):
    "model.parameters() (a generator) in, the usual zero_grad/backward/step loop; same path as torch's optimizer."
    X, y, m1, m2 = _toy()
    if which == 'adam': o1, o2 = Adam(m1.parameters(), lr=1e-2), torch.optim.Adam(m2.parameters(), lr=1e-2)
    else: o1, o2 = (SGD(m1.parameters(), lr=0.05, mom=0.9, nesterov=True),
                    torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, nesterov=True))
    losses = []
    for epoch in range(5):
        for i in range(0, 256, 32):
            for m, o in ((m1, o1), (m2, o2)):
                o.zero_grad()
                loss = F.cross_entropy(m(X[i:i+32]), y[i:i+32])
                loss.backward()
                o.step()
                if m is m1: losses.append(loss.item())
    for a, b in zip(m1.parameters(), m2.parameters()): assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert np.mean(losses[-8:]) < np.mean(losses[:8])

def test_grad_scaler_cpu():
    "torch.amp.GradScaler('cpu') unscales, skips the step on inf gradients and steps otherwise, as with torch's Adam."
    X, y, m1, m2 = _toy(1)
    o1, o2 = Adam(m1.parameters(), lr=1e-2), torch.optim.Adam(m2.parameters(), lr=1e-2)
    s1, s2 = torch.amp.GradScaler('cpu', init_scale=2.**12), torch.amp.GradScaler('cpu', init_scale=2.**12)
    for it in range(12):
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            with torch.autocast('cpu', dtype=torch.bfloat16): loss = F.cross_entropy(m(X), y)
            if it == 5: loss = loss * float('inf')            # an overflow: the scaler must skip this step
            before = snap(m)
            s.scale(loss).backward()
            s.step(o)
            s.update()
            if it == 5: assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
            else: assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert s1.get_scale() == s2.get_scale() == 2.**11
    for a, b in zip(m1.parameters(), m2.parameters()): assert_close(a, b, rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------- the accuracy bar (digits, 5 epochs of fit_one_cycle)
def one_cycle_accuracy(dls, opt_func, lr, epochs=5):
    learn = fit(learner(dls, opt_func), 'fit_one_cycle', epochs, lr)
    return learn.recorder.values[-1][-1]

def test_adam_reaches_95_percent_on_digits(digits):
    acc = one_cycle_accuracy(digits, Adam, 1e-2)
    assert acc >= 0.95, acc

# each optimizer at a sensible lr (Momentum's EMA takes (1-mom) of each gradient, so it wants ~10x SGD's lr)
ACCURACY_CASES = {
    'sgd_mom': (partial(SGD, mom=0.9), 0.1), 'momentum': (Momentum, 1.0), 'rmsprop': (RMSProp, 3e-3),
    'adamw': (AdamW, 1e-2), 'radam': (RAdam, 3e-2), 'lamb': (Lamb, 3e-2), 'lion': (Lion, 3e-3),
    'lookahead_radam': (lambda ps, lr: Lookahead(RAdam(ps, lr)), 3e-2),
}

@pytest.mark.parametrize('name', list(ACCURACY_CASES))
def test_each_optimizer_reaches_90_percent_on_digits(digits, name):
    opt_func, lr = ACCURACY_CASES[name]
    acc = one_cycle_accuracy(digits, opt_func, lr)
    assert acc >= 0.90, (name, lr, acc)
