"""fastopts optimizers as torch users meet them, written from torch.optim's documented behaviour with torch.optim as
the control where torch has the rule: named parameters, torch's keyword and group-key names (each must take effect,
checked by trajectories), schedulers cycling momentum through `betas`/`momentum`, complex parameters, torch
checkpoints both ways, refused keywords, and Lookahead over a torch optimizer."""
import io, math
from functools import partial
import pytest, torch
from torch.testing import assert_close
from fastopts.optimizer import SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion
from fastopts.lookahead import Lookahead
from registry import OPTIMIZERS, WITH_TORCH, CHECKPOINT, BY_NAME, ids

def model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)

def drive(opt, params, steps=15, seed=1, sched=None):
    "Seeded gradients (noise + 0.5 p), `steps` steps, a scheduler stepped after each if given; the params."
    g = torch.Generator().manual_seed(seed)
    params = list(params)
    for _ in range(steps):
        for p in params: p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()
        opt.step()
        if sched is not None: sched.step()
    return [p.detach().clone() for p in params]

def same(xs, ys, **tol):
    for x, y in zip(xs, ys): assert_close(x, y, **(tol or dict(rtol=1e-9, atol=1e-12)))

def load_via_bytes(sd):
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    return torch.load(buf, weights_only=True)

# ---------------------------------------------------------------- named parameters
@pytest.mark.parametrize('spec', OPTIMIZERS, ids=ids)
def test_named_parameters(spec):
    "torch >= 2.6 accepts `named_parameters()` and keeps the names in `state_dict`; the steps are the same."
    m1, m2 = model(), model()
    a = drive(spec.make(m1.named_parameters()), m1.parameters())
    b = drive(spec.make(m2.parameters()), m2.parameters())
    same(a, b)
    opt = spec.make(m1.named_parameters())
    names = [n for g in opt.state_dict()['param_groups'] for n in g['param_names']]
    assert names == [n for n, _ in m1.named_parameters()]

# ---------------------------------------------------------------- torch's names take effect
ALIASES = [  # (spec, torch keywords, the same in fastai's names)
    ('adam', dict(betas=(0.8, 0.99), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.99, wd=0.1, decouple_wd=False)),
    ('adamw', dict(betas=(0.8, 0.99), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.99, wd=0.1)),
    ('radam', dict(betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=True), dict(mom=0.8, sqr_mom=0.99, wd=0.1)),
    ('sgd', dict(momentum=0.9, weight_decay=0.1, nesterov=True), dict(mom=0.9, wd=0.1, nesterov=True, decouple_wd=False)),
    ('rmsprop', dict(alpha=0.9, momentum=0.5, weight_decay=0.1), dict(sqr_mom=0.9, mom=0.5, wd=0.1, decouple_wd=False)),
    ('momentum', dict(momentum=0.7, weight_decay=0.1), dict(mom=0.7, wd=0.1)),
    ('lamb', dict(betas=(0.8, 0.99), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.99, wd=0.1)),
    ('lion', dict(betas=(0.8, 0.95), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.95, wd=0.1)),
]

@pytest.mark.parametrize('name,torch_kw,fastai_kw', ALIASES, ids=[a[0] for a in ALIASES])
def test_torch_keywords_take_effect(name, torch_kw, fastai_kw):
    spec = BY_NAME[name]
    base = {k: v for k, v in spec.kwargs.items() if k not in fastai_kw}
    m1, m2, m3 = model(), model(), model()
    a = drive(spec.factory(m1.parameters(), **base, **torch_kw), m1.parameters())
    b = drive(spec.factory(m2.parameters(), **base, **fastai_kw), m2.parameters())
    c = drive(spec.factory(m3.parameters(), **base), m3.parameters())
    same(a, b)
    with pytest.raises(AssertionError): same(a, c)       # the keywords changed something

TORCH_CONTROL = [  # torch keywords given to fastopts and to torch.optim alike
    ('adam', torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
    ('adamw', torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
    ('radam', torch.optim.RAdam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
    ('sgd', torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
    ('rmsprop', torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.5, weight_decay=0.1)),
]

@pytest.mark.parametrize('name,tcls,kw', TORCH_CONTROL, ids=[t[0] for t in TORCH_CONTROL])
@pytest.mark.parametrize('where', ['keywords', 'group_keys'])
def test_torch_names_match_torch(name, tcls, kw, where):
    "The same call, fastopts vs torch.optim: keywords, or group dicts carrying every hyper (torch's no-decay groups)."
    m1, m2 = model(), model()
    fac = BY_NAME[name].factory
    if where == 'keywords': ours, theirs = fac(m1.parameters(), **kw), tcls(m2.parameters(), **kw)
    else:
        def groups(m): 
            ps = list(m.parameters())
            return [{'params': ps[::2], **kw}, {'params': ps[1::2], **{**kw, 'weight_decay': 0.}}]
        ours, theirs = fac(groups(m1), lr=kw['lr']), tcls(groups(m2), lr=kw['lr'])
    same(drive(ours, m1.parameters()), drive(theirs, m2.parameters()))

def test_default_lr_as_torch():
    for fac, tcls in [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW), (SGD, torch.optim.SGD),
                      (RMSProp, torch.optim.RMSprop), (RAdam, torch.optim.RAdam)]:
        m = model()
        assert fac(m.parameters()).hypers[0]['lr'] == tcls(m.parameters()).param_groups[0]['lr']

def test_aliases_stay_live():
    "Reading a torch name gives what was written, and the step reads it."
    m = model()
    opt = Adam(m.parameters(), lr=1e-2)
    g = opt.param_groups[0]
    g['betas'] = (0.5, 0.9); g['weight_decay'] = 0.2
    assert (g['betas'], g['mom'], g['sqr_mom'], g['wd'], g['weight_decay']) == ((0.5, 0.9), 0.5, 0.9, 0.2, 0.2)
    assert sorted(k for k in g if k != 'params') == ['eps', 'lr', 'mom', 'sqr_mom', 'wd']   # fastai's names stored
    assert dict(opt.hypers[0]) == {'lr': 1e-2, 'mom': 0.5, 'sqr_mom': 0.9, 'eps': 1e-8, 'wd': 0.2}
    sgd = SGD(m.parameters(), lr=0.1, mom=0.9)
    sgd.param_groups[0]['momentum'] = 0.3
    assert sgd.hypers[0]['mom'] == 0.3

@pytest.mark.parametrize('sched', ['onecycle', 'cyclic'])
@pytest.mark.parametrize('name,tcls,kw', [('adam', torch.optim.Adam, dict(lr=1e-2)), ('sgd_mom', torch.optim.SGD, dict(lr=0.1, momentum=0.9))],
                         ids=['adam', 'sgd'])
def test_schedulers_cycle_momentum_as_in_torch(name, tcls, kw, sched):
    "OneCycleLR/CyclicLR with cycle_momentum=True cycle `mom` exactly as they cycle torch's beta1/momentum."
    m1, m2 = model(), model()
    ours, theirs = BY_NAME[name].make(m1.parameters()), tcls(m2.parameters(), **kw)
    def make(o):
        if sched == 'onecycle': return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=15)
        return torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=0.05, step_size_up=4)
    s1, s2 = make(ours), make(theirs)
    moms, tmoms = [], []
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            p1.grad = torch.randn(p1.shape, generator=g, dtype=p1.dtype); p2.grad = p1.grad.clone()
        ours.step(); theirs.step(); s1.step(); s2.step()
        moms.append(ours.hypers[0]['mom'])
        tg = theirs.param_groups[0]
        tmoms.append(tg['betas'][0] if 'betas' in tg else tg['momentum'])
    assert moms == tmoms and len(set(moms)) > 3
    same(list(m1.parameters()), list(m2.parameters()))

def test_onecycle_refuses_momentum_nobody_reads():
    "SGD built without momentum has no `momentum`: torch's scheduler says so instead of cycling an ignored number."
    opt = SGD(model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match='momentum'): torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)

# ---------------------------------------------------------------- refused
REFUSED = [('amsgrad', True), ('maximize', True), ('capturable', True), ('differentiable', True), ('foreach', False),
           ('centered', True), ('dampening', 0.1)]

@pytest.mark.parametrize('key,value', REFUSED, ids=[k for k, _ in REFUSED])
@pytest.mark.parametrize('where', ['keyword', 'group_key', 'written_later'])
def test_unhonourable_torch_settings_are_refused(key, value, where):
    if (key, where) == ('maximize', 'keyword'): pytest.skip("`maximize=True` is honoured as a keyword (a callback): tests/test_cautious.py")
    m = model()
    with pytest.raises(ValueError, match=f'`{key}={value!r}`'):
        if where == 'keyword': Adam(m.parameters(), **{key: value})
        elif where == 'group_key': Adam([{'params': list(m.parameters()), key: value}])
        else: Adam(m.parameters()).param_groups[0][key] = value

@pytest.mark.parametrize('make,msg', [
    (lambda ps: SGD(ps, betas=(0.9, 0.99)), 'sets `sqr_mom`, which SGD does not have'),
    (lambda ps: Adam(ps, nesterov=True), '`nesterov=True`'),
    (lambda ps: AdamW(ps, decoupled_weight_decay=False), '`decoupled_weight_decay=False`'),
    (lambda ps: Adam(ps, lr_decay=0.1), '`lr_decay` is not a keyword'),
    (lambda ps: Adam(ps, momentum=0.9, mom=0.8), 'both `momentum` and `mom`'),
    (lambda ps: Adam(ps, betas=0.9), '`betas` must be a pair'),
    (lambda ps: SGD([{'params': ps, 'betas': (0.9, 0.99)}], lr=0.1), '`betas`'),
    (lambda ps: SGD(ps, lr=0.1, weight_decay=0.1).param_groups[0].__setitem__('alpha', 0.9), '`alpha`'),
    (lambda ps: SGD([{'params': ps[:2], 'nesterov': True}, {'params': ps[2:]}], lr=0.1, mom=0.9), 'both True and False'),
])
def test_torch_names_that_cannot_be_honoured(make, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): make(list(model().parameters()))

def test_other_group_keys_are_kept():
    "Keys that are no optimizer keyword (a group's name, metadata) are kept, as torch keeps them."
    opt = Adam([{'params': list(model().parameters()), 'name': 'body', 'tag': 3}])
    assert opt.param_groups[0]['name'] == 'body' and opt.state_dict()['param_groups'][0]['tag'] == 3
    assert 'name' not in opt.hypers[0]

def test_sgd_without_momentum_has_no_empty_state():
    m = model()
    opt = SGD(m.parameters(), lr=0.1)
    drive(opt, m.parameters(), steps=2)
    assert opt.state_dict()['state'] == {}

# ---------------------------------------------------------------- complex parameters
COMPLEX_REF = [o for o in OPTIMIZERS if o.complex_ref == 'torch']

@pytest.mark.parametrize('spec', COMPLEX_REF, ids=ids)
def test_complex_params_as_torch(spec):
    "Complex params stepped as torch steps them (as real pairs): same numbers as torch.optim on complex params."
    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(3, 2, generator=g, dtype=torch.complex128).requires_grad_(), torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()]
    a, b = params(), params()
    same(drive(spec.make(a), a), drive(spec.torch_make(b), b))

@pytest.mark.parametrize('spec', [o for o in OPTIMIZERS if o.complex_ref == 'real'], ids=ids)
def test_complex_params_as_real_pairs(spec):
    "Rules torch lacks: a complex param steps exactly as its `view_as_real` pair would."
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, generator=g, dtype=torch.complex128).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    opt_z, opt_r = spec.make([z]), spec.make([r])
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        z.grad = torch.randn(3, 2, generator=g, dtype=torch.complex128)
        r.grad = torch.view_as_real(z.grad).clone()
        opt_z.step(); opt_r.step()
    same([torch.view_as_real(z.detach())], [r.detach()])
    assert opt_z.state[z].get('grad_avg', torch.zeros(1, dtype=torch.complex128)).is_complex()

# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize('spec', CHECKPOINT, ids=ids)
def test_torch_checkpoint_continues_identically(spec):
    "torch trains 5 steps and saves; fastopts loads the file and continues: the same 5 further steps as torch."
    m1, m2 = model(), model()
    topt = spec.torch_make(m1.parameters())
    drive(topt, m1.parameters(), steps=5, seed=1)
    sd = load_via_bytes(topt.state_dict())
    m2.load_state_dict(m1.state_dict())
    opt = spec.make(m2.parameters(), lr=1.)            # a wrong lr, to be replaced by the checkpoint's
    opt.load_state_dict(sd)
    same(drive(opt, m2.parameters(), steps=5, seed=2), drive(topt, m1.parameters(), steps=5, seed=2))

@pytest.mark.parametrize('spec', CHECKPOINT, ids=ids)
def test_fastopts_checkpoint_to_torch(spec):
    "`torch_state_dict()` loads into the torch optimizer of the rule, which then continues as fastopts does."
    m1, m2 = model(), model()
    opt = spec.make(m1.parameters())
    drive(opt, m1.parameters(), steps=5, seed=1)
    m2.load_state_dict(m1.state_dict())
    topt = spec.torch_make(m2.parameters())
    topt.load_state_dict(load_via_bytes(opt.torch_state_dict()))
    same(drive(topt, m2.parameters(), steps=5, seed=2), drive(opt, m1.parameters(), steps=5, seed=2))

@pytest.mark.parametrize('src,dst,msg', [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 'adam', "torch.optim.SGD's"),
    (lambda ps: torch.optim.Adam(ps, amsgrad=True), 'adam', 'amsgrad'),
    (lambda ps: torch.optim.AdamW(ps, weight_decay=0.1), 'adam_l2', 'decouple_wd=True'),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 'sgd', 'built without momentum'),
    (lambda ps: torch.optim.RMSprop(ps, centered=True), 'rmsprop', 'centered'),
    (lambda ps: torch.optim.Adam(ps), 'lamb', 'no torch.optim optimizer computes'),
], ids=['sgd_into_adam', 'amsgrad', 'adamw_into_l2', 'momentum_into_plain', 'centered', 'into_lamb'])
def test_incompatible_torch_checkpoint_is_refused_at_load(src, dst, msg):
    m = model()
    topt = src(m.parameters())
    drive(topt, m.parameters(), steps=2)
    opt = BY_NAME[dst].make(m.parameters())
    before = opt.state_dict()
    with pytest.raises(ValueError, match=msg): opt.load_state_dict(topt.state_dict())
    assert opt.state_dict()['param_groups'] == before['param_groups']

# ---------------------------------------------------------------- Lookahead over torch.optim
def test_lookahead_over_torch_adamw_equals_over_fastopts_adamw():
    m1, m2 = model(), model()
    a = drive(Lookahead(torch.optim.AdamW(m1.parameters(), lr=1e-2), k=4, alpha=0.5), m1.parameters(), steps=14)
    b = drive(Lookahead(AdamW(m2.parameters(), lr=1e-2), k=4, alpha=0.5), m2.parameters(), steps=14)
    same(a, b)

def test_lookahead_over_torch_save_load_resumes():
    m1, m2 = model(), model()
    la = Lookahead(torch.optim.AdamW(m1.parameters(), lr=1e-2), k=4)
    drive(la, m1.parameters(), steps=6)
    m2.load_state_dict(m1.state_dict())
    la2 = Lookahead(torch.optim.AdamW(m2.parameters(), lr=1.), k=4)
    la2.load_state_dict(load_via_bytes(la.state_dict()))
    assert la2.count == 6 and la2.hypers[0]['lr'] == 1e-2
    same(drive(la2, m2.parameters(), steps=6, seed=3), drive(la, m1.parameters(), steps=6, seed=3))

def test_lookahead_hooks_run_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_pre_hook, register_optimizer_step_post_hook
    calls = []
    for inner in (torch.optim.AdamW, AdamW):
        calls.clear()
        m = model()
        la = Lookahead(inner(m.parameters(), lr=1e-2), k=2)
        la.register_step_pre_hook(lambda *a: calls.append('pre'))
        la.register_step_post_hook(lambda *a: calls.append('post'))
        la.register_state_dict_pre_hook(lambda *a: calls.append('sd_pre'))
        la.register_load_state_dict_post_hook(lambda *a: calls.append('load_post'))
        hs = [register_optimizer_step_pre_hook(lambda *a: calls.append('global_pre')),
              register_optimizer_step_post_hook(lambda *a: calls.append('global_post'))]
        try: drive(la, m.parameters(), steps=2)
        finally:
            for h in hs: h.remove()
        la.load_state_dict(la.state_dict())
        assert calls == ['global_pre', 'pre', 'post', 'global_post'] * 2 + ['sd_pre', 'load_post'], inner

def test_lookahead_refuses_what_is_no_optimizer():
    from fastai.optimizer import OptimWrapper
    m = model()
    with pytest.raises(ValueError, match='wrap the torch optimizer inside'):
        Lookahead(OptimWrapper(m.parameters(), torch.optim.AdamW, lr=1e-3))
