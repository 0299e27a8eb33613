# `make demo` and `make test` are the whole set-up: each refreshes .venv, installs the
# project with its Debian data packages, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEB_STAMP := $(VENV)/.debs
DEBS   := dataset-fashion-mnist openclipart-png fonts-dejavu-core fonts-dejavu-extra \
          fonts-liberation fonts-freefont-ttf fonts-urw-base35
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench bench-quick pretrain venv debs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEB_STAMP): Makefile | $(VENV)/bin/python
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian data packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	touch $@

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP) $(DEB_STAMP)
debs: $(DEB_STAMP)

demo: venv
	$(VENV)/bin/petl demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# One report of every benchmark and the fidelity table: bench/results/<date>/report.md (+ JSON, PNGs).
# `make bench` is the full run (hours on 2 CPU cores, ViT-B/16 included); `make bench-quick` < 15 min.
bench: venv
	$(VENV)/bin/petl bench

bench-quick: venv
	$(VENV)/bin/petl bench --quick

# Rebuild the shipped backbone and its model card (about 25 min on 2 CPU cores).
pretrain: venv
	$(PY) -m jobs.pretrain
	$(PY) -m jobs.pretrain --card

clean:
	rm -rf $(VENV) .pytest_cache
