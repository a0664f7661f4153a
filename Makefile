# Set-up is part of every target: a fresh machine needs only `make test` or `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,numpy,demo,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/safeckpt demo

# With node on the PATH, the JavaScript reader's one npm package is installed from its lockfile
# (so tests/test_js_reader.py runs instead of skipping) and its own suite runs every conformance
# vector. Without node both are skipped.
test: $(STAMP)
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
		npm ci --prefix spec/readers/js --silent --prefer-offline --no-audit --no-fund; fi
	$(PY) -m pytest -q
	@if command -v node >/dev/null 2>&1 && [ -d spec/readers/js/node_modules/@msgpack/msgpack ]; then \
		out=$$(node --test spec/readers/js/ 2>&1) || { echo "$$out"; exit 1; }; \
		echo "$$out" | grep -E '^# (tests|pass|fail) '; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/compare_formats.py

clean:
	rm -rf $(VENV) checkpoints demo-output .pytest_cache
