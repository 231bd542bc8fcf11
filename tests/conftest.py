import os, pytest

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run `#| slow` notebook cells and tests marked slow")

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; only with --slow")
    os.environ.setdefault("MPLBACKEND", "Agg")

def pytest_collect_file(file_path, parent):
    "tests/gpu_checks.py keeps its name (the README runs it as a script) and is collected too: its tests skip without CUDA."
    if file_path.name == 'gpu_checks.py' and not parent.session.isinitpath(file_path):   # (a path given: pytest's own)
        return pytest.Module.from_parent(parent, path=file_path)

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

@pytest.fixture(scope='session', autouse=True)
def no_models_folder_left():
    "fastai's `lr_find` and `save` write under `learn.path/'models'`: a test that leaves that folder in the repository fails the session."
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    before = {d for d in (root/'models', root/'nbs'/'models', root/'tests'/'models') if d.exists()}
    yield
    left = {d for d in (root/'models', root/'nbs'/'models', root/'tests'/'models') if d.exists()} - before
    assert not left, f"tests left {sorted(map(str, left))} behind: give the Learner `path=tmp_path`"

@pytest.fixture
def make_learner(digits_dls, tmp_path):
    """`make_learner(opt_func=fastai's Adam, **Learner kwargs)`: a seeded Learner on digits with an MLP, no bars, no log,
    its `path` under `tmp_path` (fastai's `lr_find` saves the model in `learn.path/'models'`)."""
    import torch.nn.functional as F
    from fastai.learner import Learner
    from fastai.callback.progress import ProgressCallback
    from fastai.optimizer import Adam
    from fastcore.basics import noop
    from fastopts.data import dls_mlp
    def make(opt_func=Adam, **kwargs):
        kwargs.setdefault('path', tmp_path)
        torch.manual_seed(0)
        learn = Learner(digits_dls, dls_mlp(digits_dls), loss_func=F.cross_entropy, opt_func=opt_func, **kwargs)
        learn.remove_cb(ProgressCallback); learn.logger = noop
        return learn
    return make

@pytest.fixture
def repo_copy(tmp_path):
    """A copy of the working tree (uncommitted work included; build outputs, caches and ignored files left out) under
    `tmp_path`, as a fresh git repository with everything committed. Not a copy of `.git`: in a `git worktree`, `.git`
    is a file pointing at the real repository, and git commands in the copy would change the real branch and index."""
    import shutil, subprocess
    from pathlib import Path
    root, dest = Path(__file__).resolve().parents[1], tmp_path/'repo'
    git = lambda *a, cwd: subprocess.run(['git', *a], cwd=cwd, capture_output=True, text=True, check=True).stdout
    files = git('ls-files', '-z', '--cached', '--others', '--exclude-standard', cwd=root).split('\0')
    for f in filter(None, files):
        if (root/f).is_file(): (dest/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(root/f, dest/f)
    git('init', '-q', cwd=dest); git('add', '-A', cwd=dest)
    git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '-m', 'snapshot', cwd=dest)
    return dest
