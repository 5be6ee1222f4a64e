"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs, its I/O APIC and
the ISA interrupt wiring. A floating pointer ("_MP_"), which the guest looks for in the last KiB of base memory,
points at the configuration table ("PCMP"), which may be elsewhere (with 64 CPUs it is larger than that KiB)."""
from __future__ import annotations

import struct
from pyhv.arch.x86.layout import IOAPIC_ADDR, LAPIC_ADDR

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4                   # version 1.4
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MPC_APIC_USABLE = 1
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
MPC_OEM = b"PYHV    "
MPC_PRODUCT = b"PYHV MICROVM"
ISA_IRQS = [irq for irq in range(16) if irq != 2]   # IRQ 2 is the PIC cascade; KVM routes GSI n to pin n


def checksum(data: bytes) -> int:
    """The byte that makes the sum of `data` plus itself zero modulo 256."""
    return (-sum(data)) & 0xFF


def build_mptable(table_addr: int, cpus: int, cpu_signature: int = 0x600, cpu_features: int = 0) -> bytes:
    """The configuration table, to be written at `table_addr`."""
    ioapic_id = cpus                 # after the local APIC ids 0..cpus-1
    entries = bytearray()
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack("<BBBBII8x", MP_PROCESSOR, cpu, LAPIC_VERSION, flags, cpu_signature, cpu_features)
    entries += struct.pack("<BB6s", MP_BUS, 0, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, IOAPIC_ADDR)
    for irq in ISA_IRQS:            # flags 0: polarity and trigger conform to the ISA bus (high, edge)
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, 0, irq, ioapic_id, irq)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0xFF, 0)   # LINT0: ExtINT
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, 0, 0, 0xFF, 1)      # LINT1: NMI
    count = cpus + 1 + 1 + len(ISA_IRQS) + 2
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", MPC_SIGNATURE, 44 + len(entries), MP_SPEC_REV, 0,
                                   MPC_OEM, MPC_PRODUCT, 0, 0, count, LAPIC_ADDR, 0, 0, 0))
    table = header + entries
    table[7] = checksum(table)
    return bytes(table)


def build_floating_pointer(table_addr: int) -> bytes:
    """The 16-byte "_MP_" structure pointing at the configuration table."""
    floating = bytearray(struct.pack("<4sIBBB5x", MPF_SIGNATURE, table_addr, 1, MP_SPEC_REV, 0))
    floating[10] = checksum(floating)
    return bytes(floating)


def mptable_size(cpus: int) -> int:
    return 44 + 20 * cpus + 8 + 8 + 8 * len(ISA_IRQS) + 16
