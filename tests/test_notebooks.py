"Execute every notebook in nbs/ with nbdev's own runner, skipping cells flagged with `tst_flags` (`--slow` runs `slow` cells too)."
import pytest
from pathlib import Path
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

def _flags():
    "nbdev's own reading of `tst_flags` in pyproject.toml (tomllib would need Python 3.11)."
    from nbdev.config import get_config
    return str(get_config(ROOT).tst_flags).split()

def test_found_notebooks(): assert len(NBS) >= 2, NBS

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb, request):
    skip = _flags()
    if request.config.getoption('--slow'): skip = [f for f in skip if f != 'slow']
    ok, secs = run_nb(nb, skip_flags=skip, basepath=ROOT, showerr=True)
    assert ok, f'{nb.name} failed (see the captured error above)'
