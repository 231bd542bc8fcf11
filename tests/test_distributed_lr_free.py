"""Schedule-Free, Prodigy, ADOPT and AdEMAMix under DDP and ZeroRedundancyOptimizer with 2 `gloo` ranks on CPU: each
rank trains on its half of the batch; params after training (y for Schedule-Free), params in eval mode (x) and
Prodigy's d equal one process on the whole batch, on both ranks (Prodigy's sums are global: under ZeRO each rank
holds a shard, and `fsdp_in_use=True` all-reduces them)."""
import pytest, torch
from torch.testing import assert_close
from test_distributed import run_ranks
import distributed_lr_free_worker as w

NAMES = list(w.optimizers())

MODES = ['ddp', 'zero']

def test_schedule_free_and_prodigy_under_ddp_and_zero(tmp_path):
    "The default run's case: Schedule-Free AdamW (modes swapped under ZeRO) and Prodigy (its sums all-reduced), one spawn."
    _check(['ddp', 'zero'], ['sf_adamw', 'prodigy'], tmp_path)

def test_lr_free_optimizers_match_one_process(tmp_path):
    "Both modes in one spawn of the ranks (starting them is most of the time)."
    _check(MODES, NAMES, tmp_path)

def _check(modes, names, tmp_path):
    "Train `names` in `modes` on 2 ranks (one spawn); both ranks' results equal one process's."
    out = tmp_path / 'out'
    run_ranks(w.job, (str(out), modes, names), tmp_path)
    r0, r1 = (torch.load(f'{out}.{r}', weights_only=True) for r in (0, 1))
    errors = {n: r for n, r in {**r0, **r1}.items() if isinstance(r, str)}
    assert not errors, errors
    for mode, name in [(m, n) for m in modes for n in names]:
        ref_trained, ref_eval, ref_d = w.reference(name)
        assert any(not torch.equal(a, b) for a, b in zip(ref_trained, [p.detach() for p in w.model().parameters()])), name
        for res in (r0[f'{mode}/{name}'], r1[f'{mode}/{name}']):
            trained, evald, d = res
            for a, b in zip(trained + evald, ref_trained + ref_eval):
                assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f'{mode} {name}: {m}')
            if ref_d is not None: assert d == pytest.approx(ref_d, rel=1e-5) and d > 1e-3, (mode, name, d, ref_d)
        if ref_d is not None: assert r0[f'{mode}/{name}'][2] == r1[f'{mode}/{name}'][2]   # one d on every rank
        if name.startswith('sf'): assert any(not torch.equal(a, b) for a, b in zip(ref_trained, ref_eval))
