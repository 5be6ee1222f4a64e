"""Debian's SeaBIOS on `--machine pc`: it must take the board for an i440FX PC, find the virtio-blk disk through
PCI with its own driver, and boot from it: the project's boot sector (int 13h reads + checksum) and a GRUB disk
(reads a file from an ext2 partition). Every boot also runs with --no-ioeventfd, INTx only, and two drives whose
boot order comes from fw_cfg `bootorder`."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "guests"))
import disks  # noqa: E402
import grubdisk  # noqa: E402

pytestmark = pytest.mark.kvm
BIOS = "/usr/share/seabios/bios.bin"
OK = (0x10 << 1) | 1
BAD_SUM = (0x11 << 1) | 1
BOOT_TIMEOUT = 300          # SeaBIOS + GRUB under PVM emulation on a shared machine; normally ~5 s and ~25 s


@pytest.fixture(autouse=True)
def _need_seabios():
    if not os.path.exists(BIOS):
        pytest.skip("seabios is not installed (scripts/install-deps)")


def boot(pyhv_run, tmp_path, drives: list[str], *extra: str, serial: bool = False):
    log, stats = tmp_path / "seabios.log", tmp_path / "stats.json"
    args = ["run", "-M", "pc", "--firmware", BIOS, "--debugcon", f"file:{log}", "--serial",
            "stdio" if serial else "none", "--stats-json", str(stats), "--dump-pci", *extra]
    for d in drives:
        args += ["--drive", d]
    r = pyhv_run(*args, timeout=BOOT_TIMEOUT)
    return r, log.read_text(errors="replace"), json.loads(stats.read_text()) if stats.exists() else {}


VARIANTS = {
    "ioeventfd": (),
    "no-ioeventfd": ("--no-ioeventfd",),
    "intx-only": ("--no-msix",),
}


def check_variant(variant: str, r, stats: dict) -> None:
    notify = stats["by_mmio"].get("virtio-blk0-notify", {}).get("count", 0)
    if variant == "no-ioeventfd":
        assert notify > 0                           # every notification exited to pyhv
    else:
        assert notify == 0                          # KVM completed them (ioeventfd): no exit to Python
    if variant == "intx-only":
        assert "MSI-X" not in r.stdout and "Region 1:" not in r.stdout
    else:
        assert "[40] MSI-X" in r.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_seabios_boots_the_boot_sector_from_virtio_blk(pyhv_run, tmp_path, variant):
    disk = disks.bootsector_disk()
    r, log, stats = boot(pyhv_run, tmp_path, [f"file={disk}"], *VARIANTS[variant])
    assert r.status == OK, f"{r.stderr}\n{log[-3000:]}"
    assert "Running on QEMU (i440fx)" in log
    assert "QEMU fw_cfg DMA interface supported" in log
    assert "qemu/e820: addr 0x0000000000000000 len 0x0000000008000000 [RAM]" in log
    for bdf, ids in (("00:00.0", "8086:1237"), ("00:01.0", "8086:7000"), ("00:01.3", "8086:7113"),
                     ("00:02.0", "1af4:1042")):
        assert f"PCI: init bdf={bdf} id={ids}" in log
    assert "PIIX3/PIIX4 init: elcr=00 0c" in log
    assert "found virtio-blk at 00:02.0" in log
    assert "using modern (1.0) virtio mode" in log
    assert "Booting from Hard Disk" in log and "bootsector: checksum ok" in log
    # the BARs SeaBIOS assigned are the ones pyhv decodes
    mapped = re.findall(r"map device bdf=00:02\.0  bar (\d), addr ([0-9a-f]+), size ([0-9a-f]+)", log)
    assert mapped
    for bar, addr, size in mapped:
        assert re.search(rf"Region {bar}: Memory \(\w+\) at {int(addr, 16):#x} \[size={int(size, 16) // 1024}K\]",
                         r.stdout), r.stdout
    check_variant(variant, r, stats)


def test_a_bad_checksum_is_reported(pyhv_run, tmp_path):
    """The boot sector's check can fail: a disk whose payload differs from what it expects."""
    r, log, _ = boot(pyhv_run, tmp_path, [f"file={disks.bootsector_disk(corrupt=True)}"])
    assert r.status == BAD_SUM and "checksum mismatch" in log


def test_two_drives_boot_order_from_fw_cfg(pyhv_run, tmp_path):
    """Drive 0 (slot 2) is bootable but fails the check; bootindex=0 on drive 1 (slot 3) must win."""
    bad, good = disks.bootsector_disk(corrupt=True), disks.bootsector_disk()
    r, log, _ = boot(pyhv_run, tmp_path, [f"file={bad},readonly=on", f"file={good},bootindex=0"])
    assert r.status == OK, log[-3000:]
    assert "found virtio-blk at 00:02.0" in log and "found virtio-blk at 00:03.0" in log
    assert "00:03.0 SCSI storage controller" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*VARIANTS, "two-drives"])
def test_seabios_boots_grub_which_reads_a_file_from_ext2(pyhv_run, tmp_path, variant):
    missing = grubdisk.available()
    if missing:
        pytest.skip(missing)
    grub = grubdisk.grub_disk()
    if variant == "two-drives":
        drives = [f"file={disks.bootsector_disk(corrupt=True)},readonly=on", f"file={grub},bootindex=0"]
        extra: tuple[str, ...] = ()
    else:
        drives, extra = [f"file={grub},readonly=on"], VARIANTS[variant]
    r, log, stats = boot(pyhv_run, tmp_path, drives, *extra, serial=True)
    assert r.status == OK, f"{r.stdout[-2000:]}\n{log[-2000:]}"
    assert "GRUB loading" in r.stdout
    assert grubdisk.HELLO.strip() in r.stdout
    if variant != "two-drives":
        check_variant(variant, r, stats)


def installed_acpi(vm, tmp_path, timeout: float = BOOT_TIMEOUT) -> dict[str, bytes]:
    """The ACPI tables the firmware installed, read back from guest RAM with QMP pmemsave: {signature: table}."""
    import struct
    import time
    dump = tmp_path / "mem.bin"

    def read(addr: int, size: int) -> bytes:
        vm.qmp("pmemsave", val=addr, size=size, filename=str(dump))
        return dump.read_bytes()

    deadline = time.monotonic() + timeout
    while True:
        fseg = read(0xE0000, 0x20000)
        at = next((i for i in range(0, len(fseg), 16) if fseg[i:i + 8] == b"RSD PTR "), None)
        if at is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert at is not None, "no RSDP in 0xE0000-0xFFFFF"
    rsdp = fseg[at:at + 36]
    tables = {"RSDP": rsdp}
    rsdt = struct.unpack_from("<I", rsdp, 16)[0]
    header = read(rsdt, 36)
    body = read(rsdt, struct.unpack_from("<I", header, 4)[0])
    for (addr,) in struct.iter_unpack("<I", body[36:]):
        length = struct.unpack_from("<I", read(addr, 8), 4)[0]
        table = read(addr, length)
        tables[table[:4].decode()] = table
        if table[:4] == b"FACP":
            dsdt = struct.unpack_from("<I", table, 40)[0]
            tables["DSDT"] = read(dsdt, struct.unpack_from("<I", read(dsdt, 8), 4)[0])
    return tables


@pytest.mark.parametrize("acpi", [True, False])
def test_seabios_installs_pyhvs_acpi_tables_from_fw_cfg(tmp_path, acpi):
    """SeaBIOS runs pyhv's etc/table-loader (ALLOCATE, ADD_POINTER, ADD_CHECKSUM) and installs pyhv's tables: the
    RSDP it puts in the F segment leads to pyhv's RSDT, FADT (PM block where SeaBIOS moved PMBASE), MADT and DSDT
    with \\_SB.PCI0, every table with a valid checksum. With --acpi off SeaBIOS writes its own (OEM "BOCHS")."""
    import pyhv
    with pyhv.VM(firmware=BIOS, machine="pc", memory="128M", cpus=2, acpi=acpi) as vm:   # no disk: SeaBIOS waits
        tables = installed_acpi(vm, tmp_path)
    for name, table in tables.items():
        size = 20 if name == "RSDP" else len(table)
        assert sum(table[:size]) % 256 == 0, f"{name} checksum"
    oem = tables["RSDP"][9:15]
    if not acpi:
        assert oem == b"BOCHS "
        return
    assert oem == b"PYHV  " and {"FACP", "APIC", "DSDT"} <= set(tables)
    assert all(t[10:16] == b"PYHV  " for name, t in tables.items() if name != "RSDP")
    import struct
    pm1a_evt = struct.unpack_from("<I", tables["FACP"], 56)[0]
    assert pm1a_evt == 0x600                      # where SeaBIOS moved PMBASE ("Moving pm_base to 0x600")
    assert b"PCI0" in tables["DSDT"] and b"_PRT" in tables["DSDT"]
    madt, entries, at = tables["APIC"], [], 44
    while at < len(madt):
        entries.append(madt[at])
        at += madt[at + 1]
    assert entries.count(0) == 2 and entries.count(1) == 1    # a local APIC per vCPU, one I/O APIC
