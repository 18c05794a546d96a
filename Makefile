# make demo: install, then run the tiny 2-rank CPU agent-SFT demo with live metrics.
# make test: install (plus Debian's prometheus when root), then run the test suite.
# make lint: ruff format --check and ruff check (CI runs it before the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format prometheus bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	touch $@

install: $(STAMP)

# Real-server tests need prometheus, promtool and the Pushgateway: Debian packages, installed when root.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway >/dev/null; \
	  else echo "prometheus missing and not root: the real-server tests will be skipped"; fi; \
	fi

demo: install
	$(VENV)/bin/agent-obs demo

test: install prometheus
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .
