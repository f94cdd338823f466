"""The rendered book, read the way a person reads it: built into a fresh folder, then opened
from disk in a real headless Chromium (Debian's chromium and chromedriver, through
selenium). Screenshots of the index and of a chapter go to _build/test-artifacts/."""
from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from lrn_lib import site
from lrn_lib.book import Chapter, load_book

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: pip install -e .[dev]")
from selenium.webdriver.common.by import By  # noqa: E402  (after the skip above)
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

BOOK = load_book(Path(__file__).resolve().parent.parent)
WRITTEN = [c for c in BOOK.chapters if c.written]
ARTIFACTS = BOOK.root / "_build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400"]
MATHJAX_CACHED = site.cached_mathjax(BOOK.root).is_file()

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
    """A headless Chromium with a fresh profile, its console log recorded."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """The SEVERE console entries logged since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


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
    assert "$$" not in driver.find_element(By.TAG_NAME, "main").text
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
