# Every target makes its own virtual environment first, so a fresh clone needs only python3 >= 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-fast check fmt e2e bench clean install-system

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# Debian's cloud-init for tests/e2e/test_cloudinit.py (run under /usr/bin/python3) and nft
	@# for the nftables examples' check: installed where apt-get is there and we are root (CI),
	@# skipped quietly elsewhere (the tests then skip, saying why); cloud-init is disabled first,
	@# so that it never acts on this machine itself.
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled; \
	  if ! dpkg-query -W -f='$${Status}' cloud-init 2>/dev/null | grep -q 'ok installed' || \
	     ! command -v nft >/dev/null 2>&1; then \
	    echo "apt-get install cloud-init nftables (for the end-to-end and nftables tests)"; \
	    log=$$(mktemp); \
	    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	           DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	             cloud-init nftables; } >"$$log" 2>&1; then \
	      tail -n 20 "$$log"; echo "warning: cloud-init/nftables not installed; their tests skip"; \
	    fi; \
	    rm -f "$$log"; \
	  fi; \
	fi
	touch $(STAMP)

install: $(STAMP)  ## editable install with dev tools, in .venv

run: $(STAMP)  ## run the daemon on the embedded issuer, listening on 127.0.0.1:8169
	$(BIN)/imdsd run --config config/imdsd.dev.toml

test: $(STAMP)  ## the whole suite, with branch coverage enforced
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

test-fast: $(STAMP)  ## the inner loop: every test not marked slow (make test remains the gate)
	$(BIN)/pytest -q -m "not slow and not external_service"

e2e: $(STAMP)  ## only the end-to-end tests (real daemon process + botocore)
	$(BIN)/pytest tests/e2e

bench: $(STAMP)  ## request-path throughput beside a bare-aiohttp baseline measured in the same run
	$(BIN)/python -m tests.bench

check: $(STAMP)  ## format check, lint, strict typing
	$(BIN)/ruff format --check imdsd tests
	$(BIN)/ruff check imdsd tests
	$(BIN)/mypy

fmt: $(STAMP)  ## rewrite: format + autofix
	$(BIN)/ruff format imdsd tests
	$(BIN)/ruff check --fix imdsd tests

install-system:  ## production install: venv in /opt/imdsd/VERSION, unit, user (DESTDIR= for a staging root)
	PYTHON=$(PYTHON) DESTDIR=$(DESTDIR) sh systemd/install-system.sh

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
