"""Direct Linux boot: place the kernel, initrd, command line and platform tables in guest RAM, then start the
boot vCPU at the kernel's entry (PVH for an ELF vmlinux that has the note, the 64-bit boot protocol otherwise).

Guest-physical layout (all below 1 MiB except the kernel and initrd):
    0x0500  GDT            0x6000  hvm_start_info (PVH)   0x7000  zero page (64-bit protocol)
    0x8000  setup_data (an RNG seed; 64-bit protocol)     0x9000  page tables
    0x20000 command line   0x9f000 MP configuration table (without ACPI tables)
    0x9fc00 MP floating pointer (the last KiB of base memory, where the guest looks for it)
    0xe0000 ACPI tables, RSDP first (its address also in hvm_start_info / boot_params.acpi_rsdp_addr)
    kernel at its ELF physical addresses (16 MiB for x86-64 Linux); initrd at the top of RAM below
    min(initrd_addr_max, the PCI hole).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pyhv.arch.x86 import entry_state
from pyhv.arch.x86.bootparams import RNG_SEED_SIZE, build_zero_page, e820_map, rng_seed_setup_data
from pyhv.arch.x86.kernel_image import KernelImage, load_kernel
from pyhv.arch.x86.mptable import build_floating_pointer, build_mptable
from pyhv.arch.x86.pvh import build_start_info
from pyhv.errors import ConfigError, GuestImageError
from pyhv.kvm import Vcpu
from pyhv.memory import GuestMemory
from pyhv.arch.x86.layout import (ACPI_TABLES_ADDR, ACPI_TABLES_END, CMDLINE_ADDR, CMDLINE_MAX, MP_FLOATING_ADDR,
                                  MP_TABLE_ADDR, SETUP_DATA_ADDR, START_INFO_ADDR, ZERO_PAGE_ADDR)

log = logging.getLogger(__name__)

PAGE = 4096


@dataclass
class AcpiBlob:
    """A machine's ACPI tables laid out for guest RAM at ACPI_TABLES_ADDR (`acpi.builder.layout_in_memory`)."""
    data: bytes
    rsdp_addr: int

    def __post_init__(self) -> None:
        if ACPI_TABLES_ADDR + len(self.data) > ACPI_TABLES_END:
            raise ConfigError(f"the ACPI tables take {len(self.data)} bytes; at most "
                              f"{ACPI_TABLES_END - ACPI_TABLES_ADDR} fit at {ACPI_TABLES_ADDR:#x}")


@dataclass
class LinuxBoot:
    kernel: KernelImage
    cmdline: str
    initrd: bytes | None
    entry: str                 # "pvh" or "linux64"
    cpus: int
    below_4g: int
    above_4g: int
    acpi: AcpiBlob | None = None      # None: the MP table describes the CPUs and interrupt routing
    initrd_addr: int = 0

    @classmethod
    def prepare(cls, kernel_path: str, initrd_path: str | None, cmdline: str, below_4g: int, above_4g: int,
                cpus: int, entry: str = "auto", acpi: AcpiBlob | None = None) -> "LinuxBoot":
        kernel = load_kernel(kernel_path)
        if entry == "auto":
            entry = "pvh" if (kernel.pvh_entry is not None and not kernel.from_bzimage) else "linux64"
        if entry == "pvh" and kernel.pvh_entry is None:
            raise GuestImageError(f"{kernel_path} has no PVH entry note (CONFIG_PVH)", "boot it with its 64-bit entry")
        if len(cmdline.encode()) + 1 > min(kernel.cmdline_size + 1, CMDLINE_MAX):
            raise ConfigError(f"the kernel command line is {len(cmdline.encode())} bytes; this kernel accepts at "
                              f"most {kernel.cmdline_size}")
        initrd = None
        if initrd_path:
            try:
                with open(initrd_path, "rb") as f:
                    initrd = f.read()
            except OSError as e:
                raise GuestImageError(f"initrd file {initrd_path}: {e.strerror}")
        boot = cls(kernel, cmdline, initrd, entry, cpus, below_4g, above_4g, acpi)
        boot._place()
        return boot

    def _place(self) -> None:
        k = self.kernel
        if k.start < 0x100000:
            raise GuestImageError(f"{k.path}: loads at {k.start:#x}, below 1 MiB")
        if k.end > self.below_4g:
            need = -(-k.end // (1 << 20))
            raise ConfigError(f"the kernel needs RAM up to {need} MiB", f"give at least --memory {need + 16}M")
        if self.initrd is not None:
            top = min(self.below_4g, k.initrd_addr_max + 1)
            addr = (top - len(self.initrd)) // PAGE * PAGE
            if addr < k.end:
                raise ConfigError(f"the initrd ({len(self.initrd) >> 20} MiB) does not fit above the kernel "
                                  f"below {top >> 20} MiB", "give more --memory")
            self.initrd_addr = addr

    def load(self, memory: GuestMemory, cpu_signature: int, cpu_features: int) -> None:
        """Write everything into guest RAM (again on every reset: the guest may have overwritten it)."""
        for seg in self.kernel.segments:
            memory.write(seg.paddr, seg.data)
            if seg.memsz > len(seg.data):
                memory.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
        if self.initrd is not None:
            memory.write(self.initrd_addr, self.initrd)
        memory.write(CMDLINE_ADDR, self.cmdline.encode() + b"\0")
        e820 = e820_map(self.below_4g, self.above_4g, MP_TABLE_ADDR)
        rsdp = 0
        if self.acpi is not None:
            memory.write(ACPI_TABLES_ADDR, self.acpi.data)
            rsdp = self.acpi.rsdp_addr
        else:
            memory.write(MP_TABLE_ADDR, build_mptable(MP_TABLE_ADDR, self.cpus, cpu_signature, cpu_features))
            memory.write(MP_FLOATING_ADDR, build_floating_pointer(MP_TABLE_ADDR))
        initrd = (self.initrd_addr, len(self.initrd)) if self.initrd is not None else None
        if self.entry == "pvh":
            memory.write(START_INFO_ADDR, build_start_info(START_INFO_ADDR, CMDLINE_ADDR, e820, initrd, rsdp))
        else:
            # a fresh seed on every (re)boot; the kernel zeroes it once read
            memory.write(SETUP_DATA_ADDR, rng_seed_setup_data(os.urandom(RNG_SEED_SIZE)))
            zp = build_zero_page(self.kernel.setup_header, e820, CMDLINE_ADDR, len(self.cmdline.encode()),
                                 *(initrd or (0, 0)), setup_data=SETUP_DATA_ADDR, acpi_rsdp_addr=rsdp)
            memory.write(ZERO_PAGE_ADDR, zp)

    def setup_vcpu(self, vcpu: Vcpu, memory: GuestMemory, bsp: bool) -> None:
        entry_state.firmware_defaults(vcpu, bsp)
        if not bsp:
            return                  # application processors wait for INIT/SIPI from the guest
        if self.entry == "pvh":
            entry_state.enter_pvh(vcpu, memory, self.kernel.pvh_entry, START_INFO_ADDR)
        else:
            entry_state.enter_long_mode(vcpu, memory, self.kernel.entry64, ZERO_PAGE_ADDR)

    def describe(self) -> str:
        how = "PVH entry" if self.entry == "pvh" else "64-bit boot protocol"
        src = (f"bzImage, {self.kernel.decompressed_from} payload decompressed on the host"
               if self.kernel.from_bzimage else "ELF vmlinux")
        return f"{self.kernel.path} ({src}; {how})"
