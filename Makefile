# Hand-written build file. `make book` runs the book, `make test` runs every test; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned for reproducible notebook outputs: the outputs committed in chapters/*.ipynb come from these versions.
PINS := "torch==2.13.0" "triton==3.6.0; sys_platform == 'linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')"
CHAPTERS ?=

.PHONY: book test check export setup clean html browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PINS)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]" $(PINS)
	touch $(STAMP)

setup: $(STAMP)

book: $(STAMP)
	$(PY) -m lrn_lib.book run $(CHAPTERS)

test: $(STAMP) browser
	$(PY) -m lrn_lib.book check
	$(PY) -m pytest -q tests
	LRN_DEVICE=cpu $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg chapters

# The browser test (tests/test_site.py) needs Debian's chromium and chromedriver: installed here as root.
browser:
	@if [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium/chromedriver not installed (needs root and apt-get): the browser test will be skipped"; fi

html: $(STAMP)
	$(PY) -m lrn_lib.site

check: $(STAMP)
	$(PY) -m lrn_lib.book check

export: $(STAMP)
	$(PY) -m lrn_lib.book export

clean:
	rm -rf $(VENV) _build .pytest_cache
