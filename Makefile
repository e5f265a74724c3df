# Two commands on a fresh machine (see README):
#   make demo   - set up .venv/ and serve the demo app (http://127.0.0.1:5006/demo)
#   make test   - set up .venv/ (+ headless Chromium for browser tests) and run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 5006

.PHONY: setup demo demo-build test test-fast test-cpu-both browser-deps bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m explorer.stages.jit  # numba kernels into the disk cache, once (~90 s)
	touch $@

# demo/ and demo.csv are committed; demo-build regenerates them from images the project makes.
demo: setup
	test -f demo.csv || $(MAKE) demo-build
	$(BIN)/bokeh serve demo --address 127.0.0.1 --port $(PORT) $(if $(CI),,--show) --args demo.csv

demo-build: setup
	$(BIN)/python src/make_demo.py

# Debian's chromium + chromium-driver drive the browser tests (root or sudo needed once).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

# The whole suite, with the CPU check forced to "no native bf16" (explorer.stages.models.cpu_runs_bf16);
# the tests marked cpu_check (precision/runtime choice, embedding, self-match search, the
# pipeline's model key) run twice in the same run, forced to each answer (tests/_cpucheck.py):
# a machine of either kind proves both. Two pytest-xdist workers, a test file per worker at a
# time (the files' module fixtures are built once), the longest files first (tests/conftest.py);
# `make test XDIST=` runs in one process.
# `make test-cpu-both`: the cpu_check tests alone, under both answers.
# docs/testing.md: how long it takes, EXPLORER_TEST_CPU=N for the tests that cost most CPU.
# Bytecode caches are written whatever the shell says (PYTHONDONTWRITEBYTECODE empty): with
# them off every server, CLI and build process the tests start compiles the package again and
# every worker re-rewrites the test modules' asserts (612 -> 742 CPU s for the suite).
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
TESTENV := EXPLORER_CPU_BF16=0 PYTHONDONTWRITEBYTECODE=

test: setup browser-deps
	$(TESTENV) $(BIN)/python -m pytest -ra $(XDIST) $(PYTEST_ARGS)

# `make test-fast`: the edit-and-check loop, without the browser tests and the ones marked
# slow (real service processes, a local Ray, the notebook, emulated bf16, the served apps)
test-fast: setup
	$(TESTENV) $(BIN)/python -m pytest -q -ra -m "not slow and not browser" $(XDIST) $(PYTEST_ARGS)

test-cpu-both: setup
	$(TESTENV) $(BIN)/python -m pytest -q -ra -m cpu_check $(XDIST) $(PYTEST_ARGS)

bench: setup
	for s in bench/*.py; do echo "== $$s"; $(BIN)/python $$s || exit 1; done
