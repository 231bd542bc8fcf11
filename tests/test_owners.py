"""Owner-based Muon (fastopts.owners) with 2 real `gloo` ranks on CPU: under DDP each rank runs Newton-Schulz on about half
the matrices and the result equals one process on the whole batch (bf16: equals the ranks' own bf16 result without owners,
bit for bit); under FSDP2 the shards travel to their owners by all-to-all, nobody gathers a whole parameter, and a rank holds
at most its own matrices; a fastai Learner under DDP trains with it. Adafactor under FSDP2 (its sums over rows
all-reduced) equals torch.optim.Adafactor in one process, Prodigy under FSDP2 (its sums all-reduced, `slice_p` from each
shard's offset) equals prodigyopt in one process, SOAP under FSDP2 (each weight whole on one owner rank) equals one
process; all three resume from torch's distributed checkpoints bit for bit. Every multi-process run is bounded by a timeout."""
import pytest, torch
import torch.multiprocessing as mp
from torch.testing import assert_close
from test_distributed import run_ranks
import owners_worker as w

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "One spawn of the 2 ranks for every mode (starting them is most of the time): each rank's results."
    tmp = tmp_path_factory.mktemp('owners')
    out = tmp / 'out'
    run_ranks(w.job, (str(out),), tmp, timeout=180)
    return [torch.load(f'{out}.{r}', weights_only=True) for r in (0, 1)]

def _sizes(): return [p.numel() for p in w.model().parameters() if p.ndim == 2]

def test_ddp_owners_equal_one_process(ranks):
    ref = w.reference()
    assert any(not torch.equal(a, b) for a, b in zip(ref, w.model().parameters()))
    for res in ranks:
        for a, b in zip(res['ddp'][0], ref): assert_close(a, b, rtol=1e-5, atol=1e-6)

def test_ddp_each_rank_orthogonalises_about_half(ranks):
    n = w.n_matrices()
    per_rank = [res['ddp'][1]['matrices'] for res in ranks]
    assert sum(per_rank) == n * w.STEPS, per_rank                     # every matrix once per step, on one rank
    assert all(c <= (n // 2 + 1) * w.STEPS for c in per_rank), per_rank   # 3 and 2 of the 5 matrices per step
    assert ranks[0]['ddp_bf16_off'][1]['matrices'] == n * w.STEPS        # without owners: every rank every matrix

def test_ddp_bf16_owners_equal_bf16_without(ranks):
    "bf16 Newton-Schulz: the owners' result equals every rank's own bf16 result on the same matrices, bit for bit."
    for res in ranks:
        for a, b in zip(res['ddp_bf16'][0], res['ddp_bf16_off'][0]): assert torch.equal(a, b)
    for a, b in zip(ranks[0]['ddp_bf16'][0], ranks[1]['ddp_bf16'][0]): assert torch.equal(a, b)

def test_fsdp2_owners_equal_one_process_without_gathering(ranks):
    ref = w.reference()
    sizes = _sizes()
    for res in ranks:
        params, counts, stats = res['fsdp2']
        for a, b in zip(params, ref): assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert counts['gathers'] == 0   # no `full_tensor` in the steps
        assert counts['matrices'] <= (len(sizes) // 2 + 1) * w.STEPS
        # whole matrices held at once: this rank's own, at most 1/world of all plus one matrix
        assert stats['full_elems'] <= sum(sizes) / 2 + max(sizes), (stats, sizes)
    assert sum(res['fsdp2'][1]['matrices'] for res in ranks) == len(sizes) * w.STEPS
    assert ranks[0]['fsdp2_off'][1]['gathers'] == len(sizes) * w.STEPS       # without owners every rank gathers every matrix

def test_fsdp2_adafactor_equals_torch_in_one_process(ranks):
    """Adafactor on FSDP2 shards of rows (float64, 3 steps, weight decay; matrices, a 5x4x4 weight split 3 and 2 rows, a
    3x5 head split 2 and 1) equals torch.optim.Adafactor in one process on the whole batch: a matrix's column statistics,
    mean(R) and the norms behind rms(p) and rms(u) are summed over the ranks (without those all-reduces the weights are
    far off: a relative error up to 15, without the norms' alone 14); a 3-D weight's statistics are local."""
    ref = w.adafactor_reference()
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(ref, w.af_model().parameters()))
    for res in ranks:
        for a, b in zip(res['fsdp2_adafactor'], ref): assert_close(a, b, rtol=1e-10, atol=1e-12)

def test_fsdp2_adafactor_checkpoint_resumes_bit_for_bit(ranks):
    "Adafactor's state under FSDP2 (DTensors: each rank's rows of R, C whole) through get/set_optimizer_state_dict: the resumed run equals the straight one."
    for res in ranks:
        straight, resumed = res['fsdp2_adafactor_resume']
        for a, b in zip(straight, resumed): assert torch.equal(a, b)

def test_fsdp2_owners_checkpoint_resumes_bit_for_bit(ranks):
    "torch's get/set_optimizer_state_dict under FSDP2 with owner-based Muon (bf16): the resumed run equals the straight one."
    straight, resumed = ranks[0]['fsdp2_resume']
    for a, b in zip(straight, resumed): assert torch.equal(a, b)

@pytest.mark.parametrize('slice_p', [1, 3])
def test_fsdp2_prodigy_equals_prodigyopt_in_one_process(ranks, slice_p):
    """Prodigy on FSDP2 shards of rows (float64, 3 steps, weight decay; uneven shards whose offsets are not
    multiples of 3, a 3-D weight) equals prodigyopt.Prodigy in one process on the whole batch, `d` included: the dot
    products and |s| sums are all-reduced over the shards, and at slice_p=3 each shard takes the entries one process takes."""
    ref, d = w.prodigy_reference(slice_p)
    assert d > 2 * w.PRODIGY['d0']   # d grew (to about 3x d0 in 3 steps): the all-reduced sums steer the step
    assert any(not torch.allclose(a, b, rtol=1e-2) for a, b in zip(ref, w.af_model().parameters()))
    for res in ranks:
        params, d_ours = res[f'fsdp2_prodigy_{slice_p}']
        assert abs(d_ours - d) <= 1e-12 * d, (d_ours, d)
        for a, b in zip(params, ref): assert_close(a, b, rtol=1e-10, atol=1e-12)

@pytest.mark.parametrize('slice_p', [1, 3])
def test_fsdp2_prodigy_checkpoint_resumes_bit_for_bit(ranks, slice_p):
    "Prodigy's state under FSDP2 (DTensors) through get/set_optimizer_state_dict: the resumed run equals the straight one."
    for res in ranks:
        straight, resumed = res[f'fsdp2_prodigy_{slice_p}_resume']
        for a, b in zip(straight, resumed): assert torch.equal(a, b)

def test_fsdp2_soap_owners_equal_one_process(ranks):
    """SOAP on FSDP2 shards of rows (float64, 5 steps: the factors built, 4 moves with the bases refreshed at steps 2 and 4;
    weight decay; uneven shards, a 3-D weight with 3 factors) equals fastopts' one-process SOAP (tested against the
    authors' rule in tests/test_matrix.py) on the whole batch, with owners and without (every rank gathering)."""
    ref = w.soap_reference()
    assert any(not torch.allclose(a, b, rtol=1e-2) for a, b in zip(ref, w.af_model().parameters()))
    for res in ranks:
        for a, b in zip(res['fsdp2_soap'][0], ref): assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(res['fsdp2_soap_off'], ref): assert_close(a, b, rtol=1e-10, atol=1e-12)

def test_fsdp2_soap_owners_hold_their_weights_only(ranks):
    "Each weight's SOAP runs on one rank per step; a rank gathers nothing and holds whole at most 1/world of the weights plus one."
    sizes = [p.numel() for p in w.af_model().parameters()]
    for res in ranks:
        _, stats, gathers, gathers_off = res['fsdp2_soap']
        # `full_tensor` calls: the run's final gather of the params only; without owners one more per weight per step
        assert gathers == len(sizes) and gathers_off == len(sizes) * (w.SOAP_STEPS + 1), (gathers, gathers_off)
        assert stats['full_elems'] <= sum(sizes) / 2 + max(sizes), (stats, sizes)
    assert sum(res['fsdp2_soap'][1]['ns_matrices'] for res in ranks) == len(sizes) * w.SOAP_STEPS

def test_fsdp2_soap_checkpoint_resumes_bit_for_bit(ranks):
    """SOAP's owner-held state (whole tensors on the owner, a step count on every rank) through get/set_optimizer_state_dict
    and `dcp.save` / `dcp.load` in a directory (each owner's tensors written once, read back on its rank): the resumed run
    equals the straight one."""
    for res in ranks:
        straight, resumed = res['fsdp2_soap_resume']
        for a, b in zip(straight, resumed): assert torch.equal(a, b)

def test_fsdp2_soap_owners_take_a_group_of_two_dtypes(ranks):
    """One group of FSDP2 shards in float32 and float64 with owners (5 steps, fixed gradients) equals one process on whole
    tensors, each weight in its own dtype: the optimizer hands a callback one dtype at a time, so the owners' former
    "one dtype per group" refusal at step time guarded nothing and is gone (issue 27)."""
    ref = w.soap_two_dtypes()
    assert [p.dtype for p in ref] == [torch.float32, torch.float64]
    assert all(not torch.allclose(a, b, rtol=1e-2) for a, b in zip(ref, w._two_dtypes(-1)))
    for res in ranks:
        for a, b in zip(res['fsdp2_soap_two_dtypes'], ref): assert_close(a, b)   # dtype-aware tolerances, the dtypes checked

def test_learner_under_ddp_with_owner_muon(tmp_path):
    "A fastai Learner with Muon, model in DDP: both ranks end with one process's weights, each orthogonalising about half."
    out = tmp_path / 'out'
    run_ranks(w.learner_job, (str(out),), tmp_path, timeout=180)
    r0, r1 = (torch.load(f'{out}.{r}', weights_only=True) for r in (0, 1))
    ref = w.fit(*w.learner())
    assert 'owners=Owners()' in r0['owners'], r0['owners']
    for a, b, c in zip(r0['weights'], r1['weights'], ref):
        assert torch.equal(a, b)
        assert_close(a, c, rtol=1e-5, atol=1e-6)
    steps = 2 * 8   # the test's opt_func wraps Muon, so the Learner's model names do not reach it: all 5 matrices on Muon
    assert r0['counts']['matrices'] + r1['counts']['matrices'] == w.n_matrices() * steps
    assert max(r0['counts']['matrices'], r1['counts']['matrices']) <= (w.n_matrices() // 2 + 1) * steps

def test_a_failing_rank_ends_the_job_with_its_message(tmp_path):
    "Rank 1 raises before the owners' all-gather that rank 0 waits in: the job fails at once, with rank 1's message."
    with pytest.raises(mp.ProcessRaisedException, match='ns_steps'):
        run_ranks(w.failing_job, (str(tmp_path / 'out'),), tmp_path, timeout=w.TIMEOUT_S + 60)
