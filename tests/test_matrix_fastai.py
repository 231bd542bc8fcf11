"""Muon, SOAP and Adafactor as fastai `opt_func`s on scikit-learn's digits: a small CNN and an MLP, with a splitter,
`freeze_to` and `fit_one_cycle`; training lowers the loss and `learn.save(with_opt=True)` resumes bit for bit."""
import random, warnings
from functools import partial
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.schedule import *   # fit_one_cycle
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import params
from fastopts.data import dls_mlp
from fastopts.matrix import Muon, SOAP, Adafactor

@pytest.fixture
def digits(digits_dls):
    random.seed(0)
    return DataLoaders(*[dl.new(num_workers=0) for dl in digits_dls.loaders])

def cnn():
    "digits' 64 features as an 8x8 image: two convs, a batchnorm, a linear head."
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32*4*4, 10))

def body_head(m): return [params(m[:-1]), params(m[-1])]

def learner(dls, opt_func, model, seed=0, **kw):
    torch.manual_seed(seed)
    learn = Learner(dls, model(dls) if model is dls_mlp else model(), loss_func=CrossEntropyLossFlat(), opt_func=opt_func,
                    splitter=body_head, **kw)
    return learn

def fit(learn, *args, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(*args, **kw)

OPTS = {'muon': partial(Muon, adamw_lr_ratio=0.2), 'soap': SOAP, 'adafactor': Adafactor}   # in a Learner Muon's output layer takes AdamW (at lr*0.2)
LRS = {'muon': 0.05, 'soap': 3e-2, 'adafactor': 0.1}

@pytest.mark.parametrize('model', [cnn, dls_mlp], ids=['cnn', 'mlp'])
@pytest.mark.parametrize('name', list(OPTS))
def test_fit_one_cycle_with_freeze_trains_and_resumes(name, model, digits, tmp_path):
    learn = learner(digits, OPTS[name], model, path=tmp_path)
    learn.create_opt()
    if name == 'muon':   # the Learner's 2 layer groups stay 2; inside them hidden matrices take Muon, the rest and the output layer AdamW
        assert len(learn.opt.param_groups) == 2
        hidden = [p for m in learn.model[:-1] if isinstance(m, (nn.Conv2d, nn.Linear)) for p in [m.weight]]
        assert [learn.opt.routes[p] for p in learn.model.parameters()] == \
               ['muon' if any(p is q for q in hidden) else 'adamw' for p in learn.model.parameters()]
    body = [p for m in learn.model[:-1] if not isinstance(m, nn.BatchNorm2d) for p in m.parameters()]   # fastai trains frozen BNs
    body0, head0 = [p.detach().clone() for p in body], learn.model[-1].weight.detach().clone()
    learn.freeze_to(1)
    fit(learn, 1, LRS[name])
    assert all(torch.equal(a, b) for a, b in zip(body0, body))   # frozen body: not moved
    assert not torch.equal(head0, learn.model[-1].weight)
    learn.unfreeze()
    fit(learn, 2, slice(LRS[name]/10, LRS[name]))
    losses = [float(l) for l in learn.recorder.losses]
    n = len(losses)//3
    assert sum(losses[-n:])/n < 0.9*sum(losses[:n])/n, (losses[:n], losses[-n:])   # smoothed: the last third below the first
    assert not any(torch.equal(a, b) for a, b in zip(body0, body))
    learn.save('m', with_opt=True)
    fresh = learner(digits, OPTS[name], model, seed=1, path=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)   # "Could not load the optimizer state" must not happen
        fresh.load('m', with_opt=True)
    groups = lambda o: [{k: v for k, v in g.items() if k != 'params'} for g in o.param_groups]
    assert groups(fresh.opt) == groups(learn.opt)
    batches = [b for b, _ in zip(digits.train, range(3))]
    for l in (learn, fresh):   # both go on with the same batches: bit for bit
        l.model.train()
        for xb, yb in batches:
            F.cross_entropy(l.model(xb), yb).backward(); l.opt.step(); l.opt.zero_grad()
    for a, b in zip(learn.model.parameters(), fresh.model.parameters()): assert torch.equal(a, b)
