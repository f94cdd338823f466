"""Render the book to a static HTML site that reads offline.

Hand-written tool (not exported from a chapter).

    python -m lrn_lib.site [--out _build/html]

Writes, in book.toml order:

* ``index.html``, the front page: the README's introduction and its sections on what the
  book teaches, its two commands, setup, reading and exercises (parsed from README.md at
  build time, so the README stays the one source of that text), then the chapter table
  (book.toml's chapters with their expected CPU and GPU minutes, and what each builds from
  the README's table), then how to cite. Relative links of that text point to the
  repository, and its images are copied into the site.
* one page per written chapter, rendered from the chapter's executed notebook by
  nbconvert's ``HTMLExporter`` with its JupyterLab template: code highlighted by Pygments,
  figures embedded as PNG data with alt text ("Figure N of chapter NN", then the figure's
  title where its cell sets one), previous/contents/next bars, and links to download the
  notebook (a copy in ``notebooks/``), view its source and open it in Colab, built from
  book.toml's ``repository``. The book's machinery is hidden: ``# NBVAL_...`` and ``#| ...``
  lines are dropped from the rendered code, and a jupytext header cell, if any, is left out
  (the committed notebook is not changed).

Every page has a sidebar (``lrn_lib/site_assets/book.css`` and ``book.js``) with a search
box, every chapter (the current page highlighted) and the current page's sections linked to
their anchors; on a narrow screen it folds behind a menu button. Search runs in the browser
over ``_static/search-index.js``, written at build time: one entry per section of every page
(title, page, anchor and its first words), loaded by a ``<script>`` tag so that it works
from ``file://``.

Math is typeset in the reader's browser by a local copy of MathJax (TeX input, SVG
output, one self-contained script: no fonts or other files to fetch) that the site ships
in ``_static/``; display equations scroll sideways rather than shrink on a narrow screen.
No page loads anything from the network. The build needs nbconvert (a dependency of the
book, which brings mistune and BeautifulSoup) and, the first time only, ``npm`` on the PATH
with access to the npm registry: ``npm pack mathjax@3.2.2`` (``MATHJAX_VERSION``) fetches
the package, and its script is cached in ``_build/cache/`` for later builds.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources as package_files
from pathlib import Path

import mistune
import nbformat
from bs4 import BeautifulSoup, SoupStrainer
from jinja2 import DictLoader, Environment, select_autoescape
from markupsafe import Markup
from nbconvert import HTMLExporter

from lrn_lib.book import Book, BookError, Chapter, load_book

MATHJAX_VERSION = "3.2.2"
MATHJAX_SCRIPT = "es5/tex-svg-full.js"  # the TeX-to-SVG bundle: everything in one file
MATHJAX_URL = "_static/mathjax/tex-svg-full.js"  # where the site keeps it, relative to a page
STATIC = "_static"  # the site's folder of scripts, styles and README images
ASSETS = ("book.css", "book.js")  # lrn_lib/site_assets/, copied into STATIC
SEARCH_INDEX = f"{STATIC}/search-index.js"
NOTEBOOKS = "notebooks"  # the site's folder of downloadable notebooks

# The README's sections on the front page, in order, around the chapter table.
FRONT_SECTIONS = ("What you will learn", "The two commands", "Setup", "How to read", "How to do the exercises")
FRONT_CLOSING = ("How to cite",)
FRONT_TABLE = "Chapters"  # the README section whose table says what each chapter builds

# Lines of a code cell that serve the book's tools, not the reader: nbval's cell markers
# and the export directives (``#| export lrn_lib.softmax``).
MACHINERY_LINE = re.compile(r"^\s*(# NBVAL_[A-Z_]+|#\|.*)\s*$")
# The title a figure's cell gives it: the first plain string literal (not an f-string) passed to a title call.
FIGURE_TITLE = re.compile(r"""(?:suptitle|set_title|plt\.title)\(\s*(["'])(.+?)(?<!\\)\1""")
DISPLAY_MATH = re.compile(r"\$\$.+?\$\$", re.DOTALL)
INLINE_DOLLAR = re.compile(r"(?<!\\)\$")  # an inline-math delimiter: a dollar sign not escaped
SECTION_TEXT_CHARS = 180  # how much of a section's text the search index keeps
FRONT_LABEL = "About the book"  # the front page's name in the sidebar and in search results
SIDEBAR_SLOT = "<!-- book-sidebar -->"  # where a chapter page's sidebar goes once its sections are known

# The chapter page: JupyterLab's template with the CDN scripts (require.js, mermaid, MathJax)
# replaced by the local MathJax, figures given alt text, the sidebar, navigation bars and
# the notebook's links around the notebook.
CHAPTER_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- macro book_nav(nav) -%}
<nav class="book-nav">
  <span class="prev">{% if nav.prev %}<a rel="prev" href="{{ nav.prev.href }}">&larr; {{ nav.prev.label }}</a>{% endif %}</span>
  <span class="contents"><a href="index.html" title="{{ nav.book_title }}">Contents</a></span>
  <span class="next">{% if nav.next %}<a rel="next" href="{{ nav.next.href }}">{{ nav.next.label }} &rarr;</a>{% endif %}</span>
</nav>
{%- endmacro -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script>
window.MathJax = {
  tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']],
        processEscapes: true},
  svg: {fontCache: 'global'}
};
</script>
<script defer src="{{ resources.mathjax_url }}"></script>
{%- endblock html_head_js_mathjax -%}
{%- block html_head_css -%}
<link rel="stylesheet" href="{{ resources.book.static }}/book.css">
{%- endblock html_head_css -%}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
     alt="{{ output | get_metadata('alt', 'image/png') | escape_html }}">
</div>
{%- endblock data_png %}
{%- block body_header -%}
<body class="jp-Notebook book-page" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
""" + SIDEBAR_SLOT + """
<div class="book-content">
{{ book_nav(resources.book.nav) }}
<p class="page-links">
  <a class="download" href="{{ resources.book.links.download }}" download>Download notebook</a>
  <a class="source" href="{{ resources.book.links.source }}">View source</a>
  <a class="colab" href="{{ resources.book.links.colab }}">Open in Colab</a>
  <span class="colab-setup">(in Colab, run <code>{{ resources.book.links.colab_setup }}</code> first)</span>
</p>
<main>
{%- endblock body_header -%}
{% block body_footer %}
</main>
{{ book_nav(resources.book.nav) }}
</div>
<script src="{{ resources.book.search_index }}"></script>
<script src="{{ resources.book.static }}/book.js"></script>
</body>
{% endblock body_footer %}
"""

# The sidebar of every page: search, then the chapters, the current page's sections under it.
SIDEBAR_TEMPLATE = """<button class="sidebar-toggle" type="button" aria-controls="book-sidebar" aria-expanded="false">
  Menu</button>
<nav id="book-sidebar" class="book-sidebar" aria-label="Chapters and sections">
  <a class="book-title" href="index.html">{{ book_title }}</a>
  <div class="book-search" role="search">
    <input id="book-search" type="search" placeholder="Search the book" aria-label="Search the book"
           autocomplete="off">
    <ol id="book-search-results" class="book-search-results" hidden></ol>
  </div>
  <ol class="toc">
  {%- for entry in entries %}
    <li{% if entry.current %} class="current"{% endif %}>
      {%- if entry.href %}<a href="{{ entry.href }}"{% if entry.current %} aria-current="page"{% endif %}>
      {%- else %}<span class="planned">{% endif %}
      {%- if entry.id %}<span class="chapter-id">{{ entry.id }}</span> {% endif %}{{ entry.title }}
      {%- if entry.href %}</a>{% else %}</span>{% endif %}
      {%- if entry.current and sections %}
      <ol class="sections">
        {%- for section in sections %}
        <li class="level-{{ section.level }}"><a href="#{{ section.anchor }}">{{ section.title }}</a></li>
        {%- endfor %}
      </ol>
      {%- endif %}
    </li>
  {%- endfor %}
  </ol>
</nav>
"""

INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{{ book.title }}</title>
<link rel="stylesheet" href="{{ static }}/book.css">
</head>
<body class="book-page front-page">
{{ sidebar }}
<div class="book-content">
<main class="front">
<h1 id="{{ title_anchor }}">{{ book.title }}</h1>
<p class="authors">{{ authors }}</p>
{{ intro }}
{% for section in before %}
<section><h2 id="{{ section.anchor }}">{{ section.title }}</h2>
{{ section.html }}</section>
{% endfor %}
<section><h2 id="{{ table_anchor }}">{{ table_title }}</h2>
<table id="chapters">
<thead><tr><th>id</th><th>chapter</th><th>what it builds</th>
  <th title="expected minutes on the CPU profile">CPU min</th>
  <th title="expected minutes on the GPU profile">GPU min</th></tr></thead>
<tbody>
{% for row in rows %}
<tr class="{{ row.status }}" data-chapter="{{ row.id }}">
  <td class="id">{{ row.id }}</td>
  <td>{% if row.href %}<a href="{{ row.href }}">{{ row.title }}</a>
      {%- else %}{{ row.title }} <span class="status">({{ row.status }})</span>{% endif %}</td>
  <td>{{ row.builds }}</td>
  <td class="minutes cpu">{{ row.cpu }}</td>
  <td class="minutes gpu">{{ row.gpu }}</td>
</tr>
{% endfor %}
</tbody>
</table></section>
{% for section in after %}
<section><h2 id="{{ section.anchor }}">{{ section.title }}</h2>
{{ section.html }}</section>
{% endfor %}
</main>
</div>
<script src="{{ search_index }}"></script>
<script src="{{ static }}/book.js"></script>
</body>
</html>
"""

TEMPLATES = Environment(loader=DictLoader({"index.html": INDEX_TEMPLATE, "sidebar.html": SIDEBAR_TEMPLATE}),
                        autoescape=select_autoescape(["html"]))
MARKDOWN = mistune.create_markdown(plugins=["table"])


class SiteError(BookError):
    """A problem with building the site that a person can act on."""


@dataclass(frozen=True)
class Link:
    """A link to a chapter page: where it points and what it says."""

    href: str
    label: str


@dataclass(frozen=True)
class Section:
    """A heading of a page, as the sidebar and the search index know it."""

    title: str
    anchor: str  # the heading's id
    level: int  # 1 for the page's title, 2 for its sections, 3 for their parts
    text: str = ""  # the first words under the heading


@dataclass(frozen=True)
class ReadmeSection:
    """A ``## `` section of the README, rendered for the front page."""

    title: str
    anchor: str
    html: Markup


# ---------------------------------------------------------------- names and links

def page_name(chapter: Chapter) -> str:
    """The file name of a chapter's page, from its notebook (``01_softmax.html``)."""
    return chapter.notebook.with_suffix(".html").name


def chapter_link(chapter: Chapter | None) -> Link | None:
    """The link to a chapter's page, or None where there is no chapter."""
    if chapter is None:
        return None
    return Link(href=page_name(chapter), label=f"{chapter.id} {chapter.title}")


def repository_url(book: Book) -> str:
    """book.toml's ``repository``, without a trailing slash."""
    if not book.repository:
        raise SiteError('book.toml needs a top-level `repository = "https://github.com/OWNER/NAME"`: '
                        "the site links each chapter's source and Colab page from it")
    return book.repository.rstrip("/")


def blob_url(book: Book, path: Path) -> str:
    """The repository's page of a file of the book (on the main branch)."""
    return f"{repository_url(book)}/blob/main/{path.relative_to(book.root).as_posix()}"


def colab_url(book: Book, notebook: Path) -> str:
    """The Colab address that opens a notebook of the book's GitHub repository."""
    repository = repository_url(book)
    github = "https://github.com/"
    if not repository.startswith(github):
        raise SiteError(f"Colab opens notebooks from GitHub, and book.toml's repository is {repository}")
    return f"https://colab.research.google.com/github/{repository[len(github):]}/blob/main/" \
           f"{notebook.relative_to(book.root).as_posix()}"


def colab_setup(book: Book) -> str:
    """The first cell a Colab reader runs: it installs the book's library, which every chapter imports."""
    return f"!pip install git+{repository_url(book)}"


def slug(title: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


# ---------------------------------------------------------------- MathJax

def cached_mathjax(root: Path) -> Path:
    """Where the fetched MathJax script is kept: ``_build/cache/`` of the repository at ``root``."""
    return root / "_build" / "cache" / f"mathjax-{MATHJAX_VERSION}" / Path(MATHJAX_SCRIPT).name


def fetch_mathjax(root: Path) -> Path:
    """The local MathJax script, fetched once with ``npm pack`` into the cache."""
    script = cached_mathjax(root)
    if script.is_file():
        return script
    npm = shutil.which("npm")
    if npm is None:
        raise SiteError(f"the site needs MathJax {MATHJAX_VERSION} from the npm registry, and npm is not "
                        "on the PATH: install Node.js and npm, then build again")
    with tempfile.TemporaryDirectory() as tmp:
        command = [npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--pack-destination", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise SiteError(f"`npm pack mathjax@{MATHJAX_VERSION}` got no answer in 5 minutes") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise SiteError(f"`npm pack mathjax@{MATHJAX_VERSION}` failed: {result.stderr.strip()}")
        with tarfile.open(tarballs[0]) as tar:
            data = tar.extractfile(f"package/{MATHJAX_SCRIPT}").read()
    script.parent.mkdir(parents=True, exist_ok=True)
    partial = script.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(script)
    return script


# ---------------------------------------------------------------- the reader's notebook

def is_jupytext_header(cell) -> bool:
    """Whether a cell is a jupytext header (a ``---`` block of ``jupyter:`` metadata)."""
    text = cell.source.lstrip()
    return cell.cell_type in ("raw", "markdown") and text.startswith("---") and "jupyter:" in text


def without_machinery(source: str) -> str:
    """A code cell's source without the lines that serve the book's tools."""
    return "\n".join(line for line in source.split("\n") if not MACHINERY_LINE.match(line)).strip("\n")


def figure_alt(chapter: Chapter, number: int, source: str) -> str:
    """The alt text of a chapter's ``number``-th figure: its number, then the title its cell sets, if any."""
    alt = f"Figure {number} of chapter {chapter.id}"
    match = FIGURE_TITLE.search(source)
    title = " ".join(match.group(2).replace("\\n", " ").split()) if match else ""
    if title and "{" not in title:  # a template's title has holes: leave it out
        alt += ": " + title
    return alt


def reader_notebook(chapter: Chapter):
    """The chapter's executed notebook as the reader sees it: machinery lines and any jupytext
    header cell left out, every PNG figure given alt text. The file itself is not changed."""
    nb = nbformat.read(chapter.notebook, as_version=4)
    nb.cells = [cell for cell in nb.cells if not is_jupytext_header(cell)]
    figures = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            if "image/png" in output.get("data", {}):
                figures += 1
                output.setdefault("metadata", {}).setdefault("image/png", {})["alt"] = \
                    figure_alt(chapter, figures, cell.source)
        cell.source = without_machinery(cell.source)
    nb.cells = [cell for cell in nb.cells if cell.cell_type != "code" or cell.source or cell.outputs]
    return nb


# ---------------------------------------------------------------- sections and the sidebar

def snippet(text: str, limit: int = SECTION_TEXT_CHARS) -> str:
    """The first ``limit`` characters of a text, display equations left out, whitespace folded,
    cut at a word and never inside inline math (the search results typeset it)."""
    text = " ".join(DISPLAY_MATH.sub(" ", text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    if len(INLINE_DOLLAR.findall(cut)) % 2:
        cut = cut[:[m.start() for m in INLINE_DOLLAR.finditer(cut)][-1]].rstrip()
    return cut + " ..."


def page_sections(html: str) -> list[Section]:
    """The headings of a rendered page that carry an id (nbconvert gives one to every
    Markdown heading), each with the first words of the paragraphs under it."""
    soup = BeautifulSoup(html, "html.parser", parse_only=SoupStrainer(["h1", "h2", "h3", "p", "li"]))
    sections: list[Section] = []
    texts: list[list[str]] = []
    for element in soup.find_all(recursive=False):
        if element.name in ("h1", "h2", "h3") and element.get("id"):
            for link in element.select("a.anchor-link"):
                link.decompose()
            sections.append(Section(element.get_text(" ", strip=True), element["id"], int(element.name[1])))
            texts.append([])
        elif texts and element.name in ("p", "li"):
            texts[-1].append(element.get_text(" ", strip=True))
    return [Section(s.title, s.anchor, s.level, snippet(" ".join(t))) for s, t in zip(sections, texts)]


def sidebar(book: Book, current: str, sections: list[Section]) -> Markup:
    """The sidebar of the page ``current`` (a file name): the front page and every chapter,
    the current one highlighted with its sections (below the page title) under it."""
    entries = [{"id": "", "title": FRONT_LABEL, "href": "index.html", "current": current == "index.html"}]
    entries += [{"id": c.id, "title": c.title, "href": page_name(c) if c.written else None,
                 "current": current == page_name(c)} for c in book.chapters]
    shown = [s for s in sections if s.level > 1]
    return Markup(TEMPLATES.get_template("sidebar.html").render(book_title=book.title, entries=entries,
                                                                sections=shown))


# ---------------------------------------------------------------- chapter pages

def make_exporter() -> HTMLExporter:
    """nbconvert's HTML exporter with the JupyterLab template, the local MathJax and the book's frame."""
    return HTMLExporter(template_name="lab", template_file="book_chapter.html.j2",
                        extra_loaders=[DictLoader({"book_chapter.html.j2": CHAPTER_TEMPLATE})],
                        mathjax_url=MATHJAX_URL)


def render_chapter(exporter: HTMLExporter, book: Book, chapter: Chapter, prev: Chapter | None,
                   next_: Chapter | None) -> tuple[str, list[Section]]:
    """The HTML page of one written chapter, rendered from its executed notebook, and its sections."""
    nav = {"prev": chapter_link(prev), "next": chapter_link(next_), "book_title": book.title}
    links = {"download": f"{NOTEBOOKS}/{chapter.notebook.name}", "source": blob_url(book, chapter.source),
             "colab": colab_url(book, chapter.notebook), "colab_setup": colab_setup(book)}
    resources = {"metadata": {"name": f"{chapter.id} {chapter.title} | {book.title}"},
                 "book": {"nav": nav, "links": links, "static": STATIC, "search_index": SEARCH_INDEX}}
    html, _ = exporter.from_notebook_node(reader_notebook(chapter), resources=resources)
    sections = page_sections(html)
    return html.replace(SIDEBAR_SLOT, sidebar(book, page_name(chapter), sections), 1), sections


# ---------------------------------------------------------------- the front page

def markdown_sections(text: str) -> tuple[str, dict[str, str]]:
    """(the Markdown before the first ``## `` heading without the ``# `` title, {heading: its
    Markdown}); lines inside fenced code blocks are never headings."""
    intro: list[str] = []
    sections: dict[str, list[str]] = {}
    body, fenced = intro, False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            body = sections.setdefault(line[3:].strip(), [])
            continue
        elif not fenced and body is intro and line.startswith("# "):
            continue  # the title line
        body.append(line)
    return "\n".join(intro), {title: "\n".join(lines) for title, lines in sections.items()}


def site_markup(book: Book, markdown: str, out: Path) -> Markup:
    """README Markdown as HTML for the site: relative links point to the repository, and
    relative images are copied into the site's ``_static/``."""
    soup = BeautifulSoup(MARKDOWN(markdown), "html.parser")
    for link in soup.find_all("a", href=True):
        if not re.match(r"[a-z]+:|#", link["href"]):
            link["href"] = blob_url(book, book.root / link["href"])
    for image in soup.find_all("img", src=True):
        if not re.match(r"[a-z]+:", image["src"]):
            target = Path(STATIC) / "readme" / image["src"]
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(book.root / image["src"], out / target)
            image["src"] = target.as_posix()
    return Markup(str(soup))


def readme_sections(book: Book, sections: dict[str, str], titles: tuple[str, ...], out: Path) -> list[ReadmeSection]:
    """The README's sections of these titles, rendered; SiteError names one the README lacks."""
    missing = [title for title in titles if title not in sections]
    if missing:
        raise SiteError(f"README.md has no `## {missing[0]}` section, which the site's front page shows "
                        "(lrn_lib/site.py, FRONT_SECTIONS)")
    return [ReadmeSection(title, slug(title), site_markup(book, sections[title], out)) for title in titles]


def chapter_builds(table: str) -> dict[str, str]:
    """Chapter id -> the "what it builds" cell of the README's chapter table."""
    rows = re.findall(r"^\| (\d\d) \|.+?\|.+?\| (.+?) \|", table, re.MULTILINE)
    return dict(rows)


def inline_markup(markdown: str) -> Markup:
    """One line of Markdown as inline HTML (no paragraph around it)."""
    html = MARKDOWN(markdown).strip()
    return Markup(html.removeprefix("<p>").removesuffix("</p>"))


def book_authors(book: Book) -> str:
    """The ``authors`` line of book.toml (empty if it has none)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((book.root / "book.toml").read_text()).get("authors", "")


def render_index(book: Book, out: Path) -> tuple[str, list[Section]]:
    """The front page, from README.md and book.toml, and its sections."""
    intro, sections = markdown_sections((book.root / "README.md").read_text(encoding="utf-8"))
    before = readme_sections(book, sections, FRONT_SECTIONS, out)
    after = readme_sections(book, sections, FRONT_CLOSING, out)
    builds = chapter_builds(sections.get(FRONT_TABLE, ""))
    rows = [{"id": c.id, "title": c.title, "status": c.status, "href": page_name(c) if c.written else None,
             "builds": inline_markup(builds.get(c.id, "")),
             "cpu": f"{c.minutes['cpu']:g}" if c.minutes and "cpu" in c.minutes else "",
             "gpu": f"{c.minutes['gpu']:g}" if c.minutes and "gpu" in c.minutes else ""}
            for c in book.chapters]
    page = {"book": book, "authors": book_authors(book), "intro": site_markup(book, intro, out),
            "before": before, "after": after, "rows": rows, "static": STATIC, "search_index": SEARCH_INDEX,
            "title_anchor": slug(book.title), "table_anchor": slug(FRONT_TABLE), "table_title": FRONT_TABLE}
    headings = [Section(book.title, slug(book.title), 1)]
    headings += [Section(s.title, s.anchor, 2) for s in before] + [Section(FRONT_TABLE, slug(FRONT_TABLE), 2)]
    headings += [Section(s.title, s.anchor, 2) for s in after]
    html = TEMPLATES.get_template("index.html").render(sidebar=sidebar(book, "index.html", headings), **page)
    found = {s.anchor: s for s in page_sections(html)}
    return html, [found.get(s.anchor, s) for s in headings]


# ---------------------------------------------------------------- search and static files

def search_index(pages: dict[str, tuple[str, list[Section]]]) -> str:
    """The search index as a script: ``window.BOOK_SEARCH_INDEX``, one entry per section of
    every page (page file name -> (page label, sections))."""
    entries = [{"page": page, "label": label, **asdict(section)}
               for page, (label, sections) in pages.items() for section in sections]
    return f"window.BOOK_SEARCH_INDEX = {json.dumps(entries, ensure_ascii=False, indent=0)};\n"


def copy_static(book: Book, out: Path) -> None:
    """Put MathJax and the site's style sheet and script into the site's ``_static/``."""
    mathjax = fetch_mathjax(book.root)
    (out / MATHJAX_URL).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mathjax, out / MATHJAX_URL)
    assets = package_files.files("lrn_lib") / "site_assets"
    for name in ASSETS:
        (out / STATIC / name).write_bytes((assets / name).read_bytes())


def build(book: Book, out: Path) -> list[Path]:
    """Write the site into ``out``; return the pages written, the index first."""
    written = [c for c in book.chapters if c.written]
    for chapter in written:
        if not chapter.notebook.is_file():
            raise SiteError(f"chapter {chapter.id}: {chapter.notebook.name} is missing: "
                            f"run `make book CHAPTERS={chapter.id}`")
    copy_static(book, out)
    (out / NOTEBOOKS).mkdir(parents=True, exist_ok=True)
    html, sections = render_index(book, out)
    pages = [out / "index.html"]
    pages[0].write_text(html, encoding="utf-8")
    indexed = {"index.html": (FRONT_LABEL, sections)}
    exporter = make_exporter()
    for i, chapter in enumerate(written):
        prev = written[i - 1] if i > 0 else None
        next_ = written[i + 1] if i + 1 < len(written) else None
        html, sections = render_chapter(exporter, book, chapter, prev, next_)
        pages.append(out / page_name(chapter))
        pages[-1].write_text(html, encoding="utf-8")
        shutil.copyfile(chapter.notebook, out / NOTEBOOKS / chapter.notebook.name)
        indexed[page_name(chapter)] = (f"{chapter.id} {chapter.title}", sections)
    (out / SEARCH_INDEX).write_text(search_index(indexed), encoding="utf-8")
    return pages


def main(argv: list[str] | None = None) -> int:
    """Build the site from the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lrn_lib.site", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the site (default: _build/html in the repository)")
    args = parser.parse_args(argv)
    try:
        book = load_book()
        out = args.out or book.root / "_build" / "html"
        pages = build(book, out)
    except BookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(pages) - 1} chapter page(s) and the index: open {pages[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
