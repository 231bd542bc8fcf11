"""Capabilities and refusals (issue 27): what each of the demo's 16 optimizers can do follows from its callbacks'
declarations (`contract(lacks=...)`, stages, `needs_all_grads`, factored state), and every refusal names the
callback that causes it."""
import pytest, torch
from torch import nn
from fastopts.cli import DEMO_OPTIMIZERS
from fastopts.caps import capabilities, refused, CAPABILITIES
from fastopts.release import release_gradients

ALL_CAN = dict(compilable=True, complex=True, sharded=True, release=True, low_precision_state=True, needs_all_grads=False)
# per optimizer, per chain: the capabilities it lacks (the rest as ALL_CAN), and whether a fused kernel computes it
EXPECTED = {
    'SGD(mom=0.9)': {'default': ({}, True)}, 'Momentum': {'default': ({}, True)}, 'RMSProp': {'default': ({}, True)},
    'Adam': {'default': ({}, True)}, 'AdamW': {'default': ({}, True)}, 'RAdam': {'default': ({}, False)},
    'Lamb': {'default': ({}, False)}, 'Lion': {'default': ({}, False)}, 'Lookahead(RAdam)': {'default': ({}, False)},
    'Muon': {'muon': ({'complex': 'muon_step'}, False), 'adamw': ({}, False)},
    'SOAP': {'default': ({'compilable': 'soap_step', 'complex': 'soap_step'}, False)},
    'Adafactor': {'default': ({'complex': 'adafactor_step', 'low_precision_state': 'adafactor_step'}, False)},
    'ScheduleFreeAdamW': {'default': ({'release': 'schedule_free_weight'}, False)},
    'Prodigy': {'default': ({'release': 'prodigy_sizes'}, False)},
    'ADOPT': {'default': ({}, False)}, 'AdEMAMix': {'default': ({}, False)},
}

def _model(): return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def _make(name, params=None, **kw):
    f, lr = DEMO_OPTIMIZERS[name]
    return f(list(_model().parameters()) if params is None else params, lr, **kw)

def _chains(opt): return getattr(opt, 'opt', opt).chains   # Lookahead: its inner optimizer's

def test_every_demo_optimizer_is_listed():
    assert set(EXPECTED) == set(DEMO_OPTIMIZERS) and len(EXPECTED) == 16

@pytest.mark.parametrize('name', list(EXPECTED))
def test_capabilities_follow_from_callbacks(name):
    "Each chain's capabilities: all but those its callbacks lack; each missing one is refused naming the callback."
    chains = _chains(_make(name))
    assert set(chains) == set(EXPECTED[name])
    for label, chain in chains.items():
        lacks, fusable = EXPECTED[name][label]
        caps = capabilities(chain)
        assert caps == {**ALL_CAN, **{k: False for k in lacks}, 'fusable': fusable}, (name, label, caps)
        for cap in CAPABILITIES:
            msg = refused(chain, cap, name, 'do it')
            if cap in lacks: assert f"`{lacks[cap]}`" in msg, (name, cap, msg)
            else: assert msg is None

@pytest.mark.parametrize('name', [n for n, cs in EXPECTED.items() if any('compilable' in l for l, _ in cs.values())])
def test_compiled_refused_naming_the_callback(name):
    with pytest.raises(ValueError, match=rf"`compiled=True`: {name} cannot run compiled: its chain's callback `soap_step`"): _make(name, compiled=True)

@pytest.mark.parametrize('name', [n for n, cs in EXPECTED.items() if any('complex' in l for l, _ in cs.values())])
def test_complex_refused_naming_the_callback(name):
    want = next(l['complex'] for l, _ in EXPECTED[name].values() if 'complex' in l)
    w = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=rf"is complex: .*cannot take complex parameters: its chain's callback `{want}`"): _make(name, [w])

@pytest.mark.parametrize('name', [n for n, cs in EXPECTED.items() if any('low_precision_state' in l for l, _ in cs.values())])
def test_low_precision_state_refused_naming_the_callback(name):
    with pytest.raises(ValueError, match=r"`state_dtype='int8'`: .*low precision: its chain's callback `adafactor_step` keeps factored state"):
        _make(name, state_dtype='int8')

@pytest.mark.parametrize('name', [n for n, cs in EXPECTED.items() if any('release' in l for l, _ in cs.values())])
def test_release_refused_naming_the_stage(name):
    want = next(l['release'] for l, _ in EXPECTED[name].values() if 'release' in l)
    with pytest.raises(ValueError, match=rf"cannot step one param at a time \(gradient release\): its chain's stage `{want}`"):
        release_gradients(_make(name))

@pytest.mark.parametrize('name', [n for n, cs in EXPECTED.items() if not any(l for l, _ in cs.values())])
def test_capable_optimizers_take_every_run_option(name):
    "No refusal where no callback lacks anything: compiled, int8 state, complex params and gradient release are all taken."
    _make(name, compiled=True); _make(name, state_dtype='int8')
    _make(name, [torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)])
    release_gradients(_make(name)).remove()

def test_int4_state_of_a_sharded_matrix_is_refused_by_name():
    """FSDP2 shards (DTensor) of a matrix with `state_dtype='int4'`: rank-1 scales span whole rows and columns, which a
    shard does not hold, so the optimizer refuses at construction (a 1-rank gloo world in a subprocess, bounded)."""
    import subprocess, sys, textwrap
    code = textwrap.dedent('''
        import torch, torch.distributed as dist
        from datetime import timedelta
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, Shard
        from fastopts.optimizer import AdamW
        dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
        mesh = init_device_mesh('cpu', (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
        b = torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
        AdamW([b], lr=1e-3, state_dtype='int4')   # a 1-d shard keeps its blocks
        try: AdamW([w], lr=1e-3, state_dtype='int4')
        except ValueError as e: print(e)
        dist.destroy_process_group()''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "`state_dtype='int4'`: param 0 of group 0 (8, 8) is an FSDP2 shard (DTensor)" in r.stdout, r.stdout
