"""SeaBIOS boot on a PC: pyhv `--machine pc` against QEMU `-M pc -accel kvm`, same bios.bin, same disk
(virtio-blk-pci), runs interleaved.

For each run: seconds from process start to SeaBIOS's "Booting from Hard Disk" line (its debug console, port
0x402) and to the boot sector's exit through port 0xf4 (tests/guests/bootsector.S: reads 64 sectors through
int 13h and checks them); then medians and the pyhv/QEMU ratio, and exits by reason: pyhv's own statistics,
and for QEMU KVM's vCPU counters taken over QMP `query-stats` when "Booting from Hard Disk" appears.

    python3 bench/pc_boot.py [--runs 5] [--no-ioeventfd] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guests"))
from disks import bootsector_disk  # noqa: E402

BIOS = "/usr/share/seabios/bios.bin"
MARK = b"Booting from Hard Disk"
EXIT_OK = (0x10 << 1) | 1
# KVM's per-vCPU counters (QEMU query-stats): all exits, those that reach userspace by kind, emulated instructions
QEMU_KVM_STATS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_window_exits", "signal_exits",
                  "insn_emulation")


def _timed(cmd: list[str], on_mark=None, timeout: float = 120) -> tuple[float | None, float, int, bytes]:
    """Run `cmd`; its stdout is the debug console. Returns (t_mark, t_exit, status, output)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            cwd=ROOT)
    out = bytearray()
    t_mark = None
    fd = proc.stdout.fileno()
    deadline = t0 + timeout
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
        if t_mark is None and MARK in out:
            t_mark = time.monotonic() - t0
            if on_mark:
                on_mark()
        if time.monotonic() > deadline:
            proc.kill()
            break
    status = proc.wait()
    return t_mark, time.monotonic() - t0, status, bytes(out)


def run_pyhv(disk: str, tmp: str, ioeventfd: bool) -> dict:
    stats = os.path.join(tmp, "pyhv-stats.json")
    cmd = [sys.executable, "-m", "pyhv.cli", "run", "-M", "pc", "--firmware", BIOS, "--debugcon", "stdio",
           "--serial", "none", "--drive", f"file={disk}", "--stats-json", stats]
    if not ioeventfd:
        cmd.append("--no-ioeventfd")
    t_mark, t_exit, status, _ = _timed(cmd)
    with open(stats) as f:
        data = json.load(f)
    reasons = {k: v["count"] for k, v in data.get("by_reason", {}).items()}
    reasons.update({f"kvm.{k}": v for k, v in data.get("kvm", {}).items() if v})
    return {"mark": t_mark, "exit": t_exit, "status": status, "exits": reasons}


def _qmp(path: str, command: dict) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb")
    f.readline()
    for cmd in ({"execute": "qmp_capabilities"}, command):
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
    s.close()
    return reply


def run_qemu(disk: str, tmp: str) -> dict:
    qmp = os.path.join(tmp, "qmp.sock")
    cmd = ["qemu-system-x86_64", "-M", "pc", "-accel", "kvm", "-m", "128", "-nodefaults", "-nographic",
           "-bios", BIOS, "-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
           "-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-serial", "none", "-monitor", "none",
           "-qmp", f"unix:{qmp},server=on,wait=off"]
    exits: dict = {}

    def snapshot() -> None:
        try:
            reply = _qmp(qmp, {"execute": "query-stats", "arguments": {"target": "vcpu"}})
            for vcpu in reply.get("return", []):
                for stat in vcpu.get("stats", []):
                    name, value = stat.get("name"), stat.get("value")
                    if isinstance(value, int) and name in QEMU_KVM_STATS and value:
                        exits[name] = exits.get(name, 0) + value
        except OSError as e:
            exits["error"] = str(e)

    t_mark, t_exit, status, _ = _timed(cmd, on_mark=snapshot)
    return {"mark": t_mark, "exit": t_exit, "status": status, "exits": exits}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-ioeventfd", action="store_true", help="pyhv with --no-ioeventfd")
    p.add_argument("--json", metavar="FILE", help="write every run as JSON")
    args = p.parse_args()
    disk = str(bootsector_disk())
    # pyhv starts as an installed package would: from compiled bytecode (pip compiles on install; with
    # PYTHONDONTWRITEBYTECODE set, as on the project's machines, every run would compile pyhv from source)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "pyhv")], check=True)
    results: dict[str, list[dict]] = {"pyhv": [], "qemu": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name in (("pyhv", "qemu") if i % 2 == 0 else ("qemu", "pyhv")):
                r = run_pyhv(disk, tmp, not args.no_ioeventfd) if name == "pyhv" else run_qemu(disk, tmp)
                results[name].append(r)
                ok = "ok" if r["status"] == EXIT_OK else f"status {r['status']}"
                print(f"run {i + 1} {name:5s}: Booting from Hard Disk {r['mark'] or float('nan'):6.3f} s, "
                      f"boot sector exit {r['exit']:6.3f} s ({ok}); exits {r['exits']}", flush=True)
    print()
    print(f"{'':34s}{'pyhv':>10s}{'QEMU':>10s}{'ratio':>8s}")
    for key, label in (("mark", "to 'Booting from Hard Disk' (s)"), ("exit", "to boot sector exit (s)")):
        med = {n: statistics.median(r[key] for r in results[n] if r[key] is not None) for n in results}
        print(f"{label:34s}{med['pyhv']:10.3f}{med['qemu']:10.3f}{med['pyhv'] / med['qemu']:8.2f}")
    failed = [n for n in results for r in results[n] if r["status"] != EXIT_OK]
    if failed:
        print(f"runs that did not pass the boot sector check: {failed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
