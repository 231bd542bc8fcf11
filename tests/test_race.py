"""`fastopts bench race`: the profile score against integrals worked out by hand, the CSV columns the design guide fixes,
the quick mode's smallest workload end to end, steps that repeat on a rerun, and bad arguments refused by name."""
import math
import numpy as np, pandas as pd, pytest, torch
from fastopts.cli import main
from fastopts.bench.race import (RUN_COLUMNS, SCORE_COLUMNS, MODES, WORKLOADS, scores, profile_score, workload_times,
                                 run_to_target)

inf = math.inf

def _runs(times:dict, ruleset='external') -> pd.DataFrame:
    "Rows of `runs.csv` from {method: {workload: [seconds per seed, inf = not reached]}}."
    rows = [dict(workload=w, optimizer=m, ruleset=ruleset, seed=s, reached=math.isfinite(t),
                 steps=7 if math.isfinite(t) else None, seconds=t if math.isfinite(t) else None)
            for m, per_w in times.items() for w, ts in per_w.items() for s, t in enumerate(ts)]
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))

def test_score_against_hand_computed_profile_integrals():
    "Three workloads, three seeds; medians; a tie for the best time; a never-reached method; a workload no one reaches."
    runs = _runs(dict(
        fast=dict(a=[1, 1, 9], b=[3, 3, 3], c=[inf, inf, inf]),     # medians 1, 3, never
        tie=dict(a=[1, 2, 1], b=[6, 6, 6], c=[inf, inf, inf]),      # 1 (ties `fast` on a), 6, never
        slow=dict(a=[5, 5, inf], b=[2, inf, 2], c=[inf, inf, inf]), # 5; b: 2 on two seeds of three -> median 2; never
        half=dict(a=[2, inf, inf], b=[1, 1, 1], c=[inf, inf, inf]), # a: two of three never -> median never; b: 1
        never=dict(a=[inf] * 3, b=[inf] * 3, c=[inf] * 3)))
    # best: a 1, b 1, c none. ratios: fast 1, 3 ; tie 1, 6 ; slow 5, 2 ; half never, 1 ; never -.
    # integral of rho over [1, 4] = sum over workloads of max(0, 4 - ratio) / 3 workloads, then / 3:
    want = dict(fast=(3 + 1) / 9, tie=3 / 9, slow=2 / 9, half=3 / 9, never=0.)
    got = scores(runs)
    assert list(got.columns) == list(SCORE_COLUMNS)
    assert set(got.ruleset) == {'external'}
    for m, v in want.items(): assert got.set_index('optimizer').score[m] == pytest.approx(v, abs=1e-12), m
    # the same integral by brute force on a fine tau grid (a left Riemann sum of the step function)
    t = workload_times(runs).droplevel('ruleset')
    taus = np.linspace(1, 4, 300001)[:-1]
    best = t.min(0)
    for m in want:
        r = (t.loc[m] / best).where(np.isfinite(t.loc[m]), inf).fillna(inf)
        rho = np.array([(r <= x).mean() for x in taus[::1000]])
        assert rho.mean() == pytest.approx(want[m], abs=5e-3), m

def test_rulesets_are_scored_apart():
    "The best time is taken within a ruleset: a slow self-tuning method can still score 1 there."
    runs = pd.concat([_runs(dict(A=dict(w=[1.])), 'external'), _runs(dict(B=dict(w=[10.]), C=dict(w=[20.])), 'self-tuning')])
    got = scores(runs).set_index(['ruleset', 'optimizer']).score
    assert got['external', 'A'] == 1. and got['self-tuning', 'B'] == 1. and got['self-tuning', 'C'] == pytest.approx(2 / 3)

def test_quick_smallest_workload_end_to_end(tmp_path, capsys):
    "The quick mode on its smallest workload (two contenders, one trial) writes the CSVs with exactly the guide's columns."
    assert 'synthetic_mlp' in MODES['quick']['workloads']   # the cheapest: 6 x 23 steps of a 20-64-64-4 MLP
    rc = main(['bench', 'race', '--quick', '--out', str(tmp_path), '--workloads', 'synthetic_mlp',
               '--optimizers', 'Lion', 'ScheduleFreeAdamW', '--trials', '1'])
    assert rc == 0
    runs, sc = pd.read_csv(tmp_path/'runs.csv'), pd.read_csv(tmp_path/'scores.csv')
    assert list(runs.columns) == list(RUN_COLUMNS) and list(sc.columns) == list(SCORE_COLUMNS)
    assert set(zip(runs.optimizer, runs.ruleset)) == {('ScheduleFreeAdamW', 'self-tuning'), ('Lion+find_lr', 'self-tuning'),
                                                     ('Lion', 'external'), ('ScheduleFreeAdamW', 'external')}
    assert runs.reached.dtype == bool and (runs.workload == 'synthetic_mlp').all() and (runs.seed == 0).all()
    assert runs[runs.reached].steps.gt(0).all() and runs[runs.reached].seconds.gt(0).all()
    assert runs[~runs.reached][['steps', 'seconds']].isna().all().all()
    assert ((sc.score >= 0) & (sc.score <= 1)).all()
    for rs, r in runs.groupby('ruleset'):    # the fastest method of a ruleset scores 1 when any reached the target
        assert sc[sc.ruleset == rs].score.max() == (1. if r.reached.any() else 0.)
    for f in ('table.md', 'race.png', 'trials.csv'): assert (tmp_path/f).stat().st_size > 0
    # a stopped race is scored from what it left: here every seed finished, so the scores are the same
    assert main(['bench', 'race', '--out', str(tmp_path), '--rescore']) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path/'scores.csv'), sc)

def test_steps_repeat_on_a_rerun():
    "Seeded, one thread: the same run reaches the target at the same step, with the finder's steps counted in."
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        a, b = (run_to_target('synthetic_mlp', 0, 'AdamW', 3e-2) for _ in range(2))
        c, d = (run_to_target('synthetic_mlp', 1, 'SGD', None, finder='find_lr') for _ in range(2))
    finally: torch.set_num_threads(threads)
    assert a['reached'] and a['steps'] == b['steps'] and [l for _, l in a['curve']] == [l for _, l in b['curve']]
    assert c['finder_steps'] > 0 and (c['steps'], c['lr'], c['reached']) == (d['steps'], d['lr'], d['reached'])

@pytest.mark.parametrize('argv, name', [
    (['--workloads', 'mnist'], 'workloads'), (['--optimizers', 'adamw'], 'optimizers'), (['--seeds', '100'], 'seeds'),
    (['--seeds', '-1'], 'seeds'), (['--trials', '0'], 'trials'), (['--evals', '0'], 'evals')])
def test_bad_arguments_are_refused_by_name(argv, name, tmp_path, capsys):
    rc = main(['bench', 'race', '--quick', '--out', str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and f'`{name}`' in err and not (tmp_path/'runs.csv').exists(), err
