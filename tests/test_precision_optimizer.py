"""The precision options on the Optimizer (kahan_sum=, stochastic_round=, state_dtype=, on every fastopts optimizer).

References: a float32 run of the same optimizer (the registry's), the saved tensors themselves for checkpoints.
These need the Optimizer's wiring of `fastopts.precision.Precision` (enter/exit around each sub-group's chain or
fused kernel, `restore_loaded` after torch's load_state_dict).
"""
import pytest, torch
from fastopts.optimizer import AdamW, Adam
from fastopts.precision import QUANT_MIN_NUMEL
from registry import OPTIMIZERS, ids

def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.2).to(dtype).requires_grad_() for s in [(96, 64), (96,), (8, 96), (8,)]]

def _fit(spec, dtype, steps=30, **kw):
    "`steps` steps of `spec`'s optimizer with lr 1e-4 on the same gradient sequence (drawn in float32, given in `dtype`)."
    ps = _params(dtype)
    opt = spec.make(ps, lr=1e-4, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps: p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
        opt.step(); opt.zero_grad()
    return [p.detach() for p in ps], opt

def _outside(a, b, atol=1e-3, rtol=1e-2):
    a, b = (torch.cat([t.float().reshape(-1) for t in xs]) for xs in (a, b))
    return ((a - b).abs() > atol + rtol * b.abs()).float().mean().item()

# The same gradients for both runs: this isolates the update's arithmetic. (With each run's own gradients, bf16
# weights change the gradients themselves: RMSProp with momentum then drifts by 6% of elements even with Kahan and
# float32 state, 25% without Kahan; see test_precision.py for AdamW on a model's own gradients.)
@pytest.mark.parametrize('spec', OPTIMIZERS, ids=ids)
def test_kahan_on_every_optimizer(spec):
    ref, _ = _fit(spec, torch.float32)
    got, opt = _fit(spec, torch.bfloat16, kahan_sum=True)
    assert all(p.dtype == torch.bfloat16 for p in got)
    assert _outside(got, ref) <= 0.01
    inner = getattr(opt, 'opt', opt)
    assert all('kahan_comp' in inner.state[p] for g in inner.param_groups for p in g['params'])

@pytest.mark.parametrize('state_dtype', [torch.bfloat16, 'int8'])
@pytest.mark.parametrize('spec', OPTIMIZERS, ids=ids)
def test_state_dtype_on_every_optimizer(spec, state_dtype):
    ref, _ = _fit(spec, torch.float32)
    got, opt = _fit(spec, torch.float32, state_dtype=state_dtype)
    p0 = _params(torch.float32)
    move = sum((r - q).abs().sum() for r, q in zip(ref, p0))
    # measured over the registry: <= 0.30% of the distance moved with bf16 state, <= 1.72% with int8; bounds ~2x that
    assert sum((a - r).abs().sum() for a, r in zip(got, ref)) <= {torch.bfloat16: 0.006, 'int8': 0.034}[state_dtype] * move
    inner = getattr(opt, 'opt', opt)
    big = inner.param_groups[0]['params'][0]            # 6144 elements: quantised
    moments = [k for k, v in inner.state[big].items() if isinstance(v, torch.Tensor) and v.shape == big.shape]
    want = {torch.int8, torch.uint8} if state_dtype == 'int8' else {torch.bfloat16}
    assert all(inner.state[big][k].dtype in want for k in moments)
    assert big.numel() >= QUANT_MIN_NUMEL

def test_checkpoint_bit_for_bit_through_the_optimizer(tmp_path):
    ps = _params(torch.bfloat16)
    opt = AdamW(ps, lr=1e-3, kahan_sum=True, state_dtype='int8')
    g = torch.Generator().manual_seed(3)
    def step(o, pp):
        for p in pp: p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).bfloat16()
        o.step()
    for _ in range(3): step(opt, ps)
    torch.save(opt.state_dict(), tmp_path / 'opt.pt')
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = AdamW(ps2, lr=1e-3, kahan_sum=True, state_dtype='int8')
    opt2.load_state_dict(torch.load(tmp_path / 'opt.pt', weights_only=True))
    for p, q in zip(ps, ps2):
        s, t = opt.state[p], opt2.state[q]
        assert s.keys() == t.keys()
        for k, v in s.items():
            if isinstance(v, torch.Tensor): assert v.dtype == t[k].dtype and torch.equal(v, t[k]), k
            else: assert v == t[k], k
    assert {opt.state[ps[0]][k].dtype for k in ('grad_avg', 'sqr_avg', 'grad_avg.absmax', 'kahan_comp')} == {torch.int8, torch.uint8, torch.float32, torch.bfloat16}
    step(opt, ps); step(opt2, ps2)
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2))

def test_stochastic_rounding_seeded_through_the_optimizer():
    spec = next(o for o in OPTIMIZERS if o.name == 'adamw')
    a, _ = _fit(spec, torch.bfloat16, steps=5, stochastic_round=True, seed=0)
    b, _ = _fit(spec, torch.bfloat16, steps=5, stochastic_round=True, seed=0)
    c, _ = _fit(spec, torch.bfloat16, steps=5, stochastic_round=True, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))

@pytest.mark.parametrize('kw,msg', [(dict(state_dtype='int2'), 'state_dtype'), (dict(kahan_sum=True, stochastic_round=True), 'pick one'),
                                    (dict(kahan_sum='on'), 'kahan_sum'), (dict(seed=1), 'stochastic_round=True')])
def test_factories_refuse(kw, msg):
    with pytest.raises(ValueError, match=msg): Adam(_params(torch.float32), lr=1e-3, **kw)

def test_bench_memory_command_refuses_bad_settings(capsys):
    from fastopts.cli import main
    assert main(['bench', 'memory', '--n', '0']) == 2
    assert 'n' in capsys.readouterr().err.split('error:')[1]

def test_state_bytes_targets_on_a_small_problem():
    "The issue's targets (state bytes per param): <= 2.1 int8 AdamW, <= 4.1 bf16 state, <= 6.1 bf16 + Kahan."
    from fastopts.bench.memory import state_benchmark
    rows = state_benchmark('mlp', n=1, warmup=1, names=['fp32', 'fp32, int8 state', 'fp32, bf16 state', 'bf16 + Kahan'])
    b = {r['contender']: r['state_bytes_per_param'] for r in rows}
    assert b['fp32'] == 8 and b['fp32, int8 state'] <= 2.1 and b['fp32, bf16 state'] <= 4.1 and b['bf16 + Kahan'] <= 6.1

def test_working_copies_are_made_a_chunk_at_a_time(monkeypatch):
    "The precision layer copies PRECISION_CHUNK bytes of params at a time (the peak stays small): the same numbers as one copy."
    import fastopts.optimizer as fo
    def fit(chunk):
        monkeypatch.setattr(fo, 'PRECISION_CHUNK', chunk)
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(torch.bfloat16).requires_grad_() for s in [(64, 32), (32,), (32, 16), (16,)]]
        opt, seen = AdamW(ps, lr=1e-2, kahan_sum=True, state_dtype='int8'), []
        real = opt.precision.enter
        monkeypatch.setattr(opt.precision, 'enter', lambda grp, *kinds: seen.append(len(grp.params)) or real(grp, *kinds))
        for _ in range(5):
            for p in ps: p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            opt.step()
        return ps, seen
    one, seen1 = fit(2**30)
    many, seen2 = fit(64 * 32 * 4)   # the first matrix alone, then the rest
    assert seen1 == [4] * 5 and seen2 == [1, 3] * 5
    for a, b in zip(one, many): assert torch.equal(a, b)

def test_a_chain_that_needs_all_grads_gets_one_working_copy(monkeypatch):
    import fastopts.optimizer as fo
    from fastopts.optimizer import Optimizer, sgd_step
    monkeypatch.setattr(fo, 'PRECISION_CHUNK', 16)
    def global_norm(grp, **_): pass
    global_norm.needs_all_grads = True
    ps = [torch.ones(8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    opt, seen = Optimizer(ps, [global_norm, sgd_step], lr=0.1), []
    real = opt.precision.enter
    monkeypatch.setattr(opt.precision, 'enter', lambda grp, *kinds: seen.append(len(grp.params)) or real(grp, *kinds))
    for p in ps: p.grad = torch.ones_like(p)
    opt.step()
    assert seen == [3] and opt.chains['default'].whole

def test_every_factory_takes_the_precision_options():
    "kahan_sum, stochastic_round, state_dtype and seed on every optimizer, the new ones included (GUIDE: on every optimizer)."
    from fastopts.all import Muon, SOAP, Adafactor, ScheduleFreeAdamW, ScheduleFreeSGD, Prodigy, ADOPT, AdEMAMix, Lion, RAdam
    for f in (Muon, SOAP, ScheduleFreeAdamW, ScheduleFreeSGD, Prodigy, ADOPT, AdEMAMix, Lion, RAdam):
        ps = [torch.randn(64, 80, dtype=torch.bfloat16, requires_grad=True)]
        opt = f(ps, kahan_sum=True, state_dtype='int8')
        assert opt.precision.kahan_sum is True and opt.precision.state_dtype == 'int8', f.__name__
        if hasattr(opt, 'train_mode'): opt.train()
        w0 = ps[0].detach().clone()
        for _ in range(2):
            ps[0].grad = torch.randn_like(ps[0]); opt.step()
        assert not torch.equal(ps[0], w0) and ps[0].dtype == torch.bfloat16, f.__name__
        assert any(isinstance(v, torch.Tensor) and v.dtype in (torch.int8, torch.uint8) for v in opt.state[ps[0]].values()), f.__name__
        with pytest.raises(ValueError, match='state_dtype'): f(ps, state_dtype='int2')
    # Adafactor's matrix state is factored (a row and a column), which 8- and 16-bit state do not cover: refused by name
    ps = [torch.randn(64, 80, dtype=torch.bfloat16, requires_grad=True)]
    for sd in ('int8', 'int4', torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=r'state_dtype=.*Adafactor.*factored'): Adafactor(ps, state_dtype=sd)
    opt = Adafactor(ps, kahan_sum=True, state_dtype=torch.float32)
    ps[0].grad = torch.randn_like(ps[0]); opt.step()
    assert opt.precision.kahan_sum is True and 'kahan_comp' in opt.state[ps[0]]

def test_paired_interval_is_the_one_sample_t_interval():
    "The parity table's interval: scipy's one-sample t-test's confidence interval of the paired differences (another code path)."
    from scipy.stats import ttest_1samp
    from fastopts.bench.memory import paired_interval
    d = [0.012, -0.004, 0.021, 0.003, 0.009, -0.011, 0.017, 0.006]
    m, lo, hi = paired_interval(d)
    ci = ttest_1samp(d, 0.).confidence_interval(0.95)
    assert m == pytest.approx(sum(d) / 8) and lo == pytest.approx(ci.low) and hi == pytest.approx(ci.high)
