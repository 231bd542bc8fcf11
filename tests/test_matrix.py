"""Muon, SOAP and Adafactor (fastopts.matrix) against their references, step by step: torch.optim.Muon,
torch.optim.Adafactor, and a SOAP written here from the paper (Vyas et al. 2024, Algorithm 3) and the authors' soap.py."""
import copy, pickle, re
from itertools import chain
from unittest import mock
import pytest, torch
from torch.testing import assert_close
from fastopts.matrix import Muon, Adafactor, SOAP, muon_routes, state_bytes_per_param, newton_schulz

STEPS = 12

def make(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]

def grads(shapes, step, dtype=torch.float32, scale=1.):
    g = torch.Generator().manual_seed(1000 + step)
    return [scale*torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]

def displacement_error(ours, ref, p0) -> float:
    "Relative error of the total displacement (all params as one vector)."
    d_ours = torch.cat([(a.detach() - a0).reshape(-1) for a, a0 in zip(ours, p0)])
    d_ref = torch.cat([(b.detach().reshape(-1) - a0.reshape(-1)) for b, a0 in zip(ref, p0)])
    return float((d_ours - d_ref).norm() / d_ref.norm())

def run_pair(ours, ref, opt, ref_opt, shapes, dtype, steps=STEPS, scale=1.):
    for step in range(steps):
        for p, q, g in zip(ours, ref, grads(shapes, step, dtype, scale)): p.grad = g.clone(); q.grad = g.reshape(q.shape).clone()
        opt.step(); ref_opt.step()

# ------------------------------------------------------------------------------------------------------------- Muon
MUON_SHAPES = [(8, 16), (8, 16), (32, 8), (12, 12), (6, 3, 3, 3), (4, 2, 5)]   # same-shape pair: one batched Newton-Schulz
MUON_KW = [dict(), dict(nesterov=False), dict(adjust_lr_fn='match_rms_adamw', momentum=0.9), dict(adjust_lr_fn='original'),
           dict(adjust_lr_fn='spectral_unclamped', weight_decay=0.), dict(ns_steps=3, eps=1e-5, ns_coefficients=(3., -3.2, 1.2))]

def _muon_run(kw, ns_dtype=torch.bfloat16, patch_f32=False):
    ours = make(MUON_SHAPES)
    ref = [p.detach().reshape(p.shape[0], -1).clone().requires_grad_() for p in ours]   # conv and 3-D as out x rest
    p0 = [p.detach().clone() for p in ours]
    opt, t = Muon(ours, lr=0.02, ns_dtype=ns_dtype, **kw), torch.optim.Muon(ref, lr=0.02, **kw)
    if patch_f32:   # torch's Newton-Schulz computed in float32 instead of bfloat16
        with mock.patch.object(torch.Tensor, 'bfloat16', lambda self: self.to(torch.float32, copy=True)): run_pair(ours, ref, opt, t, MUON_SHAPES, torch.float32)
    else: run_pair(ours, ref, opt, t, MUON_SHAPES, torch.float32)
    return displacement_error(ours, ref, p0)

@pytest.mark.parametrize('kw', MUON_KW, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'defaults')
def test_muon_equals_torch_muon(kw):
    # measured (12 steps, float32 params): bf16 vs torch's bf16 <= 4.2e-7 (0 in half the cases), f32 vs torch patched to
    # f32 <= 7.2e-7, f32 vs torch's bf16 2.5e-3 .. 6.7e-3; each bound about 10x the measured error
    assert _muon_run(kw) <= 4e-6                                   # bf16 Newton-Schulz, as torch's: a f32 one is 1e-3 off
    assert 1e-3 <= _muon_run(kw, ns_dtype=torch.float32) <= 2e-2  # the f32 option is not torch's bf16 rule ...
    assert _muon_run(kw, ns_dtype=torch.float32, patch_f32=True) <= 7e-6   # ... but torch's rule in f32

def test_muon_f32_option_is_closer_to_exact():
    "float32 Newton-Schulz is nearer the float64 iteration than bfloat16 (torch's)."
    X = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = newton_schulz(X, dtype=torch.float64)
    e16, e32 = ((newton_schulz(X, dtype=d).double() - exact).norm() for d in (torch.bfloat16, torch.float32))
    assert e32 < e16/100

def test_muon_refuses_non_matrices_in_its_chain():
    from fastopts.matrix import muon_chain, MatrixOptimizer
    opt = MatrixOptimizer(make([(3,)]), muon_chain(), lr=0.1, mom=0.9, wd=0.)
    opt.param_groups[0]['params'][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match='matrices'): opt.step()

BAD = [(Muon, dict(ns_steps=0), 'ns_steps'), (Muon, dict(ns_steps=100), 'ns_steps'), (Muon, dict(adjust_lr_fn='x'), 'adjust_lr_fn'),
       (Muon, dict(momentum=1.0), 'mom'), (Muon, dict(weight_decay=-1), 'wd'), (Muon, dict(eps=0), 'eps'),
       (Muon, dict(ns_coefficients=(1., 2.)), 'ns_coefficients'), (Muon, dict(ns_dtype=torch.int8), 'ns_dtype'),
       (Muon, dict(adamw=3), 'adamw'), (Muon, dict(lr=-0.1), 'lr'),
       (Adafactor, dict(beta2_decay=0.1), 'beta2_decay'), (Adafactor, dict(d=0.9), 'd'), (Adafactor, dict(eps=(None, -1.)), 'eps[1]'),
       (Adafactor, dict(eps=1e-3), 'eps'), (Adafactor, dict(weight_decay=-1.), 'wd'), (Adafactor, dict(maximize=1), 'maximize'),
       (Adafactor, dict(foreach='yes'), 'foreach'),
       (SOAP, dict(betas=(0.9, 1.)), 'sqr_mom'), (SOAP, dict(shampoo_beta=1.5), 'shampoo_beta'), (SOAP, dict(eps=0.), 'eps'),
       (SOAP, dict(precondition_frequency=0), 'precondition_frequency'), (SOAP, dict(max_precond_dim=0), 'max_precond_dim'),
       (SOAP, dict(merge_dims='yes'), 'merge_dims'), (SOAP, dict(data_format='NHWC'), 'data_format'),
       (SOAP, dict(weight_decay=-0.1), 'wd'), (SOAP, dict(compiled=True), 'compiled')]

@pytest.mark.parametrize('fac,kw,name', BAD, ids=[f'{f.__name__}-{n}' for f, _, n in BAD])
def test_bad_values_refused_by_name(fac, kw, name):
    with pytest.raises(ValueError, match=re.escape(f"`{name}")): fac(make([(4, 6)]), **kw)

def test_bad_group_hyper_refused_where_read():
    opt = Muon(make([(4, 6)]), lr=0.02)
    opt.param_groups[0]['ns_steps'] = 2.5
    opt.param_groups[0]['params'][0].grad = torch.ones(4, 6)
    with pytest.raises(ValueError, match='`ns_steps`'): opt.step()
    opt = SOAP(make([(4, 6)]))
    opt.param_groups[0]['merge_dims'] = 'no'
    opt.param_groups[0]['params'][0].grad = torch.ones(4, 6)
    with pytest.raises(ValueError, match='`merge_dims`'): opt.step()

# -------------------------------------------------------------------------------------------------------- Adafactor
ADA_SHAPES = [(7,), (), (4, 6), (3, 4, 5), (2, 3, 4, 5), (1, 9)]
ADA_KW = [dict(), dict(lr=0.05, weight_decay=0.1), dict(beta2_decay=-0.5, eps=(1e-20, 1e-2), d=2.0), dict(maximize=True, foreach=True),
          dict(lr=0.5, foreach=False)]

@pytest.mark.parametrize('kw', ADA_KW, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'defaults')
def test_adafactor_equals_torch_adafactor(kw):
    ours = make(ADA_SHAPES, torch.float64)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    run_pair(ours, ref, Adafactor(ours, **kw), torch.optim.Adafactor(ref, **kw), ADA_SHAPES, torch.float64)
    for a, b in zip(ours, ref): assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(a, a0) for a, a0 in zip(ours, make(ADA_SHAPES, torch.float64)))

def test_adafactor_float32_and_groups():
    "float32 (eps1 from the dtype) and torch-style group dicts with their own keys (eps pair, weight_decay, foreach)."
    ours = make(ADA_SHAPES)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    gs = lambda ps: [{'params': ps[:3], 'eps': (1e-25, 1e-3), 'weight_decay': 0.2, 'foreach': False}, {'params': ps[3:], 'lr': 0.03}]
    run_pair(ours, ref, Adafactor(gs(ours)), torch.optim.Adafactor(gs(ref)), ADA_SHAPES, torch.float32)
    for a, b in zip(ours, ref): assert_close(a, b, rtol=1e-5, atol=1e-6)

def test_adafactor_factored_state():
    opt = Adafactor(make([(6, 8), (3, 6, 8), (5,)]))
    for p, g in zip(opt.param_groups[0]['params'], grads([(6, 8), (3, 6, 8), (5,)], 0)): p.grad = g
    opt.step()
    s = [opt.state[p] for p in opt.param_groups[0]['params']]
    assert s[0]['row_var'].shape == (6, 1) and s[0]['col_var'].shape == (1, 8) and 'sqr_avg' not in s[0]
    assert s[1]['row_var'].shape == (3, 6, 1) and s[1]['col_var'].shape == (3, 1, 8)
    assert s[2]['sqr_avg'].shape == (5,) and 'row_var' not in s[2]

# ------------------------------------------------------------------------------------------------------------- SOAP
class RefSOAP:
    """SOAP written from the paper (Algorithm 3: Adam in the eigenbasis of Shampoo's L and R, the bases refreshed by one
    power iteration + QR every f steps, the first step only initialising) and the authors' soap.py conventions (per
    dimension factors, `max_precond_dim`, `merge_dims`, `precondition_1d`, channels_last, bias correction, wd after)."""
    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01, precondition_frequency=10,
                 max_precond_dim=10000, merge_dims=False, precondition_1d=False, normalize_grads=False, data_format='channels_first',
                 correct_bias=True):
        self.params, self.lr, (self.b1, self.b2), self.eps, self.wd = list(params), lr, betas, eps, weight_decay
        self.sb = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.f, self.maxd, self.merge, self.p1d, self.norm, self.cl, self.bc = (precondition_frequency, max_precond_dim, merge_dims,
            precondition_1d, normalize_grads, data_format == 'channels_last', correct_bias)
        self.st = {}

    def view(self, x):
        "The tensor whose dims get factors (channels_last: NHWC read as NCHW; merge: consecutive dims merged)."
        if not self.merge or x.dim() < 2: return x
        if self.cl and x.dim() == 4: x = x.permute(0, 3, 1, 2)
        dims, acc = [], 1
        for n in x.shape:   # greedy merge of consecutive dims while the product stays <= max_precond_dim
            if acc*n <= self.maxd: acc *= n
            elif acc > 1: dims.append(acc); acc = n
            else: dims.append(n); acc = 1
        if acc > 1 or not dims: dims.append(acc)
        return x.reshape(dims)

    def unview(self, y, like):
        if not self.merge or like.dim() < 2: return y
        if self.cl and like.dim() == 4: return y.reshape(like.permute(0, 3, 1, 2).shape).permute(0, 2, 3, 1)
        return y.reshape(like.shape)

    def mode_product(self, x, qs, transpose):
        "x ×_k Q_kᵀ (transpose) or x ×_k Q_k for every dim k with a basis, via movedim + matmul."
        for k, q in enumerate(qs):
            if q is None: continue
            m = q if transpose else q.T   # (x ×_k Qᵀ)_j = Σ_i Q[i, j] x_i: x @ Q along dim k
            x = torch.movedim(torch.movedim(x, k, -1) @ m, -1, k)
        return x

    def rot(self, x, qs, transpose=True): return self.unview(self.mode_product(self.view(x), qs, transpose), x)

    def step(self):
        for p in self.params:
            g = p.grad
            if p not in self.st:
                w = self.view(g)
                use = [self.p1d and g.shape[0] <= self.maxd] if g.dim() == 1 else [n <= self.maxd for n in w.shape]
                L = [torch.zeros(n, n) if u else None for n, u in zip(w.shape, use)]
                self.accumulate(L, g)
                Q = [None if m is None else torch.linalg.eigh(m + 1e-30*torch.eye(len(m)))[1].flip(1) for m in L]
                self.st[p] = dict(t=0, m=torch.zeros_like(g), v=torch.zeros_like(g), L=L, Q=Q)
                continue
            s = self.st[p]
            gh = self.rot(g, s['Q'])
            s['t'] += 1
            s['m'] = self.b1*s['m'] + (1 - self.b1)*gh
            s['v'] = self.b2*s['v'] + (1 - self.b2)*gh*gh
            n = self.rot(s['m']/(s['v'].sqrt() + self.eps), s['Q'], transpose=False)
            if self.norm: n = n/(1e-30 + n.pow(2).mean().sqrt())
            size = self.lr*(1 - self.b2**s['t'])**0.5/(1 - self.b1**s['t']) if self.bc else self.lr
            p.data -= size*n
            if self.wd > 0: p.data -= self.lr*self.wd*p.data
            s['m'] = self.rot(s['m'], s['Q'], transpose=False)   # m back to the parameter space
            self.accumulate(s['L'], g)
            if s['t'] % self.f == 0:
                v = self.view(s['v'])
                for k, (m, q) in enumerate(zip(s['L'], s['Q'])):
                    if m is None: continue
                    order = (q.T @ m @ q).diagonal().argsort(descending=True)
                    v = v.index_select(k, order)
                    s['Q'][k] = torch.linalg.qr(m @ q[:, order]).Q
                s['v'] = self.unview(v, s['v'])
            s['m'] = self.rot(s['m'], s['Q'])

    def accumulate(self, L, g):
        # lerp, as soap.py: a factor of a non-square gradient is rank-deficient for the first steps, and its null-space
        # eigenvectors (which Adam's per-coordinate scaling then sees) are picked by the factor's last-bit rounding
        if g.dim() == 1:
            if L[0] is not None: L[0].lerp_(torch.outer(g, g), 1 - self.sb)
            return
        w = self.view(g)
        for k, m in enumerate(L):
            if m is None: continue
            wk = torch.movedim(w, k, 0).reshape(w.shape[k], -1)
            m.lerp_(wk @ wk.T, 1 - self.sb)

SOAP_SHAPES = [(7,), (6, 4), (3, 4, 5), (4, 3, 2, 2), (20, 3)]
SOAP_KW = [dict(), dict(precondition_frequency=3, weight_decay=0.1), dict(precondition_frequency=4, precondition_1d=True, max_precond_dim=6),
           dict(precondition_frequency=3, merge_dims=True, max_precond_dim=12), dict(merge_dims=True, data_format='channels_last',
           precondition_frequency=5, max_precond_dim=8), dict(normalize_grads=True, correct_bias=False, shampoo_beta=0.8, betas=(0.9, 0.99),
           precondition_frequency=2, eps=1e-6), dict(betas=(0.9, 0.99)),   # betas apart: shampoo_beta defaults to the second
           dict(betas=(0.9, 0.99), precondition_frequency=3, merge_dims=True, max_precond_dim=12)]

@pytest.mark.parametrize('kw', SOAP_KW, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'defaults')
def test_soap_equals_reference(kw):
    ours = make(SOAP_SHAPES)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    p0 = [p.detach().clone() for p in ours]
    run_pair(ours, ref, SOAP(ours, lr=0.01, **kw), RefSOAP(ref, lr=0.01, **kw), SOAP_SHAPES, torch.float32)
    for a, b, a0 in zip(ours, ref, p0):
        assert not torch.equal(b.detach(), a0)
        # float32 through eigendecompositions, measured: <= 3.6e-7 apart (1.5 units in the last place of params ~2), total
        # displacement 1.2e-6 relative; bounds ~8x that (shampoo_beta from the wrong beta: 0.19)
        assert_close(a, b, rtol=1e-5, atol=3e-6)
    assert displacement_error(ours, ref, p0) <= 1e-5

def test_soap_first_step_only_builds_the_basis():
    ps = make([(5, 3)])
    p0 = ps[0].detach().clone()
    opt = SOAP(ps, lr=0.1, weight_decay=0.5)
    ps[0].grad = torch.ones(5, 3); opt.step()
    assert torch.equal(ps[0].detach(), p0)
    st = opt.state[ps[0]]
    assert st['step'] == 0 and st['soap_q0'].shape == (5, 5) and st['soap_q1'].shape == (3, 3)

# --------------------------------------------------------------------------------------------------- checkpoints, bytes
@pytest.mark.parametrize('rule', ['muon', 'adafactor'])
def test_torch_checkpoint_loads(rule):
    "A torch.optim.Muon / Adafactor state dict after 3 steps loads into fastopts' and the next steps agree."
    shapes = [(8, 16), (12, 6)] if rule == 'muon' else ADA_SHAPES
    dt = torch.float32 if rule == 'muon' else torch.float64
    a, b = make(shapes, dt), make(shapes, dt)
    if rule == 'muon': t, ours = torch.optim.Muon(a, lr=0.02, momentum=0.9, nesterov=False), Muon(b, lr=0.5, nesterov=False)
    else: t, ours = torch.optim.Adafactor(a, lr=0.03, weight_decay=0.1, eps=(1e-25, 1e-3)), Adafactor(b)
    for step in range(3):
        for p, g in zip(a, grads(shapes, step, dt)): p.grad = g
        t.step()
    with torch.no_grad():
        for p, q in zip(b, a): p.copy_(q)
    ours.load_state_dict(copy.deepcopy(t.state_dict()))   # (a live state dict would share its tensors)
    h = ours.hypers[0]
    if rule == 'muon': assert (h['lr'], h['mom']) == (0.02, 0.9)
    else: assert (h['lr'], h['wd'], h['eps1']) == (0.03, 0.1, 1e-25)
    for step in range(3, 6):
        for p, q, g in zip(a, b, grads(shapes, step, dt)): p.grad = g; q.grad = g.clone()
        t.step(); ours.step()
    for p, q in zip(a, b): assert_close(q, p, rtol=1e-9 if dt == torch.float64 else 1e-6, atol=1e-12 if dt == torch.float64 else 1e-7)

def test_torch_checkpoint_of_another_rule_refused():
    a = make([(4, 6)])
    t = torch.optim.Muon(a, lr=0.02, nesterov=True)
    for p in a: p.grad = torch.ones_like(p)
    t.step()
    with pytest.raises(ValueError, match='nesterov'): Muon(make([(4, 6)]), nesterov=False).load_state_dict(t.state_dict())
    with pytest.raises(ValueError, match='Adafactor'): Adafactor(make([(4, 6)])).load_state_dict(t.state_dict())

@pytest.mark.parametrize('fac', [Muon, Adafactor, SOAP], ids=lambda f: f.__name__)
def test_own_state_dict_round_trip_and_pickle(fac):
    shapes = [(6, 4), (3, 2, 2), (5,)]   # Muon: the hybrid, two chains
    ps = make(shapes)
    opt = fac(ps, lr=0.01)
    for step in range(4):
        for p, g in zip(ps, grads(shapes, step)): p.grad = g
        opt.step()
    sd = opt.state_dict()
    import io
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = fac(qs, lr=0.5)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    opt3 = pickle.loads(pickle.dumps(opt))
    for step in range(4, 7):
        gs = grads(shapes, step)
        for p, q, g in zip(ps, qs, gs): p.grad = g; q.grad = g.clone()
        opt.step(); opt2.step()
    for p, q in zip(ps, qs): assert torch.equal(p, q)
    assert type(opt3) is type(opt) and opt3.torch_rule_name == opt.torch_rule_name

def test_state_bytes_per_param():
    shapes = [(64, 32), (16, 8, 3, 3)]
    out = {}
    for fac in (Muon, Adafactor, SOAP):
        ps = make(shapes)
        opt = fac(ps)
        for step in range(2):
            for p, g in zip(ps, grads(shapes, step)): p.grad = g
            opt.step()
        out[fac.__name__] = state_bytes_per_param(opt)
    n = 64*32 + 16*8*9
    assert out['Muon']['total'] == 4. and out['Muon']['grad_avg'] == 4.
    assert out['Adafactor']['total'] == 4*(64 + 32 + 16*8*3 + 16*8*3)/n
    assert out['SOAP']['total'] == 4*(2*n + 2*(64**2 + 32**2 + 16**2 + 8**2 + 3**2 + 3**2))/n

# ------------------------------------------------------------------------------------------------------------ hybrid
def _cnn():
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3))

def test_hybrid_routes_and_equals_torch_muon_plus_adamw():
    "Muon on a CNN's named parameters: conv weights take torch.optim.Muon's rule (as out x rest), biases, the norm and the head (by name) torch.optim.AdamW's at lr*adamw_lr_ratio."
    m1, m2 = _cnn(), _cnn()
    routes = muon_routes(m1.named_parameters(), adamw='7.')
    assert routes == [('0.weight', (4, 1, 3, 3), 'muon'), ('0.bias', (4,), 'adamw'), ('1.weight', (4,), 'adamw'), ('1.bias', (4,), 'adamw'),
                      ('3.weight', (6, 4, 3, 3), 'muon'), ('3.bias', (6,), 'adamw'), ('7.weight', (3, 6), 'adamw'), ('7.bias', (3,), 'adamw')]
    ours = Muon(m1.named_parameters(), lr=0.02, adamw='7.', adamw_lr_ratio=0.1, adamw_mom=0.8, adamw_sqr_mom=0.95, adamw_eps=1e-10, adamw_wd=0.05)
    assert len(ours.param_groups) == 1 and [ours.routes[p] for p in m1.parameters()] == [r for _, _, r in routes]   # the user's one group
    ps2 = dict(m2.named_parameters())
    mats = [torch.nn.Parameter(ps2[n].detach().reshape(s[0], -1).clone()) for n, s, r in routes if r == 'muon']
    rest = [ps2[n] for n, s, r in routes if r == 'adamw']
    t_muon = torch.optim.Muon(mats, lr=0.02)
    t_adamw = torch.optim.AdamW(rest, lr=0.002, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)
    x = torch.randn(8, 1, 7, 7, generator=torch.Generator().manual_seed(0)); y = torch.arange(8) % 3
    for _ in range(STEPS):
        ours.zero_grad(); torch.nn.functional.cross_entropy(m1(x), y).backward(); ours.step()
        with torch.no_grad():   # m2 runs with the reference's matrices written back into its convs
            for (n, s, r), q in zip([r for r in routes if r[2] == 'muon'], mats): ps2[n].copy_(q.view(s))
        t_muon.zero_grad(); t_adamw.zero_grad(); m2.zero_grad()
        torch.nn.functional.cross_entropy(m2(x), y).backward()
        for (n, s, r), q in zip([r for r in routes if r[2] == 'muon'], mats): q.grad = ps2[n].grad.reshape(q.shape).clone()
        t_muon.step(); t_adamw.step()
        with torch.no_grad():
            for (n, s, r), q in zip([r for r in routes if r[2] == 'muon'], mats): ps2[n].copy_(q.view(s))
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda msg: f'{n}: {msg}')
    assert not torch.equal(m1[7].weight, _cnn()[7].weight)

def test_hybrid_lr_ratio_default_follows_adjust_lr_fn():
    ps = make([(4, 6), (4,)])
    assert Muon(ps).param_groups[0]['adamw_lr_ratio'] == 0.015
    assert Muon(ps, adjust_lr_fn='match_rms_adamw').param_groups[0]['adamw_lr_ratio'] == 1.0

def test_muon_groups_route_whole_groups():
    "Groups that already name a chain (a user who routes whole groups, e.g. with `muon_groups`) stay as they are, empty ones too."
    from fastopts.matrix import muon_groups
    ps = make([(4, 6), (4,), (3, 4)])
    gs = muon_groups([ps[:2], ps[2:]], adamw_lr_ratio=0.1)
    assert [(g['chain'], g['layer'], len(g['params'])) for g in gs] == [('muon', 0, 1), ('adamw', 0, 1), ('muon', 1, 1)]
    share = [{**g, 'params': g['params'] if i != 0 else []} for i, g in enumerate(gs)]
    opt = Muon(share)
    assert [(g['chain'], len(g['params'])) for g in opt.param_groups] == [('muon', 0), ('adamw', 1), ('muon', 1)]
    assert opt.param_groups[1]['adamw_lr_ratio'] == 0.1

@pytest.mark.slow   # inductor compiles the chains (~40 s on CPU)
@pytest.mark.parametrize('fac,kw', [(Muon, dict(ns_dtype=torch.float32)), (Muon, {}), (Adafactor, {})], ids=['muon', 'muon_bf16', 'adafactor'])
def test_compiled_equals_callbacks(fac, kw):
    shapes = [(8, 4), (4, 3), (5,)]
    runs = []
    for compiled in (False, True):
        ps = make(shapes)
        opt = fac(ps, lr=0.02, compiled=compiled, **kw)
        for step in range(4):
            for p, g in zip(ps, grads(shapes, step)): p.grad = g
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs): assert_close(a, b, rtol=1e-5, atol=1e-6)
