#!/usr/bin/env python3
"""Long fuzzing runs of tests/fuzz/targets.py: coverage-guided with atheris (libFuzzer) when it is installed,
else mutation of the kept corpus and random bytes. Each target runs in a process of its own with a budget of
inputs and of seconds; a finding (an escaped exception, a broken invariant, an ERROR logged, a hang past the
per-input bound) is written to ~/.cache/pyhv/fuzz/findings/TARGET-HASH and listed at the end.

    python3 bench/fuzz.py [--targets a,b] [--runs 100000] [--seconds 120] [--engine atheris|random]

The report (bench/fuzz.txt and .json): inputs and inputs per second per target, findings. Inputs that reach new
coverage go to ~/.cache/pyhv/fuzz/corpus/TARGET (not the repository); tests/fuzz/corpus/TARGET is read as seeds:
keep there the reproducer of every finding fixed, and the suite replays it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyhv" / "fuzz"
INPUT_SECONDS = 20
MAX_LEN = 4096


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
        return True
    except ImportError:
        return False


def worker_atheris(name: str, runs: int, seconds: int) -> None:
    import atheris
    sys.path.insert(0, str(FUZZ))
    with atheris.instrument_imports(include=["pyhv", "targets"]):
        import targets
    target = targets.TARGETS[name]

    def one(data: bytes) -> None:
        targets.check(target, data)
    work = WORK / "corpus" / name
    work.mkdir(parents=True, exist_ok=True)
    findings = WORK / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    seeds = FUZZ / "corpus" / name
    args = [sys.argv[0], f"-runs={runs}", f"-max_total_time={seconds}", f"-timeout={INPUT_SECONDS}",
            f"-max_len={MAX_LEN}", f"-artifact_prefix={findings}/{name}-", "-print_final_stats=1", str(work)]
    if seeds.is_dir():
        args.append(str(seeds))
    atheris.Setup(args, one)
    atheris.Fuzz()


def worker_random(name: str, runs: int, seconds: int) -> None:
    import signal
    sys.path.insert(0, str(FUZZ))
    import targets
    target = targets.TARGETS[name]
    seeds = [p.read_bytes() for d in (FUZZ / "corpus" / name, WORK / "corpus" / name) if d.is_dir()
             for p in sorted(d.iterdir())] or [b""]
    findings = WORK / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    rng = random.Random()

    def expired(signum, frame):
        raise TimeoutError(f"one input ran for more than {INPUT_SECONDS} s")
    signal.signal(signal.SIGALRM, expired)
    started, done, found = time.monotonic(), 0, 0
    while done < runs and time.monotonic() - started < seconds:
        base = rng.choice(seeds)
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randrange(MAX_LEN))
        else:
            data = bytearray(base)
            for _ in range(rng.randrange(1, 9)):
                at = rng.randrange(len(data) + 1)
                data[at:at + rng.randrange(8)] = rng.randbytes(rng.randrange(8))
            data = bytes(data)
        signal.alarm(INPUT_SECONDS)
        try:
            targets.check(target, data)
        except BaseException as e:       # a finding: keep the input, go on
            found += 1
            path = findings / f"{name}-{hashlib.sha1(data).hexdigest()[:12]}"
            path.write_bytes(data)
            print(f"finding: {type(e).__name__}: {str(e)[:200]} -> {path}", file=sys.stderr)
        finally:
            signal.alarm(0)
        done += 1
    print(f"Done {done} runs in {int(time.monotonic() - started)} second(s); {found} finding(s)", file=sys.stderr)


def run_target(name: str, engine: str, runs: int, seconds: int) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--engine", engine, "--runs", str(runs),
                           "--seconds", str(seconds)], capture_output=True, text=True,
                          timeout=seconds + 600)
    elapsed = time.monotonic() - started
    err = proc.stderr
    m = re.search(r"Done (\d+) runs in (\d+) second", err)
    execs = re.search(r"stat::number_of_executed_units: (\d+)", err)
    count = int(execs.group(1)) if execs else int(m.group(1)) if m else 0
    findings = re.findall(r"(?:finding: .*|==\d+== ERROR: .*|Uncaught Python exception: .*)", err)
    if proc.returncode != 0 and not findings:
        findings = [f"exit status {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"]
    if engine == "atheris" and proc.returncode != 0:
        trace = [line for line in err.splitlines() if line.strip()][-12:]
        findings.append("\n".join(trace))
    return {"target": name, "engine": engine, "inputs": count, "seconds": round(elapsed, 1),
            "inputs_per_second": round(count / elapsed, 1) if elapsed else 0, "findings": findings}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", help="comma-separated (default: all)")
    p.add_argument("--runs", type=int, default=100_000, help="inputs per target (default: 100000)")
    p.add_argument("--seconds", type=int, default=120, help="time per target (default: 120)")
    p.add_argument("--engine", choices=("atheris", "random"), default="atheris" if have_atheris() else "random")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "fuzz"), help="report path without extension")
    args = p.parse_args()
    if args.worker:
        (worker_atheris if args.engine == "atheris" else worker_random)(args.worker, args.runs, args.seconds)
        return 0
    sys.path.insert(0, str(FUZZ))
    from targets import TARGETS
    names = args.targets.split(",") if args.targets else sorted(TARGETS)
    results = []
    for name in names:
        r = run_target(name, args.engine, args.runs, args.seconds)
        results.append(r)
        print(f"{name:16} {r['inputs']:>9} inputs {r['seconds']:>7.1f} s {r['inputs_per_second']:>8.1f}/s "
              f"{len(r['findings'])} finding(s)", flush=True)
        for f in r["findings"]:
            print("    " + f.replace("\n", "\n    "))
    total = sum(r["inputs"] for r in results)
    lines = [f"pyhv fuzzing ({args.engine}), {time.strftime('%Y-%m-%d %H:%M')}: {total} inputs in "
             f"{sum(r['seconds'] for r in results):.0f} s, "
             f"{sum(len(r['findings']) for r in results)} finding(s)", ""]
    lines += [f"{r['target']:16} {r['inputs']:>9} inputs {r['seconds']:>7.1f} s {r['inputs_per_second']:>8.1f}/s "
              f"{len(r['findings'])} finding(s)" for r in results]
    Path(args.out + ".txt").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"engine": args.engine, "results": results}, indent=1))
    print(lines[0])
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
