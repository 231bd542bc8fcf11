"Reference tests for fastopts.lab.surfaces and fastopts.lab.viz: closed forms and torch.optim as independent references."
from functools import partial
import numpy as np, pytest, torch
from fastopts.lab.surfaces import SURFACES, Surface, bowl, rosenbrock, beale, himmelblau, saddle, trajectory
from fastopts.optimizer import SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion
from fastopts.lookahead import Lookahead

MINIMA = [(s, m) for s in SURFACES.values() for m in s.minima]

@pytest.mark.parametrize('s,m', MINIMA, ids=[f'{s.name}{m}' for s, m in MINIMA])
def test_minima_are_stationary_with_known_value(s, m):
    assert s(m).item() == pytest.approx(s.min_value, abs=1e-12)
    np.testing.assert_allclose(s.grad(m), 0., atol=1e-9)
    # a minimum, not a saddle: the value rises in every direction around it
    for a in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        assert s(np.array(m) + 1e-3 * np.array([np.cos(a), np.sin(a)])).item() > s.min_value

def test_saddle_point_is_a_saddle():
    assert saddle((0., 0.)).item() == 0.
    np.testing.assert_allclose(saddle.grad((0., 0.)), 0.)
    assert saddle((0.1, 0.)).item() > 0 > saddle((0., 0.1)).item()

@pytest.mark.parametrize('s', list(SURFACES.values()), ids=list(SURFACES))
def test_grid_evaluation_matches_pointwise(s):
    xy = torch.from_numpy(np.random.default_rng(0).uniform(-2, 2, (3, 4, 2)))
    z = s(xy)
    assert z.shape == (3, 4)
    for i in range(3):
        for j in range(4): assert z[i, j].item() == pytest.approx(s(xy[i, j]).item(), rel=1e-12)

@pytest.mark.parametrize('lr', [0.01, 0.05, 0.09])
def test_sgd_on_bowl_is_closed_form_gd(lr):
    n = 50
    path = trajectory(SGD, bowl, bowl.start, n, lr=lr)
    h = np.diag(bowl.hessian)
    np.testing.assert_allclose(path, (1 - lr * h) ** np.arange(n + 1)[:, None] * np.array(bowl.start), rtol=1e-10, atol=1e-14)

TORCH_PAIRS = [
    ('Adam', partial(Adam), partial(torch.optim.Adam), dict(lr=0.05)),
    ('SGD(mom)', partial(SGD, mom=0.9), partial(torch.optim.SGD, momentum=0.9), dict(lr=1e-3)),
    ('SGD(nesterov)', partial(SGD, mom=0.9, nesterov=True), partial(torch.optim.SGD, momentum=0.9, nesterov=True), dict(lr=1e-3)),
    ('RMSProp', partial(RMSProp, sqr_mom=0.9), partial(torch.optim.RMSprop, alpha=0.9, eps=1e-8), dict(lr=0.01)),
    ('RAdam', partial(RAdam), partial(torch.optim.RAdam), dict(lr=0.05)),
]

@pytest.mark.parametrize('name,ours,theirs,kw', TORCH_PAIRS, ids=[p[0] for p in TORCH_PAIRS])
@pytest.mark.parametrize('s', [rosenbrock, beale, himmelblau], ids=lambda s: s.name)
def test_paths_match_torch_optim(name, ours, theirs, kw, s):
    np.testing.assert_allclose(trajectory(ours, s, s.start, 100, **kw), trajectory(theirs, s, s.start, 100, **kw),
                               rtol=1e-6, atol=1e-9)

def test_noisy_paths_match_torch_too():
    kw = dict(lr=0.02, noise=3., seed=5)
    np.testing.assert_allclose(trajectory(Adam, beale, beale.start, 60, **kw), trajectory(torch.optim.Adam, beale, beale.start, 60, **kw), rtol=1e-6, atol=1e-9)

def test_adam_first_step_is_lr_per_coordinate():
    for start in [(-4.5, 1.5), (0.3, -2.), (1e-3, 5.)]:
        p = trajectory(Adam, bowl, start, 1, lr=0.2)
        g = bowl.hessian @ np.array(start)
        np.testing.assert_allclose(p[1] - p[0], -0.2 * g / (np.abs(g) + 1e-8), rtol=1e-10)

@pytest.mark.parametrize('opt_func', [SGD, Momentum, RMSProp, Adam, AdamW, RAdam, Lamb, Lion,
                                      lambda ps, lr: Lookahead(RAdam(ps, lr))])
def test_lr_zero_stays_put(opt_func):
    np.testing.assert_array_equal(trajectory(opt_func, himmelblau, (0.5, -1.), 15, lr=0., noise=1.), np.tile([0.5, -1.], (16, 1)))

def test_float32_path_close_to_float64():
    p64 = trajectory(Adam, beale, beale.start, 50, lr=0.01)
    p32 = trajectory(Adam, beale, beale.start, 50, lr=0.01, dtype=torch.float32)
    assert p32.dtype == np.float32
    np.testing.assert_allclose(p32, p64, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize('kw,match', [
    (dict(steps=-1), '`steps`'), (dict(start=(1.,)), '`start`'), (dict(noise=-0.5), '`noise`'),
    (dict(seed=1.5), '`seed`'), (dict(lr=float('inf')), '`lr`'), (dict(lr=None), '`lr`')])
def test_bad_input(kw, match):
    args = dict(opt_func=SGD, f=bowl, start=(0., 1.), steps=3, lr=0.1) | kw
    if args['lr'] is None: del args['lr']
    with pytest.raises(ValueError, match=match): trajectory(**args)

def test_ema_plot_lines_are_closed_form_emas():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from fastopts.lab.viz import plot_ema
    ys = np.random.default_rng(1).normal(size=30)
    ax = plot_ema(ys, betas=(0.3, 0.8), bias_correction=True)
    t = np.arange(1, 31)
    for line, b in zip(ax.lines, (0.3, 0.8)):
        ref = np.array([(1 - b) * sum(b ** (k - i) * ys[i - 1] for i in range(1, k + 1)) for k in t]) / (1 - b ** t)
        np.testing.assert_allclose(line.get_ydata(), ref, rtol=1e-10)
    plt.close('all')

def test_gif_frames(tmp_path):
    from PIL import Image
    from fastopts.lab.viz import animate_trajectories
    paths = {'GD': trajectory(SGD, bowl, bowl.start, 12, lr=0.05), 'Adam': trajectory(Adam, bowl, bowl.start, 12, lr=0.1)}
    gif = animate_trajectories(paths, bowl, tmp_path/'a.gif', frames=4, dpi=30)
    with Image.open(gif) as im: assert im.n_frames == 4
