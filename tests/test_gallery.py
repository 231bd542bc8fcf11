"""`fastopts viz` end to end (quick mode): the files it writes, read back with Pillow and an HTML parser; the GIFs'
legend colours; and the figure modules' independence from argument parsing and matplotlib's global backend."""
import ast, contextlib, io
from html.parser import HTMLParser
from pathlib import Path
import numpy as np, pytest
from matplotlib.colors import to_rgb
from PIL import Image, ImageSequence

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ('ema', 'batch', 'noisy', 'landscape', 'paths', 'saddle', 'decay', 'local', 'one_cycle', 'lr_find', 'schedule')

@pytest.fixture(scope='module')
def gallery(tmp_path_factory):
    from fastopts.cli import main
    out = tmp_path_factory.mktemp('viz')
    assert main(['viz', '--out', str(out), '--quick', '--frames', '4', '--dpi', '30', '--no-progress']) == 0
    return out

def _frames(path):
    with Image.open(path) as im: return [np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(im)]

class _Links(HTMLParser):
    def __init__(self): super().__init__(); self.src, self.href, self.captions = [], [], 0
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'img': self.src.append(a['src'])
        if tag == 'a': self.href.append(a['href'])
        if tag == 'figcaption': self.captions += 1

def test_every_topic_and_an_index_of_all(gallery):
    files = sorted(p.name for p in gallery.iterdir() if p.suffix in ('.png', '.gif'))
    for t in TOPICS: assert any(t in f for f in files), f'no file about {t!r} in {files}'
    assert sum(f.endswith('.png') for f in files) >= 16 and sum(f.endswith('.gif') for f in files) >= 3, files
    page = _Links(); page.feed((gallery/'index.html').read_text())
    assert sorted(page.src) == files and sorted(page.href) == files and page.captions == len(files)

def test_every_image_decodes_and_shows_something(gallery):
    for p in sorted(gallery.glob('*.png')) + sorted(gallery.glob('*.gif')):
        frames = _frames(p)
        assert len(frames) == (4 if p.suffix == '.gif' else 1), p.name
        for f in frames: assert f.shape[0] > 50 and f.shape[1] > 50 and np.ptp(f) > 100, p.name   # not blank

@pytest.mark.parametrize('name', ['paths_rosenbrock.gif', 'paths_rosenbrock_3d.gif', 'saddle_escape_3d.gif'])
def test_gif_legend_keeps_its_colours(gallery, name):
    "The legend (right of the axes) is the same in every frame and shows each optimizer's exact colour."
    from fastopts.lab.viz import PALETTE
    frames = _frames(gallery/name)
    legend = np.s_[:, int(0.75 * frames[0].shape[1]):]
    for f in frames[1:]: np.testing.assert_array_equal(f[legend], frames[0][legend])
    for k, c in PALETTE.items():
        exact = (np.abs(frames[0][legend].astype(float) - 255 * np.array(to_rgb(c))).max(-1) < 1).sum()
        assert exact >= 10, f'{name}: {k} {c} has {exact} exact pixels in the first frame'

@pytest.mark.parametrize('mod', ['viz', 'surfaces', 'fit_viz', 'landscape'])
def test_figure_modules_parse_no_arguments_and_keep_the_backend(mod):
    tree = ast.parse((ROOT/'fastopts'/'lab'/f'{mod}.py').read_text())
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or '').split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'argparse' not in imported
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ('use', 'switch_backend')]
    assert not uses, f'{mod}.py changes matplotlib backend at line {uses[0].lineno}'

# `fastopts viz` through the console script's `main`, in this process (the script itself, a fresh interpreter that
# exits 0 on --help and 2 with one line on a bad setting: tests/test_project.py)
def test_console_script_help():
    from fastopts.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e: main(['viz', '--help'])
    assert e.value.code == 0 and '--quick' in out.getvalue() and '--out' in out.getvalue(), out.getvalue()

def test_bad_option_is_one_clear_line(tmp_path):
    from fastopts.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main(['viz', '--out', str(tmp_path), '--surfaces', 'moon'])
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and '`surfaces`' in lines[0] and 'Traceback' not in err.getvalue(), err.getvalue()

def test_shown_notebooks_store_small_figures():
    "The notebooks GitHub should show keep their figures (nbdev-clean must not strip them), each a small PNG."
    import base64, json
    from fastopts.lab.gallery import SHOWN_NOTEBOOKS
    for name in SHOWN_NOTEBOOKS:
        nb = json.loads((ROOT/'nbs'/name).read_text())
        pngs = [base64.b64decode(''.join(o['data']['image/png'])) for c in nb['cells'] for o in c.get('outputs', [])
                if 'image/png' in o.get('data', {})]
        assert len(pngs) >= 3, f'{name} stores {len(pngs)} figures'
        assert max(map(len, pngs)) < 150_000, f'{name}: a figure of {max(map(len, pngs))} bytes'
    from nbdev.config import get_config
    assert not get_config(ROOT).get('clear_all', False)
