"""The param groups stay the user's, so `ZeroRedundancyOptimizer(model.parameters(), optimizer_class=...)` works for
the eight 2026 optimizers and equals one process on the whole batch (2 `gloo` ranks, a 3-layer MLP, every run bounded
by a timeout: the process group's and the spawn's). Muon, whose hybrid once split the groups (one rank failed ZeRO's
group check, the other hung), also runs so in the default suite (tests/test_distributed_matrix.py, mode 'zero');
here all eight run in one spawn, behind `--slow`."""
import pytest, torch
from torch.testing import assert_close
import distributed_groups_worker as w
from test_distributed import run_ranks

NAMES = list(w.optimizers())

def _zero(names, tmp) -> dict:
    run_ranks(w.job, (str(tmp / 'out.pt'), names), tmp, timeout=180)
    return torch.load(tmp / 'out.pt', weights_only=True)

def _check(name, res):
    assert not isinstance(res, str), res
    assert res['groups'] == [1, 1]   # ZeRO's one group, and the local optimizer's: not split
    ref = w.reference(name)
    moved = max(float((a - b).abs().max()) for a, b in zip(ref, w.model().parameters()))
    assert moved > 1e-3, f'the reference moved by {moved} only: the comparison would say nothing'
    for a, b in zip(res['params'], ref): assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f'{name}: {m}')

@pytest.fixture(scope='module')
def all_eight(tmp_path_factory): return _zero(NAMES, tmp_path_factory.mktemp('zero'))

@pytest.mark.parametrize('name', NAMES)
def test_zero_with_model_parameters_equals_one_process(name, all_eight): _check(name, all_eight[name])
