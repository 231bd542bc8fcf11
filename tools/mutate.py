"""A small mutation runner: does the test suite catch a deliberate wrong number?

Each mutation is `(name, file under fastopts/, exact old snippet, new snippet, tests to run)`. For each one the runner
copies the package to a temporary folder, applies the change there (never in the working tree), points `PYTHONPATH`
at the copy, runs the named tests with pytest (one process, no xdist) and reports `killed` (a test failed) or
`survived` (all passed). A snippet that does not occur exactly once is an error: the mutation went stale.

    .venv/bin/python tools/mutate.py                 # every mutation
    .venv/bin/python tools/mutate.py soap_shampoo_beta int8_map_bits   # some, by name
    .venv/bin/python tools/mutate.py --list

Not collected by pytest (it is not under tests/ and its name does not start with `test_`). The mutations are the 13 of
issue 26: each changes results in a case a user can hit, and each must be killed by at least one test.
"""
from __future__ import annotations
import argparse, os, shutil, subprocess, sys, tempfile, time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

@dataclass
class Mutation:
    name: str
    file: str       # path under fastopts/
    old: str        # exact snippet, occurring once
    new: str
    tests: list     # pytest node ids or files, relative to the repository root
    why: str = ''

MUTATIONS = [
    Mutation('soap_shampoo_beta', 'soap.py',
             "sb = sqr_mom if shampoo_beta < 0 else", "sb = mom if shampoo_beta < 0 else",
             ['tests/test_matrix.py::test_soap_equals_reference'],
             "SOAP's default shampoo_beta falls back to the first beta instead of the second"),
    Mutation('sf_weight_uses_lr', 'lr_free.py',
             "weight = ((k+1)**g['r']) * (lr_max**g['weight_lr_power'])", "weight = ((k+1)**g['r']) * (lr**g['weight_lr_power'])",
             ['tests/test_lr_free.py::test_schedule_free_adamw_falling_lr_equals_reference'],
             "Schedule-Free's averaging weight uses lr instead of the running lr_max"),
    Mutation('sf_eval_current_mom', 'lr_free.py',
             "else: p.lerp_(z, 1 - 1/s.get('y_mom', g['mom']))", "else: p.lerp_(z, 1 - 1/g['mom'])",
             ['tests/test_lr_free.py::test_schedule_free_eval_after_a_mom_change_unmixes_with_the_mom_of_y'],
             "Schedule-Free's eval() un-mixes with the group's current mom, not the one y was formed with"),
    Mutation('sf_bn_at_y', 'lr_free.py',
             "        self.learn.opt.eval()\n        if self.bn_batches:\n            recalibrate_bn(self.learn.model, (b[:self.learn.dls.n_inp] for b in self.learn.dls.train), self.bn_batches)",
             "        if self.bn_batches:\n            recalibrate_bn(self.learn.model, (b[:self.learn.dls.n_inp] for b in self.learn.dls.train), self.bn_batches)\n        self.learn.opt.eval()",
             ['tests/test_lr_free.py::test_learner_bn_recalibration_is_the_average_at_x'],
             "Schedule-Free's BatchNorm recalibration done at y, not at x"),
    Mutation('int8_unsigned_zero', 'quant.py',
             "        idx = idx + ((idx == 0) & (normed > 0) & (~signed if flag else True)).to(torch.int32)", "        pass",
             ['tests/test_precision.py::test_int8_codes_are_the_nearest_of_the_dynamic_map'],
             "int8: the unsigned map may round a positive second moment to 0"),
    Mutation('int8_map_bits', 'quant.py',
             "def dynamic_map(signed:bool=True, max_exponent_bits:int=7,", "def dynamic_map(signed:bool=True, max_exponent_bits:int=6,",
             ['tests/test_precision.py::test_int8_codes_are_the_nearest_of_the_dynamic_map'],
             "int8: the dynamic map built with 6 exponent bits instead of 7"),
    Mutation('release_refuses_bf16', 'release.py',
             "            if cb.amp_mode == AMPMode.BF16: continue", "            pass",
             ['tests/test_release.py::test_bf16_mixed_precision_is_accepted'],
             "gradient release refuses bf16 MixedPrecision (it has no loss scaler)"),
    Mutation('release_skips_lookahead', 'release.py',
             "    if inner is not None and inner is not opt: cbs += _chain_cbs(inner)", "    pass",
             ['tests/test_release.py::test_refuses_rules_needing_all_grads_inside_lookahead'],
             "the needs-all-grads check does not look inside Lookahead"),
    Mutation('release_cancel_backward', 'release.py',
             "    def after_cancel_backward(self): self.release.active = False", "    def after_cancel_backward(self): pass",
             ['tests/test_release.py::test_cancelled_backward_switches_release_off'],
             "GradientRelease.after_cancel_backward does nothing"),
    Mutation('fused_guard_params_only', 'fused.py',
             "if all(map(Tensor.is_contiguous, ps)) and all(map(Tensor.is_contiguous, grads or [p.grad for p in ps])): return list(ps), []",
             "if all(map(Tensor.is_contiguous, ps)): return list(ps), []",
             ['tests/test_optim_layout.py::test_contiguous_params_with_a_transposed_grad'],
             "the fused layout guard's fast path checks params but not grads"),
    Mutation('docs_fragments', 'docs.py',
             "            if parts.fragment and target.suffix == '.html':", "            if False:",
             ['tests/test_docs.py::test_broken_links_checks_fragments'],
             "the docs link checker accepts fragment links to missing ids"),
    Mutation('docs_leave_site', 'docs.py',
             "if not target.is_file() or site not in target.parents:", "if not target.is_file():",
             ['tests/test_docs.py::test_broken_links_refuses_links_that_leave_the_site'],
             "the docs link checker accepts relative links that leave the site"),
    Mutation('docs_blank', 'docs.py',
             "    return 1 - counts.max() / len(a) >= min_ink and len(colours) > 8", "    return len(colours) > 8",
             ['tests/test_docs.py::test_not_blank'],
             "the blank-screenshot check accepts a screenshot with almost no ink"),
    Mutation('prodigy_fsdp2_local_d', 'lr_free.py',
             "    if fsdp_in_use or isinstance(p, DTensor):", "    if fsdp_in_use:",
             ['tests/test_owners.py::test_fsdp2_prodigy_equals_prodigyopt_in_one_process'],
             "Prodigy under FSDP2 estimates d from each rank's own shards (no all-reduce unless fsdp_in_use): 0.024 off"),
    Mutation('prodigy_fsdp2_slice_offset', 'callbacks.py',
             "    return x.to_local().reshape(-1)[(-off) % slice_p::slice_p]", "    return x.to_local().reshape(-1)[::slice_p]",
             ['tests/test_owners.py::test_fsdp2_prodigy_equals_prodigyopt_in_one_process'],
             "a shard slices from its own first entry, not from its offset in the whole (slice_p=3: 0.012 off)"),
]

def apply(pkg:Path, m:Mutation):
    "Apply `m` to the package copy `pkg` (an error if its snippet does not occur exactly once)."
    f = pkg/m.file
    src = f.read_text()
    n = src.count(m.old)
    if n != 1: raise ValueError(f"{m.name}: the snippet occurs {n} times in fastopts/{m.file} (want 1): update the mutation")
    f.write_text(src.replace(m.old, m.new))

def run(m:Mutation, timeout:int=900, verbose:bool=False) -> tuple[str, float, str]:
    "`('killed' | 'survived', seconds, pytest's last lines)` for mutation `m`, run on a temporary copy of the package."
    with tempfile.TemporaryDirectory(prefix='fastopts-mutant-') as tmp:
        pkg = Path(tmp)/'fastopts'
        shutil.copytree(ROOT/'fastopts', pkg, ignore=shutil.ignore_patterns('__pycache__'))
        apply(pkg, m)
        # PYTHONSAFEPATH: the working directory (the repository root, which holds the real package) is not put on sys.path
        env = {**os.environ, 'PYTHONPATH': tmp, 'PYTHONSAFEPATH': '1', 'PYTHONDONTWRITEBYTECODE': '1'}
        where = subprocess.run([sys.executable, '-c', 'import fastopts; print(fastopts.__file__)'], env=env, cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(tmp): raise RuntimeError(f"the mutant is not the package imported: {where}")
        t0 = time.time()
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-n', '0', '-p', 'no:cacheprovider', *m.tests],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = (r.stdout + r.stderr).strip().splitlines()
        if r.returncode not in (0, 1): raise RuntimeError(f"{m.name}: pytest exited {r.returncode}:\n" + '\n'.join(out[-30:]))
        return ('killed' if r.returncode == 1 else 'survived'), time.time() - t0, '\n'.join(out[-(30 if verbose else 3):])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('names', nargs='*', help='mutations to run (default: all)')
    ap.add_argument('--list', action='store_true'); ap.add_argument('-v', '--verbose', action='store_true')
    a = ap.parse_args(argv)
    by = {m.name: m for m in MUTATIONS}
    if a.list:
        for m in MUTATIONS: print(f'{m.name:26s} fastopts/{m.file:12s} {m.why}')
        return 0
    unknown = [n for n in a.names if n not in by]
    if unknown: ap.error(f'unknown mutations: {unknown}')
    survived = []
    for m in [by[n] for n in a.names] or MUTATIONS:
        verdict, secs, tail = run(m, verbose=a.verbose)
        print(f'{verdict:8s} {m.name:26s} {secs:6.1f} s  by {" ".join(m.tests)}', flush=True)
        if a.verbose or verdict == 'survived': print('    ' + tail.replace('\n', '\n    '))
        if verdict == 'survived': survived.append(m.name)
    print(f'{len(survived)} survived' + (f': {survived}' if survived else ''))
    return 1 if survived else 0

if __name__ == '__main__': sys.exit(main())
