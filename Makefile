# Quick start on a fresh Debian 12 machine:  make run   (boot the default guest)   make test   (run the tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test deps bench clean compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Byte-compile pyhv as an installed package would be: start-up time is one of pyhv's figures, and some
# environments set PYTHONDONTWRITEBYTECODE, which would make every start compile every module again.
compile: $(VENV)/.installed
	@$(PY) -m compileall -q pyhv

deps:
	scripts/install-deps

# The default guest: until direct Linux boot lands, a real-mode test guest that prints a banner, then the exit
# statistics.
run: compile
	@gcc --version >/dev/null 2>&1 || scripts/install-deps
	$(VENV)/bin/pyhv run --firmware "$$($(PY) tests/guests/build.py demo)" --stats

test: $(VENV)/.installed deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: compile deps
	$(PY) bench/exits.py
	$(PY) bench/pc_boot.py

clean:
	rm -rf $(VENV) build .pytest_cache
