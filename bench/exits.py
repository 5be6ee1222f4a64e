#!/usr/bin/env python3
"""Exit round-trip benchmark: the same exit-loop guest (tests/guests/exitloop.S) under pyhv and under QEMU.

For each access kind the guest runs COUNT iterations; a run with COUNT=0 of the same image measures the fixed
cost (process start, teardown), so ns per iteration = (t(COUNT) - t(0)) / COUNT. The empty loop's figure is the
cost of the loop instructions themselves (emulated on PVM hosts); subtracting it gives the exit round trip.
Runs are interleaved (pyhv, QEMU, pyhv, ...) and medians reported, with pyhv/QEMU ratios. Also: pyhv's split
between KVM_RUN and Python dispatch (from --stats-json), the cost of exit accounting (--no-accounting) and of the
seccomp sandbox (--sandbox off), process start to first KVM_RUN, and peak RSS against QEMU -M microvm with the same
guest and memory.

    python3 bench/exits.py [--count 200000] [--reps 5]
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
sys.path.insert(0, str(ROOT / "tests" / "guests"))
import build as guest_build  # noqa: E402

MODES = {0: "empty loop", 1: "port write (OUT 0x80)", 2: "port read (IN 0x80)", 3: "MMIO write (unassigned)",
         4: "MMIO read (unassigned)"}  # MMIO at 0xfe000000
QEMU = "qemu-system-x86_64"
MEMORY = "128M"
# A port-I/O exit to user space and straight back on hardware KVM, without any VMM work: VM exit and entry plus
# the return from and re-entry into the KVM_RUN ioctl. On current x86 servers this is of the order of 1-2 us;
# this host (PVM) cannot measure it, so the projection takes it as a parameter.
BARE_EXIT_NS = 1500.0


def ensure_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        print("installing Debian's qemu-system-x86 ...", file=sys.stderr)
        subprocess.run([str(ROOT / "scripts" / "install-deps")], check=True)
        path = shutil.which(QEMU)
    return path


USER_CPU: dict[tuple[str, int, int], list[float]] = {}     # (variant, mode, count) -> user CPU seconds per run


def spawn(cmd: list[str], key: tuple[str, int, int] | None = None) -> tuple[float, int, int, float]:
    """Run cmd; returns (wall seconds, exit status, peak RSS KiB, monotonic start). With `key`, the process's user
    CPU time (getrusage via wait4: the VMM's own work, since the guest's time is system time) is kept."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if key is not None:
        USER_CPU.setdefault(key, []).append(usage.ru_utime)
    return wall, proc.returncode, usage.ru_maxrss, start


def pyhv_cmd(image: str, stats_json: str | None = None, accounting: bool = True, sandbox: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "pyhv.cli", "run", "--firmware", image, "--memory", MEMORY, "--serial", "none"]
    if stats_json:
        cmd += ["--stats-json", stats_json]
    if not accounting:
        cmd.append("--no-accounting")
    if not sandbox:
        cmd += ["--sandbox", "off"]
    return cmd


def qemu_cmd(qemu: str, image: str, machine: str = "pc") -> list[str]:
    return [qemu, "-accel", "kvm", "-M", machine, "-nodefaults", "-display", "none", "-bios", image,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", MEMORY]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200000, help="loop iterations per run (default 200000)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    p.add_argument("--bare-exit-ns", type=float, default=BARE_EXIT_NS,
                   help=f"a hardware KVM exit to user space and back with no user work, for the projection "
                        f"(default {BARE_EXIT_NS:.0f} ns: an assumed figure for a current x86 server, not measured)")
    args = p.parse_args()
    qemu = ensure_qemu()
    os.chdir(ROOT)
    # the empty loop is ~10x cheaper per iteration than an exit: run it longer, so process start-up jitter
    # (tens of ms) does not swamp it
    counts = {m: args.count * (20 if m == 0 else 1) for m in MODES}
    images = {(m, n): str(guest_build.build("exitloop", {"MODE": m, "COUNT": n})) for m in MODES
              for n in (0, counts[m])}
    samples: dict[tuple[str, int, int], list[float]] = {}
    split: dict[int, list[tuple[float, float]]] = {m: [] for m in MODES}
    first_run: list[float] = []
    rss = {"pyhv": [], "qemu -M microvm": [], "qemu -M pc": []}
    tmp = tempfile.mkdtemp(prefix="pyhv-bench-")
    variants = ("pyhv", "pyhv --no-accounting", "pyhv --sandbox off", "qemu")
    for rep in range(args.reps):
        for mode in MODES:
            for n in (0, counts[mode]):
                for variant in variants:
                    image = images[(mode, n)]
                    stats = os.path.join(tmp, "stats.json")
                    key = (variant, mode, n)
                    if variant == "qemu":
                        wall, status, maxrss, _ = spawn(qemu_cmd(qemu, image), key)
                    else:
                        wall, status, maxrss, start = spawn(pyhv_cmd(image, stats, "accounting" not in variant,
                                                                     "sandbox" not in variant), key)
                        if variant == "pyhv":
                            data = json.load(open(stats))
                            if n:
                                exits = max(data["exits"], 1)
                                split[mode].append((data["kvm_run_ns"] / exits, data["handling_ns"] / exits))
                            elif data["first_kvm_run_monotonic"]:
                                first_run.append(data["first_kvm_run_monotonic"] - start)
                            if n == 0 and mode == 1:
                                rss["pyhv"].append(maxrss)
                    if status != 1:
                        print(f"warning: {variant} mode {mode} count {n} exited with {status}", file=sys.stderr)
                    samples.setdefault((variant, mode, n), []).append(wall)
                    if variant == "qemu" and n == 0 and mode == 1:
                        rss["qemu -M pc"].append(maxrss)
        # peak RSS of QEMU's smallest machine with the same guest and memory
        rss["qemu -M microvm"].append(spawn(qemu_cmd(qemu, images[(1, 0)], "microvm"))[2])
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)

    def per_iter(variant: str, mode: int) -> float:
        base = statistics.median(samples[(variant, mode, 0)])
        return (statistics.median(samples[(variant, mode, counts[mode])]) - base) / counts[mode] * 1e9

    med = statistics.median
    print(f"\npyhv vs QEMU {subprocess.run([qemu, '--version'], capture_output=True, text=True).stdout.split(chr(10))[0]}")
    print(f"exit-loop guest, {args.count} iterations per run, {args.reps} interleaved runs, medians\n")
    print(f"{'access':<26}{'pyhv ns/iter':>14}{'QEMU ns/iter':>14}{'ratio':>8}{'pyhv exit ns':>14}"
          f"{'QEMU exit ns':>14}{'ratio':>8}{'no-acct ns/iter':>17}")
    empty = {v: per_iter(v, 0) for v in variants}
    for mode, name in MODES.items():
        pv, qv, na = per_iter("pyhv", mode), per_iter("qemu", mode), per_iter("pyhv --no-accounting", mode)
        if mode == 0:
            print(f"{name:<26}{pv:>14.0f}{qv:>14.0f}{pv / qv:>8.2f}{'':>14}{'':>14}{'':>8}{na:>17.0f}")
            continue
        pe, qe = pv - empty["pyhv"], qv - empty["qemu"]
        print(f"{name:<26}{pv:>14.0f}{qv:>14.0f}{pv / qv:>8.2f}{pe:>14.0f}{qe:>14.0f}{pe / qe:>8.2f}{na:>17.0f}")
    print("\npyhv's time per exit (from --stats-json): inside KVM_RUN / handling in Python")
    for mode, name in MODES.items():
        if mode and split[mode]:
            print(f"  {name:<26}{med(s[0] for s in split[mode]):>8.0f} ns / {med(s[1] for s in split[mode]):>6.0f} ns")
    def user_per_iter(variant: str, mode: int) -> float:
        return (med(USER_CPU[(variant, mode, counts[mode])]) - med(USER_CPU[(variant, mode, 0)])) / counts[mode] * 1e9

    print("\nuser-space CPU per exit (getrusage: the VMM's own work between KVM_RUN calls), and the projected "
          f"round trip on hardware KVM = {args.bare_exit_ns} ns bare exit + user time (--bare-exit-ns)")
    print(f"  {'access':<26}{'pyhv us':>10}{'QEMU us':>10}{'ratio':>8}{'pyhv proj us':>14}{'QEMU proj us':>14}"
          f"{'ratio':>8}")
    empty_user = {v: user_per_iter(v, 0) for v in ("pyhv", "qemu")}
    for mode, name in MODES.items():
        if not mode:
            continue
        pu = user_per_iter("pyhv", mode) - empty_user["pyhv"]
        qu = user_per_iter("qemu", mode) - empty_user["qemu"]
        pp, qp = args.bare_exit_ns + pu, args.bare_exit_ns + qu
        print(f"  {name:<26}{pu / 1e3:>10.2f}{qu / 1e3:>10.2f}{pu / max(qu, 1):>8.2f}{pp / 1e3:>14.2f}"
              f"{qp / 1e3:>14.2f}{pp / qp:>8.2f}")
    cost = [(per_iter("pyhv", m) - per_iter("pyhv --no-accounting", m)) / per_iter("pyhv", m) * 100
            for m in MODES if m]
    print(f"\nexit accounting cost: {med(cost):.1f} % of the round trip (median over the four access kinds; "
          f"per kind: {', '.join(f'{c:.1f}' for c in cost)})")
    sandbox = [(per_iter("pyhv", m) - per_iter("pyhv --sandbox off", m)) / per_iter("pyhv --sandbox off", m) * 100
               for m in MODES if m]
    sandbox_user = [user_per_iter("pyhv", m) - user_per_iter("pyhv --sandbox off", m) for m in MODES if m]
    print(f"sandbox cost (--sandbox on against off): {med(sandbox):.1f} % of the round trip, "
          f"{med(sandbox_user):.0f} ns of user CPU per exit (medians over the four access kinds; per kind: "
          f"{', '.join(f'{c:.1f} %' for c in sandbox)})")
    if first_run:
        print(f"process start -> first KVM_RUN (pyhv): median {med(first_run) * 1000:.0f} ms "
              f"(min {min(first_run) * 1000:.0f}, max {max(first_run) * 1000:.0f})")
    print("peak RSS with the same guest, -m " + MEMORY + ": " + ", ".join(
        f"{k} {med(v) / 1024:.1f} MiB" for k, v in rss.items() if v))
    if rss["pyhv"] and rss["qemu -M microvm"]:
        print(f"  pyhv / QEMU microvm: {med(rss['pyhv']) / med(rss['qemu -M microvm']):.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
