"""Param groups with their own chains, layer groups, stepping some params only, and the factories' first checks.

An `Optimizer` built with `cbs={label: callbacks}` runs each group's chain (group key `'chain'`): the result must be
what one torch optimizer per rule gives on its own params, with each chain's fused kernel where it has one. Groups
sharing a `'layer'` count as one layer group for fastai's `set_hyper` lists and slices and for `freeze_to`.
"""
import copy, io, pickle
from functools import partial
import pytest, torch
from torch.testing import assert_close
from fastopts.optimizer import (Optimizer, Adam, SGD, Momentum, Lamb, Lion, average_grad, average_sqr_grad,
                                step_stat, adam_step, momentum_step, weight_decay, l2_reg)
from fastopts.lookahead import Lookahead
from registry import OPTIMIZERS, ids, seeded_params
from test_optim_fast import kernel_calls   # the fixture: fused kernel calls made during a test

ADAMW = [weight_decay, partial(average_grad, dampening=True), average_sqr_grad, step_stat, adam_step]
SGD_MOM = [l2_reg, average_grad, momentum_step]

def two_rules(ps, **kw):
    "Adam(W) on the first two params, SGD with momentum (L2) on the last one, in one optimizer."
    return Optimizer([{'params': ps[:2], 'chain': 'adamw', 'wd': 0.1, 'sqr_mom': 0.999},
                      {'params': ps[2:], 'chain': 'sgd', 'lr': 0.05, 'mom': 0.9, 'wd': 0.01}],
                     {'adamw': ADAMW, 'sgd': SGD_MOM}, lr=1e-2, **kw)

def references(ps):
    return [torch.optim.AdamW(ps[:2], lr=1e-2, weight_decay=0.1),
            torch.optim.SGD(ps[2:], lr=0.05, momentum=0.9, weight_decay=0.01)]

SHAPES = [(5, 3), (3,), (4, 2)]

def train(make, steps=20, seed=0):
    ps, g = seeded_params(SHAPES, seed=seed), torch.Generator().manual_seed(1)
    opts = make(ps)
    opts = opts if isinstance(opts, list) else [opts]
    for _ in range(steps):
        for p in ps: p.grad = torch.randn(p.shape, generator=g) + 0.5 * p.detach()
        for o in opts: o.step()
    return ps, opts[0]

@pytest.mark.parametrize('fused', [None, False])
def test_each_group_runs_its_chain(fused, kernel_calls):
    ours, opt = train(lambda ps: two_rules(ps, fused=fused))
    ref, _ = train(references)
    for p, q in zip(ours, ref): assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert kernel_calls == ({'_fused_adamw_': 20, '_fused_sgd_': 20} if fused is None else {})
    assert [g['chain'] for g in opt.param_groups] == ['adamw', 'sgd']
    assert set(opt.state[ours[0]]) >= {'grad_avg', 'sqr_avg', 'step'} and set(opt.state[ours[2]]) == {'grad_avg'}

def test_chain_defaults_per_group_and_keywords_beat_them():
    ps = seeded_params(SHAPES)
    opt = Optimizer([{'params': ps[:1], 'chain': 'a'}, {'params': ps[1:], 'chain': 'b'}],
                    {'a': ADAMW, 'b': [l2_reg, average_sqr_grad, average_grad, momentum_step]}, lr=0.1, sqr_mom=0.9)
    assert opt.param_groups[0]['eps'] == 1e-8 and opt.param_groups[1]['sqr_mom'] == 0.9 and opt.param_groups[0]['sqr_mom'] == 0.9
    assert opt.param_groups[1]['lr'] == 0.1

def test_unknown_chain_and_bad_layer_refused():
    ps = seeded_params(SHAPES)
    with pytest.raises(ValueError, match=r"`chain='muon'`.*\['adamw', 'sgd'\]"):
        Optimizer([{'params': ps, 'chain': 'muon'}], {'adamw': ADAMW, 'sgd': SGD_MOM})
    with pytest.raises(ValueError, match=r"`chain='sgd'`.*\['default'\]"):
        Optimizer([{'params': ps, 'chain': 'sgd'}], ADAMW)
    with pytest.raises(ValueError, match='`layer`'):
        Optimizer([{'params': ps, 'layer': -1}], ADAMW)
    with pytest.raises(ValueError, match='empty dict'): Optimizer(ps, {})

def test_checkpoint_round_trip_and_a_checkpoint_of_other_chains_refused():
    full, _ = train(two_rules, steps=20)
    ps, opt = train(two_rules, steps=10)
    buf = io.BytesIO(); torch.save((opt.state_dict(), [p.detach().clone() for p in ps]), buf); buf.seek(0)
    sd, saved = torch.load(buf, weights_only=True)
    ps2 = [torch.nn.Parameter(t) for t in saved]
    opt2 = two_rules(ps2); opt2.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):   # replay the generator's first 10 steps, then continue with the same grads as `full`
        for p in ps2: torch.randn(p.shape, generator=g)
    for _ in range(10):
        for p in ps2: p.grad = torch.randn(p.shape, generator=g) + 0.5 * p.detach()
        opt2.step()
    for p, q in zip(ps2, full): assert_close(p, q, rtol=0, atol=0)
    swapped = Optimizer([{'params': ps2[:2], 'chain': 'sgd', 'mom': 0.9}, {'params': ps2[2:], 'chain': 'adamw'}],
                        {'adamw': ADAMW, 'sgd': SGD_MOM}, lr=1e-2)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*'adamw'.*'sgd'"): swapped.load_state_dict(sd)

def test_pickle_deepcopy_and_lookahead_keep_the_chains():
    ps, opt = train(two_rules, steps=3)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert set(copied.chains) == {'adamw', 'sgd'} and copied.cbs['sgd'][-1] is momentum_step
    ours, _ = train(lambda ps: Lookahead(two_rules(ps), k=3))
    ref, _ = train(lambda ps: [Lookahead(o, k=3) for o in references(ps)])
    for p, q in zip(ours, ref): assert_close(p, q, rtol=1e-5, atol=1e-6)

def test_torch_scheduler_and_set_hyper_reach_every_chain():
    ps, opt = train(two_rules, steps=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(); sched.step()
    assert [g['lr'] for g in opt.param_groups] == [5e-3, 0.025]
    opt.set_hyper('mom', 0.8)
    assert [h['mom'] for h in opt.hypers] == [0.8, 0.8]

def layered(ps):
    "Two layer groups, the first split in two rules (as a user who routes whole groups splits a splitter's groups)."
    return Optimizer([{'params': ps[:1], 'chain': 'adamw', 'layer': 0}, {'params': ps[1:2], 'chain': 'sgd', 'layer': 0, 'mom': 0.9},
                      {'params': ps[2:], 'chain': 'adamw', 'layer': 1}], {'adamw': ADAMW, 'sgd': SGD_MOM}, lr=1e-2)

def test_layers_count_for_set_hyper_and_freeze():
    ps = seeded_params(SHAPES)
    opt = layered(ps)
    opt.set_hyper('lr', slice(1e-3, 1e-1))              # fastai's discriminative lrs: one per layer group
    assert [g['lr'] for g in opt.param_groups] == [1e-3, 1e-3, 1e-1]
    opt.set_hyper('wd', [0.1, 0.2])
    assert [g['wd'] for g in opt.param_groups] == [0.1, 0.1, 0.2]
    with pytest.raises(ValueError, match='`lr` got 4 values'): opt.set_hyper('lr', [1e-3, 1e-2, 1e-1, 1.])
    opt.freeze()
    assert [p.requires_grad for p in ps] == [False, False, True] and opt.frozen_idx == 1
    opt.unfreeze()
    assert all(p.requires_grad for p in ps)
    one_layer = Optimizer([{'params': ps[:1], 'chain': 'a', 'layer': 0}, {'params': ps[1:], 'chain': 'b', 'layer': 0}],
                          {'a': ADAMW, 'b': ADAMW}, lr=1e-2)
    with pytest.raises(ValueError, match='at least 2 parameter groups, got 1'): one_layer.freeze()

def test_a_learner_splits_layers_by_rule(make_learner):
    "fastai's discriminative lrs and freeze with an opt_func whose layer groups are each split by rule."
    def opt_func(layer_groups, lr=1e-3):
        groups = []
        for i, ps in enumerate(layer_groups):
            mats, rest = [p for p in ps if p.dim() >= 2], [p for p in ps if p.dim() < 2]
            groups += [{'params': mats, 'chain': 'sgd', 'layer': i, 'mom': 0.9}, {'params': rest, 'chain': 'adamw', 'layer': i}]
        return Optimizer(groups, {'adamw': ADAMW, 'sgd': SGD_MOM}, lr=lr)
    learn = make_learner(opt_func=opt_func, splitter=lambda m: [list(m[:2].parameters()), list(m[2:].parameters())])
    learn.freeze()
    learn.fit(1, slice(1e-3, 1e-2))
    opt = learn.opt
    assert len(opt.param_groups) == 4 and [g['lr'] for g in opt.param_groups] == [1e-3, 1e-3, 1e-2, 1e-2]
    assert not any(p.requires_grad for p in learn.model[:2].parameters())
    assert all(p.requires_grad for p in learn.model[2:].parameters())

@pytest.mark.parametrize('spec', OPTIMIZERS, ids=ids)
def test_step_params_one_at_a_time_equals_step(spec):
    "Stepping each param alone (gradient release) gives exactly the numbers of one step of all."
    full, _ = train(spec.make, steps=5)
    def one_by_one(ps):
        opt = spec.make(ps)
        class Each:
            def step(self):
                for p in ps: (opt.opt if isinstance(opt, Lookahead) else opt).step_params([p])
        return Each()
    if spec.name == 'lookahead_adam': pytest.skip('Lookahead.step_params needs a step() after it with the grads freed: tests/test_release.py')
    alone, _ = train(one_by_one, steps=5)
    for p, q in zip(alone, full): assert torch.equal(p, q)

def test_hypers_are_checked_before_params():
    with pytest.raises(ValueError, match='`momentum=-1`.*`mom`'): SGD(None, momentum=-1)
    with pytest.raises(ValueError, match='`lr`'): Adam(None, lr=-1.)
    with pytest.raises(ValueError, match='`betas=.*`sqr_mom`'): Adam(None, betas=(0.9, 1.5))
    with pytest.raises(TypeError, match='`params` must be an iterable'): Adam(None)
    with pytest.raises(TypeError, match='`params` must be an iterable'): Optimizer(3, ADAMW)

@pytest.mark.parametrize('factory,lr', [(Momentum, 1e-3), (Lamb, 1e-3), (Lion, 1e-4)])
def test_default_lr(factory, lr):
    assert factory(seeded_params(SHAPES)).param_groups[0]['lr'] == lr

def test_run_options_reach_every_factory_through_one_place():
    "`fused` and `compiled` are not forwarded by hand: `torch_names` passes them to `Optimizer.configure`."
    import inspect
    ps = seeded_params(SHAPES)
    assert SGD(ps, mom=0.9, fused=False)._fast is None and SGD(ps, mom=0.9)._fast is not None
    assert Lamb(ps, compiled=True).compiled
    assert 'fused' in inspect.signature(Lion).parameters
    with pytest.raises(ValueError, match='no fused kernel computes the chain'): Lion(ps, fused=True)
    with pytest.raises(ValueError, match='`kahan` is not a keyword of SGD.*run options'): SGD(ps, kahan=True)
    with pytest.raises(ValueError, match='`fusd` is not a run option'): Adam(ps).configure(fusd=True)

def test_set_hyper_takes_one_value_per_param_group_too():
    "fastai's schedules read `lr` from `hypers` (one per param group) and set their values back per param group."
    ps = seeded_params(SHAPES)
    opt = layered(ps)
    opt.set_hyper('lr', [1e-3, 2e-3, 3e-3])
    assert [g['lr'] for g in opt.param_groups] == [1e-3, 2e-3, 3e-3]
    with pytest.raises(ValueError, match='`lr` got 4 values'): opt.set_hyper('lr', [1e-3] * 4)

def test_loaded_hypers_are_hypers():
    "A hyper a checkpoint's groups carry (fit_one_cycle's `mom` on a plain SGD) is in `hypers` after loading, as before saving."
    ps = seeded_params(SHAPES)
    opt = SGD(ps, lr=0.1); opt.set_hyper('mom', 0.9)
    sd = opt.state_dict()
    opt2 = SGD(seeded_params(SHAPES), lr=0.1); opt2.load_state_dict(sd)
    assert dict(opt2.hypers[0]) == dict(opt.hypers[0]) and 'mom' in opt2.hypers[0]
