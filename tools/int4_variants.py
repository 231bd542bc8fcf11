"""Which part of 4-bit Adam state costs loss: paired-seed fits of `fastopts.bench.memory`'s tasks with the moments
stored in float32 but rounded, at every store, to what a 4-bit variant would decode (fake quantisation: the same
numbers the real codes give, since each step reads back exactly what was stored).

    PYTHONPATH=. .venv/bin/python tools/int4_variants.py digits_cnn 16 [variant ...]

Prints each variant's final validation loss over the seeds and its mean paired difference to float32 with a 95%
interval (`paired_interval`). Variants: the blockwise maps of 128 (the old int4 state, torchao's AdamW4bit) for both
moments or one of them, other block sizes, lpmm's rank-1 normalisation for the second moment or both (the int4 state now).
"""
import math, statistics, sys, time, warnings
import torch
import fastopts.precision as fp
import fastopts.quant as fq
from fastopts.bench import memory as mb

def _nearest(normed, qm): return qm[torch.bucketize(normed, (qm[1:] + qm[:-1]) / 2)]

def blockwise(signed:bool, block:int=128):
    "Round-trip through the 4-bit map with one absmax per `block` elements (the flat tensor, zero-padded)."
    def f(v):
        qm, flat = fq.quant_map(4, signed), v.reshape(-1).float()
        b = fq._blocks(flat, block); a = b.abs().amax(1, keepdim=True)
        return (_nearest(b / torch.where(a > 0, a, 1.), qm) * a).reshape(-1)[:flat.numel()].view(v.shape)
    return f

def rank1(signed:bool):
    "Round-trip with lpmm's rank-1 scales: per element the least over the dims of the max of |v| along that dim's slice."
    def f(v):
        if v.dim() < 2: return blockwise(signed)(v)
        x, s = v.float(), None
        for d in range(x.dim()):
            m = x.abs().amax(dim=[j for j in range(x.dim()) if j != d], keepdim=True)
            s = m if s is None else torch.minimum(s, m)
        return _nearest(x / torch.where(s > 0, s, 1.), fq.quant_map(4, signed)) * s
    return f

VARIANTS = {   # (first moment, second moment): None keeps it in float32
    'blockwise 128 (the old int4, torchao)': (blockwise(True), blockwise(False)),
    'first blockwise, second fp32': (blockwise(True), None),
    'first fp32, second blockwise': (None, blockwise(False)),
    'second blockwise 32': (blockwise(True), blockwise(False, 32)),
    'both blockwise 64': (blockwise(True, 64), blockwise(False, 64)),
    'second rank-1': (blockwise(True), rank1(False)),
    'both rank-1 (the int4 state now)': (rank1(True), rank1(False)),
}

def fake_store(first, second):
    "`fastopts.precision._store` with 4-bit moments kept in float32, rounded by `first` / `second` (Adam's grad_avg / sqr_avg)."
    orig = fp._store
    def store(s, k, v, target):
        if target == 'int4' and k in ('grad_avg', 'sqr_avg'):
            f = first if k == 'grad_avg' else second
            return orig(s, k, v if f is None else f(v), torch.float32)
        return orig(s, k, v, target)
    return orig, store

def main(task:str, n:int, only=()):
    torch.set_num_threads(1); warnings.filterwarnings('ignore')
    seeds, ref = range(n), None
    def report(name, losses, t0):
        d, lo, hi = mb.paired_interval([l / r - 1 for l, r in zip(losses, ref)])
        print(f"| {name} | {statistics.mean(losses):.4f} | {d:+.2%} | {lo:+.2%} .. {hi:+.2%} | {(time.time() - t0) / n:.1f} |", flush=True)
    print('| variant | final valid loss (mean) | paired difference to fp32 | 95% interval | s per fit |\n|---|---:|---:|---|---:|')
    t0 = time.time(); ref = [mb.fit_loss(task, 'fp32', s) for s in seeds]; report('fp32', ref, t0)
    for name, (first, second) in VARIANTS.items():
        if only and name not in only: continue
        orig, fp._store = fake_store(first, second)
        try: t0 = time.time(); report(name, [mb.fit_loss(task, 'fp32, int4 state', s) for s in seeds], t0)
        finally: fp._store = orig
    if not only or 'torchao' in only:
        t0 = time.time(); report('torchao AdamW4bit', [mb.fit_loss(task, 'torchao AdamW4bit (fp32)', s) for s in seeds], t0)

if __name__ == '__main__': main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
