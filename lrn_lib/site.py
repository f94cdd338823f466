"""Render the book to a static HTML site that reads offline.

Hand-written tool (not exported from a chapter).

    python -m lrn_lib.site [--out _build/html]

Writes ``index.html`` (the book's title and the chapter table of book.toml: written
chapters linked, planned ones listed) and one page per written chapter, in book.toml
order, rendered from the chapter's executed notebook by nbconvert's ``HTMLExporter`` with
its JupyterLab template: code highlighted by Pygments, figures embedded as PNG data, and a
previous/contents/next bar at the top and bottom of every chapter page.

Math is typeset in the reader's browser by a local copy of MathJax (TeX input, SVG
output, one self-contained script: no fonts or other files to fetch) that the site ships
in ``_static/``; no page loads anything from the network. The build needs nbconvert (a
dependency of the book) and, the first time only, ``npm`` on the PATH with access to the
npm registry: ``npm pack mathjax@3.2.2`` (``MATHJAX_VERSION``) fetches the package, and its
script is cached in ``_build/cache/`` for later builds.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from jinja2 import DictLoader, Environment, select_autoescape
from nbconvert import HTMLExporter

from lrn_lib.book import Book, BookError, Chapter, load_book

MATHJAX_VERSION = "3.2.2"
MATHJAX_SCRIPT = "es5/tex-svg-full.js"  # the TeX-to-SVG bundle: everything in one file
MATHJAX_URL = "_static/mathjax/tex-svg-full.js"  # where the site keeps it, relative to a page

NAV_CSS = """
nav.book-nav { display: flex; justify-content: space-between; gap: 1em; max-width: 1200px;
  margin: 0.5em auto; padding: 0.5em 1em; font: 15px/1.4 system-ui, sans-serif;
  border-top: 1px solid #ddd; border-bottom: 1px solid #ddd; }
nav.book-nav a { color: #1a5fb4; text-decoration: none; }
nav.book-nav a:hover { text-decoration: underline; }
nav.book-nav span { flex: 1; }
nav.book-nav .contents { text-align: center; }
nav.book-nav .next { text-align: right; }
"""

# The chapter page: JupyterLab's template with the CDN scripts (require.js, mermaid, MathJax)
# replaced by the local MathJax, and the navigation bar added above and below the notebook.
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
{% block extra_css %}<style type="text/css">{{ resources.book_nav.css }}</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ book_nav(resources.book_nav) }}
{%- endblock body_header -%}
{% block body_footer %}
{{ book_nav(resources.book_nav) }}
{{ super() }}
{% endblock body_footer %}
"""

INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{{ book.title }}</title>
<style>
body { max-width: 50em; margin: 2em auto; padding: 0 1em; font: 17px/1.5 system-ui, sans-serif; color: #222; }
h1 { font-size: 2em; margin-bottom: 0.2em; }
.authors { color: #555; margin-top: 0; }
table { border-collapse: collapse; width: 100%; margin-top: 1.5em; }
th, td { text-align: left; padding: 0.4em 0.8em; border-bottom: 1px solid #ddd; }
td.id { font-variant-numeric: tabular-nums; color: #555; width: 3em; }
a { color: #1a5fb4; text-decoration: none; }
a:hover { text-decoration: underline; }
.planned { color: #888; }
</style>
</head>
<body>
<h1>{{ book.title }}</h1>
<p class="authors">{{ authors }}</p>
<table id="chapters">
<thead><tr><th>id</th><th>chapter</th><th>status</th></tr></thead>
<tbody>
{% for row in rows %}
<tr class="{{ row.status }}" data-chapter="{{ row.id }}">
  <td class="id">{{ row.id }}</td>
  <td>{% if row.href %}<a href="{{ row.href }}">{{ row.title }}</a>{% else %}{{ row.title }}{% endif %}</td>
  <td>{{ row.status }}</td>
</tr>
{% endfor %}
</tbody>
</table>
</body>
</html>
"""


class SiteError(BookError):
    """A problem with building the site that a person can act on."""


@dataclass(frozen=True)
class Link:
    """A link to a chapter page: where it points and what it says."""

    href: str
    label: str


def page_name(chapter: Chapter) -> str:
    """The file name of a chapter's page, from its notebook (``01_softmax.html``)."""
    return chapter.notebook.with_suffix(".html").name


def chapter_link(chapter: Chapter | None) -> Link | None:
    """The link to a chapter's page, or None where there is no chapter."""
    if chapter is None:
        return None
    return Link(href=page_name(chapter), label=f"{chapter.id} {chapter.title}")


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


def make_exporter() -> HTMLExporter:
    """nbconvert's HTML exporter with the JupyterLab template, the local MathJax and the nav bar."""
    return HTMLExporter(template_name="lab", template_file="book_chapter.html.j2",
                        extra_loaders=[DictLoader({"book_chapter.html.j2": CHAPTER_TEMPLATE})],
                        mathjax_url=MATHJAX_URL)


def render_chapter(exporter: HTMLExporter, book: Book, chapter: Chapter, prev: Chapter | None,
                   next_: Chapter | None) -> str:
    """The HTML page of one written chapter, rendered from its executed notebook."""
    nb = nbformat.read(chapter.notebook, as_version=4)
    nav = {"prev": chapter_link(prev), "next": chapter_link(next_), "book_title": book.title, "css": NAV_CSS}
    resources = {"metadata": {"name": f"{chapter.id} {chapter.title} | {book.title}"}, "book_nav": nav}
    html, _ = exporter.from_notebook_node(nb, resources=resources)
    return html


def render_index(book: Book, authors: str) -> str:
    """The index page: the book's title and every chapter of book.toml, written ones linked."""
    env = Environment(loader=DictLoader({"index.html": INDEX_TEMPLATE}), autoescape=select_autoescape(["html"]))
    rows = [{"id": c.id, "title": c.title, "status": c.status, "href": page_name(c) if c.written else None}
            for c in book.chapters]
    return env.get_template("index.html").render(book=book, authors=authors, rows=rows)


def book_authors(book: Book) -> str:
    """The ``authors`` line of book.toml (empty if it has none)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((book.root / "book.toml").read_text()).get("authors", "")


def build(book: Book, out: Path) -> list[Path]:
    """Write the site into ``out``; return the pages written, the index first."""
    written = [c for c in book.chapters if c.written]
    for chapter in written:
        if not chapter.notebook.is_file():
            raise SiteError(f"chapter {chapter.id}: {chapter.notebook.name} is missing: "
                            f"run `make book CHAPTERS={chapter.id}`")
    mathjax = fetch_mathjax(book.root)
    (out / MATHJAX_URL).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mathjax, out / MATHJAX_URL)
    pages = [out / "index.html"]
    pages[0].write_text(render_index(book, book_authors(book)), encoding="utf-8")
    exporter = make_exporter()
    for i, chapter in enumerate(written):
        prev = written[i - 1] if i > 0 else None
        next_ = written[i + 1] if i + 1 < len(written) else None
        page = out / page_name(chapter)
        page.write_text(render_chapter(exporter, book, chapter, prev, next_), encoding="utf-8")
        pages.append(page)
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
