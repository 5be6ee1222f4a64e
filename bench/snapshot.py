#!/usr/bin/env python3
"""Snapshot figures: `pyhv snapshot create` time and size for 128 and 512 MiB guests, and `pyhv run --restore`
from process start to the guest's first instruction (first KVM_RUN), median of --reps restores, against a cold
start of the same guest.

The guest is the exit-loop test guest (tests/guests/exitloop.S) started with -S, so the snapshot holds it before
its first instruction and every restore runs its short loop and exits by itself.

    python3 bench/snapshot.py [--reps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "guests"))
import build as guest_build  # noqa: E402

from pyhv.monitor.client import QmpClient  # noqa: E402


def first_run(cmd: list[str], stats: str) -> tuple[float, float]:
    """Seconds from spawning `cmd` to its first KVM_RUN, and inside the restore itself (from --stats-json)."""
    start = time.monotonic()
    subprocess.run(cmd + ["--stats-json", stats], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    data = json.load(open(stats))
    return data["first_kvm_run_monotonic"] - start, data.get("restore_seconds") or 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="restores per size (default 10)")
    args = p.parse_args()
    os.chdir(ROOT)
    image = str(guest_build.build("exitloop", {"MODE": 1, "COUNT": 1000}))
    tmp = tempfile.mkdtemp(prefix="pyhv-snapbench-")
    base = [sys.executable, "-m", "pyhv.cli", "run", "--serial", "none"]
    print(f"{'memory':>8}{'create s':>10}{'paused s':>10}{'memory MiB':>12}{'state KiB':>11}"
          f"{'restore ms':>12}{'of which load':>15}{'cold ms':>10}")
    for memory in ("128M", "512M"):
        qmp = os.path.join(tmp, f"{memory}.qmp")
        vm = subprocess.Popen(base + ["--firmware", image, "--memory", memory, "-S", "--qmp", f"unix:{qmp}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(qmp):
            time.sleep(0.02)
        client = QmpClient(qmp)
        creates = []
        for i in range(3):
            creates.append(client.execute("x-pyhv-snapshot-create", path=os.path.join(tmp, f"{memory}-{i}")))
        client.execute("quit")
        vm.wait()
        snap = os.path.join(tmp, f"{memory}-0")
        stats = os.path.join(tmp, "stats.json")
        restores = [first_run(base + ["--restore", snap], stats) for _ in range(args.reps)]
        colds = [first_run(base + ["--firmware", image, "--memory", memory], stats) for _ in range(args.reps)]
        med = statistics.median
        print(f"{memory:>8}{med(c['seconds'] for c in creates):>10.3f}{med(c['paused_seconds'] for c in creates):>10.3f}"
              f"{creates[0]['memory_bytes'] / 2**20:>12.1f}{creates[0]['state_bytes'] / 1024:>11.1f}"
              f"{med(r[0] for r in restores) * 1e3:>12.1f}{med(r[1] for r in restores) * 1e3:>15.1f}"
              f"{med(c[0] for c in colds) * 1e3:>10.1f}")
        for i in range(3):
            shutil.rmtree(os.path.join(tmp, f"{memory}-{i}"), ignore_errors=True)
    print("restore/cold: process start to the first KVM_RUN, medians; 'of which load': inside the restore (map the "
          "memory file, load KVM and device state); the rest is starting Python and building the machine")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
