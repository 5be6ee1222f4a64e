"""Boot figures of pyhv's Linux test guests under QEMU TCG (no KVM needed); not a test.

    python3 bench/guest_boot.py                 # both kernels, 3 boots each
    python3 bench/guest_boot.py --kernel mini --runs 1 --icount

For each kernel: wall time from QEMU's start to the PYHV-INIT marker, the guest's uptime at the marker, and QEMU's
exit status. --icount also estimates how many instructions the guest ran until the marker, with either initramfs:
QEMU's -icount makes the virtual clock advance 2**shift ns per instruction (plus idle time it skips), so two runs at
shifts 0 and 6 give N = (uptime6 - uptime0) / 63 ns and the remaining wait time. That count is what matters on PVM,
where guest kernel code is emulated instruction by instruction.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyhv.assets import build_guest  # noqa: E402
from pyhv.assets.protocol import INIT_RE, encode_command  # noqa: E402

QEMU = "qemu-system-x86_64"


def qemu(guest, initrd: Path, extra: list[str], machine: str, options: argparse.Namespace) -> list[str]:
    return [QEMU, "-accel", "tcg", *extra, "-M", machine, "-m", options.memory, "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(guest.bzimage), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 {options.append} {encode_command('true')}"]


def boot(args: list[str]) -> tuple[float | None, float | None, int]:
    """(seconds to the marker, guest uptime at the marker, exit status)."""
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, marker_at = "", None
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):
        out += chunk.decode(errors="replace")
        if marker_at is None and INIT_RE.search(out):
            marker_at = time.monotonic() - started
    status = proc.wait()
    m = INIT_RE.search(out)
    return marker_at, float(m.group(1)) if m else None, status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=("mini", "stock"), action="append")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--machine", default="q35", help="QEMU machine for the wall-time runs (default q35)")
    p.add_argument("--icount", action="store_true", help="also estimate instructions to the marker")
    p.add_argument("--append", default="", help="more kernel options, e.g. pyhv's PVM ones (rodata=off ...)")
    p.add_argument("--memory", "-m", default="128", help="guest RAM as QEMU's -m takes it (default 128 MiB)")
    args = p.parse_args()
    print(f"{'kernel':6} {'initramfs':10} {'to marker':>10} {'uptime':>7} {'status':>6}")
    for flavour in args.kernel or ["mini", "stock"]:
        guest = build_guest(flavour)
        for _ in range(args.runs):
            wall, uptime, status = boot(qemu(guest, guest.initramfs, [], args.machine, args))
            print(f"{flavour:6} {'.cpio.gz':10} {wall or float('nan'):9.2f}s {uptime or float('nan'):6.2f}s {status:6}")
        if args.icount:
            for name, initrd in ((".cpio.gz", guest.initramfs), (".cpio", guest.initramfs_uncompressed)):
                machine = "microvm,acpi=off,rtc=on" if flavour == "mini" else "q35"
                u0 = boot(qemu(guest, initrd, ["-icount", "shift=0,sleep=on"], machine, args))[1]
                u6 = boot(qemu(guest, initrd, ["-icount", "shift=6,sleep=on"], machine, args))[1]
                if u0 is None or u6 is None:
                    print(f"{flavour:6} {name:10} icount: no marker")
                    continue
                n = (u6 - u0) / 63e-9
                print(f"{flavour:6} {name:10} icount ({machine}): ~{n / 1e6:.0f} M instructions to the marker, "
                      f"~{u0 - n * 1e-9:.2f} s waiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
