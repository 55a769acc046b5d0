# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench bench-peers browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,test]"
	touch $(STAMP)

# Browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else echo "chromium is missing: install Debian's chromium package for the browser tests"; fi; }

test: install browser lint
	$(PY) -m pytest -n 2

# Types are a gate: mypy --strict on the package, ruff on everything.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m mypy --strict src/offload tests/typecheck

# The photo site (examples/photos): site, workers and beat on http://$(HOST):$(PORT); Ctrl-C stops all.
# `make demo PORT=8080` serves it on another port (0: any free one).
HOST ?= 127.0.0.1
PORT ?= 8000
demo: install
	$(PY) -m examples.photos.run --host $(HOST) --port $(PORT)

bench: install
	$(PY) benchmarks/core.py

# The peers run in their own venv, benchmarks/.peers-venv, which peers.py creates (with this
# checkout of offload installed editable) and re-runs itself in: offload's dev venv is not needed.
bench-peers:
	$(PYTHON) benchmarks/peers.py

clean:
	rm -rf $(VENV) offload.db offload.db-* offload.db.notify var/photos
