#!/usr/bin/env python3
"""Benchmark: what the VT-d model costs, host side and in a guest.

Host: pyhv's cost per translation (ns): an IOTLB hit, a miss (a 4-level walk of tables in guest RAM) and a 4 KiB
buffer through `TranslatedDma.view` against `GuestMemory.view` (the identity DMA space every device has without
an IOMMU), in this process.

Guest: the project's Linux guest on `--machine pc` with a virtio-blk disk, in one run: without an IOMMU, with
`--iommu intel` in lazy mode (intel_iommu=on iommu.strict=0) and in strict mode (iommu.strict=1, the seed's
`dma_map` cost: an IOTLB invalidation per unmap). In each, `blkload` (bench/blkload.c, O_DIRECT) does 4 KiB random
reads at queue depth 1 and 1 MiB sequential reads, one boot per workload, rounds interleaved; the best round
is reported with translations and IOTLB misses per request (pyhv's counters over the whole boot, divided by the
workload's requests).

    python3 bench/iommu.py [--rounds 2] [--seconds 3] [--configs none,lazy,strict,none@DIR]

`CONFIG@DIR` runs pyhv from another checkout, interleaved with the others: `none@/tmp/old` (a worktree of main
before the IOMMU) against `none` is the "no device without an IOMMU gets slower" comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyhv.assets.protocol import encode_command  # noqa: E402

CONFIGS = {"none": ((), ""), "lazy": (("--iommu", "intel"), "intel_iommu=on iommu.strict=0"),
           "strict": (("--iommu", "intel"), "intel_iommu=on iommu.strict=1")}
WORKLOADS = [("randread", "rand read 4K QD1"), ("seqread", "seq read 1M QD1")]


# --- host side ---------------------------------------------------------------------------------------------------
def host_costs(n: int = 200_000) -> dict[str, float]:
    from pyhv.devices.iommu import intel_vtd as vtd
    from pyhv.memory import AddressSpace, GuestMemory, MemoryRegion

    system = MemoryRegion.container("system", 1 << 40)
    space = AddressSpace("memory", system)
    system.add_subregion(0, MemoryRegion.ram("ram", 64 << 20))
    mem = GuestMemory(space)
    unit = vtd.IntelIommu("iommu", 0, mem, send_msi=lambda a, d: None)
    dma = unit.dma_space("dev", 0x10)
    root, ctx, pml4, pdpt, pd, pt = (0x100000 + 0x1000 * i for i in range(6))
    mem.write(root, struct.pack("<QQ", ctx | 1, 0))
    mem.write(ctx + 16 * 0x10, struct.pack("<QQ", pml4 | 1, 1 << 8 | 2))
    for table, nxt in ((pml4, pdpt), (pdpt, pd), (pd, pt)):
        mem.write(table, struct.pack("<Q", nxt | 3))
    mem.write(pt, b"".join(struct.pack("<Q", (0x400000 + 0x1000 * i) | 3) for i in range(512)))
    unit.bank.write(vtd.RTADDR, 8, root)
    unit.bank.write(vtd.GCMD, 4, vtd.GCMD_SRTP)
    unit.bank.write(vtd.GCMD, 4, vtd.GCMD_TE)

    def per_op(fn, count: int) -> float:
        t = time.perf_counter_ns()
        fn(count)
        return (time.perf_counter_ns() - t) / count

    def hits(count: int) -> None:
        translate = unit.translate
        for _ in range(count):
            translate(0x10, 0x5000, False)

    def misses(count: int) -> None:
        translate, iotlb = unit.translate, unit._iotlb
        for _ in range(count):
            iotlb.clear()
            translate(0x10, 0x5000, False)

    def translated_views(count: int) -> None:
        view = dma.view
        for _ in range(count):
            view(0x5000, 4096, True)

    def identity_views(count: int) -> None:
        view = mem.view
        for _ in range(count):
            view(0x405000, 4096, True)

    return {"IOTLB hit": per_op(hits, n), "IOTLB miss (4-level walk)": per_op(misses, n // 4),
            "TranslatedDma.view 4 KiB (hit)": per_op(translated_views, n),
            "GuestMemory.view 4 KiB (identity)": per_op(identity_views, n)}


# --- guest side --------------------------------------------------------------------------------------------------
def guest_assets(tmp: Path) -> tuple[Path, Path]:
    from pyhv.assets.guest import build_guest
    tool = tmp / "blkload"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(tool), str(ROOT / "bench" / "blkload.c"), "-lpthread"],
                   check=True)
    assets = build_guest("mini", add=[f"{tool}:/bin/blkload"])
    return Path(assets.bzimage), Path(assets.initramfs_uncompressed)


def run_once(kernel: Path, initrd: Path, image: Path, tmp: Path, config: str, mode: str, seconds: float) -> dict:
    name, _, tree_text = config.partition("@")
    tree = Path(tree_text) if tree_text else ROOT
    options, append = CONFIGS[name]
    stats = tmp / f"{name}-{mode}-{abs(hash(config))}.json"
    command = f"blkload {mode} /dev/vda {seconds} 1"
    cmd = [sys.executable, "-m", "pyhv.cli", "run", "--machine", "pc", "--memory", "256M", "--kernel", str(kernel),
           "--initrd", str(initrd), "--drive", f"file={image}", *options, "--stats-json", str(stats),
           "--append", f"console=ttyS0 reboot=k panic=-1 {append} {encode_command(command)}"]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, timeout=900, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    out = proc.stdout.decode(errors="replace")
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"bench: {config} {mode}: no RESULT\n{out[-3000:]}{proc.stderr.decode()[-2000:]}")
    _, _, _, _, nbytes, ops, secs = line.split()
    data = json.loads(stats.read_text())
    iommu = data.get("iommu") or {}
    blk = (iommu.get("devices") or {}).get("virtio-blk0", {})
    ops_n = int(ops)
    return {"MB/s": int(nbytes) / float(secs) / 1e6, "IOPS": ops_n / float(secs),
            "translations/req": blk.get("translations", 0) / ops_n if blk else 0.0,
            "misses/req": blk.get("iotlb-misses", 0) / ops_n if blk else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per workload in the guest")
    p.add_argument("--configs", default="none,lazy,strict",
                   help="comma-separated: none, lazy, strict, each optionally @DIR (pyhv from that checkout)")
    p.add_argument("--no-host", action="store_true", help="skip the in-process translation costs")
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = {c.partition("@")[0] for c in configs} - set(CONFIGS)
    if unknown:
        p.error(f"unknown config {', '.join(sorted(unknown))}: choose from {', '.join(CONFIGS)}")
    if not args.no_host:
        print("pyhv's cost per translation (host side, this process):")
        for name, ns in host_costs().items():
            print(f"  {name:<36}{ns:>8.0f} ns")
        print(flush=True)
    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as tmpdir:
        tmp = Path(tmpdir)
        kernel, initrd = guest_assets(tmp)
        image = tmp / "disk.raw"
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(256):
                f.write(chunk)
        best: dict[tuple[str, str], dict] = {}
        for r in range(args.rounds):
            for mode, label in WORKLOADS:
                for config in configs:
                    res = run_once(kernel, initrd, image, tmp, config, mode, args.seconds)
                    print(f"round {r + 1} {config:<7} {label}: {res['MB/s']:.2f} MB/s {res['IOPS']:.0f} IOPS "
                          f"{res['translations/req']:.1f} translations/req {res['misses/req']:.1f} misses/req",
                          flush=True)
                    old = best.get((config, mode))
                    if old is None or res["IOPS"] > old["IOPS"]:
                        best[(config, mode)] = res
    print()
    width = max(8, *(len(c) + 1 for c in configs))
    print(f"{'workload':<18}{'config':<{width}}{'MB/s':>9}{'IOPS':>9}{'vs none':>9}{'transl/req':>12}{'miss/req':>10}")
    for mode, label in WORKLOADS:
        base = best.get(("none", mode))
        for config in configs:
            res = best[(config, mode)]
            ratio = f"{res['IOPS'] / base['IOPS']:.2f}" if base else "-"
            print(f"{label:<18}{config:<{width}}{res['MB/s']:>9.2f}{res['IOPS']:>9.0f}{ratio:>9}"
                  f"{res['translations/req']:>12.1f}{res['misses/req']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
