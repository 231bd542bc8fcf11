"The README as a new user meets it: its python blocks run as written, its quick start is two commands CI also runs."
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT/'README.md').read_text()

def blocks(text:str, lang:str) -> list[str]: return re.findall(rf'^```{lang}\n(.*?)^```', text, flags=re.M | re.S)

def quick_start() -> list[str]:
    "The commands of the first bash block under '## Quick start'."
    section = README.split('\n## Quick start', 1)[1].split('\n## ', 1)[0]
    return [l.strip() for l in blocks(section, 'bash')[0].splitlines() if l.strip()]

def test_readme_python_blocks_run(tmp_path):
    "Every ```python block, top to bottom, in one fresh interpreter started in an empty folder (nothing is written here)."
    code = blocks(README, 'python')
    assert len(code) >= 3, code
    (tmp_path/'readme.py').write_text('\n\n'.join(code))
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}   # headless; one thread on a shared CPU
    r = subprocess.run([sys.executable, 'readme.py'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]

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
