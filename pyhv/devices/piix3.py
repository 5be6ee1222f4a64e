"""Intel 82371SB (PIIX3) PCI-to-ISA bridge, function 00:01.0: the PIRQ route control registers that connect the
four PCI interrupt lines PIRQA#-PIRQD# to ISA IRQs (82371SB datasheet, 2.2.8 PIRQRC[A:D], offsets 0x60-0x63).

Every PCI function's INTx pin reaches one PIRQ (see `pci.bus.pirq_swizzle`); several functions may share it, so
a PIRQ is asserted while any of them asserts it, and an ISA IRQ while any PIRQ routed to it is asserted. The ISA
IRQ is driven with KVM_IRQ_LINE on GSI n, which KVM's default routing sends to both the 8259 pair (pin n) and the
IOAPIC (pin n): that is the board's PCI-to-IOAPIC wiring, the one SeaBIOS's MP table describes.

The edge/level control registers (ELCR, ports 0x4D0/0x4D1) live in the PIIX3's 8259s, which KVM models in the
kernel: SeaBIOS's writes there never leave KVM. `elcr()` reads them back through KVM_GET_IRQCHIP when asked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from pyhv.devices.irq import IrqLine
from pyhv.devices.pci.constants import PCI_CLASS_BRIDGE_ISA, PCI_HEADER_TYPE_MULTI_FUNCTION, PCI_VENDOR_ID_INTEL
from pyhv.devices.pci.device import PciDevice

log = logging.getLogger(__name__)

PCI_DEVICE_ID_INTEL_82371SB_0 = 0x7000
PIIX_PIRQRC = 0x60                 # PIRQRC[A:D], 0x60-0x63
PIIX_PIRQRC_IRQEN_DISABLE = 0x80   # IRQEN#: set = not routed
PIIX_PIRQRC_IRQ_MASK = 0x0F
PIIX_PIRQRC_RESET = 0x80
PIIX_IRQ_ROUTABLE = frozenset({3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15})   # datasheet: reserved values 0-2, 8, 13
PIIX_XBCS = 0x4E                   # X-bus chip select, reset 0x0003
PIIX_TOM = 0x69                    # top of memory, reset 0x02
PIIX_MBIRQ0 = 0x70                 # motherboard device IRQ route 0, reset 0x80
PIIX_MBDMA0 = 0x76
PIIX_APICBASE = 0x80
PIIX_DLC = 0x82
PIIX_SMICNTL = 0xA0
PIIX_SMIEN = 0xA2
PIIX_SEE = 0xA4
PIIX_FTMR = 0xA8
PIIX_SMIREQ = 0xAA
NUM_PIRQS = 4


@dataclass
class Piix3State:
    asserted: list[set[int]] = field(default_factory=lambda: [set() for _ in range(NUM_PIRQS)])   # ids of sources
    irq_levels: dict[int, bool] = field(default_factory=dict)
    bad_routes: int = 0


class Piix3(PciDevice):
    SNAPSHOT = True
    SNAPSHOT_EXTRA = ("pirq_state",)
    VENDOR_ID = PCI_VENDOR_ID_INTEL
    DEVICE_ID = PCI_DEVICE_ID_INTEL_82371SB_0
    CLASS_CODE = PCI_CLASS_BRIDGE_ISA
    HEADER_TYPE = PCI_HEADER_TYPE_MULTI_FUNCTION

    def __init__(self, name: str, isa_irq: Callable[[int], IrqLine],
                 read_elcr: Callable[[], tuple[int, int]] | None = None) -> None:
        super().__init__(name)
        self.isa_irq = isa_irq
        self.read_elcr = read_elcr
        self.pirq_state = Piix3State()
        self._lines: dict[int, IrqLine] = {}
        self._bad_logged = False
        c = self.config
        for i in range(NUM_PIRQS):
            c.set(PIIX_PIRQRC + i, 1, PIIX_PIRQRC_RESET)
            c.set_mask(PIIX_PIRQRC + i, 1, PIIX_PIRQRC_IRQEN_DISABLE | PIIX_PIRQRC_IRQ_MASK)
        for off, width, reset in ((PIIX_XBCS, 2, 0x0003), (PIIX_TOM, 1, 0x02), (PIIX_MBIRQ0, 2, 0x8080),
                                  (PIIX_MBDMA0, 2, 0x0404), (PIIX_APICBASE, 1, 0x00), (PIIX_DLC, 1, 0x00),
                                  (PIIX_SMICNTL, 1, 0x08), (PIIX_SMIEN, 2, 0x0000), (PIIX_SEE, 4, 0),
                                  (PIIX_FTMR, 1, 0x0F), (PIIX_SMIREQ, 2, 0)):
            c.set(off, width, reset)
            c.set_mask(off, width, (1 << (8 * width)) - 1)

    # --- routing ---------------------------------------------------------------------------------------------
    def route(self, pirq: int) -> int | None:
        """The ISA IRQ that PIRQ `pirq` (0-3) is routed to now, or None."""
        value = self.config.get(PIIX_PIRQRC + pirq, 1)
        if value & PIIX_PIRQRC_IRQEN_DISABLE:
            return None
        irq = value & PIIX_PIRQRC_IRQ_MASK
        if irq not in PIIX_IRQ_ROUTABLE:
            self.pirq_state.bad_routes += 1
            if not self._bad_logged:
                self._bad_logged = True
                log.warning("%s: PIRQ%s routed to reserved IRQ %d; not connected (logged once)", self.name,
                            "ABCD"[pirq], irq)
            return None
        return irq

    def set_pirq(self, pirq: int, source: object, level: bool) -> None:
        with self.lock:
            sources = self.pirq_state.asserted[pirq]
            if level:
                sources.add(id(source))
            else:
                sources.discard(id(source))
            self._update_irqs()

    def _update_irqs(self) -> None:
        wanted: dict[int, bool] = {}
        for pirq in range(NUM_PIRQS):
            irq = self.route(pirq)
            if irq is not None:
                wanted[irq] = wanted.get(irq, False) or bool(self.pirq_state.asserted[pirq])
        for irq in set(self.pirq_state.irq_levels) | set(wanted):
            level = wanted.get(irq, False)
            if self.pirq_state.irq_levels.get(irq, False) != level:
                line = self._lines.get(irq)
                if line is None:
                    line = self._lines[irq] = self.isa_irq(irq)
                line.set_level(level)
            self.pirq_state.irq_levels[irq] = level

    def config_written(self, offset: int, size: int, value: int) -> None:
        if offset < PIIX_PIRQRC + NUM_PIRQS and offset + size > PIIX_PIRQRC:
            with self.lock:
                self._update_irqs()

    def elcr(self) -> tuple[int, int] | None:
        return self.read_elcr() if self.read_elcr else None

    def reset(self) -> None:
        super().reset()
        with self.lock:
            for s in self.pirq_state.asserted:
                s.clear()
            self._update_irqs()
