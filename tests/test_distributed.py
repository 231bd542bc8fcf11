"""Every optimizer under data parallelism, with 2 real `gloo` ranks on CPU: `DistributedDataParallel`,
`ZeroRedundancyOptimizer` and FSDP2 (`fully_shard`). Each rank trains on its half of a 32-row batch; the result must
equal one process on the whole batch. Every multi-process run is bounded by a timeout."""
import time
import pytest, torch
import torch.multiprocessing as mp
from torch.testing import assert_close
import distributed_worker as w

TIMEOUT = 240

def run_ranks(fn, args, tmp_path, world=2, timeout=TIMEOUT):
    "Spawn `world` ranks of `fn(rank, world, init_file, *args)`; fail (and kill them) after `timeout` seconds."
    ctx = mp.start_processes(fn, args=(world, str(tmp_path / 'init'), *args), nprocs=world, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes: p.kill()
            pytest.fail(f'ranks did not finish in {timeout}s (a hang: a collective one rank never joined?)')

NAMES = list(w.optimizers())

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
