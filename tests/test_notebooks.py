"Execute every notebook in nbs/ with nbdev's own runner, skipping cells flagged with `tst_flags` (`--slow` runs `slow` cells too)."
import tomllib, pytest
from pathlib import Path
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))

def _flags():
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())['tool']['nbdev']
    return cfg.get('tst_flags', 'notest').split()

def test_found_notebooks(): assert len(NBS) >= 2, NBS

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb, request):
    skip = _flags()
    if request.config.getoption('--slow'): skip = [f for f in skip if f != 'slow']
    ok, secs = run_nb(nb, skip_flags=skip, basepath=ROOT, showerr=True)
    assert ok, f'{nb.name} failed (see the captured error above)'
