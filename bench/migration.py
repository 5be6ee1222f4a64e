#!/usr/bin/env python3
"""Live-migration figures: a 256 MiB small-Linux guest moved between two pyhv processes on loopback TCP, idle (a
shell loop printing a line every 0.2 s) and while writing memory (a loop rewriting a 64 MiB file in the guest's
tmpfs), with downtime-limit 300 ms (QEMU's default): total time, downtime, bytes sent, passes. Needs the small
guest (`pyhv guest build`).

    python3 bench/migration.py [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyhv.assets.guest import load_manifest  # noqa: E402
from pyhv.assets.protocol import encode_command  # noqa: E402
from pyhv.monitor.client import QmpClient  # noqa: E402

WORKLOADS = {
    "idle": "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done",
    "writing": "echo go; while :; do dd if=/dev/zero of=/tmp/f bs=1M count=64 2>/dev/null; echo pass; done",
}


def pyhv(options: list[str], tmp: str, tag: str, *extra: str) -> tuple[subprocess.Popen, QmpClient, str]:
    qmp, serial = os.path.join(tmp, f"{tag}.qmp"), os.path.join(tmp, f"{tag}.serial")
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", *options, "--qmp", f"unix:{qmp}", "--serial",
                             f"file:{serial}", *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    while not os.path.exists(qmp):
        time.sleep(0.05)
    return proc, QmpClient(qmp), serial


def run_once(assets, command: str, ready: str, tmp: str) -> dict:
    options = ["--kernel", str(assets.bzimage), "--initrd", str(assets.initramfs_uncompressed), "--memory", "256M",
               "--append", f"console=ttyS0 reboot=k panic=-1 {encode_command(command)}"]
    src, src_qmp, serial = pyhv(options, tmp, "src")
    dst, dst_qmp, _ = pyhv(options, tmp, "dst", "--incoming", "tcp:127.0.0.1:0")
    try:
        port = None
        while port is None:
            match = re.search(rb"migration on tcp:(\S+)", dst.stderr.readline())
            port = match.group(1).decode() if match else None
        while ready not in open(serial, errors="replace").read():
            time.sleep(0.2)
        time.sleep(2)
        src_qmp.execute("migrate-set-parameters", downtime_limit=300)
        src_qmp.execute("migrate", uri=f"tcp:{port}")
        while (info := src_qmp.execute("query-migrate"))["status"] not in ("completed", "failed"):
            time.sleep(0.1)
        return info  # type: ignore[return-value]
    finally:
        for proc in (src, dst):
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    os.chdir(ROOT)
    assets = load_manifest("mini")
    print(f"{'workload':<10}{'status':<11}{'total s':>9}{'downtime ms':>13}{'MiB sent':>10}{'passes':>8}"
          f"{'dirty pages/s':>15}")
    for name, command in WORKLOADS.items():
        results = []
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory(prefix="pyhv-migbench-") as tmp:
                results.append(run_once(assets, command, "tick 3" if name == "idle" else "pass", tmp))
        ok = [r for r in results if r["status"] == "completed"]
        med = statistics.median
        if not ok:
            print(f"{name:<10}failed: {results[0].get('error-desc')}")
            continue
        print(f"{name:<10}{'completed':<11}{med(r['total-time'] for r in ok) / 1e3:>9.2f}"
              f"{med(r['downtime'] for r in ok):>13.0f}{med(r['ram']['transferred'] for r in ok) / 2**20:>10.1f}"
              f"{med(r['ram']['dirty-sync-count'] for r in ok):>8.0f}"
              f"{med(r['ram']['dirty-pages-rate'] for r in ok):>15.0f}   ({len(ok)}/{len(results)} completed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
