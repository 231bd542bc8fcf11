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
    out = _in_one_rank('''
        from fastopts.optimizer import AdamW
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
        b = torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
        AdamW([b], lr=1e-3, state_dtype='int4')   # a 1-d shard keeps its blocks
        try: AdamW([w], lr=1e-3, state_dtype='int4')
        except ValueError as e: print(e)''')
    assert "`state_dtype='int4'`: param 0 of group 0 (8, 8) is an FSDP2 shard (DTensor)" in out, out

def _in_one_rank(body:str, timeout=120) -> str:
    """Run `body` in a 1-rank gloo world in a process of its own (bounded by timeouts), with `mesh` (1-D) and `mesh2` (2-D,
    HSDP's replicate x shard) and torch.distributed.tensor's `distribute_tensor`, `Shard`, `Replicate` at hand; its stdout.
    The process is forked from the distributed tests' fork server (torch, fastai, fastopts imported there once), not a
    fresh interpreter importing them (~8 s of CPU each time)."""
    import multiprocessing, tempfile, textwrap
    import test_distributed  # noqa: F401 (the fork server's preloaded modules)
    from distributed_worker import run_code
    code = textwrap.dedent('''
        import torch, torch.distributed as dist
        from datetime import timedelta
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, Shard, Replicate
        dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
        mesh, mesh2 = init_device_mesh('cpu', (1,)), init_device_mesh('cpu', (1, 1), mesh_dim_names=('replicate', 'shard'))
        ''') + textwrap.dedent(body) + '\ndist.destroy_process_group()\n'
    with tempfile.TemporaryDirectory() as d:
        out = f'{d}/out.txt'
        p = multiprocessing.get_context('forkserver').Process(target=run_code, args=(code, out))
        p.start(); p.join(timeout)
        if p.exitcode is None: p.kill(); p.join(); pytest.fail(f'the 1-rank world did not finish in {timeout} s')
        with open(out) as f: text = f.read()
    assert p.exitcode == 0, text
    return text

ROWS = "takes FSDP2 shards of rows (placements (Shard(0),) on a 1-D mesh), got placements (Replicate(), Shard(dim=0)) on a 2-D mesh"

def test_a_layout_the_rule_cannot_take_is_refused_when_its_group_is_added():
    """Adafactor, Prodigy and SOAP with owners take FSDP2 shards of rows only (`contract(accepts=...)`): another layout
    (HSDP's 2-D mesh) is refused at construction and by `add_param_group`, naming the param and the callback, and a
    refused group is not kept (the optimizer steps on as before). Before issue 27's change each was built and only
    `step()` raised, after other groups may have stepped (SOAP's added group: a RuntimeError from the device mesh)."""
    out = _in_one_rank('''
        from fastopts.adafactor import Adafactor
        from fastopts.soap import SOAP
        from fastopts.lr_free import Prodigy
        rows = lambda: torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
        hsdp = lambda: torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh2, [Replicate(), Shard(0)]))
        def refused(f):
            try: f()
            except ValueError as e: print(e)
            else: print('not refused')
        refused(lambda: Adafactor([('w', rows()), ('v', hsdp())], lr=0.01))
        refused(lambda: Prodigy([hsdp()]))
        for opt in (Adafactor([rows()], lr=0.01), SOAP([rows()])):
            kept = [list(g['params']) for g in opt.param_groups]
            refused(lambda: opt.add_param_group({'params': [hsdp()]}))
            assert [list(g['params']) for g in opt.param_groups] == kept
            for p in kept[0]: p.grad = torch.ones_like(p)
            opt.step()
        opt = SOAP([rows()], owners=False)   # every rank gathers every gradient: any layout
        opt.add_param_group({'params': [hsdp()]})
        print(len(opt.param_groups), 'groups without owners')''')
    assert f"param `v` (8, 8): Adafactor cannot take it: its chain's callback `adafactor_step` {ROWS}\n" in out, out
    assert f"param 0 of group 0 (8, 8): Prodigy cannot take it: its chain's callback `prodigy_stats` {ROWS}\n" in out, out
    assert f"param 0 of group 1 (8, 8): Adafactor cannot take it: its chain's callback `adafactor_step` {ROWS}\n" in out, out
    assert (f"param 0 of group 1 (8, 8): SOAP cannot take it: its chain's callback `soap_step` with owners {ROWS}: build SOAP "
            "with owners=False (every rank gathers every gradient)\n") in out, out
    assert '2 groups without owners' in out and 'not refused' not in out, out

@pytest.mark.parametrize('name', ['SOAP', 'Muon'])
def test_a_refused_group_is_not_kept(name):
    """`add_param_group` with a param the chain refuses (complex, for SOAP's and Muon's matrices) raises and leaves the
    optimizer's groups as they were (before, the refused group stayed and the next step failed on it); then it steps."""
    opt = _make(name)
    kept = [list(g['params']) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"param 0 of group 1 \(3, 4\) is complex"):
        opt.add_param_group({'params': [torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)]})
    assert [list(g['params']) for g in opt.param_groups] == kept
    for ps in kept:
        for p in ps: p.grad = torch.ones_like(p)
    opt.step()

def test_a_routed_share_names_its_own_param():
    "Muon routes a group's matrices and vectors apart: a refusal names the refused param, not the one at its place in the share."
    w, b = torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    c = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    from fastopts.matrix import Muon
    with pytest.raises(ValueError, match=r"^param `c.weight` \(4, 4\) is complex: Muon cannot take complex"):
        Muon([('a.weight', w), ('a.bias', b), ('c.weight', c)], lr=0.01)

def test_prodigy_refuses_shards_beside_whole_tensors():
    """Prodigy's one `d` sums over every param of every group, all-reduced over the ranks when the params are FSDP2 shards.
    A whole tensor beside shards (in any group) would be summed on one rank only, or once per rank: before issue 27's
    change, 2 gloo ranks with a plain bias in group 0 and a sharded weight in group 1 ended 5 steps with d = 1.93e-6 on
    one rank and 1.01e-6 on the other (no all-reduce) and the bias different on each. Now refused at construction and by
    `add_param_group` (the group not kept), either way round."""
    out = _in_one_rank('''
        from fastopts.lr_free import Prodigy
        rows = lambda: torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        whole = lambda: torch.nn.Parameter(torch.randn(3))
        def refused(f):
            try: f()
            except ValueError as e: print(e)
            else: print('not refused')
        refused(lambda: Prodigy([dict(params=[whole()]), dict(params=[rows()])]))
        refused(lambda: Prodigy([rows(), whole()]))
        opt = Prodigy([rows()])
        refused(lambda: opt.add_param_group({'params': [whole()]}))
        print(len(opt.param_groups), 'group kept')''')
    assert "param 0 of group 1 (8, 4) is an FSDP2 shard (DTensor) but param 0 of group 0 is a whole tensor: Prodigy's one `d`" in out, out
    assert "param 1 of group 0 (3,) is a whole tensor but param 0 of group 0 is an FSDP2 shard (DTensor): Prodigy's" in out, out
    assert "param 0 of group 1 (3,) is a whole tensor" in out and '1 group kept' in out and 'not refused' not in out, out

def test_a_group_mixing_shards_and_whole_tensors_steps_as_torch():
    """A param group holding FSDP2 shards (DTensors) and whole tensors (a bias left out of `fully_shard`, say): torch's
    optimizers step it; before issue 27's change fastopts failed in `step()` (the fused kernel got "mixed torch.Tensor and
    DTensor", or `to_local` of a whole tensor). The driver now hands each kind to the kernels apart: torch's numbers,
    either order, for AdamW (fused), AdamW through its callbacks and Adafactor (a 1-rank world: the shard is the whole)."""
    out = _in_one_rank('''
        from fastopts.optimizer import AdamW
        from fastopts.adafactor import Adafactor
        makes = {'AdamW': (lambda ps: AdamW(ps, lr=0.1, wd=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01)),
                 'AdamW callbacks': (lambda ps: AdamW(ps, lr=0.1, wd=0.01, fused=False), lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01)),
                 'Adafactor': (lambda ps: Adafactor(ps, lr=0.1), lambda ps: torch.optim.Adafactor(ps, lr=0.1))}
        def params(order):
            torch.manual_seed(0)
            w, b = torch.randn(8, 4), torch.randn(4)
            ps = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])), torch.nn.Parameter(b)]
            return (ps if order else ps[::-1]), [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())][::1 if order else -1]
        for name, (ours, ref) in makes.items():
            for order in (0, 1):
                ps, qs = params(order)
                o, r = ours(ps), ref(qs)
                for t in range(3):
                    for p, q in zip(ps, qs):
                        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(t + q.numel()))
                        q.grad = g.clone()
                        p.grad = distribute_tensor(g, mesh, [Shard(0)]) if hasattr(p, 'to_local') else g.clone()
                    o.step(); r.step()
                diff = max((p.full_tensor() if hasattr(p, 'full_tensor') else p).sub(q).abs().max().item() for p, q in zip(ps, qs))
                print(name, order, 'max diff', diff)''')
    lines = [l for l in out.splitlines() if 'max diff' in l]
    assert len(lines) == 6, out
    for l in lines: assert float(l.split()[-1]) < 1e-6, out
