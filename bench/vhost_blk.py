#!/usr/bin/env python3
"""Benchmark: pyhv's vhost-user-blk back end against qemu-storage-daemon's, same guest, same image.

QEMU (TCG, q35) boots the project's Linux test guest with `vhost-user-blk-pci` on one back end or the other; in the
guest, `blkload` (bench/blkload.c, built static here and appended to the initramfs as a second cpio archive) runs
sequential 1 MiB reads and writes and 4 KiB random reads at queue depth 1 and 32, O_DIRECT on /dev/vda (Linux AIO,
or one thread per outstanding request on a kernel without AIO, like the project's mini kernel). Runs are
interleaved (pyhv, qsd, pyhv, qsd, ...) and the best of the rounds is reported for each back end, with ratios.

    python3 bench/vhost_blk.py [--rounds 3] [--seconds 4] [--size 512M] [--kernel K --initrd I]

Both back ends use the host page cache (pyhv cache=writeback, qsd cache.direct=off), so the figures measure the
back ends and the vhost-user path, not the disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from qemu_guest import run_guest, vhost_user_blk  # noqa: E402
from vhost_helpers import spawn_listener, unique_socket  # noqa: E402

WORKLOADS = [("seqread", 1, "seq read 1M"), ("seqwrite", 1, "seq write 1M"), ("randread", 1, "rand read 4K QD1"),
             ("randread", 32, "rand read 4K QD32")]


def newc_entry(name: str, data: bytes, mode: int, ino: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initrd(base: Path, tool: Path, out: Path) -> None:
    """The guest's initramfs with /bin/blkload appended as a second (uncompressed) cpio archive."""
    archive = newc_entry("bin", b"", 0o040755, 1) + newc_entry("bin/blkload", tool.read_bytes(), 0o100755, 2)
    archive += newc_entry("TRAILER!!!", b"", 0, 0)
    base_data = base.read_bytes()
    out.write_bytes(base_data + b"\0" * (-len(base_data) % 4) + archive)


def guest_assets(args):
    if args.kernel and args.initrd:
        return Path(args.kernel), Path(args.initrd)
    try:
        from pyhv.assets.guest import build_guest
    except ImportError:
        sys.exit("bench: no guest assets on this branch (pyhv.assets); pass --kernel and --initrd")
    assets = build_guest()
    return Path(assets.bzimage), Path(assets.initramfs)


class BackendProc:
    def __init__(self, kind: str, image: Path, tmp: Path) -> None:
        self.socket = unique_socket(tmp, kind)
        if kind == "pyhv":
            cmd = [sys.executable, "-m", "pyhv.cli", "vhost-user-backend", "--type", "blk", "--socket",
                   self.socket, "--image", str(image)]
        else:
            cmd = ["qemu-storage-daemon",
                   "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off",
                   "--blockdev", "driver=raw,node-name=disk0,file=file0",
                   "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                               f"addr.path={self.socket},writable=on,num-queues=1"]
        self.proc = spawn_listener(cmd, self.socket, subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_round(kind: str, guest, image: Path, tmp: Path, seconds: float) -> dict:
    be = BackendProc(kind, image, tmp)
    try:
        command = "\n".join(f"blkload {mode} /dev/vda {seconds} {depth}" for mode, depth, _ in WORKLOADS)
        run = run_guest(guest, command, vhost_user_blk(be.socket), timeout=600)
    finally:
        be.stop()
    results = {}
    for line in run.console.splitlines():
        if line.startswith("RESULT "):
            _, mode, depth, block, nbytes, ops, secs = line.split()
            results[(mode, int(depth))] = (int(nbytes) / float(secs) / 1e6, int(ops) / float(secs))
    if len(results) != len(WORKLOADS):
        raise SystemExit(f"bench: {kind} run incomplete:\n{run.console[-3000:]}")
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per workload in the guest")
    p.add_argument("--size", default="512M", help="image size (default 512M)")
    p.add_argument("--kernel")
    p.add_argument("--initrd")
    args = p.parse_args()
    for tool in ("qemu-system-x86_64", "qemu-storage-daemon", "gcc"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (scripts/install-deps)")
    kernel, initrd = guest_assets(args)
    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as tmpdir:
        tmp = Path(tmpdir)
        subprocess.run(["gcc", "-O2", "-static", "-o", str(tmp / "blkload"), str(ROOT / "bench" / "blkload.c"),
                        "-lpthread"], check=True)
        build_initrd(initrd, tmp / "blkload", tmp / "initrd")
        guest = type("Guest", (), {"bzimage": kernel, "initramfs": tmp / "initrd"})
        image = tmp / "disk.raw"
        size = int(args.size.rstrip("M")) << 20
        with open(image, "wb") as f:                  # real data, so reads are not of holes
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())                      # no write-back of the image during the measurements
        best: dict[str, dict] = {"pyhv": {}, "qsd": {}}
        for r in range(args.rounds):
            for kind in ("pyhv", "qsd"):
                res = run_round(kind, guest, image, tmp, args.seconds)
                print(f"round {r + 1} {kind}: " + ", ".join(f"{label} {res[(m, d)][0]:.1f} MB/s "
                                                           f"{res[(m, d)][1]:.0f} IOPS"
                                                           for m, d, label in WORKLOADS), flush=True)
                for key, value in res.items():
                    old = best[kind].get(key)
                    best[kind][key] = value if old is None or value[0] > old[0] else old
    print()
    print(f"{'workload':<20}{'pyhv MB/s':>11}{'qsd MB/s':>11}{'pyhv IOPS':>11}{'qsd IOPS':>11}{'ratio':>8}")
    for mode, depth, label in WORKLOADS:
        (pm, pi), (qm, qi) = best["pyhv"][(mode, depth)], best["qsd"][(mode, depth)]
        print(f"{label:<20}{pm:>11.1f}{qm:>11.1f}{pi:>11.0f}{qi:>11.0f}{pm / qm:>7.2f}x")
    print(f"\nbest of {args.rounds} interleaved rounds, {args.seconds:g} s per workload; ratio = pyhv / qsd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
