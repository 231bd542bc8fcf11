"""Checks that need a CUDA GPU: collected by pytest (tests/conftest.py collects this file by name), each test skipped,
with the reason in the report, where no CUDA device exists; or run by hand: `python tests/gpu_checks.py`.

1. every torch-referenced optimizer matches torch.optim on CUDA float32 (torch's foreach path), 200 steps;
2. fastai's `MixedPrecision` (CUDA-only) trains digits with fastopts optimizers to the CPU accuracy bar;
3. under `MixedPrecision`, `find_lr(); fit_one_cycle()` gives bit-identical weights to `fit_one_cycle()` alone;
4. the fused fast path on CUDA (float32 and bfloat16): the CUDA kernels run and give the callbacks' numbers and torch's
   fused optimizer's, 200 steps, two groups, some params with do_wd=False.
Exits non-zero on the first failure and prints one line per check.
"""
import sys, pytest, torch, torch.nn.functional as F
from functools import partial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (torch.cuda.is_available() is False)')

def reference_on_cuda():
    from fastopts.optimizer import SGD, Adam, AdamW, RAdam, RMSProp
    cases = [('SGD nesterov', partial(SGD, lr=1e-2, mom=0.9, nesterov=True), partial(torch.optim.SGD, lr=1e-2, momentum=0.9, nesterov=True)),
             ('Adam', partial(Adam, lr=1e-3), partial(torch.optim.Adam, lr=1e-3)),
             ('AdamW', partial(AdamW, lr=1e-3, wd=0.1), partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)),
             ('RAdam', partial(RAdam, lr=1e-3), partial(torch.optim.RAdam, lr=1e-3)),
             ('RMSProp mom', partial(RMSProp, lr=1e-3, mom=0.9), partial(torch.optim.RMSprop, lr=1e-3, alpha=0.99, eps=1e-8, momentum=0.9))]
    for name, ours, theirs in cases:
        g = torch.Generator(device='cuda').manual_seed(0)
        shapes = [(64, 32), (32,), (10, 64), (10,)]
        p0 = [torch.randn(s, device='cuda', generator=g) for s in shapes]
        pa = [torch.nn.Parameter(p.clone()) for p in p0]; pb = [torch.nn.Parameter(p.clone()) for p in p0]
        oa, ob = ours(pa), theirs(pb, foreach=True)
        for _ in range(200):
            grads = [torch.randn(s, device='cuda', generator=g) for s in shapes]
            for p, gr in zip(pa, grads): p.grad = gr.clone()
            for p, gr in zip(pb, grads): p.grad = gr.clone()
            oa.step(); ob.step()
        for a, b in zip(pa, pb): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        print(f'ok  {name}: matches torch.optim (foreach, CUDA float32) ')

def mixed_precision_fit():
    from fastai.learner import Learner
    from fastai.callback.schedule import fit_one_cycle
    from fastai.callback.fp16 import MixedPrecision
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastopts.optimizer import Adam, SGD, Lookahead, RAdam
    from fastopts.data import sklearn_dls, dls_mlp
    for name, of, lr in [('Adam', Adam, 1e-2), ('SGD(mom=0.9)', partial(SGD, mom=0.9), 0.1),
                         ('Lookahead(RAdam)', lambda ps, lr: Lookahead(RAdam(ps, lr)), 3e-2)]:
        set_seed(0, reproducible=True)
        dls = sklearn_dls('digits'); dls.to('cuda')
        learn = Learner(dls, dls_mlp(dls), loss_func=F.cross_entropy, metrics=accuracy, opt_func=of, cbs=MixedPrecision())
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(5, lr)
        acc = learn.recorder.values[-1][-1]
        assert next(learn.model.parameters()).is_cuda
        assert acc >= 0.9, (name, acc)
        print(f'ok  MixedPrecision fit_one_cycle(5) on CUDA with {name}: accuracy {acc:.4f}')

def find_lr_restores_under_mixed_precision():
    from fastai.learner import Learner
    from fastai.callback.schedule import fit_one_cycle
    from fastai.callback.fp16 import MixedPrecision
    from fastai.torch_core import set_seed
    from fastopts.optimizer import Adam
    from fastopts.data import sklearn_dls, dls_mlp
    import fastopts.lr_finder  # noqa: F401  (adds Learner.find_lr)
    def weights(find):
        set_seed(0, reproducible=True)
        dls = sklearn_dls('digits'); dls.to('cuda')
        learn = Learner(dls, dls_mlp(dls), loss_func=F.cross_entropy, opt_func=Adam, cbs=MixedPrecision())
        with learn.no_bar(), learn.no_logging():
            if find: res = learn.find_lr(show_plot=False)
            learn.fit_one_cycle(2, 1e-2)
        return [p.detach().cpu() for p in learn.model.parameters()]
    for a, b in zip(weights(False), weights(True)): assert torch.equal(a, b)
    print('ok  find_lr under MixedPrecision on CUDA: the fit after it is bit-identical to the fit alone')

def fused_on_cuda():
    from fastopts.optimizer import SGD, Momentum, Adam, AdamW
    cases = [('Adam', partial(Adam, lr=1e-3), partial(torch.optim.Adam, lr=1e-3)),
             ('AdamW', partial(AdamW, lr=1e-3, wd=0.1), partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)),
             ('SGD mom', partial(SGD, lr=1e-2, mom=0.9), partial(torch.optim.SGD, lr=1e-2, momentum=0.9)),
             ('SGD nesterov L2', partial(SGD, lr=1e-2, mom=0.9, nesterov=True, wd=1e-2, decouple_wd=False),
              partial(torch.optim.SGD, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
             ('Momentum', partial(Momentum, lr=1e-2), None)]
    shapes = [(256, 128), (128,), (10, 256), (10,)]
    for dtype, tol in [(torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))]:
        for name, ours, theirs in cases:
            g = torch.Generator(device='cuda').manual_seed(0)
            p0 = [torch.randn(s, device='cuda', generator=g).to(dtype) for s in shapes]
            runs = {}
            for key, make in [('fused', ours), ('callbacks', partial(ours, fused=False)),
                              ('torch', None if theirs is None else partial(theirs, fused=True))]:
                if make is None: continue
                ps = [torch.nn.Parameter(p.clone()) for p in p0]
                opt = make([{'params': ps[:2]}, {'params': ps[2:]}])
                if key == 'fused': assert opt._fast is not None, name
                gg = torch.Generator(device='cuda').manual_seed(1)
                for _ in range(200 if dtype == torch.float32 else 50):   # bfloat16 rounding drifts: fewer steps
                    for p in ps: p.grad = torch.randn(p.shape, device='cuda', generator=gg).to(dtype)
                    opt.step()
                runs[key] = ps
            for key in runs:
                for a, b in zip(runs['fused'], runs[key]): torch.testing.assert_close(a.float(), b.float(), **tol)
            print(f'ok  fused {name} on CUDA {dtype}: equals the callbacks{" and torch fused" if "torch" in runs else ""} ')

def compiled_on_cuda():
    "compiled=True on CUDA (Triton kernels, hypers as 0-d device tensors): the callbacks' numbers, one graph per group."
    from torch._dynamo.utils import counters
    from fastopts.optimizer import Adam, RAdam, Lion
    shapes = [(256, 128), (128,), (10, 256), (10,)]
    for name, make in [('Adam', partial(Adam, lr=1e-3)), ('RAdam', partial(RAdam, lr=1e-3)), ('Lion', partial(Lion, lr=1e-4, wd=0.1))]:
        g = torch.Generator(device='cuda').manual_seed(0)
        p0 = [torch.randn(s, device='cuda', generator=g) for s in shapes]
        runs, graphs = {}, 0
        for key, kw in [('callbacks', dict(fused=False)), ('compiled', dict(compiled=True))]:
            ps = [torch.nn.Parameter(p.clone()) for p in p0]
            opt = make([{'params': ps[:2]}, {'params': ps[2:]}], **kw)
            gg, before = torch.Generator(device='cuda').manual_seed(1), counters['stats']['unique_graphs']
            for t in range(30):
                for p in ps: p.grad = torch.randn(p.shape, device='cuda', generator=gg)
                opt.set_hyper('lr', 1e-3 * (1 + t % 5)); opt.set_hyper('mom', 0.9 - 0.01 * (t % 5))
                opt.step()
            runs[key], graphs = ps, counters['stats']['unique_graphs'] - before
        for a, b in zip(runs['compiled'], runs['callbacks']): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert graphs == 2, f'{name}: {graphs} graphs for 2 groups'
        print(f'ok  compiled {name} on CUDA: equals the callbacks, {graphs} graphs for 2 groups over 30 scheduled steps')

CHECKS = [reference_on_cuda, fused_on_cuda, compiled_on_cuda, mixed_precision_fit, find_lr_restores_under_mixed_precision]

@pytest.mark.parametrize('check', CHECKS, ids=[c.__name__ for c in CHECKS])
def test_gpu(check): check()

if __name__ == '__main__':
    assert torch.cuda.is_available(), 'no CUDA device'
    print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)
    for check in CHECKS: check()
    print('all GPU checks passed')
