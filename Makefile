# Quick start on a fresh Debian 12 machine:  make run   (boot the default guest)   make test   (run the tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run demo test lint deps bench bench-models bench-iommu bench-snapshot bench-migration fuzz crash-test clean \
	compile

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

# The default guest: Debian's kernel (on PVM hosts a small kernel built from Debian's linux-source-6.1) with a
# busybox initramfs, booted to a shell on this terminal (C-a x quits). The first run downloads the Debian packages
# and builds the guest (a few minutes for the small kernel); later runs reuse the cache in ~/.cache/pyhv.
run: compile deps
	$(VENV)/bin/pyhv guest build
	$(VENV)/bin/pyhv run --stats

# The firmware demo: a real-mode test guest that prints a banner and what it sees of its machine, then resets.
demo: compile
	@gcc --version >/dev/null 2>&1 || scripts/install-deps
	$(VENV)/bin/pyhv run --firmware "$$($(PY) tests/guests/build.py demo)" --stats

test: $(VENV)/.installed deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The contracts CI holds the code to besides the tests: ruff (pyflakes, pycodestyle, bugbear; pyproject.toml) on
# everything, mypy on the embeddable API that users type-check their own code against.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pyhv tests bench scripts
	$(VENV)/bin/mypy --follow-imports=silent pyhv/api.py pyhv/__init__.py

bench: compile deps
	$(PY) bench/exits.py
	$(PY) bench/pc_boot.py

# The emulation models side by side (e1000, virtio with exits / ioeventfd / sidecore, vhost-user) on the same Linux
# TCP workload: bench/models.txt, .json and .svg. Needs root; a few minutes.
bench-models: compile deps
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/models.py

# The VT-d model's cost: per translation (host side) and virtio-blk IOPS/MB/s without an IOMMU, lazy and strict
bench-iommu: compile deps
	$(PY) bench/iommu.py

# Snapshot create time and size (128 and 512 MiB), restore to the first guest instruction against a cold start
bench-snapshot: compile
	$(PY) bench/snapshot.py

# Live migration of a 256 MiB small-Linux guest on loopback, idle and while writing: total time, downtime, bytes
bench-migration: compile
	$(PY) bench/migration.py

# Long fuzzing (tests/fuzz/targets.py) with atheris, coverage-guided: FUZZ_RUNS inputs or FUZZ_SECONDS per target;
# bench/fuzz.txt and .json report inputs, rates and findings (the suite runs every target briefly)
FUZZ_RUNS ?= 100000
FUZZ_SECONDS ?= 300
fuzz: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) bench/fuzz.py --runs $(FUZZ_RUNS) --seconds $(FUZZ_SECONDS)

# Crash consistency, long: 20 SIGKILLs of the small Linux guest mid-fsync loop (the suite runs 3)
crash-test: $(VENV)/.installed deps
	PYHV_CRASH_RUNS=20 $(PY) -m pytest -q tests/integration/test_disk_safety.py -k sigkill

clean:
	rm -rf $(VENV) build .pytest_cache
