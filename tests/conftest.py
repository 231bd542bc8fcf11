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
