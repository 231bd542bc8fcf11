"Reference tests for fastopts.schedule: fastai's fit_one_cycle, torch's OneCycleLR/StepLR/MultiStepLR, closed forms."
import math, tempfile, warnings
from functools import partial
import numpy as np, pytest, torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.callback.training import GradientAccumulation
from fastai.optimizer import OptimWrapper, Adam as FaAdam, SGD as FaSGD
from fastopts.schedule import (OneCycle, StepDecay, TimeDecay, SqrtDecay, HyperSchedule, SchedulePlan, plot_schedule,
                               schedule_values, batch_steps, cos_anneal, lin_anneal, const_sched, cos_restarts,
                               time_decay, sqrt_decay, step_decay)


N_ITER = 21   # digits (conftest's `digits_dls`): 1347 training items in batches of 64, last partial batch dropped

def test_digits_batches(digits_dls): assert len(digits_dls.train) == N_ITER

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
def test_one_cycle_matches_fit_one_cycle(make_learner, kw, n_epoch):
    a = make_learner(); a.fit_one_cycle(n_epoch, 3e-3, **kw)
    b = make_learner(); b.fit(n_epoch, 3e-3, cbs=OneCycle(**kw))
    for k in ('lr', 'mom'):   # fastai computes phase positions in float32: ~1e-7 relative apart, hence 1e-5
        assert len(b.recorder.hps[k]) == n_epoch * N_ITER
        np.testing.assert_allclose(b.recorder.hps[k], a.recorder.hps[k], rtol=1e-5)

def test_one_cycle_slice_matches_fit_one_cycle(make_learner):
    a = make_learner(splitter=split3); pa = Probe('lr', 'mom'); a.fit_one_cycle(1, slice(1e-4, 1e-2), cbs=pa)
    b = make_learner(splitter=split3); pb = Probe('lr', 'mom'); b.fit(1, cbs=[OneCycle(lr_max=slice(1e-4, 1e-2)), pb])
    for k in ('lr', 'mom'): np.testing.assert_allclose(pb.seen[k], pa.seen[k], rtol=1e-5)   # float32 phases, as above
    assert np.array(pb.seen['lr']).shape == (N_ITER, 3)

def test_one_cycle_per_group_list(make_learner):
    b = make_learner(splitter=split3); pb = Probe('lr'); b.fit(1, cbs=[OneCycle(lr_max=[1e-3, 2e-3, 4e-3]), pb])
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
    assert abs(ol.max() - tl.max()) <= np.abs(np.diff(tl)).max()             # peak: within one of torch's steps
    assert abs(int(ol.argmax()) - int(tl.argmax())) <= 1                      # peak within one step
    # the curves are torch's shifted by one step (fastai puts the peak at step pct·N, torch at pct·N - 1), and with
    # three phases torch's second phase also ends two steps early: so the gap is at most one (two) of torch's own
    # largest step-to-step changes (nbs/03_schedule.ipynb, "Versus torch's OneCycleLR", prints the gaps)
    shift = 2 if three else 1
    assert np.abs(ol - tl).max() <= shift * np.abs(np.diff(tl)).max() * (1 + 1e-9)
    assert np.abs(om - tm).max() <= shift * np.abs(np.diff(tm)).max() * (1 + 1e-9)

def torch_phase_fractions(N, pct, three):
    "For each of torch's `N` OneCycleLR steps: (its phase, the fraction of it done), as `OneCycleLR.get_lr` computes them."
    ends = [pct * N - 1, 2 * pct * N - 2, N - 1] if three else [pct * N - 1, N - 1]
    out = []
    for i in range(N):
        start = 0.
        for k, end in enumerate(ends):
            if i <= end or k == len(ends) - 1: out.append((k, (i - start) / (end - start))); break
            start = end
    return out

def assert_phases_match_torch(sched, N, lr_max, div, fdiv, pct, anneal, three):
    """Each annealing phase of `sched` (a OneCycle) is torch's: at every step torch takes, our schedule at the same
    fraction of the same phase gives torch's lr and momentum to rtol 1e-9 (the phases' discretisation differs, see above)."""
    tl, tm = torch_one_cycle(N, lr_max, div, fdiv, pct, anneal, three)
    fs = sched.schedules(dict(lr=[lr_max]))
    widths = [pct, pct, 1 - 2 * pct] if three else [pct, 1 - pct]
    starts = np.cumsum([0.] + widths[:-1])
    for i, (k, x) in enumerate(torch_phase_fractions(N, pct, three)):
        pos = starts[k] + x * widths[k]
        np.testing.assert_allclose(np.asarray(fs['lr'](pos)), tl[i], rtol=1e-9, err_msg=f'lr, step {i}, phase {k}')
        np.testing.assert_allclose(np.asarray(fs['mom'](pos)), tm[i], rtol=1e-9, err_msg=f'mom, step {i}, phase {k}')

@pytest.mark.parametrize('N', [100, 257, 1000])
@pytest.mark.parametrize('pct', [.25, .3, .45])
@pytest.mark.parametrize('anneal', ['cos', 'linear'])
@pytest.mark.parametrize('three', [False, True])
def test_one_cycle_phases_are_torchs(N, pct, anneal, three):
    "Start, peak, end and the curve between, of every phase, to rtol 1e-9: a wrong `div`/`div_final`/shape fails."
    lr_max, div, fdiv = 1e-2, 25., 1e4
    sched = OneCycle(div=div, div_final=div * fdiv, pct_start=pct, anneal=anneal, three_phase=three, moms=(.95, .85, .95))
    assert_phases_match_torch(sched, N, lr_max, div, fdiv, pct, anneal, three)
    # and the plan takes its step i at the position i/N of those phases (fastai's `ParamScheduler`)
    v, fs = schedule_values(sched, 1, N, lr=lr_max), sched.schedules(dict(lr=[lr_max]))
    np.testing.assert_allclose(v['lr'][:, 0], [float(np.asarray(fs['lr'](i / N))[0]) for i in range(N)], rtol=1e-12)
    np.testing.assert_allclose(v['mom'][:, 0], [float(np.asarray(fs['mom'](i / N))) for i in range(N)], rtol=1e-12)

@pytest.mark.parametrize('anneal', ['cos', 'linear'])
@pytest.mark.parametrize('three', [False, True])
def test_one_cycle_wrong_div_final_fails(anneal, three):
    "A `div_final` 100x too large passed the one-step-shift comparison above in all 36 cases; the phase check rejects it."
    lr_max, div, fdiv, pct, N = 1e-2, 25., 1e4, .3, 100
    wrong = OneCycle(div=div, div_final=div * fdiv * 100, pct_start=pct, anneal=anneal, three_phase=three)
    tl, _ = torch_one_cycle(N, lr_max, div, fdiv, pct, anneal, three)
    ol = schedule_values(wrong, 1, N, lr=lr_max)['lr'][:, 0]
    shift = 2 if three else 1
    assert np.abs(ol - tl).max() <= shift * np.abs(np.diff(tl)).max() * (1 + 1e-9)   # the loose check: passes
    with pytest.raises(AssertionError, match='lr, step'):
        assert_phases_match_torch(wrong, N, lr_max, div, fdiv, pct, anneal, three)

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
def test_decays_in_a_real_fit(make_learner, per):
    "What reaches the optimizer, step by step, in a fit: the formulas at every epoch and batch."
    t = np.arange(3 * N_ITER) // N_ITER if per == 'epoch' else np.arange(3 * N_ITER)
    for cb, ref in [(TimeDecay(.5, per=per), 1e-2 / (1 + .5 * t)), (SqrtDecay(2., per=per), 2e-2 / np.sqrt(t + 1)),
                    (StepDecay(.5, step_size=2, per=per), 1e-2 * .5 ** (t // 2))]:
        l = make_learner(); p = Probe('lr'); l.fit(3, 1e-2, cbs=[cb, p])
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

def test_hyper_schedule_cos_restarts_per_group(make_learner):
    "Any hyper, one schedule per parameter group, as functions of the step."
    scheds = [cos_restarts(1e-2, 1e-4, period=10), cos_restarts(1e-3, 1e-5, period=10, mult=2), lambda t: 5e-3]
    l = make_learner(splitter=split3); p = Probe('lr', 'wd')
    l.fit(2, cbs=[HyperSchedule(per='batch', lr=scheds, wd=lambda t: 1e-2 * .9 ** t), p])
    lrs, wds = np.array(p.seen['lr']), np.array(p.seen['wd'])
    s = np.arange(2 * N_ITER)
    for g, f in enumerate(scheds): np.testing.assert_allclose(lrs[:, g], [f(t) for t in s])
    np.testing.assert_allclose(wds, np.repeat((1e-2 * .9 ** s)[:, None], 3, 1))
    assert all(type(v) is float for v in l.opt.hypers[0].values() if not isinstance(v, bool))

# ---------------------------------------------------------------------------------------------- behaviour
def test_gradient_accumulation_counts_optimizer_steps(make_learner):
    l = make_learner(); p = Probe('lr'); l.fit(2, cbs=[OneCycle(lr_max=1e-2), GradientAccumulation(4 * 64), p])
    lrs = np.array(p.seen['lr'])[:, 0]
    assert len(lrs) == 2 * N_ITER // 4 == len(l.recorder.hps['lr'])
    np.testing.assert_allclose(lrs[0], 1e-2 / 25)
    np.testing.assert_allclose(lrs, schedule_values(OneCycle(lr_max=1e-2), 1, 10, lr=1e-2)['lr'][:, 0])
    l = make_learner(); p = Probe('lr'); l.fit(1, 1e-2, cbs=[TimeDecay(1., per='batch'), GradientAccumulation(3 * 64), p])
    np.testing.assert_allclose(np.array(p.seen['lr'])[:, 0], 1e-2 / (1 + np.arange(N_ITER // 3)))

class SaveAfter(Callback):
    order = 65
    def __init__(self, epoch, fname): self.ep, self.fname = epoch, fname
    def after_epoch(self):
        if self.epoch == self.ep - 1: self.learn.save(self.fname)

@pytest.mark.parametrize('make', [OneCycle, partial(StepDecay, .5, milestones=[1, 2]), partial(SqrtDecay, per='batch', warmup=30),
                                  partial(OneCycle, anneal='exp', three_phase=True)])
@pytest.mark.parametrize('opt_func', [FaAdam, partial(OptimWrapper, opt=torch.optim.Adam)])
def test_resume_reproduces_the_sequence(make_learner, make, opt_func):
    with tempfile.TemporaryDirectory() as d:
        full = make_learner(opt_func, path=d); full.fit(4, 1e-2, cbs=[make(), SaveAfter(2, 'ep2')])
        res = make_learner(opt_func, path=d); res.load('ep2'); res.fit(4, 1e-2, cbs=make(), start_epoch=2)
    for k in full.recorder.hps: assert res.recorder.hps[k] == full.recorder.hps[k][2 * N_ITER:]

def test_past_the_planned_end_holds_the_last_value(make_learner):
    l = make_learner(); l.fit(3, 1e-2, cbs=OneCycle(n_epoch=2))
    lrs = l.recorder.hps['lr']
    assert lrs[:2 * N_ITER] == schedule_values(OneCycle(), 2, N_ITER, lr=1e-2)['lr'][:, 0].tolist()
    assert lrs[2 * N_ITER:] == [lrs[2 * N_ITER - 1]] * N_ITER

@pytest.mark.parametrize('opt_func,mom_of', [
    (FaAdam, lambda o: o.hypers[0]['mom']), (FaSGD, lambda o: o.hypers[0]['mom']),
    (partial(OptimWrapper, opt=torch.optim.Adam), lambda o: o.opt.param_groups[0]['betas'][0]),
    (partial(OptimWrapper, opt=torch.optim.SGD, momentum=.9), lambda o: o.opt.param_groups[0]['momentum']),
    (partial(OptimWrapper, opt=torch.optim.RMSprop, momentum=.9), lambda o: o.opt.param_groups[0]['momentum'])])
def test_any_optimizer(make_learner, opt_func, mom_of):
    l = make_learner(opt_func); p = Probe('lr', 'mom'); l.fit(1, 1e-2, cbs=[OneCycle(), p])
    ref = schedule_values(OneCycle(), 1, N_ITER, lr=1e-2)
    for k in ('lr', 'mom'): np.testing.assert_allclose(np.array(p.seen[k])[:, 0], ref[k][:, 0])
    assert mom_of(l.opt) == pytest.approx(ref['mom'][-1, 0])

def test_fastopts_optimizers(make_learner):
    for opt_func in fastopts_opts():
        l = make_learner(opt_func); p = Probe('lr', 'mom'); l.fit(1, 1e-2, cbs=[OneCycle(), p])
        ref = schedule_values(OneCycle(), 1, N_ITER, lr=1e-2)
        for k in ('lr', 'mom'): np.testing.assert_allclose(np.array(p.seen[k])[:, 0], ref[k][:, 0])
        assert l.opt.param_groups[0]['lr'] == pytest.approx(ref['lr'][-1, 0])
        l = make_learner(opt_func); p = Probe('lr'); l.fit(2, 1e-2, cbs=[StepDecay(.1, step_size=1), p])
        assert np.array(p.seen['lr'])[:, 0].tolist() == [1e-2] * N_ITER + [1e-2 * .1] * N_ITER

def test_missing_hyper_warns_once(make_learner):
    l = make_learner(partial(OptimWrapper, opt=torch.optim.Adagrad))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always'); l.fit(2, 1e-2, cbs=[OneCycle(), HyperSchedule(sqr_mom=.99)])
    msgs = [str(w.message) for w in ws if 'hyper-parameter' in str(w.message)]
    assert msgs == ["OneCycle: the optimizer has no hyper-parameter 'mom'; its schedule is skipped",
                    "HyperSchedule: the optimizer has no hyper-parameter 'sqr_mom'; its schedule is skipped"]
    assert list(l.recorder.hps) == ['lr'] and len(l.recorder.hps['lr']) == 2 * N_ITER

def test_recorder_plot_sched_and_plot_schedule(make_learner):
    l = make_learner(); l.fit(1, 1e-2, cbs=[OneCycle(), HyperSchedule(wd=cos_anneal(0., 1e-2))])
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


# ---------------------------------------------------------------------------------------------- the plan itself
def test_plan_closed_forms():
    "Warm-up then a per-epoch decay, two groups: the plan against the formulas, step by step, in any order."
    n_epoch, spe, w = 6, 5, 7
    p = SchedulePlan(dict(lr=[time_decay(.1, .5), time_decay(.2, .5)], wd=lin_anneal(0., 1e-2)), n_steps=n_epoch * spe,
                     n_groups=2, per='epoch', warmup=w, steps_per_epoch=spe)
    s = np.arange(n_epoch * spe)
    e = s // spe - w // spe                          # epochs begun since the one in which warm-up ended
    lr = np.where(s[:, None] < w, np.array([.1, .2]) * (s[:, None] + 1) / w, np.array([.1, .2]) / (1 + .5 * e[:, None]))
    v = p.values()
    np.testing.assert_allclose(v['lr'], lr, rtol=1e-12)
    np.testing.assert_allclose(v['wd'][:, 0], np.where(s < w, 0., np.minimum(e, 1) * 1e-2), rtol=1e-12)  # lin on epochs: 0 then 1
    for t in [29, 0, 100, 7, 0]:                      # no state: any order, and past the end the last values hold
        assert p(t) == {k: v[k][min(t, 29)].tolist() for k in v}

def test_plan_pct_and_batch_positions():
    p = SchedulePlan(dict(lr=lambda x: x), n_steps=8, per='pct', warmup=3)
    np.testing.assert_allclose(p.values()['lr'][:, 0], np.r_[[0., 0., 0.], np.arange(5) / 5])   # lr0 = f(0) = 0
    p = SchedulePlan(dict(lr=lambda t: 10. + t), n_steps=6, per='batch', warmup=2)
    np.testing.assert_allclose(p.values()['lr'][:, 0], [5., 10., 10., 11., 12., 13.])

@pytest.mark.parametrize('make,arg,value', [
    (lambda: SchedulePlan(dict(lr=1.), n_steps=0), 'n_steps', '0'),
    (lambda: SchedulePlan(dict(lr=1.), n_steps=4, n_groups=0), 'n_groups', '0'),
    (lambda: SchedulePlan(dict(lr=1.), n_steps=4, per='step'), 'per', "'step'"),
    (lambda: SchedulePlan(dict(lr=1.), n_steps=4, steps_per_epoch=0), 'steps_per_epoch', '0'),
    (lambda: SchedulePlan(dict(lr=1.), n_steps=4, step_epochs=[0, 0]), 'step_epochs', '2'),
    (lambda: SchedulePlan(dict(lr=[const_sched(1.)] * 3), n_steps=4, n_groups=2), 'lr', '3 values'),
    (lambda: SchedulePlan(dict(wd='x'), n_steps=4), 'wd', "'x'"),
    (lambda: SchedulePlan(dict(lr=1.), n_steps=4)(-1), 'step', '-1'),
    (lambda: batch_steps(2, 3, batch_sizes=[1, 1], n_acc=2), 'batch_sizes', '2'),
    (lambda: batch_steps(2, 3, n_acc=0), 'n_acc', '0'),
    (lambda: cos_restarts(.1, period=10, mult=.5), 'mult', '0.5'),     # shrinking periods: restarts never end
    (lambda: cos_restarts(.1, period=0), 'period', '0'),
    (lambda: cos_restarts(.1, period=-5), 'period', '-5'),
    (lambda: time_decay(.1, -2), 'decay_rate', '-2'),                  # would give a negative lr at t = 1
    (lambda: sqrt_decay(.1, k=0), 'k', '0'),
    (lambda: step_decay(.1, step_size=0), 'step_size', '0'),           # was a ZeroDivisionError at the first call
    (lambda: step_decay(.1, step_size=1.5), 'step_size', '1.5'),
    (lambda: step_decay(.1, gamma=-1, step_size=1), 'gamma', '-1'),
    (lambda: step_decay(.1, milestones=[3, 1]), 'milestones', '[3, 1]'),
    (lambda: step_decay(.1), 'step_size', 'None')])
def test_bad_plan_and_schedule_function_arguments(make, arg, value):
    "Refused at the call with a ValueError naming the argument and the value given."
    with pytest.raises(ValueError) as e: make()
    assert f'`{arg}`' in str(e.value) and value in str(e.value), str(e.value)

def test_batch_steps_replays_gradient_accumulation(make_learner):
    "The batches after which fastai's own `GradientAccumulation` steps are the ones `batch_steps` counts."
    class Steps(Callback):
        order = 90
        def before_fit(self): self.at = []
        def after_step(self): self.at.append(self.epoch * self.n_iter + self.iter)
    for n_acc in (64, 3 * 64, 5 * 64 + 1):
        l = make_learner(); cb = Steps(); l.fit(2, 1e-2, cbs=[GradientAccumulation(n_acc), cb])
        before = batch_steps(2, N_ITER, [64] * N_ITER, n_acc)
        assert cb.at == [j for j in range(2 * N_ITER) if before[j + 1] > before[j]], n_acc
