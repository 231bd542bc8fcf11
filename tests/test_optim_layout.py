"""Parameters a fused kernel cannot step: strided views, and dense params whose grad (or state) is laid out otherwise.

torch's fused kernels walk a param, its grad and its state as flat memory, which is right only for a param that
covers its memory densely and a grad and state of the same layout (see "Which parameters a kernel takes" in
01_optimizer). Every fused-dispatched optimizer is run on one group mixing ordinary params with each awkward kind,
20 steps, against torch's foreach implementation of the rule where torch has it (and always against our own
callbacks, `fused=False`); a counter of the params handed to the kernels shows that the ordinary ones, and only
those the kernel computes correctly, still take it.
"""
import pytest, torch
from registry import FUSED, BY_NAME, ids
from fastopts.optimizer import kernel_layout
from fastopts.lookahead import Lookahead

TOL = dict(rtol=1e-5, atol=1e-6)

def _awkward():
    "`(name, make_param, grad_layout)`: grad_layout 'same' (autograd's: like the param) or 'contiguous' (set by a hook or by hand)."
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    return [
        ('dense', lambda: r(6, 5), 'same'),
        ('slice', lambda: r(10, 5, 2)[..., 0], 'contiguous'),                        # torch's non-contiguous test pattern
        ('as_strided', lambda: r(40).as_strided((5, 4), (8, 2)), 'contiguous'),
        ('transpose', lambda: r(7, 5).t(), 'same'),                                    # dense: the kernel takes it
        ('transpose_contig_grad', lambda: r(7, 5).t(), 'contiguous'),
        ('channels_last', lambda: r(4, 3, 3, 3).to(memory_format=torch.channels_last), 'same'),
        ('channels_last_contig_grad', lambda: r(4, 3, 3, 3).to(memory_format=torch.channels_last), 'contiguous'),
        ('vector', lambda: r(7), 'same'),
    ]

KINDS = _awkward()
KERNEL_OK = {'dense', 'transpose', 'channels_last', 'vector'}

def _params():
    "Fresh leaf params of every kind (the same values each call), views kept as views."
    return [torch.nn.Parameter(make()) for _, make, _ in _awkward()]

def _grad(p, layout, g):
    "A seeded grad for `p`: laid out like `p` (every 'same' kind is dense) or contiguous."
    v = torch.randn(p.shape, generator=g) + 0.5 * p.detach()
    return v.contiguous() if layout == 'contiguous' else torch.empty_strided(p.shape, p.stride()).copy_(v)

def _train(make_opt, steps=20):
    ps = _params()
    opt, g = make_opt(ps), torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, (_, _, layout) in zip(ps, KINDS): p.grad = _grad(p, layout, g)
        opt.step()
    return ps

@pytest.fixture
def kernel_params(monkeypatch):
    "The ids of the params handed to torch's fused kernels during the test."
    seen = set()
    for name in ('_fused_adam_', '_fused_adamw_', '_fused_sgd_'):
        real = getattr(torch, name)
        def counted(params, *a, _real=real, **kw):
            seen.update(p.data_ptr() for p in params)
            return _real(params, *a, **kw)
        monkeypatch.setattr(torch, name, counted)
    return seen

def test_the_awkward_params_are_awkward():
    "The layouts are what the names say: slices and as_strided views are not dense; the others are."
    ps = _params()
    for p, (name, _, layout) in zip(ps, KINDS):
        p.grad = _grad(p, layout, torch.Generator().manual_seed(0))
        fit, rest = kernel_layout([p], {p: {}})
        assert bool(fit) == (name in KERNEL_OK), name
    assert not ps[1].is_contiguous() and ps[1].stride() == (10, 2)

@pytest.mark.parametrize('spec', FUSED, ids=ids)
def test_fused_default_on_awkward_params(spec, kernel_params):
    "The default (fused) step equals the callbacks and torch's foreach on every kind; the kernel takes the dense ones only."
    ours = _train(spec.make)
    taken = set(kernel_params)
    chain = _train(lambda ps: spec.make(ps, fused=False))
    for p, q, (name, _, _) in zip(ours, chain, KINDS): torch.testing.assert_close(p, q, **TOL, msg=lambda m: f'{name}: {m}')
    if spec.torch_cls is not None:
        ref = _train(lambda ps: spec.torch_cls(ps, **spec.torch_kwargs, foreach=True))
        for p, q, (name, _, _) in zip(ours, ref, KINDS): torch.testing.assert_close(p, q, **TOL, msg=lambda m: f'{name}: {m}')
    kinds_taken = {name for p, (name, _, _) in zip(ours, KINDS) if p.data_ptr() in taken}
    assert kinds_taken == KERNEL_OK, kinds_taken

def test_lookahead_over_fused_adam_on_awkward_params(kernel_params):
    spec = BY_NAME['adam']
    ours = _train(lambda ps: Lookahead(spec.make(ps), k=3))
    ref = _train(lambda ps: Lookahead(torch.optim.Adam(ps, **spec.torch_kwargs, foreach=True), k=3))
    for p, q, (name, _, _) in zip(ours, ref, KINDS): torch.testing.assert_close(p, q, **TOL, msg=lambda m: f'{name}: {m}')
    assert kernel_params

def test_state_of_another_layout_is_put_in_the_params_layout_when_loaded(kernel_params):
    "A checkpoint from a channels_last model loaded into a contiguous one: its state takes the param's layout, so the kernel stays right."
    spec = BY_NAME['adam']
    g = torch.Generator().manual_seed(0)
    src = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=g).to(memory_format=torch.channels_last))
    opt = spec.make([src])
    for _ in range(3): src.grad = torch.randn(src.shape, generator=g).to(memory_format=torch.channels_last); opt.step()
    sd = opt.state_dict()
    assert not sd['state'][0]['grad_avg'].is_contiguous()
    runs = []
    for fused in (None, False):
        p = torch.nn.Parameter(src.detach().contiguous())
        o = spec.make([p], fused=fused); o.load_state_dict(sd)
        assert all(v.is_contiguous() for v in o.state[p].values() if isinstance(v, torch.Tensor))
        h = torch.Generator().manual_seed(1)
        for _ in range(5): p.grad = torch.randn(p.shape, generator=h); o.step()
        runs.append(p)
    torch.testing.assert_close(runs[0], runs[1], **TOL)
    assert kernel_params

def test_without_the_guard_the_kernel_is_wrong(monkeypatch):
    "The guard is what makes the default right: sending every param to the kernel breaks the strided ones."
    import fastopts.optimizer as fo
    monkeypatch.setattr(fo, 'kernel_layout', lambda ps, state, grads=None: (list(ps), []))
    spec = BY_NAME['sgd_mom']
    ours = _train(spec.make)
    ref = _train(lambda ps: spec.torch_cls(ps, **spec.torch_kwargs, foreach=True))
    off = {name for p, q, (name, _, _) in zip(ours, ref, KINDS) if not torch.allclose(p, q, **TOL)}
    assert off == {'slice', 'as_strided', 'transpose_contig_grad', 'channels_last_contig_grad'}, off

@pytest.mark.slow
def test_compiled_step_on_awkward_params():
    "The compiled step follows strides (inductor's generated code): equal to torch's foreach on every kind (~30 s)."
    import shutil
    if shutil.which('c++') is None and shutil.which('g++') is None: pytest.skip('no C++ compiler for inductor')
    spec = BY_NAME['adam']
    ours = _train(lambda ps: spec.make(ps, compiled=True))
    ref = _train(lambda ps: spec.torch_cls(ps, **spec.torch_kwargs, foreach=True))
    for p, q, (name, _, _) in zip(ours, ref, KINDS): torch.testing.assert_close(p, q, **TOL, msg=lambda m: f'{name}: {m}')

@pytest.mark.parametrize('spec', FUSED, ids=ids)
def test_contiguous_params_with_a_transposed_grad(spec, kernel_params):
    """Every param contiguous, one grad laid out transposed (a hook or a custom autograd Function may return one): the
    guard's quick all-contiguous answer must look at the grads too. The default step equals the callbacks and torch's
    foreach; the param with the transposed grad does not go to the kernel, the others do."""
    def train(make_opt):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
        opt, h = make_opt(ps), torch.Generator().manual_seed(1)
        for _ in range(10):
            ps[0].grad = (torch.randn(5, 6, generator=h) + 0.5 * ps[0].detach().t()).t()   # a (6, 5) grad with strides (1, 6)
            ps[1].grad = torch.randn(7, generator=h) + 0.5 * ps[1].detach()
            opt.step()
        return ps
    ours = train(spec.make)
    assert ours[0].is_contiguous() and not ours[0].grad.is_contiguous()
    taken = set(kernel_params)
    refs = [train(lambda ps: spec.make(ps, fused=False))]
    if spec.torch_cls is not None: refs.append(train(lambda ps: spec.torch_cls(ps, **spec.torch_kwargs, foreach=True)))
    for ref in refs:
        for i, (p, q) in enumerate(zip(ours, ref)): torch.testing.assert_close(p, q, **TOL, msg=lambda m: f'param {i}: {m}')
    assert ours[0].data_ptr() not in taken and ours[1].data_ptr() in taken
