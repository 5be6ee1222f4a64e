#!/usr/bin/env python3
"""Boot benchmark: pyhv vs QEMU (-M microvm and -M pc, -accel kvm, -kernel) on the same kernel and initramfs.

For each run: time from process start to each console milestone (the kernel's version banner, "Run /init",
the initramfs's PYHV-INIT marker), and peak RSS. Runs are interleaved, medians reported with pyhv/QEMU ratios.
On PVM hosts QEMU gets the same kernel options pyhv adds there, so both kernels do the same work; a milestone not
reached within --timeout is reported as such (QEMU cannot boot a stock kernel on PVM hosts).

    python3 bench/boot.py [--kernel mini|stock] [--reps 3] [--timeout 120] [--format bzimage|vmlinux]
"""
from __future__ import annotations

import argparse
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyhv.arch.x86.pvm import PVM_CLEARCPUID, PVM_KERNEL_OPTIONS  # noqa: E402
from pyhv.kvm import detect_flavour  # noqa: E402

MILESTONES = (("banner", b"Linux version "), ("run-init", b"Run /init as init process"), ("init", b"PYHV-INIT"))


def run_once(cmd: list[str], timeout: float) -> tuple[dict[str, float], int]:
    """Spawn cmd; return ({milestone: seconds from spawn}, peak RSS KiB)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    out = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while len(seen) < len(MILESTONES) and time.monotonic() - start < timeout:
            if not sel.select(timeout=0.2):
                continue
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            out += chunk
            now = time.monotonic() - start
            for name, marker in MILESTONES:
                if name not in seen and marker in out:
                    seen[name] = now
    finally:
        proc.kill()
        try:
            _, _, usage = os.wait4(proc.pid, 0)
            peak = usage.ru_maxrss
        except ChildProcessError:          # already reaped (it exited on its own): no figure for this run
            peak = 0
        proc.returncode = 0
        proc.stdout.close()
    return seen, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=("mini", "stock"), default="mini")
    p.add_argument("--format", choices=("bzimage", "vmlinux"), default="bzimage",
                   help="which image to boot (QEMU always gets the same file)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per run (default 120)")
    p.add_argument("--memory", default="128M")
    p.add_argument("--vmms", default="pyhv,qemu-microvm,qemu-pc",
                   help="comma-separated, from: pyhv (ACPI on, the default), pyhv-acpi-off (MP table and "
                        "virtio_mmio.device=), qemu-microvm (acpi=off), qemu-microvm-acpi, qemu-pc")
    args = p.parse_args()
    from pyhv.assets import build_guest
    assets = build_guest(args.kernel)
    kernel = str(assets.bzimage if args.format == "bzimage" else assets.vmlinux)
    initrd = str(assets.initramfs_uncompressed)
    pvm = detect_flavour().is_pvm
    base = "console=ttyS0 earlyprintk=serial reboot=k panic=-1 pyhv.cmd=true"
    qemu_append = base + (" " + " ".join(PVM_KERNEL_OPTIONS) + f" clearcpuid={PVM_CLEARCPUID}" if pvm else "")
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    qemu_common = [qemu, "-accel", "kvm", "-m", args.memory, "-nodefaults", "-no-user-config", "-display", "none",
                   "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", qemu_append,
                   # on PVM: no CX16 (the emulator fails on cmpxchg16b) and no ARCH_CAPABILITIES MSR, which PVM
                   # refuses to set (QEMU then aborts before the guest runs)
                   "-cpu", "host,-cx16,-arch-capabilities" if pvm else "host"]
    commands = {
        "pyhv": [sys.executable, "-m", "pyhv.cli", "run", "--kernel", kernel, "--initrd", initrd, "--memory",
                 args.memory, "--append", base],
        "pyhv-acpi-off": [sys.executable, "-m", "pyhv.cli", "run", "--kernel", kernel, "--initrd", initrd,
                          "--memory", args.memory, "--append", base, "--acpi", "off"],
        "qemu-microvm": qemu_common + ["-M", "microvm,acpi=off"],
        "qemu-microvm-acpi": qemu_common + ["-M", "microvm,acpi=on"],
        "qemu-pc": qemu_common + ["-M", "pc"],
    }
    vmms = [v for v in args.vmms.split(",") if v in commands]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in vmms}
    rss: dict[str, list[int]] = {v: [] for v in vmms}
    os.chdir(ROOT)
    for rep in range(args.reps):
        for vmm in vmms:
            seen, peak = run_once(commands[vmm], args.timeout)
            results[vmm].append(seen)
            rss[vmm].append(peak)
            print(f"rep {rep + 1} {vmm}: " + ", ".join(f"{k} {v:.2f}s" for k, v in seen.items()), file=sys.stderr)
    print(f"\nboot: {args.kernel} kernel ({args.format}), {args.memory}, KVM: {detect_flavour().description}")
    print(f"{args.reps} interleaved runs, medians; '-' = not reached within {args.timeout:.0f} s\n")
    header = f"{'milestone':<12}" + "".join(f"{v:>16}" for v in vmms) + "".join(
        f"{'pyhv/' + v:>22}" for v in vmms if v != "pyhv")
    print(header)
    medians: dict[str, dict[str, float | None]] = {}
    for vmm in vmms:
        medians[vmm] = {}
        for name, _ in MILESTONES:
            times = [r[name] for r in results[vmm] if name in r]
            medians[vmm][name] = statistics.median(times) if len(times) == len(results[vmm]) else None
    for name, _ in MILESTONES:
        row = f"{name:<12}"
        for vmm in vmms:
            m = medians[vmm][name]
            row += f"{(f'{m:.2f} s' if m is not None else '-'):>16}"
        for vmm in vmms:
            if vmm == "pyhv":
                continue
            a, b = medians.get("pyhv", {}).get(name), medians[vmm][name]
            row += f"{(f'{a / b:.2f}' if a is not None and b else ('pyhv only' if a else '-')):>22}"
        print(row)
    print("peak RSS: " + ", ".join(f"{v} {statistics.median(rss[v]) / 1024:.1f} MiB" for v in vmms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
