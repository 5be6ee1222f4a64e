"""`--iommu intel`: pyhv's VT-d unit in front of the PCI devices, proved from inside guests.

The project's test guest (tests/guests/iommutest.c) programs the unit itself: maps pages for the virtio-blk
disk, reads into a mapped one (the host checks the bytes), then into an unmapped, a read-only and (for a write)
a write-only mapping: IOERR each time, a fault record naming the disk's source-id and address, the fault event
MSI pending in its local APIC, and not one byte of those pages changed; remaps after queued and register
invalidations take effect. Linux's own intel-iommu driver (intel_iommu=on) finds the unit through the DMAR table,
puts the virtio devices in IOMMU groups and moves disk and network data through its DMA API, in strict and lazy
invalidation mode; pyhv's counters show the translations."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linux_guest import boot
from pyhv.assets.protocol import debug_exit_status
from test_linux_devices import tcp_both_ways, values

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "guests"))
from build import build_elf  # noqa: E402

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20
DMAR_LINES = ("DMAR: IOMMU enabled", "DMAR: Host address width 48", "DMAR: DRHD base: 0x000000fed90000 flags: 0x1",
              "Using Queued invalidation", "DMAR: Intel(R) Virtualization Technology for Directed I/O")


@pytest.fixture(scope="module")
def iommutest():
    return build_elf("iommutest")


def test_project_guest_programs_the_iommu_and_faults_stop_rogue_dma(iommutest, tmp_path):
    disk = tmp_path / "disk.raw"
    data = os.urandom(MiB)
    disk.write_bytes(data)
    stats = tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "-M", "pc", "--iommu", "intel", "--memory",
                           "128M", "--kernel", str(iommutest), "--drive", f"file={disk}", "--serial", "stdio",
                           "--stats-json", str(stats)], stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                          cwd=ROOT)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 33, out + proc.stderr.decode(errors="replace")[-2000:]
    steps = [line for line in out.splitlines() if line.startswith("STEP ")]
    assert len(steps) == 14 and all(line.endswith(" ok") for line in steps), out
    got = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("read"))
    assert got["read0"].strip() == data[:32].hex()                          # sector 0, through the mapping
    assert got["read1"].strip() == data[512:544].hex()                      # after the queued invalidation
    assert got["read2"].strip() == data[1024:1056].hex()                    # after IOTLB_REG
    image = disk.read_bytes()
    assert image[3 * 512:4 * 512] == bytes((i * 7 + 3) & 0xFF for i in range(512))   # the guest's write landed
    assert image[5 * 512:6 * 512] == data[5 * 512:6 * 512]                  # the refused write did not
    assert image[:3 * 512] == data[:3 * 512] and image[6 * 512:] == data[6 * 512:]
    iommu = json.loads(stats.read_text())["iommu"]
    disk_counters = iommu["devices"]["virtio-blk0"]
    assert disk_counters["faults"] == 3 and disk_counters["translations"] > 20
    assert iommu["invalidations"]["iotlb-page"] == 1 and iommu["invalidations"]["wait"] >= 3


DISK_COMMANDS = [
    "dmesg > /tmp/dmesg",
    "g=$(basename $(readlink /sys/block/vda/device/../iommu_group)); echo blkgroup=$g",
    "echo blkpci=$(basename $(readlink -f /sys/block/vda/device/..))",
    "echo blkmember=$(ls /sys/kernel/iommu_groups/$g/devices)",
    "dd if=/dev/vda of=/tmp/r bs=64k count=32 iflag=direct 2>/dev/null", "echo readsum=$(sha256sum /tmp/r)",
    "dd if=/dev/urandom of=/tmp/w bs=64k count=16 2>/dev/null", "echo wrotesum=$(sha256sum /tmp/w)",
    "dd if=/tmp/w of=/dev/vda bs=64k seek=64 oflag=direct conv=fsync 2>/dev/null; echo dd=$?",
    "echo faults=$(grep -c 'DMAR: \\[DMA' /tmp/dmesg)",
]


def check_linux(got: dict, out: str, disk: Path, host_data: bytes, stats: Path, mode: str, devices: list[str]):
    for line in DMAR_LINES:                                 # the kernel's log, on the serial console
        assert line in out, line
    assert f"DMA domain TLB invalidation policy: {mode} mode" in out
    assert got["blkgroup"].isdigit() and got["blkmember"] == got["blkpci"], got
    assert got["readsum"] == hashlib.sha256(host_data).hexdigest() and got["dd"] == "0"
    with open(disk, "rb") as f:
        f.seek(64 * 65536)
        assert hashlib.sha256(f.read(MiB)).hexdigest() == got["wrotesum"]
    assert got["faults"] == "0"
    iommu = json.loads(stats.read_text())["iommu"]
    assert iommu["translation"] is True
    for name in devices:
        c = iommu["devices"][name]
        assert c["faults"] == 0 and c["translations"] > 2 * MiB // 4096, (name, c)
    assert iommu["invalidations"].get("iotlb", 0) > 0


def disk_image(tmp_path: Path) -> tuple[Path, bytes]:
    disk = tmp_path / "disk.raw"
    host_data = os.urandom(2 * MiB)
    with open(disk, "wb") as f:
        f.write(host_data)
        f.truncate(8 * MiB)
    return disk, host_data


@pytest.mark.slow
def test_linux_intel_iommu_strict_moves_disk_and_network_data_through_the_dma_api(linux_guest, netns, tmp_path):
    """Strict mode (iommu.strict=1): every dma_unmap invalidates the IOTLB before the buffer is reused."""
    disk, host_data = disk_image(tmp_path)
    stats = tmp_path / "stats.json"
    got, _, out = tcp_both_ways(linux_guest, netns, "pc", "mac=52:54:00:12:34:57", after=[
        *DISK_COMMANDS,
        "g=$(basename $(readlink /sys/class/net/eth0/device/../iommu_group)); echo netgroup=$g",
    ], extra=("--iommu", "intel", "--drive", f"file={disk}", "--stats-json", str(stats)),
        append="intel_iommu=on iommu.strict=1")
    check_linux(got, out, disk, host_data, stats, "strict", ["virtio-blk0", "virtio-net0"])
    assert got["netgroup"].isdigit() and got["netgroup"] != got["blkgroup"]


@pytest.mark.slow
def test_linux_intel_iommu_lazy_moves_disk_data(linux_guest, tmp_path):
    """Lazy mode (iommu.strict=0, the kernel's default): unmapped IOVAs are flushed in batches."""
    disk, host_data = disk_image(tmp_path)
    stats = tmp_path / "stats.json"
    status, out, err = boot(linux_guest, "--machine", "pc", "--iommu", "intel", "--drive", f"file={disk}",
                            "--stats-json", str(stats), command="; ".join(DISK_COMMANDS),
                            append="intel_iommu=on iommu.strict=0")
    assert status == debug_exit_status(0), (out + err)[-3000:]
    check_linux(values(out), out, disk, host_data, stats, "lazy", ["virtio-blk0"])


def test_without_intel_iommu_on_the_unit_stays_off_and_devices_work(linux_guest):
    """Linux leaves the unit alone unless told intel_iommu=on (the mini kernel's default): its virtio driver still
    accepts ACCESS_PLATFORM, the DMA API hands out guest-physical addresses and the unit, translation off, passes
    them through."""
    status, out, err = boot(linux_guest, "--machine", "pc", "--iommu", "intel", "--device", "virtio-rng",
                            command="dd if=/dev/hwrng of=/tmp/r bs=512 count=2 2>/dev/null; echo dd=$?")
    assert status == debug_exit_status(0), (out + err)[-3000:]
    assert values(out)["dd"] == "0"
    assert "IOMMU: translation off" in err
