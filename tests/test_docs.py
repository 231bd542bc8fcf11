"`fastopts docs`: the site is built from the repository (no notebook executed), checked page by page, and shown in Chromium."
import contextlib, io, re, shutil, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The site of this repository, built once by `fastopts docs` run from the repository's root (with `--check`: no
    broken link), through the console script's `main` in this process (the script itself: tests/test_project.py)."""
    from fastopts.cli import main
    out, said = tmp_path_factory.mktemp('docs')/'site', io.StringIO()
    t0 = time.time()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        code = main(['docs', '--out', str(out), '--check'])
    assert code == 0, said.getvalue()[-3000:]
    print(f'docs built in {time.time() - t0:.1f} s: {said.getvalue().strip()}')
    return out

def test_a_page_per_notebook(site):
    assert (site/'index.html').is_file()
    for nb in (ROOT/'nbs').glob('*.ipynb'): assert (site/f'{nb.stem}.html').is_file(), nb.name
    for md in (ROOT/'nbs').glob('*.md'): assert (site/f'{md.stem}.html').is_file(), md.name
    assert (site/'gallery.html').is_file()

def test_landing_page_is_the_readme(site):
    from fastopts.docs import page_text
    text = page_text(site/'index.html')
    readme = (ROOT/'README.md').read_text()
    for line in [l for l in readme.splitlines() if l.startswith('## ')][:6]: assert line[3:].replace('`', '') in text, line

def test_no_directive_is_shown(site):
    "No rendered page shows an nbdev `#|` line (a code line that starts with it, after the highlighter's markup is gone)."
    from fastopts.docs import page_text
    for page in site.glob('*.html'):
        bad = [l for l in page_text(page).splitlines() if re.match(r'\s*#\s*\|', l)]
        assert not bad, (page.name, bad[:3])

def test_notebook_pages_read_as_the_notebook(site):
    "Prose, code and stored figures: the viz notebook's page has its headings, its code, and its stored PNGs as files."
    from fastopts.docs import page_text
    text = page_text(site/'05a_viz.html')
    assert 'Exponential moving averages' in text and 'def plot_ema' in text
    imgs = re.findall(r'<img class="output" src="([^"]+)"', (site/'05a_viz.html').read_text())
    assert imgs and all((site/i).stat().st_size > 1000 for i in imgs), imgs

def test_every_public_name_has_an_api_entry(site):
    "Every name `from fastopts.all import *` gives has an entry (its id and its signature) in an API page."
    import fastopts.all as A
    from fastopts.docs import public_names
    names = public_names()
    assert len(names) > 50 and {'Adam', 'OneCycle', 'LRFinder', 'trajectory', 'sklearn_dls'} <= set(names)
    star = {}; exec('from fastopts.all import *', star)
    assert set(names) == set(star) - {'__builtins__'}, set(names) ^ (set(star) - {'__builtins__'})
    api = ''.join(p.read_text() for p in site.glob('api_*.html'))
    missing = [n for n in names if f'id="{n}"' not in api]
    assert not missing, missing
    # what show_doc shows: the signature with its defaults, the docstring
    assert re.search(r'<b>Adam</b>\(params.*lr.*mom.*0\.9.*sqr_mom.*0\.999', api), 'Adam signature'
    assert 'Learner.find_lr' in api

def test_every_internal_link_resolves(site):
    from fastopts.docs import broken_links
    assert broken_links(site) == []
    nav = re.findall(r'<nav>.*?</nav>', (site/'index.html').read_text(), re.S)[0]
    linked = set(re.findall(r'href="([^"#]+)"', nav))
    assert {p.name for p in site.glob('*.html')} <= linked, {p.name for p in site.glob('*.html')} - linked

def test_broken_links_fails_on_a_broken_link(site, tmp_path):
    from fastopts.docs import broken_links
    copy = tmp_path/'s'; shutil.copytree(site, copy)
    (copy/'01_optimizer.html').unlink()
    assert any(b.endswith('-> 01_optimizer.html') for b in broken_links(copy))

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')

@pytest.mark.skipif(CHROMIUM is None, reason='no chromium on PATH (apt-get install chromium): the screenshots of the docs site are not checked')
@pytest.mark.parametrize('page', ['index.html', '05a_viz.html', 'api_optimizer.html'])
def test_page_renders_in_chromium(site, page, tmp_path):
    "Headless Chromium renders the page, and its screenshot is not blank."
    from fastopts.lab.gallery import screenshot
    from fastopts.docs import not_blank
    png = screenshot(site/page, tmp_path/'shot.png', width=1300, height=1500, browser=CHROMIUM)
    assert png.stat().st_size > 20_000 and not_blank(png), page

def test_gallery_is_copied_in(tmp_path):
    "`--gallery DIR` copies a drawn gallery into the site; the gallery page shows its figures and links its index."
    import json
    from PIL import Image
    from fastopts.docs import build_docs, broken_links
    from fastopts.lab.gallery import Entry, write_index
    gal, nbs = tmp_path/'viz', tmp_path/'nbs'
    gal.mkdir(); nbs.mkdir()
    Image.new('RGB', (40, 30), 'red').save(gal/'ema_betas.png')
    write_index(gal, [Entry('ema_betas.png', 'EMAs', None)])
    (nbs/'00_x.ipynb').write_text(json.dumps({'cells': [{'cell_type': 'markdown', 'metadata': {}, 'source': '# x'}],
                                              'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    (tmp_path/'README.md').write_text('# r\n\nSee [x](nbs/00_x.ipynb).\n')
    site = build_docs(tmp_path/'site', nbs, tmp_path/'README.md', gallery=gal)
    page = (site/'gallery.html').read_text()
    assert 'href="gallery/index.html"' in page and 'src="gallery/ema_betas.png"' in page
    assert 'href="00_x.html"' in (site/'index.html').read_text()
    assert broken_links(site) == []
    with pytest.raises(ValueError, match='`gallery`'): build_docs(tmp_path/'site2', nbs, tmp_path/'README.md', gallery=nbs)
    with pytest.raises(ValueError, match='`out`'): build_docs(nbs, nbs, tmp_path/'README.md')   # never wipes a folder it did not write

def test_broken_links_checks_fragments(tmp_path):
    "A `#id` link, on the page itself or on another page, resolves only if that page has an element with that id."
    from fastopts.docs import broken_links
    (tmp_path/'a.html').write_text('<h2 id="here">x</h2><a href="#here">ok</a> <a href="#nowhere">bad</a> '
                                   '<a href="b.html#there">ok</a> <a href="b.html#gone">bad</a> <a href="b.html">ok</a>')
    (tmp_path/'b.html').write_text('<p id="there">y</p>')
    assert sorted(broken_links(tmp_path)) == ['a.html -> #nowhere', 'a.html -> b.html#gone']

def test_broken_links_refuses_links_that_leave_the_site(tmp_path):
    "A relative or absolute path to a file outside the site is broken once the site is moved; web and mail links are not checked."
    from fastopts.docs import broken_links
    site = tmp_path/'site'; site.mkdir()
    (tmp_path/'outside.html').write_text('<p>outside</p>')
    (site/'a.html').write_text(f'<a href="../outside.html">up</a> <img src="{tmp_path}/outside.html"> '
                               '<a href="https://example.org/x#y">web</a> <a href="mailto:a@b.c">mail</a>')
    assert sorted(broken_links(site)) == sorted(['a.html -> ../outside.html', f'a.html -> {tmp_path}/outside.html'])

def test_not_blank(tmp_path):
    "A flat page, or one with a few specks of many colours (under 1% of its pixels), is blank; a drawn page is not."
    from PIL import Image, ImageDraw
    from fastopts.docs import not_blank
    img = Image.new('RGB', (200, 200), 'white'); img.save(tmp_path/'white.png')
    assert not not_blank(tmp_path/'white.png')
    for i in range(30): img.putpixel((i, i), (8*i, 255 - 8*i, 4*i))   # 30 pixels of 0.075%, 30 colours
    img.save(tmp_path/'specks.png')
    assert not not_blank(tmp_path/'specks.png')
    d = ImageDraw.Draw(img)
    for i in range(12): d.rectangle([10 + 15*i, 50, 20 + 15*i, 60], fill=(20*i, 100, 255 - 20*i))   # 12 colours, 3% of the pixels
    img.save(tmp_path/'drawn.png')
    assert not_blank(tmp_path/'drawn.png')
