"""The rendered book, read the way a person reads it: built into a fresh folder, then opened
from disk in a real headless Chromium (Debian's chromium and chromedriver, through
selenium), on a desktop window and on a phone-sized one. Screenshots of the index and of a
chapter, wide and narrow, go to _build/test-artifacts/. The checks of what the files hold
(links, markers, alt text) read the built HTML with BeautifulSoup."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from bs4 import BeautifulSoup

from lrn_lib import site
from lrn_lib.book import Chapter, load_book

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: pip install -e .[dev]")
from selenium.webdriver.common.by import By  # noqa: E402  (after the skip above)
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BOOK = load_book(Path(__file__).resolve().parent.parent)
WRITTEN = [c for c in BOOK.chapters if c.written]
ARTIFACTS = BOOK.root / "_build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400"]
MATHJAX_CACHED = site.cached_mathjax(BOOK.root).is_file()
PHONE = (375, 800)  # the narrow viewport, CSS pixels
MARKERS = ("NBVAL_", "#| export", "#|")  # the book's machinery, never shown in a page's code

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="the browser test needs Debian's chromium and chromium-driver "
                              "(apt-get install chromium chromium-driver; `make test` does it as root)"),
    pytest.mark.skipif(shutil.which("npm") is None and not MATHJAX_CACHED,
                       reason="building the site needs npm once, to fetch MathJax"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The site, built into a fresh folder."""
    out = tmp_path_factory.mktemp("html")
    site.build(BOOK, out)
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile, its console log and its DevTools events
    (every request it makes) recorded."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """The SEVERE console entries logged since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def requested_urls(driver: WebDriver) -> list[str]:
    """The URLs of every request the browser sent (pages, scripts, styles, images, data:
    URIs) since the last call, from its DevTools log."""
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [event["params"]["request"]["url"] for event in events if event["method"] == "Network.requestWillBeSent"]


def wait_for_math(driver: WebDriver) -> None:
    """Block until MathJax has typeset the page; fail with its error if it could not."""
    outcome = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "MathJax.startup.promise.then(() => done('ok'), (err) => done(String(err)));")
    assert outcome == "ok", f"MathJax failed: {outcome}"


def expected_content(chapter: Chapter) -> tuple[int, int, bool]:
    """(figures, display equations, any math) in the chapter's notebook: its PNG outputs, its
    $$ blocks, and whether its text has any $ at all."""
    nb = nbformat.read(chapter.notebook, as_version=4)
    figures = sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                  for out in cell.outputs)
    markdown = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    return figures, len(re.findall(r"\$\$.+?\$\$", markdown, re.DOTALL)), "$" in markdown


def nav_target(driver: WebDriver, rel: str) -> str | None:
    """The page the navigation bar's ``prev`` or ``next`` link points to, or None."""
    links = driver.find_elements(By.CSS_SELECTOR, f"nav.book-nav a[rel={rel}]")
    return links[0].get_attribute("href").rsplit("/", 1)[-1] if links else None


def check_chapter_page(driver: WebDriver, chapter: Chapter, index: int) -> None:
    """The open page is the chapter's, with its figures, typeset math and navigation."""
    assert driver.current_url.endswith("/" + site.page_name(chapter))
    assert chapter.title in driver.title
    wait_for_math(driver)
    figures, display_equations, has_math = expected_content(chapter)
    widths = [img.get_property("naturalWidth") for img in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea img")]
    assert len(widths) == figures and all(w > 0 for w in widths), f"chapter {chapter.id}: figure widths {widths}"
    assert len(driver.find_elements(By.CSS_SELECTOR, "mjx-container[display='true']")) == display_equations
    assert bool(driver.find_elements(By.CSS_SELECTOR, "mjx-container svg")) == has_math
    assert not driver.find_elements(By.CSS_SELECTOR, "mjx-merror"), f"chapter {chapter.id}: a TeX error"
    assert "$$" not in driver.execute_script("return document.querySelector('main').innerText")
    assert driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .highlight span.k"), "no highlighted keywords"
    prev = site.page_name(WRITTEN[index - 1]) if index > 0 else None
    next_ = site.page_name(WRITTEN[index + 1]) if index + 1 < len(WRITTEN) else None
    assert (nav_target(driver, "prev"), nav_target(driver, "next")) == (prev, next_)
    assert console_errors(driver) == [], f"chapter {chapter.id}: console errors"


def test_the_site_reads_in_a_browser_from_the_index_through_every_chapter(built: Path, browser: WebDriver) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get((built / "index.html").as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == BOOK.title
    rows = browser.find_elements(By.CSS_SELECTOR, "#chapters tbody tr")
    assert [r.get_attribute("data-chapter") for r in rows] == [c.id for c in BOOK.chapters]
    for row, chapter in zip(rows, BOOK.chapters):
        assert chapter.title in row.text
        links = row.find_elements(By.TAG_NAME, "a")
        assert [a.get_attribute("href").rsplit("/", 1)[-1] for a in links] == \
            ([site.page_name(chapter)] if chapter.written else [])
    assert console_errors(browser) == [], "index: console errors"
    browser.save_screenshot(str(ARTIFACTS / "site-index.png"))

    browser.find_element(By.LINK_TEXT, WRITTEN[0].title).click()
    for index, chapter in enumerate(WRITTEN):
        check_chapter_page(browser, chapter, index)
        if index + 1 < len(WRITTEN):
            browser.find_element(By.CSS_SELECTOR, "nav.book-nav a[rel=next]").click()
    if len(WRITTEN) > 1:
        browser.find_element(By.CSS_SELECTOR, "nav.book-nav a[rel=prev]").click()
        assert browser.current_url.endswith("/" + site.page_name(WRITTEN[-2]))


def test_a_chapter_screenshot_shows_its_text_math_and_a_figure(built: Path, browser: WebDriver) -> None:
    chapter = next(c for c in WRITTEN if expected_content(c)[0] > 0 and expected_content(c)[2])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get((built / site.page_name(chapter)).as_uri())
    wait_for_math(browser)
    browser.save_screenshot(str(ARTIFACTS / f"site-chapter-{chapter.id}.png"))
    figure = browser.find_element(By.CSS_SELECTOR, ".jp-OutputArea img")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", figure)
    browser.save_screenshot(str(ARTIFACTS / f"site-chapter-{chapter.id}-figure.png"))
    assert console_errors(browser) == []


# ---------------------------------------------------------------- what the built files hold

def page_names() -> list[str]:
    """The site's pages: the index, then every written chapter."""
    return ["index.html"] + [site.page_name(c) for c in WRITTEN]


@pytest.fixture(scope="module")
def parsed(built: Path) -> dict[str, BeautifulSoup]:
    """Every page of the built site, parsed."""
    return {name: BeautifulSoup((built / name).read_text(encoding="utf-8"), "html.parser") for name in page_names()}


def is_external(ref: str) -> bool:
    """Whether a link or source names a scheme (``https:``, ``data:``) rather than a file of the site."""
    return re.match(r"[a-z][a-z0-9+.-]*:|//", ref) is not None


def test_no_internal_link_is_broken(built: Path, parsed: dict[str, BeautifulSoup]) -> None:
    ids = {name: {element["id"] for element in soup.find_all(id=True)} for name, soup in parsed.items()}
    checked = 0
    for name, soup in parsed.items():
        for element in soup.find_all(["a", "img", "script", "link"]):
            ref = element.get("href") or element.get("src")
            if not ref or is_external(ref):
                continue
            path, _, anchor = ref.partition("#")
            target = (built / unquote(path)) if path else built / name
            assert target.is_file(), f"{name}: {ref} points to no file of the site"
            if anchor:  # a browser tries the fragment as written, then percent-decoded
                assert {anchor, unquote(anchor)} & ids[target.name], f"{name}: {ref}: {target.name} has no such anchor"
            checked += 1
    assert checked > 50 * len(parsed), "too few links checked: are the sidebars there?"


def test_no_page_refers_to_the_network_except_by_its_links(parsed: dict[str, BeautifulSoup]) -> None:
    for name, soup in parsed.items():
        for element in soup.find_all(src=True):
            assert not re.match(r"https?:|//", element["src"]), f"{name} loads {element['src']}"
        for element in soup.find_all("link", href=True):
            assert not is_external(element["href"]), f"{name} loads {element['href']}"
        for style in soup.find_all("style"):
            assert not re.search(r"url\(\s*['\"]?(https?:)?//", style.get_text()), f"{name}: a style fetches a URL"


def test_the_books_machinery_is_hidden_from_the_rendered_code(parsed: dict[str, BeautifulSoup]) -> None:
    for chapter in WRITTEN:
        page = parsed[site.page_name(chapter)]
        code = "\n".join(area.get_text() for area in page.select(".jp-CodeCell .jp-InputArea"))
        assert code.strip(), f"chapter {chapter.id}: no code on the page"
        assert [m for m in MARKERS if m in code] == [], f"chapter {chapter.id}: markers shown"
        assert "NBVAL_" not in page.find("main").get_text()
    # the pages come from copies: the committed notebooks keep their markers
    assert any("# NBVAL_IGNORE_OUTPUT" in c.notebook.read_text() for c in WRITTEN)
    assert any('"#| export' in c.notebook.read_text() for c in WRITTEN)


def test_each_chapter_page_links_its_notebook_its_source_and_colab_with_its_install_line(
        built: Path, parsed: dict[str, BeautifulSoup]) -> None:
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", BOOK.repository)
    owner_name = urlsplit(BOOK.repository).path.strip("/")
    for chapter in WRITTEN:
        links = parsed[site.page_name(chapter)].select_one(".page-links")
        download, source, colab = (links.select_one(f"a.{kind}") for kind in ("download", "source", "colab"))
        assert download.has_attr("download") and download["href"] == f"notebooks/{chapter.notebook.name}"
        assert (built / download["href"]).read_bytes() == chapter.notebook.read_bytes()
        assert source["href"] == f"{BOOK.repository}/blob/main/chapters/{chapter.source.name}"
        assert colab["href"] == (f"https://colab.research.google.com/github/{owner_name}/blob/main/"
                                 f"chapters/{chapter.notebook.name}")
        assert [a.get_text() for a in (download, source, colab)] == ["Download notebook", "View source",
                                                                     "Open in Colab"]
        assert links.select_one(".colab-setup code").get_text() == f"!pip install git+{BOOK.repository}"


def test_every_figure_has_alt_text_naming_it(parsed: dict[str, BeautifulSoup]) -> None:
    titled = 0
    for chapter in WRITTEN:
        alts = [img.get("alt", "") for img in parsed[site.page_name(chapter)].select(".jp-OutputArea img")]
        assert len(alts) == expected_content(chapter)[0]
        for number, alt in enumerate(alts, start=1):
            assert re.fullmatch(rf"Figure {number} of chapter {chapter.id}(: \S.*)?", alt), alt
        titled += sum(": " in alt for alt in alts)
    assert titled > 0, "no figure's alt text carries the title its cell gives it"


# ---------------------------------------------------------------- what a reader sees

def test_the_front_page_shows_the_readme_introduction_and_the_chapters_with_run_times(
        built: Path, browser: WebDriver) -> None:
    browser.get((built / "index.html").as_uri())
    intro, _ = site.markdown_sections((BOOK.root / "README.md").read_text(encoding="utf-8"))
    first_sentence = intro.strip().split("\n\n")[0].split(". ")[0]
    main = browser.find_element(By.TAG_NAME, "main")
    assert first_sentence in main.text
    assert [h.text for h in main.find_elements(By.TAG_NAME, "h2")] == \
        [*site.FRONT_SECTIONS, site.FRONT_TABLE, *site.FRONT_CLOSING]
    figures = main.find_elements(By.TAG_NAME, "img")
    assert figures and all(img.get_property("naturalWidth") > 0 and img.get_attribute("alt") for img in figures)
    for row, chapter in zip(browser.find_elements(By.CSS_SELECTOR, "#chapters tbody tr"), BOOK.chapters):
        cells = row.find_elements(By.TAG_NAME, "td")
        assert [c.text for c in cells[3:]] == [f"{chapter.minutes['cpu']:g}", f"{chapter.minutes['gpu']:g}"]
        assert cells[2].text, f"chapter {chapter.id}: the table does not say what it builds"
    assert console_errors(browser) == []


def test_the_sidebar_lists_the_chapters_and_the_current_chapters_sections(built: Path, browser: WebDriver) -> None:
    chapter, other = WRITTEN[1], WRITTEN[-1]
    browser.get((built / site.page_name(chapter)).as_uri())
    entries = browser.find_elements(By.CSS_SELECTOR, "#book-sidebar .toc > li")
    assert len(entries) == len(BOOK.chapters) + 1  # the front page, then every chapter
    current = browser.find_elements(By.CSS_SELECTOR, "#book-sidebar .toc > li.current")
    assert len(current) == 1 and chapter.title in current[0].text
    headings = browser.find_elements(By.CSS_SELECTOR, "main h2[id], main h3[id]")
    sections = current[0].find_elements(By.CSS_SELECTOR, ".sections a")
    assert len(headings) > 3
    assert [a.get_dom_attribute("href") for a in sections] == ["#" + h.get_dom_attribute("id") for h in headings]
    sections[2].click()
    assert browser.current_url.endswith(site.page_name(chapter) + sections[2].get_dom_attribute("href"))

    browser.find_element(By.CSS_SELECTOR, f"#book-sidebar a[href='{site.page_name(other)}']").click()
    assert browser.current_url.endswith("/" + site.page_name(other))
    assert other.title in browser.find_element(By.CSS_SELECTOR, "#book-sidebar .toc > li.current").text
    assert console_errors(browser) == []


def test_search_finds_a_known_section_and_links_to_its_page_and_anchor(
        built: Path, browser: WebDriver, parsed: dict[str, BeautifulSoup]) -> None:
    chapter = WRITTEN[1]
    heading = parsed[site.page_name(chapter)].select("main h2[id]")[1]
    title = heading.get_text().rstrip("¶").strip()
    browser.get((built / "index.html").as_uri())
    browser.find_element(By.ID, "book-search").send_keys(title)
    results = browser.find_elements(By.CSS_SELECTOR, "#book-search-results a")
    assert results, f"no result for {title!r}"
    assert results[0].get_dom_attribute("href") == f"{site.page_name(chapter)}#{heading['id']}"
    assert title in results[0].text and chapter.title in results[0].text
    browser.find_element(By.ID, "book-search").send_keys(Keys.ENTER)
    assert unquote(browser.current_url).endswith(f"/{site.page_name(chapter)}#{heading['id']}")
    assert browser.find_element(By.ID, heading["id"]).is_displayed()

    browser.find_element(By.ID, "book-search").send_keys("zzzz no such words")
    assert browser.find_element(By.CSS_SELECTOR, "#book-search-results .empty").text == "No section matches."
    assert console_errors(browser) == []


PAGE_FACTS = """return {
  scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
  displayMath: Array.from(document.querySelectorAll("mjx-container[display='true']")).map(
    (box) => ({overflowX: getComputedStyle(box).overflowX, wider: box.scrollWidth > box.clientWidth}))
};"""


@pytest.fixture(scope="module")
def phone_visits(built: Path, browser: WebDriver) -> dict[str, dict]:
    """Every page opened in a phone-sized window (math typeset): its widths, the requests it
    made and its display equations' boxes. Screenshots of the index and of a chapter."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(*PHONE)
    facts = {}
    try:
        for name in page_names():
            requested_urls(browser)  # forget the requests of earlier pages
            browser.get((built / name).as_uri())
            if name != "index.html":
                wait_for_math(browser)
            facts[name] = browser.execute_script(PAGE_FACTS) | {"requests": requested_urls(browser)}
            if name in ("index.html", site.page_name(WRITTEN[min(4, len(WRITTEN) - 1)])):
                browser.save_screenshot(str(ARTIFACTS / f"site-phone-{Path(name).stem}.png"))
    finally:
        browser.set_window_size(1280, 1400)
    return facts


def test_search_results_typeset_the_math_of_their_snippets(built: Path, browser: WebDriver) -> None:
    index = (built / site.SEARCH_INDEX).read_text(encoding="utf-8")
    entries = json.loads(index[index.index("["):index.rindex("]") + 1])
    entry = next(e for e in entries if e["page"] != "index.html" and "$" in e["text"] and "$" not in e["title"])
    assert entry["text"].count("$") % 2 == 0, "a snippet cut inside inline math"
    browser.get((built / entry["page"]).as_uri())
    wait_for_math(browser)
    browser.find_element(By.ID, "book-search").send_keys(entry["title"])
    typeset = WebDriverWait(browser, 10).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "#book-search-results mjx-container svg"))
    assert typeset, f"no typeset math in the results for {entry['title']!r}"
    assert console_errors(browser) == []


def test_a_phone_screen_needs_no_sideways_scrolling_and_wide_equations_scroll(phone_visits: dict[str, dict]) -> None:
    for name, facts in phone_visits.items():
        assert facts["innerWidth"] <= PHONE[0]
        assert facts["scrollWidth"] <= facts["innerWidth"], f"{name} is wider than a phone screen"
        assert all(box["overflowX"] == "auto" for box in facts["displayMath"]), name
    assert any(box["wider"] for facts in phone_visits.values() for box in facts["displayMath"]), \
        "no display equation is wider than a phone: do equations still shrink to fit?"


def test_no_page_loads_anything_from_the_network(phone_visits: dict[str, dict]) -> None:
    for name, facts in phone_visits.items():
        assert any(url.endswith("/_static/book.css") for url in facts["requests"]), f"{name}: requests not seen"
        assert [url for url in facts["requests"] if not url.startswith(("file:", "data:"))] == [], name
