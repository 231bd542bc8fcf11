"Reference tests for fastopts.schedule: fastai's fit_one_cycle, torch's OneCycleLR/StepLR/MultiStepLR, closed forms."
import math, tempfile, warnings
from functools import partial
import numpy as np, pytest, torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper, Adam as FaAdam, SGD as FaSGD
from fastcore.basics import noop
from fastopts.data import sklearn_dls, dls_mlp
from fastopts.schedule import (OneCycle, StepDecay, TimeDecay, SqrtDecay, HyperSchedule, plot_schedule,
                               schedule_values, cos_anneal, cos_restarts)


@pytest.fixture(scope='module')
def dls():
    d = sklearn_dls('digits')
    for dl in d.loaders: dl.fake_l.num_workers = 0
    return d

N_ITER = 21   # digits: 1347 training items in batches of 64, last partial batch dropped

def learner(dls, opt_func=FaAdam, **kw):
    torch.manual_seed(0)
    l = Learner(dls, dls_mlp(dls), loss_func=F.cross_entropy, opt_func=opt_func, **kw)
    l.remove_cb(ProgressCallback); l.logger = noop
    return l

def split3(m): return [list(m[0].parameters()), list(m[2].parameters()), list(m[4].parameters())]

class Probe(Callback):
    "Reads every group's hypers straight from the optimizer just before each step (after the schedules set them)."
    order = 61
    def __init__(self, *keys): self.keys, self.seen = keys, {k: [] for k in keys}
    def before_step(self):
        for k in self.keys: self.seen[k].append([h[k] for h in self.learn.opt.hypers])

def fastopts_opts():
    import fastopts.optimizer as fo
    return [fo.Adam, fo.SGD]

# ---------------------------------------------------------------------------------------------- OneCycle vs fastai
@pytest.mark.parametrize('kw', [dict(), dict(pct_start=.3, div=10., div_final=1e3), dict(moms=(.9, .8, .95), pct_start=.5)])
@pytest.mark.parametrize('n_epoch', [1, 3])
def test_one_cycle_matches_fit_one_cycle(dls, kw, n_epoch):
    a = learner(dls); a.fit_one_cycle(n_epoch, 3e-3, **kw)
    b = learner(dls); b.fit(n_epoch, 3e-3, cbs=OneCycle(**kw))
    for k in ('lr', 'mom'):
        assert len(b.recorder.hps[k]) == n_epoch * N_ITER
        np.testing.assert_allclose(b.recorder.hps[k], a.recorder.hps[k], rtol=1e-5)

def test_one_cycle_slice_matches_fit_one_cycle(dls):
    a = learner(dls, splitter=split3); pa = Probe('lr', 'mom'); a.fit_one_cycle(1, slice(1e-4, 1e-2), cbs=pa)
    b = learner(dls, splitter=split3); pb = Probe('lr', 'mom'); b.fit(1, cbs=[OneCycle(lr_max=slice(1e-4, 1e-2)), pb])
    for k in ('lr', 'mom'): np.testing.assert_allclose(pb.seen[k], pa.seen[k], rtol=1e-5)
    assert np.array(pb.seen['lr']).shape == (N_ITER, 3)

def test_one_cycle_per_group_list(dls):
    b = learner(dls, splitter=split3); pb = Probe('lr'); b.fit(1, cbs=[OneCycle(lr_max=[1e-3, 2e-3, 4e-3]), pb])
    lrs = np.array(pb.seen['lr'])
    np.testing.assert_allclose(lrs[0], np.array([1e-3, 2e-3, 4e-3]) / 25)
    np.testing.assert_allclose(lrs[:, 1] / lrs[:, 0], 2.)

# ---------------------------------------------------------------------------------------------- OneCycle vs torch
def torch_one_cycle(N, lr_max, div, fdiv, pct, anneal, three):
    p = torch.zeros(1, requires_grad=True); o = torch.optim.SGD([p], lr=lr_max, momentum=.9)
    s = torch.optim.lr_scheduler.OneCycleLR(o, lr_max, total_steps=N, pct_start=pct, anneal_strategy=anneal,
                                            div_factor=div, final_div_factor=fdiv, three_phase=three)
    lrs, moms = [], []
    for _ in range(N):
        lrs.append(o.param_groups[0]['lr']); moms.append(o.param_groups[0]['momentum']); o.step(); s.step()
    return np.array(lrs), np.array(moms)

@pytest.mark.parametrize('N', [100, 257, 1000])
@pytest.mark.parametrize('pct', [.25, .3, .45])
@pytest.mark.parametrize('anneal', ['cos', 'linear'])
@pytest.mark.parametrize('three', [False, True])
def test_one_cycle_vs_torch(N, pct, anneal, three):
    lr_max, div, fdiv = 1e-2, 25., 1e4
    tl, tm = torch_one_cycle(N, lr_max, div, fdiv, pct, anneal, three)
    v = schedule_values(OneCycle(div=div, div_final=div * fdiv, pct_start=pct, anneal=anneal, three_phase=three,
                                 moms=(.95, .85, .95)), 1, N, lr=lr_max)
    ol, om = v['lr'][:, 0], v['mom'][:, 0]
    np.testing.assert_allclose(ol[0], tl[0], rtol=1e-9)                       # same start: lr_max/div
    np.testing.assert_allclose(ol.max(), tl.max(), rtol=5e-3)                 # same peak value
    assert abs(int(ol.argmax()) - int(tl.argmax())) <= 1                      # peak within one step
    assert np.abs(ol - tl).max() <= (.10 if three else .04) * lr_max
    assert np.abs(om - tm).max() <= (.10 if three else .04) * .1 + 1e-12      # momentum: same bound, on its range

def test_one_cycle_exp_is_geometric():
    v = schedule_values(OneCycle(anneal='exp', pct_start=.5, div=100., div_final=1e4), 1, 4, lr=1.)['lr'][:, 0]
    np.testing.assert_allclose(v, [1e-2, 1e-1, 1., 1e-2])

# ---------------------------------------------------------------------------------------------- decays vs torch
def torch_lrs(make_sched, n, lr0=(.1, .03)):
    ps = [torch.zeros(1, requires_grad=True) for _ in lr0]
    o = torch.optim.SGD([{'params': [p], 'lr': l} for p, l in zip(ps, lr0)])
    s = make_sched(o); out = []
    for _ in range(n):
        out.append([g['lr'] for g in o.param_groups]); o.step(); s.step()
    return out

@pytest.mark.parametrize('gamma,step_size', [(.1, 1), (.5, 3), (.9, 7), (2., 4)])
@pytest.mark.parametrize('per,n_epoch,n_batch', [('epoch', 30, 1), ('batch', 3, 20)])
def test_step_decay_equals_step_lr(gamma, step_size, per, n_epoch, n_batch):
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma), n_epoch * n_batch if per == 'batch' else n_epoch)
    v = schedule_values(StepDecay(gamma, step_size=step_size, per=per), n_epoch, n_batch, lr=[.1, .03])['lr']
    if per == 'epoch': v = v[::n_batch]
    assert v.tolist() == ref   # exactly, bit for bit

@pytest.mark.parametrize('gamma,milestones', [(.1, [5, 12, 20]), (.5, [1, 2, 3, 29]), (.3, [0, 10])])
def test_step_decay_equals_multistep_lr(gamma, milestones):
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones, gamma), 30)
    assert schedule_values(StepDecay(gamma, milestones=milestones), 30, 1, lr=[.1, .03])['lr'].tolist() == ref
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones, gamma), 30)
    assert schedule_values(StepDecay(gamma, milestones=milestones, per='batch'), 3, 10, lr=[.1, .03])['lr'].tolist() == ref

@pytest.mark.parametrize('per', ['epoch', 'batch'])
@pytest.mark.parametrize('dr', [0., .1, 1.])
def test_time_decay_formula(per, dr):
    v = schedule_values(TimeDecay(dr, per=per), 30, 7, lr=.1)['lr'][:, 0]
    t = np.arange(30 * 7) // 7 if per == 'epoch' else np.arange(30 * 7)
    np.testing.assert_allclose(v, .1 / (1 + dr * t), rtol=1e-12)

@pytest.mark.parametrize('per', ['epoch', 'batch'])
@pytest.mark.parametrize('k', [.5, 1., 3.])
def test_sqrt_decay_formula(per, k):
    v = schedule_values(SqrtDecay(k, per=per), 30, 7, lr=.1)['lr'][:, 0]
    t = np.arange(30 * 7) // 7 if per == 'epoch' else np.arange(30 * 7)
    np.testing.assert_allclose(v, k * .1 / np.sqrt(t + 1), rtol=1e-12)

@pytest.mark.parametrize('per', ['epoch', 'batch'])
def test_decays_in_a_real_fit(dls, per):
    "What reaches the optimizer, step by step, in a fit: the formulas at every epoch and batch."
    t = np.arange(3 * N_ITER) // N_ITER if per == 'epoch' else np.arange(3 * N_ITER)
    for cb, ref in [(TimeDecay(.5, per=per), 1e-2 / (1 + .5 * t)), (SqrtDecay(2., per=per), 2e-2 / np.sqrt(t + 1)),
                    (StepDecay(.5, step_size=2, per=per), 1e-2 * .5 ** (t // 2))]:
        l = learner(dls); p = Probe('lr'); l.fit(3, 1e-2, cbs=[cb, p])
        np.testing.assert_allclose(np.array(p.seen['lr'])[:, 0], ref, rtol=1e-12)
        np.testing.assert_allclose(l.recorder.hps['lr'], ref, rtol=1e-12)

@pytest.mark.parametrize('w', [1, 5, 30])
def test_warmup_then_decay_counts_from_its_end(w):
    v = schedule_values(TimeDecay(.1, per='batch', warmup=w), 1, 60, lr=.2)['lr'][:, 0]
    np.testing.assert_allclose(v[:w], .2 * np.arange(1, w + 1) / w)
    np.testing.assert_allclose(v[w:], .2 / (1 + .1 * np.arange(60 - w)))
    v = schedule_values(StepDecay(.5, step_size=1, warmup=w), 4, 20, lr=.2)['lr'][:, 0]   # per epoch
    e_w = w // 20
    np.testing.assert_allclose(v[w:], .2 * .5 ** (np.arange(w, 80) // 20 - e_w))

def test_hyper_schedule_cos_restarts_per_group(dls):
    "Any hyper, one schedule per parameter group, as functions of the step."
    scheds = [cos_restarts(1e-2, 1e-4, period=10), cos_restarts(1e-3, 1e-5, period=10, mult=2), lambda t: 5e-3]
    l = learner(dls, splitter=split3); p = Probe('lr', 'wd')
    l.fit(2, cbs=[HyperSchedule(per='batch', lr=scheds, wd=lambda t: 1e-2 * .9 ** t), p])
    lrs, wds = np.array(p.seen['lr']), np.array(p.seen['wd'])
    s = np.arange(2 * N_ITER)
    for g, f in enumerate(scheds): np.testing.assert_allclose(lrs[:, g], [f(t) for t in s])
    np.testing.assert_allclose(wds, np.repeat((1e-2 * .9 ** s)[:, None], 3, 1))
    assert all(type(v) is float for v in l.opt.hypers[0].values() if not isinstance(v, bool))

# ---------------------------------------------------------------------------------------------- behaviour
def test_gradient_accumulation_counts_optimizer_steps(dls):
    l = learner(dls); p = Probe('lr'); l.fit(2, cbs=[OneCycle(lr_max=1e-2), GradientAccumulation(4 * 64), p])
    lrs = np.array(p.seen['lr'])[:, 0]
    assert len(lrs) == 2 * N_ITER // 4 == len(l.recorder.hps['lr'])
    np.testing.assert_allclose(lrs[0], 1e-2 / 25)
    np.testing.assert_allclose(lrs, schedule_values(OneCycle(lr_max=1e-2), 1, 10, lr=1e-2)['lr'][:, 0])
    l = learner(dls); p = Probe('lr'); l.fit(1, 1e-2, cbs=[TimeDecay(1., per='batch'), GradientAccumulation(3 * 64), p])
    np.testing.assert_allclose(np.array(p.seen['lr'])[:, 0], 1e-2 / (1 + np.arange(N_ITER // 3)))

class SaveAfter(Callback):
    order = 65
    def __init__(self, epoch, fname): self.ep, self.fname = epoch, fname
    def after_epoch(self):
        if self.epoch == self.ep - 1: self.learn.save(self.fname)

@pytest.mark.parametrize('make', [OneCycle, partial(StepDecay, .5, milestones=[1, 2]), partial(SqrtDecay, per='batch', warmup=30),
                                  partial(OneCycle, anneal='exp', three_phase=True)])
@pytest.mark.parametrize('opt_func', [FaAdam, partial(OptimWrapper, opt=torch.optim.Adam)])
def test_resume_reproduces_the_sequence(dls, make, opt_func):
    with tempfile.TemporaryDirectory() as d:
        full = learner(dls, opt_func, path=d); full.fit(4, 1e-2, cbs=[make(), SaveAfter(2, 'ep2')])
        res = learner(dls, opt_func, path=d); res.load('ep2'); res.fit(4, 1e-2, cbs=make(), start_epoch=2)
    for k in full.recorder.hps: assert res.recorder.hps[k] == full.recorder.hps[k][2 * N_ITER:]

def test_past_the_planned_end_holds_the_last_value(dls):
    l = learner(dls); l.fit(3, 1e-2, cbs=OneCycle(n_epoch=2))
    lrs = l.recorder.hps['lr']
    assert lrs[:2 * N_ITER] == schedule_values(OneCycle(), 2, N_ITER, lr=1e-2)['lr'][:, 0].tolist()
    assert lrs[2 * N_ITER:] == [lrs[2 * N_ITER - 1]] * N_ITER

@pytest.mark.parametrize('opt_func,mom_of', [
    (FaAdam, lambda o: o.hypers[0]['mom']), (FaSGD, lambda o: o.hypers[0]['mom']),
    (partial(OptimWrapper, opt=torch.optim.Adam), lambda o: o.opt.param_groups[0]['betas'][0]),
    (partial(OptimWrapper, opt=torch.optim.SGD, momentum=.9), lambda o: o.opt.param_groups[0]['momentum']),
    (partial(OptimWrapper, opt=torch.optim.RMSprop, momentum=.9), lambda o: o.opt.param_groups[0]['momentum'])])
def test_any_optimizer(dls, opt_func, mom_of):
    l = learner(dls, opt_func); p = Probe('lr', 'mom'); l.fit(1, 1e-2, cbs=[OneCycle(), p])
    ref = schedule_values(OneCycle(), 1, N_ITER, lr=1e-2)
    for k in ('lr', 'mom'): np.testing.assert_allclose(np.array(p.seen[k])[:, 0], ref[k][:, 0])
    assert mom_of(l.opt) == pytest.approx(ref['mom'][-1, 0])

def test_fastopts_optimizers(dls):
    for opt_func in fastopts_opts():
        l = learner(dls, opt_func); p = Probe('lr', 'mom'); l.fit(1, 1e-2, cbs=[OneCycle(), p])
        ref = schedule_values(OneCycle(), 1, N_ITER, lr=1e-2)
        for k in ('lr', 'mom'): np.testing.assert_allclose(np.array(p.seen[k])[:, 0], ref[k][:, 0])
        assert l.opt.param_groups[0]['lr'] == pytest.approx(ref['lr'][-1, 0])
        l = learner(dls, opt_func); p = Probe('lr'); l.fit(2, 1e-2, cbs=[StepDecay(.1, step_size=1), p])
        assert np.array(p.seen['lr'])[:, 0].tolist() == [1e-2] * N_ITER + [1e-2 * .1] * N_ITER

def test_missing_hyper_warns_once(dls):
    l = learner(dls, partial(OptimWrapper, opt=torch.optim.Adagrad))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always'); l.fit(2, 1e-2, cbs=[OneCycle(), HyperSchedule(sqr_mom=.99)])
    msgs = [str(w.message) for w in ws if 'hyper-parameter' in str(w.message)]
    assert msgs == ["OneCycle: the optimizer has no hyper-parameter 'mom'; its schedule is skipped",
                    "HyperSchedule: the optimizer has no hyper-parameter 'sqr_mom'; its schedule is skipped"]
    assert list(l.recorder.hps) == ['lr'] and len(l.recorder.hps['lr']) == 2 * N_ITER

def test_recorder_plot_sched_and_plot_schedule(dls):
    import matplotlib; matplotlib.use('Agg')
    l = learner(dls); l.fit(1, 1e-2, cbs=[OneCycle(), HyperSchedule(wd=cos_anneal(0., 1e-2))])
    assert set(l.recorder.hps) == {'lr', 'mom', 'wd'}
    l.recorder.plot_sched()
    axs = plot_schedule(OneCycle(), 2, 10, lr=1e-2)
    assert len(axs) == 2 and len(axs[0].lines[0].get_ydata()) == 20

@pytest.mark.parametrize('make,arg', [
    (lambda: OneCycle(pct_start=0), 'pct_start'), (lambda: OneCycle(pct_start=1.2), 'pct_start'),
    (lambda: OneCycle(div=0), 'div'), (lambda: OneCycle(div_final=-1.), 'div_final'),
    (lambda: OneCycle(anneal='cubic'), 'anneal'), (lambda: OneCycle(lr_max=-1e-3), 'lr_max'),
    (lambda: OneCycle(moms=(.9, .8)), 'moms'),
    (lambda: StepDecay(gamma=0, step_size=1), 'gamma'), (lambda: StepDecay(gamma=-.5, step_size=1), 'gamma'),
    (lambda: StepDecay(step_size=0), 'step_size'), (lambda: StepDecay(milestones=[2, 1]), 'milestones'),
    (lambda: StepDecay(milestones=[1, 1]), 'milestones'), (lambda: StepDecay(step_size=1, per='step'), 'per'),
    (lambda: TimeDecay(-1e-3), 'decay_rate'), (lambda: TimeDecay(.1, per='pct'), 'per'),
    (lambda: SqrtDecay(k=0), 'k'), (lambda: SqrtDecay(k=-1), 'k'), (lambda: SqrtDecay(warmup=-2), 'warmup'),
    (lambda: HyperSchedule(per='iteration'), 'per'), (lambda: HyperSchedule(lr='fast'), 'lr')])
def test_bad_arguments(make, arg):
    with pytest.raises(ValueError, match=f'`{arg}`'): make()
