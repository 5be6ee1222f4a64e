"""pyhv's ACPI tables read by Linux itself (the project's small kernel, CONFIG_ACPI): on `microvm` the RSDP reaches
the kernel through boot_params/hvm_start_info, the MADT brings up the vCPUs without an MP table, virtio_mmio binds
to the LNRO0005 devices of the DSDT (no virtio_mmio.device= on the command line), and the GED's power button,
pressed by QMP system_powerdown, ends in the guest's own ACPI S5 power-off."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time

import pytest
from qemu.qmp import EventListener, QMPClient

import pyhv
from linux_guest import BOOT_TIMEOUT, boot
from pyhv.assets.protocol import command_output, debug_exit_status

pytestmark = [pytest.mark.kvm, pytest.mark.slow]
MiB = 1 << 20
TABLES = ("RSDP", "XSDT", "FACP", "APIC", "DSDT")


def lines_of(out: str) -> list[str]:
    return (command_output(out) or "").splitlines()


def test_microvm_acpi_tables_and_virtio_blk_found_through_the_dsdt(linux_guest, tmp_path):
    disk = tmp_path / "disk.raw"
    host_data = os.urandom(MiB)
    with open(disk, "wb") as f:
        f.write(host_data)
        f.truncate(8 * MiB)
    status, out, err = boot(linux_guest, "--drive", f"file={disk}", command="; ".join([
        "dmesg > /tmp/dmesg",
        "grep -E 'ACPI: (RSDP|XSDT|FACP|APIC|DSDT) ' /tmp/dmesg",
        "grep -o 'Using ACPI.*' /tmp/dmesg",
        "echo cmdline=$(grep -c 'virtio_mmio[.]device=4K' /proc/cmdline)",   # [.]: not matching this text
        "echo path=$(readlink -f /sys/block/vda/device)",
        "dd if=/dev/vda of=/tmp/r bs=64k count=16 2>/dev/null", "echo readsum=$(sha256sum /tmp/r)",
        "dd if=/dev/urandom of=/tmp/w bs=64k count=4 2>/dev/null", "echo wrotesum=$(sha256sum /tmp/w)",
        "dd if=/tmp/w of=/dev/vda bs=64k seek=64 conv=fsync 2>/dev/null; echo dd=$?",
    ]))
    assert status == debug_exit_status(0), (out + err)[-3000:]
    text = "\n".join(lines_of(out))
    for table in TABLES:
        assert re.search(rf"ACPI: {table} 0x00000000000E", text), f"no ACPI: {table} in\n{text}"
    assert "PYHV" in text                                           # pyhv's OEM id on the tables
    assert "Using ACPI (MADT) for SMP configuration information" in text
    got = dict(line.split("=", 1) for line in lines_of(out) if "=" in line)
    assert got["cmdline"] == "0"                                    # no virtio_mmio.device= given
    assert "LNRO0005" in got["path"], got["path"]                   # the platform device ACPI enumerated
    assert got["readsum"].split()[0] == hashlib.sha256(host_data).hexdigest()
    assert got["dd"] == "0"
    with open(disk, "rb") as f:
        f.seek(64 * 65536)
        assert hashlib.sha256(f.read(4 * 65536)).hexdigest() == got["wrotesum"].split()[0]


def test_two_vcpus_come_up_from_the_madt_without_an_mp_table(linux_guest):
    status, out, err = boot(linux_guest, "--cpus", "2", command="; ".join([
        "dmesg > /tmp/dmesg",
        "echo cpus=$(grep -c ^processor /proc/cpuinfo)",
        "echo mptable=$(grep -c 'found SMP MP-tabl[e]' /tmp/dmesg)",
        "echo madt=$(grep -c 'Using ACPI (MAD[T])' /tmp/dmesg)",
    ]))
    assert status == debug_exit_status(0), (out + err)[-3000:]
    got = dict(line.split("=", 1) for line in lines_of(out) if "=" in line)
    assert got == {"cpus": "2", "mptable": "0", "madt": "1"}, got


def test_pc_direct_boot_pci_root_bridge_and_intx_routing_from_the_dsdt(linux_guest, tmp_path):
    """On pc, the kernel takes PCI0 (PNP0A03, its _CRS windows) from the DSDT and routes INTx (--no-msix) through
    _PRT to GSI 10 as PIIX3 does; the SCI is IRQ 9 (level) and the PM timer sits where the FADT says."""
    disk = tmp_path / "disk.raw"
    host_data = os.urandom(256 * 1024)
    disk.write_bytes(host_data)
    status, out, err = boot(linux_guest, "--machine", "pc", "--no-msix", "--drive", f"file={disk}",
                            command="; ".join([
                                "dmesg > /tmp/dmesg",
                                "grep -E 'ACPI: (RSDP|XSDT|FACP|FACS|APIC|DSDT) |PCI Root Bridge|PM-Timer' /tmp/dmesg",
                                "grep -E ' (9|10):' /proc/interrupts",
                                "dd if=/dev/vda of=/tmp/r bs=64k count=4 2>/dev/null",
                                "echo readsum=$(sha256sum /tmp/r)",
                            ]))
    assert status == debug_exit_status(0), (out + err)[-3000:]
    text = "\n".join(lines_of(out))
    for table in (*TABLES, "FACS"):
        assert re.search(rf"ACPI: {table} 0x00000000000E", text), f"no ACPI: {table} in\n{text}"
    assert "ACPI: PCI Root Bridge [PCI0]" in text and "PM-Timer IO Port: 0x608" in text
    assert re.search(r"^\s*9:.*IO-APIC\s+9-fasteoi\s+acpi", text, re.M), text
    assert re.search(r"^\s*10:.*IO-APIC\s+10-fasteoi\s+virtio0", text, re.M), text      # INTx via _PRT
    got = dict(line.split("=", 1) for line in lines_of(out) if "=" in line)
    assert got["readsum"].split()[0] == hashlib.sha256(host_data).hexdigest()


def test_acpi_off_keeps_the_mp_table_and_the_command_line_devices(linux_guest, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"P" * 4096)
    status, out, err = boot(linux_guest, "--acpi", "off", "--cpus", "2", "--drive", f"file={disk}",
                            command="; ".join([
                                "dmesg > /tmp/dmesg",
                                "echo acpi=$(grep -c 'ACPI: RSD[P]' /tmp/dmesg)",
                                "echo mptable=$(grep -c 'found SMP MP-tabl[e]' /tmp/dmesg)",
                                "echo cpus=$(grep -c ^processor /proc/cpuinfo)",
                                "echo cmdline=$(grep -c 'virtio_mmio[.]device=4K@0xd0000000' /proc/cmdline)",
                                "echo head=$(head -c 4 /dev/vda)",
                            ]))
    assert status == debug_exit_status(0), (out + err)[-3000:]
    got = dict(line.split("=", 1) for line in lines_of(out) if "=" in line)
    assert got == {"acpi": "0", "mptable": "1", "cpus": "2", "cmdline": "1", "head": "PPPP"}, got


@pytest.mark.parametrize("machine", ["microvm", "pc"])
def test_system_powerdown_presses_the_power_button_and_the_guest_powers_off(linux_guest, machine):
    """QMP (QEMU's client) system_powerdown. microvm: the GED raises its event, Linux's evged runs the DSDT's _EVT
    (Notify PWRB); pc: PIIX4 PM sets PWRBTN_STS and raises the SCI (the fixed power button). Linux's tiny
    power-button driver then signals the process in /proc/sys/kernel/cad_pid (here the test's shell), which runs
    poweroff: Linux writes S5 to the GED's sleep register / PM1a_CNT and pyhv ends with status 0. While the shell
    ignores the signal, a press changes nothing: the VM keeps running."""
    # (the markers are split by "" so that the kernel's echo of its command line does not match them)
    command = ("echo $$ > /proc/sys/kernel/cad_pid; trap '' USR2; echo ig\"\"noring; sleep 6; "
               "trap 'echo power-button-\"\"pressed; poweroff -f' USR2; echo ar\"\"med; while :; do sleep 1; done")
    with pyhv.VM(kernel=str(linux_guest.bzimage), initrd=str(linux_guest.initramfs_uncompressed), machine=machine,
                 append=f"reboot=k panic=-1 {pyhv_cmd(command)}") as vm:
        vm.console.expect("\nignoring", timeout=BOOT_TIMEOUT)
        vm.qmp("system_powerdown")              # a guest that ignores the button keeps running
        time.sleep(3)
        assert vm.wait(0) is None and vm.state == "running"
        vm.console.expect("\narmed", timeout=60)

        async def body() -> list[str]:
            client = QMPClient("test")
            await client.connect(vm.qmp_path)
            listener = EventListener()
            events = []
            with client.listen(listener):
                await client.execute("system_powerdown")
                while len(events) < 2:
                    events.append(await listener.get())
            await client.disconnect()
            return [e["event"] for e in events] + [str(events[-1]["data"])]

        names = asyncio.run(asyncio.wait_for(body(), 120))
        vm.console.expect("\npower-button-pressed", timeout=60)
        assert vm.wait(60) == 0
    assert names[:2] == ["POWERDOWN", "SHUTDOWN"], names
    assert "guest" in names[2]


def pyhv_cmd(command: str) -> str:
    from pyhv.assets.protocol import encode_command
    return encode_command(command)
