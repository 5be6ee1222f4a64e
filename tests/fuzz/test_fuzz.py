"""Every fuzz target (targets.py) for a bounded time in the test suite: the kept corpus first (seeds and the
reproducers of what fuzzing found, tests/fuzz/corpus/TARGET/), then hypothesis-generated inputs. The long runs are
`make fuzz` (bench/fuzz.py). PYHV_FUZZ_EXAMPLES sets the hypothesis inputs per target (default 150)."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targets import TARGETS, check, close_shared

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("PYHV_FUZZ_EXAMPLES", "150"))
INPUT_SECONDS = 20          # a hang, not a speed figure: one input never takes more than a fraction of this


@contextmanager
def time_bound(seconds: int):
    def expired(signum, frame):
        raise AssertionError(f"one input ran for more than {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def marks(name: str):
    return [pytest.mark.kvm] if TARGETS[name].needs_kvm else []


def corpus_cases():
    for name in sorted(TARGETS):
        files = sorted((CORPUS / name).glob("*")) if (CORPUS / name).is_dir() else []
        for path in files:
            yield pytest.param(name, path, id=f"{name}/{path.name}", marks=marks(name))


@pytest.mark.parametrize("name,path", list(corpus_cases()))
def test_the_kept_corpus_holds(name, path):
    with time_bound(INPUT_SECONDS):
        check(TARGETS[name], path.read_bytes())


@pytest.fixture(autouse=True)
def no_vm_left_running():
    yield
    close_shared()              # the QMP target's VM must not idle through the rest of the suite


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks(n)) for n in sorted(TARGETS)])
def test_random_inputs_hold(name):
    target = TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.binary(max_size=2048))
    def run(data: bytes) -> None:
        with time_bound(INPUT_SECONDS):
            check(target, data)
    run()
