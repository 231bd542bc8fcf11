"""Every optimizer under data parallelism, with 2 real `gloo` ranks on CPU: `DistributedDataParallel`,
`ZeroRedundancyOptimizer` and FSDP2 (`fully_shard`). Each rank trains on its half of a 32-row batch; the result must
equal one process on the whole batch. Every multi-process run is bounded by a timeout."""
import multiprocessing, sys, time
import pytest, torch
import torch.multiprocessing as mp
from torch.testing import assert_close
import distributed_worker as w

TIMEOUT = 240

# The ranks start from a fork server that imported torch, fastai and fastopts once (per pytest process) and forks each
# rank from there: a freshly spawned rank paid those imports itself, 6-8 s of CPU each, twice per run, in every test.
# The ranks are still separate processes, each its own `gloo` rank; what they compute does not depend on how they started.
PRELOAD = ['torch', 'torch.distributed', 'torch.distributed.fsdp', 'torch.distributed.optim', 'fastai.learner', 'fastopts.all']
multiprocessing.get_context('forkserver').set_forkserver_preload(PRELOAD)

def _spawn(fn, args, init_file, world, timeout):
    ctx = mp.start_processes(fn, args=(world, init_file, *args), nprocs=world, join=False, start_method='forkserver')
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes: p.kill()
            pytest.fail(f'ranks did not finish in {timeout}s (a hang: a collective one rank never joined?)')

def run_ranks(fn, args, tmp_path, world=2, timeout=TIMEOUT):
    """Spawn `world` ranks of `fn(rank, world, init_file, *args)`; fail (and kill them) after `timeout` seconds. A
    rank aborted (gloo's C++ threads once aborted a rank in CI: SIGABRT, "terminate called without an active
    exception", no Python error) gets one more try of the whole job, said on stderr; a Python exception, a hang,
    any other signal (a crash, a kill) or a second abort fails the test."""
    try: _spawn(fn, args, str(tmp_path / 'init'), world, timeout)
    except mp.ProcessExitedException as e:
        if e.signal_name != 'SIGABRT': raise
        print(f'rank {e.error_index} was killed by {e.signal_name}: running the ranks once more', file=sys.stderr)
        _spawn(fn, args, str(tmp_path / 'init2'), world, timeout)

NAMES = list(w.optimizers())

@pytest.mark.parametrize('times', [1, 2])
def test_a_rank_killed_by_a_signal_gets_one_more_try(times, tmp_path):
    marker = tmp_path / 'runs'
    if times == 1: run_ranks(w.abort_job, (str(marker), times), tmp_path)
    else:
        with pytest.raises(mp.ProcessExitedException, match='SIGABRT'): run_ranks(w.abort_job, (str(marker), times), tmp_path)
    assert (tmp_path / 'runs.1').read_text() == '2'

def test_a_rank_that_fails_alone_ends_the_job_with_its_message(tmp_path):
    "Rank 1 raises while rank 0 waits in a collective: the test fails at once with rank 1's message, not after a timeout."
    t0 = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match='rank 1 fails alone'): run_ranks(w.fail_alone_job, (), tmp_path)
    assert time.monotonic() - t0 < w.COLLECTIVE_TIMEOUT

def test_another_signal_is_not_retried(tmp_path):
    "A rank killed by a signal other than SIGABRT (here a crash, SIGSEGV) fails the test at once, without a second run."
    from signal_worker import signal_job
    marker = tmp_path / 'runs'
    with pytest.raises(mp.ProcessExitedException, match='SIGSEGV'): run_ranks(signal_job, (str(marker), 1, 'SIGSEGV'), tmp_path)
    assert (tmp_path / 'runs.1').read_text() == '1'

@pytest.mark.parametrize('mode', ['ddp', 'zero', 'fsdp2'])
def test_every_optimizer_matches_one_process(mode, tmp_path):
    out = tmp_path / 'out.pt'
    run_ranks(w.job, (str(out), mode, NAMES), tmp_path)
    res = torch.load(out, weights_only=True)
    errors = {n: r for n, r in res.items() if isinstance(r, str)}
    assert not errors, errors
    for name in NAMES:
        ref = w.reference(name)
        assert any(not torch.equal(a, b) for a, b in zip(ref, [p.detach() for p in w.model().parameters()])), name
        for a, b in zip(res[name], ref): assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f'{mode} {name}: {m}')

def test_fsdp2_distributed_checkpoint_resumes_identically(tmp_path):
    "torch's get/set_optimizer_state_dict (distributed checkpoint helpers) save and restore every optimizer under FSDP2."
    out = tmp_path / 'out.pt'
    run_ranks(w.ckpt_job, (str(out), NAMES), tmp_path)
    res = torch.load(out, weights_only=True)
    errors = {n: r for n, r in res.items() if isinstance(r, str)}
    assert not errors, errors
    for name, (straight, resumed) in res.items():
        for a, b in zip(straight, resumed): assert_close(a, b, rtol=0, atol=0, msg=lambda m: f'{name}: {m}')

@pytest.mark.parametrize('n_acc', [0, 16], ids=['every_batch', 'grad_accumulation'])
def test_learner_schedules_in_lockstep(n_acc, tmp_path):
    """A fastai Learner with a fastopts optimizer and OneCycle on 2 ranks (model in DDP, each rank half of every
    batch), with and without GradientAccumulation: both ranks set the same lr and mom at every step and end with the
    weights of one process on the whole batches."""
    out = tmp_path / 'out'
    run_ranks(w.learner_job, (str(out), n_acc), tmp_path)
    r0, r1 = (torch.load(f'{out}.{r}', weights_only=True) for r in (0, 1))
    ref = w.fit_record(*w.learner(n_acc=n_acc))
    assert r0['lrs'] == r1['lrs'] == ref['lrs'] and r0['moms'] == r1['moms'] == ref['moms']
    assert len(set(r0['lrs'])) > 5
    for a, b, c in zip(r0['weights'], r1['weights'], ref['weights']):
        assert torch.equal(a, b)
        assert_close(a, c, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('epochs', [None, 2], ids=['sweep', 'trials'])
def test_find_lr_under_ddp(epochs, tmp_path):
    """find_lr under DDP with deliberately different per-rank losses: no hang, one suggestion on all ranks, every rank
    restored bit for bit, and fit_one_cycle after it equal to a fit without it. A rank with fewer batches: a clear
    error on every rank instead of a hang."""
    out = tmp_path / 'out'
    run_ranks(w.find_lr_job, (str(out), epochs), tmp_path)
    r0, r1 = (torch.load(f'{out}.{r}', weights_only=True) for r in (0, 1))
    assert r0['suggested'] is not None and r0['suggested'] == r1['suggested'] and r0['n_sweep'] == r1['n_sweep']
    assert r0['restored'] and r1['restored']
    for r in (r0, r1):
        for a, b in zip(r['with_find'], r['without']): assert torch.equal(a, b)
        assert '`len(dls.train)` differs between ranks' in r['mismatch']
