"""The guest-physical memory map of pyhv's x86 machines, in one place (Cloud Hypervisor's
`arch/src/x86_64/layout.rs` is the model). Firmware loading, the boot protocol's tables, fw_cfg and both boards
read their addresses here.

    0x0000_0500  GDT (direct boot)                       0x0009_F000  MP table (e820-reserved up to 1 MiB)
    0x0000_6000  PVH start_info                          0x000A_0000  legacy VGA window (not RAM)
    0x0000_7000  boot_params (the zero page)             0x000C_0000  RAM again (option ROM / shadow area)
    0x0000_8000  setup_data                              0x000E_0000  ISA BIOS window (firmware) or ACPI tables
    0x0000_9000  page tables (PML4, PDPT, 4 PDs)         0x0010_0000  RAM: kernel, initrd, ...
    0x0002_0000  kernel command line (64 KiB)
    BELOW_4G_LIMIT (3 GiB)  .. 4 GiB: the MMIO hole
        0xD000_0000  virtio-mmio slots (microvm), 4 KiB each
        0xFEA0_0000  ACPI Generic Event Device (microvm)
        0xFEC0_0000  I/O APIC          0xFED9_0000  VT-d remapping unit (pc --iommu intel, as QEMU's q35)
        0xFEE0_0000  local APICs
        0xFEFF_C000  KVM's identity-map page, then its 3-page TSS
        4 GiB - size  firmware ROM
    4 GiB ..  RAM above the hole, when memory exceeds BELOW_4G_LIMIT
"""
from __future__ import annotations

MiB = 1 << 20
FOUR_GIB = 1 << 32

# low memory (direct boot)
GDT_ADDR = 0x500
START_INFO_ADDR = 0x6000
ZERO_PAGE_ADDR = 0x7000
SETUP_DATA_ADDR = 0x8000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000                     # four page directories: 0xb000-0xefff
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000                # room reserved at CMDLINE_ADDR
MP_TABLE_ADDR = 0x9F000              # reserved in e820 from here to 1 MiB
MP_FLOATING_ADDR = 0x9FC00
VGA_START, VGA_END = 0xA0000, 0xC0000
ISA_BIOS_START = 0xE0000             # the legacy BIOS window; direct boot puts the ACPI tables here
ACPI_TABLES_ADDR = ISA_BIOS_START
ACPI_TABLES_END = 0x100000           # the BIOS area's end (e820-reserved with it)
HIGH_MEMORY_START = 0x100000         # 1 MiB

# the hole below 4 GiB
BELOW_4G_LIMIT = 0xC0000000          # RAM below the PCI/MMIO hole
VIRTIO_MMIO_BASE = 0xD0000000        # microvm's virtio-mmio slots
VIRTIO_MMIO_SLOT_SIZE = 0x1000
MICROVM_GED_ADDR = 0xFEA00000        # microvm's ACPI Generic Event Device (4 bytes), as QEMU's microvm
IOAPIC_ADDR = 0xFEC00000
INTEL_IOMMU_ADDR = 0xFED90000         # the VT-d register block (4 KiB), where QEMU puts intel-iommu
LAPIC_ADDR = 0xFEE00000
IDENTITY_MAP_ADDR = 0xFEFFC000       # as QEMU: one page, then the 3-page TSS
TSS_ADDR = 0xFEFFD000
KVM_RESERVED_START, KVM_RESERVED_SIZE = IDENTITY_MAP_ADDR, 0x4000
