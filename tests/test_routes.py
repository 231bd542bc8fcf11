"""Groups are the user's: Muon's hybrid routes each parameter to Muon or AdamW inside the groups it is given, so their
number and order stay, torch's per-group schedulers reach both rules, `add_param_group` routes as construction does,
and checkpoints carry the routes (the earlier split form still loads). References: torch.optim.Muon + torch.optim.AdamW."""
import io, pickle
import pytest, torch
from torch import nn
from torch.testing import assert_close
from fastopts.matrix import Muon, muon_chain, ADAMW_PART, MUON_NS_COEFFICIENTS
from fastopts.optimizer import Optimizer

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))

def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]

def fit(m, opts, data, scheds=()):
    for x, y in data:
        for o in opts: o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        for o in opts: o.step()
        for s in scheds: s.step()

def test_lambda_lr_per_user_group_reaches_both_rules():
    "One lambda per user group (2 groups): the Muon share steps at lr*lambda, the AdamW share at lr*adamw_lr_ratio*lambda, as torch's pair."
    lams = [lambda s: 0.5**s, lambda s: 1. + s]
    a, b = mlp(), mlp()
    ours = Muon([list(a[0].parameters()), list(a[2].parameters())], lr=0.02, adamw_lr_ratio=0.1)
    assert len(ours.param_groups) == 2
    sched = torch.optim.lr_scheduler.LambdaLR(ours, lams)
    t_muon = torch.optim.Muon([{'params': [b[0].weight]}, {'params': [b[2].weight]}], lr=0.02)
    t_adamw = torch.optim.AdamW([{'params': [b[0].bias]}, {'params': [b[2].bias]}], lr=0.002, weight_decay=0.01)
    t_scheds = [torch.optim.lr_scheduler.LambdaLR(t, lams) for t in (t_muon, t_adamw)]
    data = batches(6)
    fit(a, [ours], data, [sched]); fit(b, [t_muon, t_adamw], data, t_scheds)
    assert [g['lr'] for g in ours.param_groups] == [g['lr'] for g in t_muon.param_groups]
    for (n, p), q in zip(a.named_parameters(), b.parameters()): assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f'{n}: {m}')
    assert not torch.equal(a[2].bias, mlp()[2].bias)

def test_add_param_group_routes_as_construction():
    "A group with a weight and a bias added later: routed (weight Muon, bias AdamW) and stepped as if given at construction."
    a, b = mlp(), mlp()
    late = Muon(a[0].parameters(), lr=0.02, adamw_lr_ratio=0.1)
    late.add_param_group({'params': list(a[2].parameters()), 'lr': 0.01})
    built = Muon([{'params': list(b[0].parameters())}, {'params': list(b[2].parameters()), 'lr': 0.01}], lr=0.02, adamw_lr_ratio=0.1)
    assert [late.routes[p] for p in a.parameters()] == ['muon', 'adamw', 'muon', 'adamw']
    assert [{k: v for k, v in g.items() if k != 'params'} for g in late.param_groups] == \
           [{k: v for k, v in g.items() if k != 'params'} for g in built.param_groups]
    data = batches(4)
    fit(a, [late], data); fit(b, [built], data)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)
    assert not torch.equal(a[2].bias, mlp()[2].bias)

def _saved(opt) -> dict:
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    return torch.load(buf, weights_only=True)

def test_checkpoint_carries_routes_and_refuses_other_routes():
    m = mlp()
    opt = Muon(m.named_parameters(), lr=0.02)
    fit(m, [opt], batches(2))
    sd = _saved(opt)
    assert sd['param_groups'][0]['routes'] == ['muon', 'adamw', 'muon', 'adamw']
    other = Muon(mlp().named_parameters(), lr=0.02, adamw='2.')   # the last layer's weight to AdamW
    with pytest.raises(ValueError, match=r"param_groups\[0\].*routes"): other.load_state_dict(sd)
    same = Muon(mlp().named_parameters(), lr=0.5)
    same.load_state_dict(sd)
    assert 'routes' not in same.param_groups[0] and same.param_groups[0]['lr'] == 0.02

def test_the_earlier_split_checkpoint_loads():
    """A checkpoint of the earlier Muon, which split each group `i` into a Muon and an AdamW group (`'layer': i`, AdamW's
    hypers as plain keys): built here as that Muon was (an `Optimizer` with the two chains), it loads into today's Muon
    and both go on alike. A group lists its bias first, so the split changed the param order."""
    a, b = mlp(), mlp()
    (w1, b1), (w2, b2) = a[0].parameters(), a[2].parameters()
    adamw = dict(mom=0.8, sqr_mom=0.99, eps=1e-8, wd=0.01, lr_ratio=0.1)
    old = Optimizer([{'params': [w1], 'layer': 0, 'chain': 'muon'}, {'params': [b1], 'layer': 0, 'chain': 'adamw', **adamw},
                     {'params': [w2], 'layer': 1, 'chain': 'muon'}, {'params': [b2], 'layer': 1, 'chain': 'adamw', **adamw}],
                    {'muon': muon_chain(), 'adamw': ADAMW_PART}, lr=0.02, mom=0.95, wd=0.1, eps=1e-7,
                    ns_coefficients=MUON_NS_COEFFICIENTS, ns_steps=5, adjust_lr_fn=None)
    fit(a, [old], batches(3))
    with torch.no_grad():
        for p, q in zip(b.parameters(), a.parameters()): p.copy_(q)
    new = Muon([[b[0].bias, b[0].weight], [b[2].bias, b[2].weight]], lr=0.5)
    new.load_state_dict(_saved(old))
    g = new.param_groups[0]
    assert len(new.param_groups) == 2 and (g['lr'], g['mom'], g['adamw_mom'], g['adamw_sqr_mom'], g['adamw_lr_ratio']) == (0.02, 0.95, 0.8, 0.99, 0.1)
    assert torch.equal(new.state[b[0].weight]['grad_avg'], old.state[w1]['grad_avg']) and new.state[b[0].bias]['step'] == 3
    data = batches(3, seed=1)
    fit(a, [old], data); fit(b, [new], data)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)

def test_pickle_keeps_routes_and_a_lambda_router_is_refused_only_for_new_params():
    m = mlp()
    opt = Muon(m.parameters(), lr=0.02, adamw=lambda n, p: p.shape[0] == 4)   # a lambda: pickle cannot keep it
    fit(m, [opt], batches(1))
    m2, opt2 = pickle.loads(pickle.dumps((m, opt)))
    assert [opt2.routes[p] for p in m2.parameters()] == ['muon', 'adamw', 'adamw', 'adamw']
    fit(m2, [opt2], batches(1))
    with pytest.raises(ValueError, match='router'): opt2.add_param_group({'params': [nn.Parameter(torch.ones(3, 3))]})
    opt3 = pickle.loads(pickle.dumps(Muon(mlp().parameters(), adamw='bias')))   # a string: the router pickles
    opt3.add_param_group({'params': [nn.Parameter(torch.ones(3, 3))]})
