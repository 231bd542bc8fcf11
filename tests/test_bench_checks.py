"""The benchmarks' correctness gates reject wrong optimizers that pass a looser check, and pass honest ones.

`fastopts bench step`: after the timed float32 steps (7 by default) a contender may be 1e-3 away from the reference
(float32 rounding), which let Adam with `sqr_mom=0.99` (6.9e-4 on `mlp`) and an lr 0.05% off (6.6e-4) through;
`check_rule`'s 50 untimed float64 steps (tolerance 1e-9; honest contenders <= 1.1e-13) reject them.
`fastopts bench epoch`: the contenders' final weights must agree to rtol 1e-4.
"""
from functools import partial
import pytest, torch
import fastopts.optimizer as fo
import fastopts.bench.step as sb
from fastopts.bench.step import time_rule, check_rule, contenders, wrong_results, CHECK_TOL

OLD_TOL = 1e-3   # the only check before: the timed float32 steps against the reference
HONEST = ['fastopts', 'fastopts fused=False', 'torch (for-loop)', 'torch (foreach)', 'torch (fused)', 'fastai']
WRONG = {'sqr_mom 0.99': partial(fo.Adam, lr=1e-3, sqr_mom=0.99), 'lr 0.05% off': partial(fo.Adam, lr=1e-3 * 1.0005)}

def rows_by_name(rows): return {r['contender']: r for r in rows}

@pytest.mark.parametrize('problem', ['tiny', 'mlp'])
def test_step_gate_rejects_wrong_beta2_and_lr(problem):
    "Both wrong Adams pass the float32 check (err <= 1e-3) and fail the float64 one; every honest contender passes both."
    cs = contenders('adam')
    r = rows_by_name(time_rule('adam', problem, n=2, makers={**{k: cs[k] for k in HONEST}, **WRONG}))
    for name in WRONG:
        assert r[name]['err'] <= OLD_TOL, (name, r[name]['err'])        # what the old gate saw: "ok"
        assert r[name]['err64'] > 100 * CHECK_TOL, (name, r[name]['err64'])
        assert r[name]['check'] == 'WRONG'
    for name in HONEST:
        assert r[name]['check'] in ('ok', 'reference'), (name, r[name])
        assert r[name]['err64'] <= 1e-12, (name, r[name]['err64'])
    assert sorted(w.split(' / ')[2].split(' (')[0] for w in wrong_results(r.values())) == sorted(WRONG)

def test_step_gate_without_the_reference_selected():
    "`names` leaving out every reference still checks the rest (the reference runs untimed): none is left unchecked."
    rows = rows_by_name(time_rule('adam', 'tiny', n=2, names=['fastopts', 'fastopts fused=False']))
    assert set(rows) == {'fastopts', 'fastopts fused=False'}
    for r in rows.values(): assert r['check'] == 'ok' and r['err'] is not None and r['err64'] is not None, r
    r = rows_by_name(time_rule('adam', 'tiny', n=2, makers={'fastopts': contenders('adam')['fastopts'], **WRONG}))
    assert r['fastopts']['check'] == 'ok'
    assert all(r[name]['check'] == 'WRONG' for name in WRONG)

def test_step_rule_without_reference_is_marked_unchecked(monkeypatch):
    "A rule with no torch, fastai or closed-form reference gets rows marked unchecked (†), never a silent pass."
    rules = sb._rules()
    monkeypatch.setattr(sb, '_rules', lambda: {**rules, 'adam': {**rules['adam'], 'torch': lambda lr: {}, 'fastai': None}})
    rows = time_rule('adam', 'tiny', n=2, names=['fastopts', 'fastopts fused=False'])
    assert {r['contender'] for r in rows} == {'fastopts', 'fastopts fused=False'}
    for r in rows: assert r['check'] == 'unchecked' and 'no reference' in r['note'], r
    assert '†' in sb.format_step_table(rows)

@pytest.mark.parametrize('rule', ['lamb', 'lion'])
def test_float64_check_other_references(rule):
    "Lamb (fastai's as reference) and Lion (closed form): a 0.05% lr error is rejected, the rule itself agrees to 1e-12."
    lr = sb._rules()[rule]['lr']
    wrong = partial(fo.Lamb if rule == 'lamb' else fo.Lion, lr=lr * 1.0005)
    out = check_rule(rule, {'fastopts': contenders(rule)['fastopts'], 'wrong lr': wrong})
    assert out['fastopts'][0] <= 1e-12, out
    assert out['wrong lr'][0] > 100 * CHECK_TOL, out

@pytest.mark.slow
def test_step_gate_compiled_contender_passes():
    "The compiled step (float32 timed, float64 checked: each compiles once) passes the gate where inductor can compile."
    r = rows_by_name(time_rule('adam', 'tiny', n=2, names=['fastopts compiled', 'torch (for-loop)']))
    c = r['fastopts compiled']
    if ' failed: ' in c['note']: pytest.skip(c['note'])
    assert c['check'] == 'ok' and c['err64'] <= 1e-12, c

# ---------------------------------------------------------------------------------------------- fastopts bench epoch
import fastopts.bench.epoch as eb

def test_epoch_gate_rejects_wrong_beta2_and_eps():
    """A wrong beta2 or eps ends within 1e-4 of the reference's validation loss (7.2e-5, 6.8e-6: the old check, passed)
    but ~1e-2 away in weights; honest contenders agree to ~2e-6."""
    wrong = {'sqr_mom 0.99': partial(fo.Adam, sqr_mom=0.99), 'eps 1e-6': partial(fo.Adam, eps=1e-6)}
    res = eb.epoch_benchmark(epochs=1, warmup=1, channels=(8, 16), bs=128, contenders={**wrong, **eb.epoch_contenders()})
    ref = res['torch Adam fused (OptimWrapper)']
    assert ref['check'] == 'reference'
    for name in wrong:
        assert abs(res[name]['valid_loss'] - ref['valid_loss']) <= 1e-4 * ref['valid_loss'], res[name]   # old check
        assert res[name]['weights_err'] > 1e-3 and res[name]['check'] == 'WRONG', res[name]
    for name in ('fastopts Adam', 'fastai Adam'):
        assert res[name]['weights_err'] <= 1e-5 and res[name]['check'] == 'ok', res[name]
    assert eb.format_epoch_table(res).count('✗WRONG') == 2

def test_epoch_command_exits_1_on_disagreement(monkeypatch, tmp_path):
    "`fastopts bench epoch` ends with SystemExit(message) (exit status 1) naming the contender whose weights differ."
    from fastopts.cli import main
    monkeypatch.setattr(eb, 'epoch_contenders', lambda: {'eps 1e-6': partial(fo.Adam, eps=1e-6), 'fastopts Adam': partial(fo.Adam)})
    with pytest.raises(SystemExit) as e: main(['bench', 'epoch', '--epochs', '1', '--warmup', '0', '--channels', '4', '8', '--out', str(tmp_path)])
    assert isinstance(e.value.code, str) and 'final weights differ' in e.value.code and 'eps 1e-6 (error' in e.value.code
    assert (tmp_path/'epoch_bench.md').exists()   # the table is written first: it shows the disagreement
    monkeypatch.setattr(eb, 'epoch_contenders', lambda: {'fastopts Adam': partial(fo.Adam, fused=False), 'ref': partial(fo.Adam)})
    assert main(['bench', 'epoch', '--epochs', '1', '--warmup', '0', '--channels', '4', '8', '--out', str(tmp_path)]) == 0
