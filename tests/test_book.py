"""Checks of the built book (``pytest -m book``, after ``jupyter-book build -W -n --keep-going .``).

(a) every page of ``_toc.yml`` was built, and every link between built pages reaches its target;
(b) headless Chromium opens every chapter page: it loads, its figures are present and not broken,
    chapters 1-7 have at least one figure, no cell rendered an error; a screenshot of each chapter
    is written to ``_build/screenshots/<page>.png``;
(c) the notebook sources are committed without outputs and carry the Colab badge, the set-up cell
    and the profile cell (the same checks as ``test_notebooks_static.py``), and every cell that
    shows a figure carries its alt text in its metadata;
(d) every figure of a chapter page has alt text for screen readers.

Without a build these tests skip, except under CI (``CI`` set), where a missing build is a failure.
``ANCHOR_BOOK_BUILD`` points them at another build folder (default: ``_build`` in the repository).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import by_path
import pytest

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parent.parent
BUILD = Path(os.environ.get("ANCHOR_BOOK_BUILD", ROOT / "_build")).resolve()
HTML = BUILD / "html"
SCREENSHOTS = BUILD / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")
                or "/usr/bin/chromedriver")
# Chapters 1-7 teach with figures; chapter 8 may be tables only.
CHAPTERS_WITH_FIGURES = 7

static = by_path.load("tests/test_notebooks_static.py", "_nb_static")

CHAPTERS = static.chapter_files()


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> None:
    if _under_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def html() -> Path:
    if not (HTML / "index.html").is_file():
        _missing(f"no built book at {HTML}; run `jupyter-book build -W -n --keep-going .` first")
    return HTML


# --- (a) every page was built ------------------------------------------------------------------------

def test_every_toc_page_is_built(html):
    missing = [page for page in static.toc_files() if not (html / f"{page}.html").is_file()]
    assert not missing, f"pages in _toc.yml without a built HTML page: {missing}"
    assert (html / "genindex.html").is_file() and (html / "search.html").is_file()


def test_printed_output_wraps_instead_of_scrolling(html):
    """_static/outputs.css (long printed lines, mostly sentences, wrap at the column's edge)
    reaches the build and every chapter page links it."""
    css = (html / "_static" / "outputs.css").read_text(encoding="utf-8")
    assert "white-space: pre-wrap" in css and "div.output.stream pre" in css
    unlinked = [p for p in CHAPTERS if "_static/outputs.css" not in
                (html / "book" / f"{Path(p).stem}.html").read_text(encoding="utf-8")]
    assert not unlinked, f"chapter pages without outputs.css: {unlinked}"


def test_api_reference_documents_the_library(html):
    text = (html / "book" / "api.html").read_text(encoding="utf-8")
    for name in ("anchor_lib.attacks.pgd", "anchor_lib.losses.anchor_loss",
                 "anchor_lib.models.PreActResNet18"):
        assert f'id="{name}"' in text, f"the API reference has no entry for {name}"


class _LinksAndIds(HTMLParser):
    """The ``href`` of every link and every ``id`` (and old-style ``<a name>``) of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])


def test_internal_links_reach_their_targets(html):
    """Every link from one built page to another (the API's source pages included) lands on a
    page that exists and, when it names an anchor, on an element with that id."""
    from urllib.parse import unquote, urlsplit

    pages: dict[Path, _LinksAndIds] = {}
    for path in html.rglob("*.html"):
        parser = _LinksAndIds()
        parser.feed(path.read_text(encoding="utf-8"))
        pages[path.resolve()] = parser
    broken = []
    for path, parser in pages.items():
        for href in parser.hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if target.suffix != ".html":
                if not target.exists():
                    broken.append(f"{path.relative_to(html)}: {href} (no such file)")
                continue
            if target not in pages:
                broken.append(f"{path.relative_to(html)}: {href} (no such page)")
            elif parts.fragment and unquote(parts.fragment) not in pages[target].ids:
                broken.append(f"{path.relative_to(html)}: {href} (no such anchor)")
    assert not broken, f"{len(broken)} broken internal links, e.g.:\n" + "\n".join(broken[:10])


# --- (b) the pages in a real browser ----------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(html):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _missing(f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} "
                 "(apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="anchor-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic",
                 "--disable-extensions", "--window-size=1280,1600", "--hide-scrollbars",
                 # Offline by construction: external hosts (CDNs, the Colab badge) fail at once
                 # instead of waiting for a network that is not there.
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # the console's messages, for test_pages_log_no_script_error
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# The article body of the sphinx-book-theme page (not the navigation, not the header with its
# launch buttons). querySelector on a selector list returns the first match in document order,
# so the candidates are tried one after the other.
_FIND_MAIN = ("const main = document.querySelector('article.bd-article') || "
              "document.querySelector('main article') || document.querySelector('[role=main]');")

_IMAGES_JS = f"""
{_FIND_MAIN}
if (!main) return null;
return Array.from(main.querySelectorAll('img')).map(img => ({{
  src: img.getAttribute('src') || '', url: img.src, complete: img.complete,
  width: img.naturalWidth, height: img.naturalHeight}}));
"""

_ERRORS_JS = f"""
{_FIND_MAIN}
const out = [];
for (const el of main.querySelectorAll('.output.traceback, .output.error')) {{
  out.push('traceback: ' + el.innerText.slice(0, 300));
}}
for (const el of main.querySelectorAll('.output.stderr')) {{
  const t = el.innerText;
  if (/Traceback|Error/.test(t)) out.push('stderr: ' + t.slice(0, 300));
}}
for (const el of main.querySelectorAll('.system-message, .problematic')) {{
  out.push('docutils: ' + el.innerText.slice(0, 300));
}}
return out;
"""


def _local(image: dict) -> bool:
    return image["url"].startswith("file:")


def _open(driver, path: Path) -> None:
    driver.get(path.as_uri())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if driver.execute_script("return document.readyState") == "complete":
            images = driver.execute_script(_IMAGES_JS) or []
            if all(img["complete"] for img in images if _local(img)):
                return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not finish loading within 30 s")


def _screenshot(driver, page: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / f"{Path(page).name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight") or 1600
    driver.set_window_size(1280, max(800, min(int(height), 12000)))
    try:
        driver.save_screenshot(str(target))
    finally:
        driver.set_window_size(1280, 1600)
    return target


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_renders_in_chromium(browser, html, page):
    path = html / f"{page}.html"
    assert path.is_file(), f"{page} was not built"
    _open(browser, path)

    title = browser.title.strip()
    assert title and "404" not in title, f"{page}: page has no title ({title!r})"
    heading = browser.execute_script(f"{_FIND_MAIN} const h = main && main.querySelector('h1');"
                                     "return h ? h.innerText : null;")
    assert heading, f"{page}: the article has no <h1> title"

    images = browser.execute_script(_IMAGES_JS)
    assert images is not None, f"{page}: no article element found"
    local = [img for img in images if _local(img)]
    broken = [img["src"] for img in local if img["width"] == 0 or img["height"] == 0]
    assert not broken, f"{page}: broken images (naturalWidth 0): {broken}"
    number = CHAPTERS.index(page) + 1
    if number <= CHAPTERS_WITH_FIGURES:
        assert local, f"{page}: chapter {number} must show at least one figure, found none"

    errors = browser.execute_script(_ERRORS_JS)
    assert not errors, f"{page}: rendered error output: {errors}"

    shot = _screenshot(browser, page)
    assert shot.is_file() and shot.stat().st_size > 10_000, f"{page}: screenshot failed"


@pytest.mark.parametrize("page", ["book/index", "book/colab", "book/api", "book/bibliography"])
def test_reference_page_renders_in_chromium(browser, html, page):
    _open(browser, html / f"{page}.html")
    assert browser.title.strip()
    errors = browser.execute_script(_ERRORS_JS)
    assert not errors, f"{page}: rendered error output: {errors}"


# What sticks out past a phone's screen: the page's widest elements outside the boxes that scroll
# on their own (tables, code blocks, outputs, formulas) and the theme's hidden side bars.
_WIDE_JS = """
const width = document.documentElement.clientWidth;
const own = '.table-wrapper, table, pre, .highlight, .cell_output, mjx-container, .math, '
          + '.bd-sidebar-primary, .bd-sidebar-secondary';
const out = [];
for (const el of document.querySelectorAll('article *')) {
  if (el.getBoundingClientRect().right > width + 1 && !el.closest(own)) {
    out.push(el.tagName.toLowerCase() + ': ' + (el.innerText || '').slice(0, 80));
  }
}
return [document.documentElement.scrollWidth, width, out.slice(0, 3)];
"""
PHONE_WIDTH = 390


def test_pages_fit_a_phone_screen(browser, html):
    """No page scrolls sideways as a whole at a phone's width: long inline names (paths, URLs,
    dotted API names), the API page's signatures, headings and field lists wrap (_static/code.css);
    tables and code blocks scroll inside their own boxes."""
    wide = []
    browser.set_window_size(PHONE_WIDTH, 900)
    try:
        for page in static.toc_files():
            _open(browser, html / f"{page}.html")
            page_width, screen, culprits = browser.execute_script(_WIDE_JS)
            if page_width > screen + 1:
                wide.append(f"{page}: {page_width} px wide on a {screen}-px screen, e.g. {culprits}")
    finally:
        browser.set_window_size(1280, 1600)
    assert not wide, "pages wider than a phone's screen:\n" + "\n".join(wide)


# Every block of code in the article (highlight-ipython3 in cells, highlight-python in the
# solutions; printed output is not code and wraps), the folded ones opened, with the columns it
# shows: its width over one character's width in its own font.
_CODE_JS = f"""
{_FIND_MAIN}
for (const d of main.querySelectorAll('details')) d.open = true;
for (const el of main.querySelectorAll('.toggle-hidden')) el.classList.remove('toggle-hidden');
const out = [];
for (const pre of main.querySelectorAll('div[class^="highlight-"] pre')) {{
  const probe = document.createElement('span');
  probe.textContent = 'x'.repeat(100);
  pre.appendChild(probe);
  const char = probe.getBoundingClientRect().width / 100;
  probe.remove();
  const style = getComputedStyle(pre);
  const inner = pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  out.push([pre.scrollWidth > pre.clientWidth + 1, Math.floor(inner / char),
            pre.innerText.split('\\n').find(l => l.length * char > inner) || '']);
}}
return out;
"""


def test_code_fits_a_laptop_screen(browser, html):
    """At a 1280-px window no code block of the book scrolls sideways (the learner sees every
    line whole: cells, folded cells, solutions, commands in the text), and a chapter's code
    column shows at least book/ruff.toml's line length."""
    limit = static.code_columns()
    wide, narrow = [], []
    for page in static.toc_files():
        _open(browser, html / f"{page}.html")
        blocks = browser.execute_script(_CODE_JS)
        if page not in CHAPTERS:
            wide += [f"{page}: {line[:60]!r}" for scrolls, _, line in blocks if scrolls]
            continue
        assert blocks, f"{page}: no code blocks found"
        wide += [f"{page}: {line[:60]!r}" for scrolls, _, line in blocks if scrolls]
        narrow += [f"{page}: {columns}" for _, columns, _ in blocks if columns < limit]
    assert not narrow, f"code columns narrower than {limit} at 1280 px: {sorted(set(narrow))}"
    assert not wide, "code blocks that scroll sideways at 1280 px:\n" + "\n".join(wide)


def test_bibliography_lists_the_cited_papers(html):
    text = (html / "book" / "bibliography.html").read_text(encoding="utf-8").lower()
    for title in ("Towards deep learning models resistant to adversarial attacks",
                  "Supervised contrastive learning", "Integrating adversarial training"):
        assert title.lower() in text, f"the bibliography does not list {title!r}"


def _text(fragment: str) -> str:
    """An HTML fragment's text: tags removed, white space collapsed."""
    return " ".join(re.sub(r"<[^>]+>", "", fragment).split())


def test_bibliography_labels_read_as_the_citations(html):
    """A citation "[Madry et al., 2018]" leads to the entry labelled "Madry et al., 2018"
    (_ext/author_year_labels.py), not to one labelled with pybtex's key "MMS+18"."""
    bib = (html / "book" / "bibliography.html").read_text(encoding="utf-8")
    labels = {m.group(1): _text(m.group(2)) for m in re.finditer(
        r'<div class="citation" id="([^"]+)"[^>]*>\s*<span class="label">'
        r'<span class="fn-bracket">\[</span>(.*?)<span class="fn-bracket">\]</span>', bib, re.S)}
    assert labels, "no labelled entries found on the bibliography page"
    cited, wrong = 0, []
    for page in CHAPTERS:
        text = (html / f"{page}.html").read_text(encoding="utf-8")
        for m in re.finditer(r'<a class="reference internal" href="bibliography\.html#([^"]+)"'
                             r'[^>]*>(.*?)</a>', text, re.S):
            cited += 1
            if _text(m.group(2)) != labels.get(m.group(1)):
                wrong.append(f"{page}: [{_text(m.group(2))}] leads to [{labels.get(m.group(1))}]")
    assert cited >= 20, f"only {cited} citations found in the chapters"
    assert not wrong, f"{len(wrong)} citations whose entry has another label, e.g. {wrong[:5]}"


# --- (c) the notebook sources ------------------------------------------------------------------------

@pytest.mark.parametrize("page", CHAPTERS)
def test_notebook_source_is_clean_and_runnable_in_colab(page):
    static.check_no_outputs(page)
    static.check_colab_badge(page)
    static.check_setup_and_profile_cells(page)


# A figure's alt text: one or two sentences on what it shows, set in its code cell's metadata as
# {"mystnb": {"image": {"alt": "..."}}}; MyST-NB gives it to every image output of the cell.
ALT_LENGTH = (40, 400)
# A caption names the figure and says what to look for: a sentence or two.
CAPTION_LENGTH = (60, 400)


def _figure_text_problems(page: str, key: str, name: str, length: tuple[int, int]) -> list[str]:
    """What is wrong with ``mystnb.<key>`` of each figure cell of ``page`` (a code cell that
    calls ``plt.show()``, how every figure of the book is drawn): missing, or its length
    outside ``length``."""
    problems = []
    for index, cell in enumerate(static.load_notebook(page).cells):
        if cell.cell_type != "code" or "plt.show()" not in cell.source:
            continue
        section, field = key.split(".")
        text = cell.metadata.get("mystnb", {}).get(section, {}).get(field)
        where = f"cell {index} (id {cell.get('id')})"
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: no metadata mystnb.{key}")
        elif not length[0] <= len(text) <= length[1]:
            problems.append(f"{where}: {name} of {len(text)} characters, "
                            f"expected {length[0]}-{length[1]}")
        elif key == "figure.caption" and text.strip() == \
                cell.metadata["mystnb"].get("image", {}).get("alt", "").strip():
            problems.append(f"{where}: the caption repeats the alt text")
    return problems


@pytest.mark.parametrize("page", CHAPTERS)
def test_every_figure_cell_has_alt_text(page):
    """Each figure cell carries alt text in its metadata: MyST-NB renders the cell's images with
    it (checked on the built pages by :func:`test_chapter_figures_have_alt_text`)."""
    problems = _figure_text_problems(page, "image.alt", "alt text", ALT_LENGTH)
    assert not problems, (f"{page}.ipynb: figure cells without usable alt text (set the cell's "
                          f"metadata {{\"mystnb\": {{\"image\": {{\"alt\": \"...\"}}}}}}): "
                          f"{problems}")


@pytest.mark.parametrize("page", CHAPTERS)
def test_every_figure_cell_has_a_caption(page):
    """Each figure cell also carries a caption (``mystnb.figure.caption``): MyST-NB then puts its
    images in a numbered <figure> with the caption under it, which says what is plotted and
    what to look for (checked on the built pages by :func:`test_chapter_figures_have_captions`)."""
    problems = _figure_text_problems(page, "figure.caption", "caption", CAPTION_LENGTH)
    assert not problems, f"{page}.ipynb: figure cells without a usable caption: {problems}"


@pytest.mark.parametrize("page", CHAPTERS)
def test_widgets_are_left_out_of_the_web_page(page):
    """A widget on the static page looks live but cannot redraw its picture without a kernel
    (the ε slider moved its readout while its image stayed at 8/255), and its image output had
    no alt text: every cell that shows an explorer of anchor_lib.widgets is tagged
    remove-output, and the prose beside it sends the reader to Colab or Jupyter."""
    nb = static.load_notebook(page)
    untagged = [f"cell {i} (id {cell.get('id')})" for i, cell in enumerate(nb.cells)
                if cell.cell_type == "code" and re.search(r"\w+_explorer\(", cell.source)
                and "remove-output" not in cell.metadata.get("tags", [])]
    assert not untagged, f"{page}.ipynb: explorer cells without the remove-output tag: {untagged}"


@pytest.mark.parametrize("page", CHAPTERS)
def test_built_pages_hold_no_widget(html, page):
    path = html / f"{page}.html"
    assert path.is_file(), f"{page} was not built"
    assert "application/vnd.jupyter.widget-view+json" not in path.read_text(encoding="utf-8"), (
        f"{page}.html shows a widget, which cannot work without a kernel")


class _InlineScripts(HTMLParser):
    """The text of every <script> of a page that has no src."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script" and not dict(attrs).get("src"):
            self._inside = True
            self.bodies.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.bodies[-1] += data


@pytest.mark.parametrize("page", [*CHAPTERS, "book/index", "book/api"])
def test_no_inline_script_is_repeated(html, page):
    """sphinx-thebe's configuration script came twice on every page, and its repeated
    ``const THEBE_JS_URL`` threw a SyntaxError in the console (_ext/unique_scripts.py)."""
    parser = _InlineScripts()
    parser.feed((html / f"{page}.html").read_text(encoding="utf-8"))
    repeated = [body[:80] for body, count in Counter(b.strip() for b in parser.bodies).items()
                if body and count > 1]
    assert not repeated, f"{page}.html repeats inline scripts: {repeated}"


# Offline by construction (the browser fixture's resolver rules): a script or font from a CDN
# fails to load, which says nothing about the page's own scripts.
_OFFLINE = ("net::ERR_NAME_NOT_RESOLVED", "net::ERR_INTERNET_DISCONNECTED")


@pytest.mark.parametrize("page", [*CHAPTERS, "book/index", "book/api"])
def test_pages_log_no_script_error(browser, html, page):
    """No page logs an error to the browser's console but the CDNs it cannot reach offline: the
    repeated ``const THEBE_JS_URL`` logged "Uncaught SyntaxError" on every page."""
    browser.get_log("browser")                    # drop what the pages before this one logged
    _open(browser, html / f"{page}.html")
    errors = [entry["message"][:200] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and not any(o in entry["message"] for o in _OFFLINE)]
    assert not errors, f"{page}.html logs errors in the console: {errors}"


# --- (d) accessibility of the built pages -----------------------------------------------------------

class _Images(HTMLParser):
    """The attributes of every <img> of a page, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))


def _images(path: Path) -> list[dict[str, str | None]]:
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.images


def _is_figure(image: dict[str, str | None]) -> bool:
    """A figure: an image Sphinx copied into ``_images/`` (the notebooks' image outputs). Not the
    theme's icons and logos (``_static/``) nor the Colab badge (an external URL, with its alt)."""
    return "_images/" in (image.get("src") or "")


def _has_alt_text(image: dict[str, str | None]) -> bool:
    """Whether the alt text says something. Without one, docutils writes the image's URI as its
    alt, which a screen reader reads out as a file name: that counts as none."""
    alt, src = (image.get("alt") or "").strip(), image.get("src") or ""
    return bool(alt) and alt != src and Path(src).name not in alt


class _Figures(HTMLParser):
    """For every <img> of a page: whether it sits in a <figure>, and the text of that figure's
    <figcaption> (empty when it has none)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[dict[str, str | None], list[str]]] = []
        self._figures: list[list[str]] = []   # caption text of each open <figure>
        self._in_caption = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "figure":
            self._figures.append([])
        elif tag == "figcaption":
            self._in_caption += 1
        elif tag == "img":
            self.images.append((dict(attrs), self._figures[-1] if self._figures else None))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure" and self._figures:
            self._figures.pop()
        elif tag == "figcaption":
            self._in_caption -= 1

    def handle_data(self, data: str) -> None:
        if self._in_caption and self._figures:
            self._figures[-1].append(data)


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_figures_have_captions(html, page):
    parser = _Figures()
    parser.feed((html / f"{page}.html").read_text(encoding="utf-8"))
    parser.close()
    figures = [(img, caption) for img, caption in parser.images if _is_figure(img)]
    bare = [Path(img.get("src") or "").name for img, caption in figures
            if caption is None or not re.sub(r"Fig\.\s*[\d.]+", "", " ".join(caption)).strip()]
    assert not bare, (f"{page}.html: {len(bare)} of {len(figures)} figures without a caption "
                      f"(set mystnb.figure.caption in the metadata of the code cell that draws "
                      f"them): {bare}")


@pytest.mark.parametrize("page", CHAPTERS)
def test_chapter_figures_have_alt_text(html, page):
    path = html / f"{page}.html"
    assert path.is_file(), f"{page} was not built"
    figures = [img for img in _images(path) if _is_figure(img)]
    number = CHAPTERS.index(page) + 1
    if number <= CHAPTERS_WITH_FIGURES:
        assert figures, f"{page}: chapter {number} must show at least one figure, found none"
    missing = [Path(img.get("src") or "").name for img in figures if not _has_alt_text(img)]
    assert not missing, (f"{page}.html: {len(missing)} of {len(figures)} figures without alt text "
                         f"(set mystnb.image.alt in the metadata of the code cell that draws "
                         f"them): {missing}")
