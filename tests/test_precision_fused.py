"""The fused precision path (`compiled=True` with a precision option): decode, the chain, Kahan or stochastic write-back
and encode compiled into one pass per tensor. The reference is the eager precision layer (`enter`, the callbacks,
`exit`), which tests/test_precision.py ties to torch.optim and closed forms.

inductor compiles C++ here (seconds per graph): the tensors are tiny and few shapes are used; the heavier cases are
`slow`. Where only the structure matters (gradient release, checkpoints, graph counts) the `aot_eager` backend
traces exactly what inductor would compile, at a fraction of the time.
"""
from functools import partial
import shutil
import pytest, torch
from torch._dynamo.utils import counters
from fastopts.optimizer import AdamW, Lion, ParamGroupView, _hyper_tensors
from fastopts.callbacks import weight_decay, average_grad, average_sqr_grad, step_stat, adam_step, lion_step
from fastopts.precision import Precision, _kahan, stochastic_round, QUANT_MIN_NUMEL
from fastopts.release import release_gradients

pytestmark = pytest.mark.skipif(not shutil.which('g++') and not shutil.which('gcc'), reason='inductor needs a C++ compiler on CPU')

ADAMW = [weight_decay, partial(average_grad, dampening=True), average_sqr_grad, step_stat, adam_step]
HYPER = dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01)
SHAPE = (64, 80)   # 5120 elements: quantised (>= QUANT_MIN_NUMEL)
INDUCTOR = dict(fullgraph=True, dynamic=False, options={'emulate_precision_casts': True})

def graphs() -> int: return counters['stats']['unique_graphs']

def layer_run(prec, fused:bool, cbs=ADAMW, steps=4, shapes=(SHAPE,), dtype=torch.bfloat16, compile_kw=None):
    "`steps` of `cbs` through `prec` with the same 0-d tensor hypers both ways: eagerly (enter, callbacks, exit) or fused."
    g = torch.Generator().manual_seed(0)
    ps, sts = [torch.randn(s, generator=g).to(dtype) for s in shapes], [{} for _ in shapes]
    for t in range(steps):
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        h = _hyper_tensors({**HYPER, 'lr': HYPER['lr'] * 0.9**t}, torch.device('cpu'))
        if fused and t and prec.fused_step(cbs, ps, grads, sts, h, compile_kw): continue
        grp = ParamGroupView(ps, grads, sts); w = prec.enter(grp)
        for cb in cbs: w.update(cb(w, **h), cb)
        prec.exit(w, grp)
    return ps, sts

def test_write_back_bit_for_bit():
    "Kahan's write-back and stochastic rounding (counter-hash bits) compiled equal eager, bit for bit, on the same float32 values."
    g = torch.Generator().manual_seed(0)
    n = 3000
    p, comp = torch.randn(n, generator=g).bfloat16(), (torch.randn(n, generator=g) * 1e-3).bfloat16()
    w = p.float() + torch.randn(n, generator=g) * 1e-4
    def both(p, w, comp, key):
        _kahan(p, w.clone(), comp)
        return stochastic_round(w, torch.bfloat16, key=key), stochastic_round(w, torch.float16, key=key + 1)
    eager, comp_ = (p.clone(), comp.clone()), None
    r_e = both(*eager[:1], w, eager[1], torch.tensor(11))
    fused = (p.clone(), comp.clone())
    r_c = torch.compile(both, **INDUCTOR)(fused[0], w, fused[1], torch.tensor(11))
    assert torch.equal(eager[0], fused[0]) and torch.equal(eager[1], fused[1])
    assert all(torch.equal(a, b) for a, b in zip(r_e, r_c))
    assert (eager[1] != 0).any() and not torch.equal(r_e[0], w.bfloat16())   # something was compensated, and rounded off nearest

@pytest.mark.slow
def test_fused_step_equals_eager_layer_kahan_int8():
    """AdamW's chain with Kahan and int8 state: codes, scales, params and steps equal the eager layer's. The chain's own
    arithmetic is not always the same: ATen's eager division by a per-tensor scalar and inductor's loop differ by one
    float32 ulp in about 0.1% of the elements, which moves Kahan's bf16 remainder by one of its own ulps there. Bound:
    the weight Kahan holds (p + comp) within 2**-15 of its size."""
    prec, before = Precision(kahan_sum=True, state_dtype='int8'), graphs()
    (pe, se), (pc, sc) = layer_run(Precision(kahan_sum=True, state_dtype='int8'), False, shapes=(SHAPE, SHAPE)), layer_run(prec, True, shapes=(SHAPE, SHAPE))
    assert graphs() - before == 1 and len(prec._fused) == 1            # two tensors of one shape: one graph, for 3 scheduled steps
    for a, b, s1, s2 in zip(pe, pc, se, sc):
        assert s1.keys() == s2.keys() and s2['step'] == 4 and s2['grad_avg'].dtype == torch.int8 and s2['sqr_avg'].dtype == torch.uint8
        for k in ('grad_avg', 'grad_avg.absmax', 'sqr_avg', 'sqr_avg.absmax'): assert torch.equal(s1[k], s2[k]), k
        assert torch.equal(a, b)
        w1, w2 = a.double() + s1['kahan_comp'].double(), b.double() + s2['kahan_comp'].double()
        assert ((w1 - w2).abs() <= w1.abs() * 2**-15).all()
        assert (s1['kahan_comp'] != s2['kahan_comp']).float().mean() < 0.01

@pytest.mark.slow
@pytest.mark.parametrize('kw,cbs', [(dict(stochastic_round=True, seed=3, state_dtype='int4'), ADAMW),
                                    (dict(kahan_sum=True, state_dtype='int4'), [weight_decay, lion_step]),
                                    (dict(stochastic_round=True, seed=0, state_dtype=torch.bfloat16), [weight_decay, lion_step])],
                         ids=['adamw-sr-int4', 'lion-kahan-int4', 'lion-sr-bf16'])
def test_fused_step_equals_eager_layer(kw, cbs):
    "Stochastic rounding (the same seed: the same stream) and 4-bit state: bit for bit on these steps; a small fp32-state tensor too."
    (pe, se), (pc, sc) = (layer_run(Precision(**kw), f, cbs=cbs, shapes=(SHAPE, (7,))) for f in (False, True))
    for a, b, s1, s2 in zip(pe, pc, se, sc):
        assert torch.equal(a, b)
        assert s1.keys() == s2.keys() and all(torch.equal(v, s2[k]) if isinstance(v, torch.Tensor) else v == s2[k] for k, v in s1.items())

def _opt_run(make, steps=4, release=False, dtype=torch.bfloat16, shapes=(SHAPE, (7,), SHAPE)):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    opt, x = make(ps), [torch.randn(s, generator=g) for s in shapes]
    h = release_gradients(opt) if release else None
    for t in range(steps):
        opt.set_hyper('lr', 1e-2 * 0.9**t)
        loss = sum(((p.float() - xi * (t + 1)) ** 2).sum() for p, xi in zip(ps, x))
        loss.backward()
        if release: assert all(p.grad is None for p in ps)
        opt.step(); opt.zero_grad()
    if h: h.remove()
    return ps, opt

def _same_state(sa, sb) -> bool:
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) and v.dtype == sb[k].dtype if isinstance(v, torch.Tensor) else v == sb[k] for k, v in sa.items())

def test_optimizer_reaches_the_fused_path_with_release_and_checkpoints(tmp_path):
    """`compiled=True` with Kahan and int8 state goes through the fused pass (traced with aot_eager: eager's ops), one
    graph per shape; with gradient release it gives the same numbers bit for bit; it tracks the eager optimizer (float
    hypers there, 0-d tensors here: torch's lerp and a multiply-add, so a float32 ulp apart); its checkpoint reloads bit
    for bit and steps on the same."""
    mk = lambda compiled: (lambda ps: AdamW(ps, lr=1e-2, kahan_sum=True, state_dtype='int8', compiled=compiled))
    eager, runs = _opt_run(mk(False)), []
    for release in (False, True):
        before = graphs()
        runs.append(_opt_run(mk(dict(backend='aot_eager')), release=release))
        assert len(runs[-1][1].precision._fused) == 2 and graphs() - before == 2
    (ps, opt), (ps_r, opt_r) = runs
    for a, b, c in zip(eager[0], ps, ps_r):
        assert torch.equal(b, c) and _same_state(opt.state[b], opt_r.state[c])
        wa, wb = (x.double() + o.state[x]['kahan_comp'].double() for x, o in ((a, eager[1]), (b, opt)))
        assert ((wa - wb).abs() <= 1e-6 + wa.abs() * 2**-14).all()
    torch.save(opt.state_dict(), tmp_path / 'o.pt')
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = AdamW(ps2, lr=1e-2, kahan_sum=True, state_dtype='int8', compiled=dict(backend='aot_eager'))
    opt2.load_state_dict(torch.load(tmp_path / 'o.pt', weights_only=True))
    for p, q in zip(ps, ps2):
        assert _same_state(opt.state[p], opt2.state[q])
        p.grad = q.grad = torch.ones_like(p)
    opt.step(); opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2))

def test_a_moment_that_turns_negative_takes_the_signed_map():
    "A moment first stored with the unsigned map (it was >= 0) keeps it until a value goes below 0; then signed, in both paths alike."
    def flip(grp, **_):
        for s, g in zip(grp.states, grp.grads): s['buf'] = s['buf'] * 0 + g if 'buf' in s else g.abs()
    def run(fused):
        prec, g = Precision(state_dtype='int8'), torch.Generator().manual_seed(0)
        p, s = torch.zeros(QUANT_MIN_NUMEL), {}
        dtypes = []
        for t in range(3):
            grads = [torch.randn(QUANT_MIN_NUMEL, generator=g)]
            if not (fused and t and prec.fused_step([flip], [p], grads, [s], {}, dict(backend='aot_eager'))):
                grp = ParamGroupView([p], grads, [s]); w = prec.enter(grp); flip(w); prec.exit(w, grp)
            dtypes.append(s['buf'].dtype)
        return s, dtypes
    (se, de), (sc, dc) = run(False), run(True)
    assert de == dc == [torch.uint8, torch.int8, torch.int8]
    assert torch.equal(se['buf'], sc['buf']) and torch.equal(se['buf.absmax'], sc['buf.absmax'])

@pytest.mark.parametrize('bits', [8, 4])
def test_encode_with_the_map_chosen_in_the_kernel(bits):
    """`_encode` with a 0-d bool `signed` (the fused pass's one encode) gives the bytes of the map it names, eager and compiled,
    the last block partial too (inductor once miscompiled a cast after cutting the padded blocks)."""
    from fastopts.precision import _encode
    g = torch.Generator().manual_seed(0)
    for x in (torch.rand(5001, generator=g) ** 6, torch.randn(5000, generator=g) ** 3):   # dynamic range; both signs; a partial last block
        for signed in ((False, True) if (x >= 0).all() else (True,)):   # the unsigned map holds values >= 0 only
            want, am = _encode(x, bits, signed)
            for fn in (_encode, torch.compile(_encode, **INDUCTOR)):
                codes, am2 = fn(x, bits, torch.tensor(signed))
                assert torch.equal(codes, want.view(torch.uint8)) and torch.equal(am2, am)
