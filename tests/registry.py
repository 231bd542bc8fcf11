"""The one registry of fastopts' optimizers that the parameterised tests read: a new optimizer is one entry here.

Each entry says how to build the optimizer (`make(params, **overrides)`), its `torch.optim` counterpart with the same
numbers where torch has the rule (`torch_make(params)`), and which properties apply: `fused` (the default step runs
a torch fused kernel), `checkpoint` (a `torch.optim` state dict of the rule loads), `complex_ref` ('torch' when torch
steps complex params of this rule, 'real' when the reference is the same params stepped as real pairs).
"""
from dataclasses import dataclass, field
from functools import partial
import torch
from fastopts.optimizer import SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion
from fastopts.lookahead import Lookahead

@dataclass
class OptSpec:
    name: str
    factory: object                 # the fastopts factory
    kwargs: dict                    # hypers in fastai's names
    torch_cls: object = None        # torch.optim class computing the same rule, or None
    torch_kwargs: dict = field(default_factory=dict)
    fused: bool = False             # dispatched to a torch fused kernel by default
    checkpoint: bool = False        # a torch.optim state dict of this rule loads (issue: checkpoint migration)
    complex_ref: str = 'real'
    def make(self, params, **kw): return self.factory(params, **{**self.kwargs, **kw})
    def torch_make(self, params): return self.torch_cls(params, **self.torch_kwargs)

def _lookahead_adam(params, **kw): return Lookahead(Adam(params, **{'lr': 1e-2, **kw}), k=3, alpha=0.5)

OPTIMIZERS = [
    OptSpec('sgd', SGD, dict(lr=0.1), torch.optim.SGD, dict(lr=0.1), fused=True, checkpoint=True, complex_ref='torch'),
    OptSpec('sgd_mom', SGD, dict(lr=0.1, mom=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9), fused=True,
            checkpoint=True, complex_ref='torch'),
    OptSpec('sgd_nesterov_l2', SGD, dict(lr=0.1, mom=0.9, nesterov=True, wd=0.01, decouple_wd=False), torch.optim.SGD,
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), fused=True, checkpoint=True, complex_ref='torch'),
    OptSpec('momentum', Momentum, dict(lr=0.1, mom=0.9), fused=True),
    OptSpec('momentum_wd', Momentum, dict(lr=0.1, mom=0.9, wd=0.1), fused=True),
    OptSpec('rmsprop_wd', RMSProp, dict(lr=1e-2, wd=0.01), fused=True),   # decoupled decay: torch's RMSprop has only L2
    OptSpec('rmsprop', RMSProp, dict(lr=1e-2), torch.optim.RMSprop, dict(lr=1e-2, alpha=0.99, eps=1e-8),
            fused=True, checkpoint=True, complex_ref='torch'),
    OptSpec('rmsprop_mom', RMSProp, dict(lr=1e-2, mom=0.9), torch.optim.RMSprop, dict(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.9),
            checkpoint=True, complex_ref='torch'),
    OptSpec('adam', Adam, dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2), fused=True, checkpoint=True, complex_ref='torch'),
    OptSpec('adam_l2', Adam, dict(lr=1e-2, wd=0.01, decouple_wd=False), torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01),
            fused=True, checkpoint=True, complex_ref='torch'),
    OptSpec('adamw', AdamW, dict(lr=1e-2), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01), fused=True,
            checkpoint=True, complex_ref='torch'),
    OptSpec('radam', RAdam, dict(lr=1e-2), torch.optim.RAdam, dict(lr=1e-2), checkpoint=True, complex_ref='torch'),
    OptSpec('lamb', Lamb, dict(lr=1e-2, wd=0.01)),
    OptSpec('lion', Lion, dict(lr=1e-3, wd=0.1)),
    OptSpec('lookahead_adam', _lookahead_adam, {}),
]
BY_NAME = {o.name: o for o in OPTIMIZERS}
# each factory's documented defaults (README "Using it", and the factories' signatures)
DOCUMENTED_DEFAULTS = {
    SGD: dict(mom=0., wd=0.), Momentum: dict(mom=0.9, wd=0.), RMSProp: dict(sqr_mom=0.99, mom=0., eps=1e-8, wd=0.),
    Adam: dict(mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.), AdamW: dict(mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01),
    RAdam: dict(mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.), Lamb: dict(mom=0.9, sqr_mom=0.999, eps=1e-6, wd=0.),
    Lion: dict(mom=0.9, sqr_mom=0.99, wd=0.),
}
FUSED = [o for o in OPTIMIZERS if o.fused]
WITH_TORCH = [o for o in OPTIMIZERS if o.torch_cls is not None]
CHECKPOINT = [o for o in OPTIMIZERS if o.checkpoint]
ids = lambda o: o.name

# Two paths of the same computation (fused kernel / compiled code vs the callbacks) differ only by float rounding
SAME_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}

def assert_same(xs, ys, dtype=torch.float32):
    "Each tensor of `xs` equals its partner in `ys` within `SAME_TOL[dtype]`, the failing param named."
    from torch.testing import assert_close
    for i, (x, y) in enumerate(zip(xs, ys)): assert_close(x, y, **SAME_TOL[dtype], msg=lambda m: f"param {i}: {m}")

def seeded_params(shapes, dtype=torch.float32, seed=0, frozen=()):
    "Params of `shapes` drawn in float64 from a seeded generator (the same values for every dtype); `frozen` indices do not require grad."
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    for i, p in enumerate(ps): p.requires_grad_(i not in frozen)
    return ps

# Schedule-Free and LR-free optimizers (fastopts.lr_free). Kept out of OPTIMIZERS: Schedule-Free starts in eval mode,
# as schedulefree's optimizers do (`opt.train()` before the first step), and none has a compiled step, which the shared
# tests above assume. tests/test_lr_free.py reads these; `torch_cls` builds the reference package's optimizer
# (imported when called: the packages are test-only, in the `dev` extra).
def _ref(module, cls): return lambda ps, **kw: getattr(__import__(module), cls)(ps, **kw)
from fastopts.lr_free import ScheduleFreeAdamW, ScheduleFreeSGD, Prodigy, ADOPT, AdEMAMix
LR_FREE = [
    OptSpec('sf_adamw', ScheduleFreeAdamW, dict(lr=1e-2), _ref('schedulefree', 'AdamWScheduleFree'), dict(lr=1e-2)),
    OptSpec('sf_sgd', ScheduleFreeSGD, dict(lr=1e-2), _ref('schedulefree', 'SGDScheduleFree'), dict(lr=1e-2)),
    OptSpec('prodigy', Prodigy, dict(lr=1.), _ref('prodigyopt', 'Prodigy'), dict(lr=1.)),
    OptSpec('adopt', ADOPT, dict(lr=1e-3), _ref('adopt', 'ADOPT'), dict(lr=1e-3)),
    OptSpec('ademamix', AdEMAMix, dict(lr=1e-3)),   # no package: tests/test_lr_free.py writes the paper's update
]
LR_FREE_STATE_BYTES = {'sf_adamw': 8, 'sf_sgd': 4, 'prodigy': 16, 'adopt': 8, 'ademamix': 12}   # float32 state per parameter

# Matrix optimizers (fastopts.matrix). Kept out of OPTIMIZERS for the same reason as LR_FREE (no compiled step for
# all, no fused kernel; tests/test_matrix.py holds their references).
from fastopts.matrix import Muon, SOAP, Adafactor
MATRIX = [
    OptSpec('muon', Muon, dict(lr=0.02)),   # the hybrid: Muon for matrices, AdamW for the rest
    OptSpec('soap', SOAP, dict(lr=3e-3, precondition_frequency=2)),
    OptSpec('adafactor', Adafactor, dict(lr=1e-2)),
]
ALL = OPTIMIZERS + MATRIX + LR_FREE

# Gradient release (tests/test_release.py): every optimizer in ALL steps one param at a time with the ordinary step's
# numbers, except these, which refuse it with a ValueError matching the pattern (their step couples the params).
RELEASE_REFUSED = {'sf_adamw': 'ScheduleFreeOptimizer cannot step one param', 'sf_sgd': 'ScheduleFreeOptimizer cannot step one param',
                   'prodigy': 'Prodigy cannot step one param'}
RELEASE = [o for o in ALL if o.name not in RELEASE_REFUSED]
