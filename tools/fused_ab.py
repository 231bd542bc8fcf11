"""Interleaved before/after of the fused precision pass on the GPT-2 blocks (issue 28): an older fastopts copied to
DIR/fastopts_before (e.g. `git worktree add` or `git archive` of the old commit, its `fastopts/` renamed), then

    PYTHONPATH=DIR:$PWD .venv/bin/python tools/fused_ab.py ROUNDS [NAME_PART ...]

One process, one thread; each round steps every contender once. The old pass compiles with the 16-lane tiling and
inductor's own bitcast, its caches keyed apart (two copies of fastopts in one process would otherwise share one
inductor patch, whose switch belongs to the copy that installed it)."""
import sys, time, statistics, torch
import contextlib
import torch._inductor.codegen.cpp as cpp
ORIG = vars(cpp.CppVecOverrides)['to_dtype_bitcast']   # inductor's own, before any patch
import fastopts.inductor_tiling as IT
IT._install()   # the new patches (tiling, bitcast), reading the new module's switch
import fastopts.optimizer as A, fastopts_before.optimizer as B, fastopts_before.precision as BP
@contextlib.contextmanager
def before_tiling():
    "The old pass's compile: the 16-lane tiling (as before), inductor's own bitcast, caches keyed apart."
    with IT.lowp_tiling():
        cur = vars(cpp.CppVecOverrides)['to_dtype_bitcast']
        cpp.CppVecOverrides.to_dtype_bitcast = ORIG
        try:
            with torch.compiler.config.patch(cache_key_tag=torch.compiler.config.cache_key_tag + '|before'): yield
        finally: cpp.CppVecOverrides.to_dtype_bitcast = cur
BP.lowp_tiling = before_tiling
from fastopts.bench.memory import FUSED_SETTINGS, LION, LR, BETAS, EPS, WD
from fastopts.bench.step_rules import make_params
torch.set_num_threads(1)
only = sys.argv[2:] or None
rounds = int(sys.argv[1])
def adamw(mod, kw): return lambda ps: mod.AdamW(ps, lr=LR, mom=BETAS[0], sqr_mom=BETAS[1], eps=EPS, wd=WD, **kw)
def lion(mod, kw): return lambda ps: mod.Lion(ps, lr=1e-4, mom=0.9, sqr_mom=0.99, wd=WD, **kw)
cons = {'torch fused AdamW (fp32)': (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True))}
for k, (dt, kw) in {**FUSED_SETTINGS, **LION}.items():
    if only and not any(o in k for o in only): continue
    f = lion if k.startswith('Lion') else adamw
    if kw.get('compiled'):
        cons[k + ' [before]'] = (dt, f(B, kw)); cons[k + ' [after]'] = (dt, f(A, kw))
    else: cons[k] = (dt, f(A, kw))
steps, warm = {}, {}
for name, (dt, make) in cons.items():
    ps = make_params('gpt2')
    for p in ps: p.data, p.grad = p.data.to(dt), p.grad.to(dt)
    opt = make(ps); t0 = time.perf_counter(); opt.step(); opt.step(); warm[name] = time.perf_counter() - t0
    steps[name] = opt.step
    print(f'  ready {name} ({warm[name]:.1f} s)', file=sys.stderr, flush=True)
times = {k: [] for k in steps}
for r in range(rounds):
    for k, f in steps.items():
        t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
ref = statistics.median(times['torch fused AdamW (fp32)'])
lref = statistics.median(times['Lion fp32']) if 'Lion fp32' in times else None
print(f'| contender | step ms (median of {rounds}) | vs torch fused fp32 | vs Lion fp32 | warm-up s |\n|---|---:|---:|---:|---:|')
for k, ts in times.items():
    m = statistics.median(ts)
    own = f'{m / lref:.2f}' if lref and k.startswith('Lion') else ''
    print(f'| {k} | {1000 * m:.0f} | {m / ref:.2f} | {own} | {warm[k]:.1f} |')
