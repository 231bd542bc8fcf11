import os, pytest

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run `#| slow` notebook cells and tests marked slow")

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; only with --slow")
    os.environ.setdefault("MPLBACKEND", "Agg")

def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"): return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords: item.add_marker(skip)

# The models in the tests are tiny: one torch thread per process is faster than two fighting over 2 cores
# (and pytest-xdist may run two processes).
import torch
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------- shared fixtures
DIGITS_N_ITER = 21   # digits: 1347 training items in batches of 64, the last partial batch dropped

@pytest.fixture(scope='session')
def digits_dls():
    "scikit-learn's bundled digits as fastai `DataLoaders` (`DIGITS_N_ITER` training batches of 64), made once."
    from fastopts.data import sklearn_dls
    return sklearn_dls('digits')

@pytest.fixture
def make_learner(digits_dls):
    "`make_learner(opt_func=fastai's Adam, **Learner kwargs)`: a seeded Learner on digits with an MLP, no bars, no log."
    import torch.nn.functional as F
    from fastai.learner import Learner
    from fastai.callback.progress import ProgressCallback
    from fastai.optimizer import Adam
    from fastcore.basics import noop
    from fastopts.data import dls_mlp
    def make(opt_func=Adam, **kwargs):
        torch.manual_seed(0)
        learn = Learner(digits_dls, dls_mlp(digits_dls), loss_func=F.cross_entropy, opt_func=opt_func, **kwargs)
        learn.remove_cb(ProgressCallback); learn.logger = noop
        return learn
    return make

@pytest.fixture
def repo_copy(tmp_path):
    "A copy of the working tree (uncommitted work included, build outputs and caches left out) under `tmp_path`."
    import shutil
    from pathlib import Path
    dest = tmp_path/'repo'
    shutil.copytree(Path(__file__).resolve().parents[1], dest, ignore=shutil.ignore_patterns(
        '.venv', '__pycache__', '*.egg-info', '.pytest_cache', '.hypothesis', 'fastopts-demo', 'fastopts-viz', 'build', 'dist'))
    return dest
