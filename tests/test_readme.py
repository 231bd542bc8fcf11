"""The README as a new user meets it: its python blocks run as written, what they claim to print or return is what they
print or return, and its quick start is two commands CI also runs.

Claims the README can make (checked by `test_readme_python_blocks_run`):
- a value, on a one-line expression statement of a ```python block: `EXPR  # -> EXPECTED`. EXPECTED is a Python
  expression evaluated after EXPR, in the block's namespace plus `approx` (pytest's): `plan(0)  # -> {'lr': [0.005],
  'mom': [0.9]}`, `x.shape  # -> (100, 1)`, `res.suggested  # -> approx(3e-3, rel=0.5)`. Numbers match to rel 1e-6
  (write `approx(...)` for a looser claim), sequences of any kind (list, tuple, torch.Size, arrays, tensors) match
  element by element, dicts key by key, and `...` matches anything: `plan(0), plan(199)  # -> ({'lr': [0.005], 'mom':
  [0.9]}, ...)`.
- the printed output, in a fenced block with the info string `output` right after the ```python block (only blank
  lines between): its lines are the block's stdout, where `...` stands for any text (a line of only `...`: any number
  of lines).
"""
import ast, json, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT/'README.md').read_text()

def blocks(text:str, lang:str) -> list[str]: return re.findall(rf'^```{lang}\n(.*?)^```', text, flags=re.M | re.S)

def quick_start() -> list[str]:
    "The commands of the first bash block under '## Quick start'."
    section = README.split('\n## Quick start', 1)[1].split('\n## ', 1)[0]
    return [l.strip() for l in blocks(section, 'bash')[0].splitlines() if l.strip()]

# ---------------------------------------------------------------------------------------------- claims
CLAIM = re.compile(r'^(?P<expr>\S.*?)\s*#\s*->\s*(?P<expected>.+?)\s*$')

def python_blocks(text:str) -> list[dict]:
    "Each ```python block: its code, the README line its code starts on, and the ```output block after it (or None)."
    out = []
    for m in re.finditer(r'^```python\n(.*?)^```[ \t]*\n((?:[ \t]*\n)*```output\n(.*?)^```)?', text, flags=re.M | re.S):
        out.append(dict(code=m.group(1), line=text.count('\n', 0, m.start()) + 2, output=m.group(3)))
    return out

def instrument(code:str, first_line:int) -> tuple[str, int]:
    "`code` with each top-level `EXPR  # -> EXPECTED` line turned into a check call; and how many claims it holds."
    lines, n = code.splitlines(), 0
    for i, l in enumerate(lines):
        m = CLAIM.match(l)
        if not m: continue
        ast.parse(m['expr'], mode='eval'); ast.parse(m['expected'], mode='eval')   # a claim must be an expression
        lines[i] = f"_readme_check({first_line + i}, ({m['expr']}), {m['expected']!r}, globals())"
        n += 1
    return '\n'.join(lines) + '\n', n

PRELUDE = r'''
import math as _m, sys as _sys
from collections.abc import Mapping as _Mapping
_readme_failures = []
def _readme_same(a, e):
    if e is Ellipsis: return True
    if type(e).__name__ == 'ApproxScalar' or type(e).__module__.startswith('_pytest'): return a == e
    if hasattr(a, 'tolist') and not isinstance(e, str): a = a.tolist()   # numpy / torch arrays and scalars
    if isinstance(e, dict): return isinstance(a, _Mapping) and set(a) == set(e) and all(_readme_same(a[k], e[k]) for k in e)
    if isinstance(e, (list, tuple)):
        try: a = list(a)
        except TypeError: return False
        return len(a) == len(e) and all(_readme_same(x, y) for x, y in zip(a, e))
    if isinstance(e, (int, float)) and not isinstance(e, bool) and not isinstance(a, (bool, str)):
        try: return _m.isclose(float(a), e, rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError): return False
    return a == e
def _readme_check(line, actual, expected_src, g):
    import pytest
    expected = eval(expected_src, {**g, 'approx': pytest.approx})
    if not _readme_same(actual, expected):
        _readme_failures.append(f'README line {line}: got {actual!r}, the README says {expected_src}')
    return actual
'''
EPILOGUE = r'''
if _readme_failures:
    import json as _json
    with open('readme_failures.json', 'w') as _f: _json.dump(_readme_failures, _f)
    _sys.exit(3)
'''
MARK = '\x1eREADME BLOCK {}\x1e'

def program(text:str) -> tuple[str, int]:
    "One script running every python block of `text` in turn (a marker on stdout before each), and the number of claims."
    parts, n = [PRELUDE], 0
    for k, b in enumerate(python_blocks(text)):
        code, c = instrument(b['code'], b['line'])
        parts += [f'print({MARK.format(k)!r}, flush=True)', code]; n += c
    return '\n'.join(parts + [EPILOGUE]), n

def output_matches(actual:str, expected:str) -> bool:
    "`actual` (a block's stdout) fits `expected`: line by line, `...` any text, a line of only `...` any number of lines."
    def rx(l): return re.compile('.*'.join(map(re.escape, l.rstrip().split('...'))) + r'\Z')
    exp, act = expected.rstrip('\n').splitlines(), actual.rstrip('\n').splitlines()
    memo = {}
    def fit(i, j):
        if (i, j) not in memo:
            if i == len(exp): r = j == len(act)
            elif exp[i].strip() == '...': r = fit(i + 1, j) or (j < len(act) and fit(i, j + 1))
            else: r = j < len(act) and bool(rx(exp[i]).match(act[j].rstrip())) and fit(i + 1, j + 1)
            memo[i, j] = r
        return memo[i, j]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * (len(exp) + len(act)) + 100))
    return fit(0, 0)

def run_readme(text:str, cwd:Path, timeout=1200) -> list[str]:
    "Run `text`'s python blocks in one fresh interpreter in `cwd`; the problems found (an error, a claim, an output)."
    code, _ = program(text)
    (cwd/'readme.py').write_text(code)
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1',   # headless; one thread on a shared CPU
           'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}   # this checkout's fastopts
    r = subprocess.run([sys.executable, 'readme.py'], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode not in (0, 3): return [f'the blocks failed (exit {r.returncode}):\n{r.stderr[-4000:]}']
    problems = json.loads((cwd/'readme_failures.json').read_text()) if r.returncode == 3 else []
    outs = re.split('\x1eREADME BLOCK \\d+\x1e\n', r.stdout)[1:]
    for b, out in zip(python_blocks(text), outs):
        if b['output'] is not None and not output_matches(out, b['output']):
            problems.append(f"README line {b['line']}: the block printed\n{out}\nnot the ```output block after it:\n{b['output']}")
    return problems

def test_readme_python_blocks_run(tmp_path):
    "Every ```python block, top to bottom, in one fresh interpreter started in an empty folder; its claims hold."
    assert len(blocks(README, 'python')) >= 3
    assert len(python_blocks(README)) == len(blocks(README, 'python'))
    problems = run_readme(README, tmp_path)
    assert not problems, '\n'.join(problems)

# the checker itself: it must be able to fail
FAKE = '''text
```python
import numpy as np
x = np.zeros((100, 1))
x.shape              # -> (100, 1)
{'lr': [0.005], 'mom': np.array([0.9])}, 7   # -> ({'lr': [0.005], 'mom': [0.9]}, ...)
1/3                  # -> approx(0.33, rel=0.02)
print('lr', 0.1); print('a line', x.sum())
```

```output
lr 0.1
...
```
'''

def test_claims_and_outputs_that_hold_pass(tmp_path):
    assert program(FAKE)[1] == 3
    assert run_readme(FAKE, tmp_path, timeout=120) == []

@pytest.mark.parametrize('old,new,says', [
    ('# -> (100, 1)', '# -> (100, 2)', 'README line 5: got (100, 1), the README says (100, 2)'),
    ("'lr': [0.005], 'mom': [0.9]}, ...)", "'lr': [0.0051], 'mom': [0.9]}, ...)", 'README line 6: got'),
    ('approx(0.33, rel=0.02)', 'approx(0.3, rel=0.02)', 'README line 7'),
    ('lr 0.1\n...', 'lr 0.2\n...', 'README line 3: the block printed'),
    ('lr 0.1\n...', 'lr 0.1', 'not the ```output block')])
def test_a_wrong_claim_or_output_fails(tmp_path, old, new, says):
    assert old in FAKE
    problems = run_readme(FAKE.replace(old, new), tmp_path, timeout=120)
    assert len(problems) == 1 and says in problems[0], problems

def test_output_matching():
    assert output_matches('a 1\nb\nc\n', 'a ...\n...\nc')
    assert output_matches('a\n', 'a\n...')
    assert not output_matches('a\nb\n', 'a')
    assert not output_matches('x a\n', 'a')

def test_quick_start_is_two_commands():
    "One command for the demo, one for the tests, each working from a fresh clone (it makes the venv it uses)."
    cmds = quick_start()
    assert len(cmds) == 2, cmds
    for c in cmds: assert c.startswith('python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && '), c
    assert cmds[0].endswith('.venv/bin/fastopts demo') and cmds[1].endswith('.venv/bin/python -m pytest'), cmds

def test_ci_runs_the_readme_test_command():
    "`.ci/run` ends with the README's test command verbatim, under `set -e`: its exit status is the suite's."
    ci = (ROOT/'.ci/run').read_text()
    assert 'set -euo pipefail' in ci
    assert ci.rstrip().splitlines()[-1].strip() == quick_start()[1], ci
