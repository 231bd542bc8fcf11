"""Lookahead as a wrapper: a `torch.optim.Optimizer` around the inner optimizer (not a second fastopts chain) whose
checkpoints keep the documented layout, written here by hand: the inner optimizer's state dict, each param's slow
weights as the per-param state entry `lookahead_slow`, the step count as the group key `lookahead_count`."""
import io, pickle
import torch
from torch.testing import assert_close
from fastopts.optimizer import Optimizer, Adam
from fastopts.lookahead import Lookahead

K, ALPHA = 4, 0.5

def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()

def grads(params, g):
    for p in params: p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()

def lookahead_by_hand(params, inner, steps, slow, count, g):
    "The paper's rule, written here around a plain inner optimizer: every K-th step slow += ALPHA (fast - slow), fast = slow."
    for _ in range(steps):
        grads(params, g); inner.step(); count += 1
        if count % K == 0:
            with torch.no_grad():
                for p, s in zip(params, slow): s += ALPHA * (p - s); p.copy_(s)
    return slow, count

def test_is_a_torch_optimizer_wrapping_not_a_fastopts_one():
    m = model()
    la = Lookahead(Adam(m.parameters(), lr=1e-2), k=K)
    assert isinstance(la, torch.optim.Optimizer) and not isinstance(la, Optimizer)
    assert la.param_groups is la.opt.param_groups and la.state is la.opt.state and la.chains is la.opt.chains
    sched = torch.optim.lr_scheduler.LambdaLR(la, lambda t: 0.5 ** t)   # torch's schedulers take it
    grads(list(m.parameters()), torch.Generator().manual_seed(0)); la.step(); sched.step()
    assert la.opt.param_groups[0]['lr'] == 5e-3
    copied = pickle.loads(pickle.dumps(la))
    assert copied.count == 1 and copied.k == K and len(copied.slow_weights[0]) == 4 and copied.hypers[0]['lr'] == 5e-3

def test_loads_the_documented_checkpoint_layout_built_by_hand():
    "A checkpoint written from the layout (not by `Lookahead.state_dict`) after 6 steps resumes as the rule by hand does."
    m_ref, m = model(), model()
    ps_ref, ps = list(m_ref.parameters()), list(m.parameters())
    g = torch.Generator().manual_seed(1)
    inner = Adam(ps_ref, lr=1e-2)
    slow, count = lookahead_by_hand(ps_ref, inner, 6, [p.detach().clone() for p in ps_ref], 0, g)
    sd = inner.state_dict()
    sd = {'state': {i: {**sd['state'].get(i, {}), 'lookahead_slow': slow[i].clone()} for i in range(len(ps_ref))},
          'param_groups': [{**grp, 'lookahead_count': count} for grp in sd['param_groups']]}
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    with torch.no_grad():
        for p, q in zip(ps, ps_ref): p.copy_(q)
    la = Lookahead(Adam(ps, lr=1.), k=K, alpha=ALPHA)
    la.load_state_dict(torch.load(buf, weights_only=True))
    assert la.count == 6 and la.hypers[0]['lr'] == 1e-2
    for s, r in zip(la.slow_weights[0], slow): assert_close(s, r, rtol=0, atol=0)
    g2, g3 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    lookahead_by_hand(ps_ref, inner, 7, slow, count, g2)
    for _ in range(7): grads(ps, g3); la.step()
    for p, q in zip(ps, ps_ref): assert_close(p, q, rtol=1e-12, atol=1e-14)
