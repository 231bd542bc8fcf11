"Execute every notebook in nbs/ with nbdev's own runner, skipping cells flagged with `tst_flags` (`--slow` runs `slow` cells too)."
import pytest
from pathlib import Path
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

def _config():
    "nbdev's own reading of pyproject.toml (tomllib would need Python 3.11)."
    from nbdev.config import get_config
    return get_config(ROOT)

def _flags(): return str(_config().tst_flags).split()

def test_found_notebooks():
    "We run exactly the notebooks nbdev itself exports from (its own glob), and among them every module's source."
    from nbdev.doclinks import nbglob
    assert NBS == sorted(Path(p) for p in nbglob(_config().nbs_path))
    sources = set()
    for py in (ROOT/'fastopts').glob('*.py'):
        for line in py.read_text().splitlines()[:15]:
            if 'File to edit: ../nbs/' in line: sources.add(line.split('File to edit: ../nbs/')[1].strip().rstrip('.'))
    assert sources and sources <= {p.name for p in NBS}, sources - {p.name for p in NBS}

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb, request):
    skip = _flags()
    if request.config.getoption('--slow'): skip = [f for f in skip if f != 'slow']
    ok, secs = run_nb(nb, skip_flags=skip, basepath=ROOT, showerr=True)
    assert ok, f'{nb.name} failed (see the captured error above)'
