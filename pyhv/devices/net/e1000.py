"""Intel 82540EM Gigabit Ethernet controller (PCI 8086:100E, "PRO/1000 MT Desktop", subsystem 8086:001E), enough
for Linux's `e1000` driver (and option ROMs such as iPXE's `intel`) to bind, read the MAC from the EEPROM, bring
the link up and move frames both ways. Facts from Intel's PCI/PCI-X Family of Gigabit Ethernet Controllers
Software Developer's Manual (8254x SDM); the code is pyhv's own.

PCI function:
    BAR 0  128 KiB memory: the registers
    BAR 1  64 bytes I/O: IOADDR (0x0) selects a register, IODATA (0x4) reads/writes it (Linux issues CTRL.RST
           through this window on the 82540)
    INTx pin A: asserted while ICR & IMS != 0. No MSI (the 82540EM has none).

Registers are declared once (`REGISTERS`: offset, name, reset, writable bits, read/write hooks) and kept as
32-bit values by offset in `state.regs`; arrays (MTA, RAL/RAH, VFTA) and the statistics block are generated
into the same table. Offsets not declared read 0 and ignore writes (logged once each).

Data path: the driver writes TDT → descriptors from TDH to TDT are processed at once on the writing vCPU
thread; each packet (legacy descriptors, or extended data descriptors after a TCP/IP context descriptor, with
checksum insertion and TCP/UDP segmentation offload) goes to `port.send(frame)`. Frames from the outside come in
through `receive(frame)` (any thread), which fills legacy receive descriptors from RDH toward RDT, or drops the
frame and counts it in MPC when none is free. Frames carry no vnet header either way.

A guest that points a ring outside RAM, programs RDLEN/TDLEN 0 or a head/tail beyond its ring, or sends a packet
over `MAX_TX_PACKET` gets a one-time warning and that queue stops (until the driver programs the ring again or
resets the device); the vCPU loop never sees an exception and nothing is written outside the ring and the
buffers its descriptors name.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from pyhv.devices.net.e1000_eeprom import (
    E1000_EERD_ADDR_SHIFT, E1000_EERD_DATA_SHIFT, E1000_EERD_DONE, E1000_EERD_START, EEPROM_WORDS,
    PHY_ADDRESS, Microwire, MicrowireState, Phy, PhyState, build_eeprom,
)
from pyhv.devices.pci.constants import PCI_CLASS_NETWORK_ETHERNET, PCI_VENDOR_ID_INTEL
from pyhv.devices.pci.device import PciDevice, PciDeviceState
from pyhv.devices.registers import Register
from pyhv.memory import GuestMemoryError, MemoryRegion
from pyhv.runtime.tap import VNET_HDR_SIZE, TapError, open_tap, parse_mac

if TYPE_CHECKING:
    from pyhv.runtime.iothread import IoThread
    from pyhv.memory import GuestMemory

log = logging.getLogger(__name__)

VENDOR_ID = PCI_VENDOR_ID_INTEL
DEVICE_ID = 0x100E                     # 82540EM
SUBSYSTEM_VENDOR_ID = PCI_VENDOR_ID_INTEL
SUBSYSTEM_ID = 0x001E                  # PRO/1000 MT Desktop Adapter
REVISION = 0x03
MMIO_BAR, MMIO_SIZE = 0, 0x20000
IO_BAR, IO_SIZE = 1, 0x40
IOADDR, IODATA = 0x0, 0x4

# --- register offsets (8254x SDM 13.x) -------------------------------------------------------------------------
CTRL, STATUS, EECD, EERD, CTRL_EXT, FLA, MDIC = 0x0000, 0x0008, 0x0010, 0x0014, 0x0018, 0x001C, 0x0020
FCAL, FCAH, FCT, VET = 0x0028, 0x002C, 0x0030, 0x0038
ICR, ITR, ICS, IMS, IMC = 0x00C0, 0x00C4, 0x00C8, 0x00D0, 0x00D8
RCTL, FCTTV, TXCW, RXCW = 0x0100, 0x0170, 0x0178, 0x0180
TCTL, TIPG, AIT = 0x0400, 0x0410, 0x0458
LEDCTL, PBA = 0x0E00, 0x1000
FCRTL, FCRTH = 0x2160, 0x2168
RDBAL, RDBAH, RDLEN, RDH, RDT, RDTR, RXDCTL, RADV, RSRPD = \
    0x2800, 0x2804, 0x2808, 0x2810, 0x2818, 0x2820, 0x2828, 0x282C, 0x2C00
TXDMAC = 0x3000
TDBAL, TDBAH, TDLEN, TDH, TDT, TIDV, TXDCTL, TADV, TSPMT = \
    0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x3820, 0x3828, 0x382C, 0x3830
STATS_START, STATS_END = 0x4000, 0x4100
RXCSUM = 0x5000
MTA, MTA_COUNT = 0x5200, 128
RA, RA_ENTRIES = 0x5400, 16             # RAL(n) = RA + 8n, RAH(n) = RA + 8n + 4
VFTA, VFTA_COUNT = 0x5600, 128
WUC, WUFC, WUS, MANC = 0x5800, 0x5808, 0x5810, 0x5820

# statistics (read-to-clear)
CRCERRS, MPC, SCC, ECOL, COLC, RLEC = 0x4000, 0x4010, 0x4014, 0x4018, 0x4028, 0x4040
GPRC, BPRC, MPRC, GPTC = 0x4074, 0x4078, 0x407C, 0x4080
GORCL, GORCH, GOTCL, GOTCH = 0x4088, 0x408C, 0x4090, 0x4094
RNBC, RUC, ROC = 0x40A0, 0x40A4, 0x40AC
TORL, TORH, TOTL, TOTH, TPR, TPT = 0x40C0, 0x40C4, 0x40C8, 0x40CC, 0x40D0, 0x40D4
PRC64, PRC127, PRC255, PRC511, PRC1023, PRC1522 = 0x405C, 0x4060, 0x4064, 0x4068, 0x406C, 0x4070
PTC64, PTC127, PTC255, PTC511, PTC1023, PTC1522 = 0x40D8, 0x40DC, 0x40E0, 0x40E4, 0x40E8, 0x40EC
MPTC, BPTC, TSCTC, TSCTFC = 0x40F0, 0x40F4, 0x40F8, 0x40FC
STAT_PAIRS = {GORCL: GORCH, GOTCL: GOTCH, TORL: TORH, TOTL: TOTH}     # 64-bit counters: low, high

# --- register bits -----------------------------------------------------------------------------------------------
E1000_CTRL_FD = 1 << 0
E1000_CTRL_ASDE = 1 << 5
E1000_CTRL_SLU = 1 << 6
E1000_CTRL_SPD_1000 = 2 << 8
E1000_CTRL_FRCSPD = 1 << 11
E1000_CTRL_FRCDPX = 1 << 12
E1000_CTRL_RST = 1 << 26
E1000_CTRL_VME = 1 << 30
E1000_CTRL_PHY_RST = 1 << 31
E1000_STATUS_FD = 1 << 0
E1000_STATUS_LU = 1 << 1
E1000_STATUS_SPEED_1000 = 2 << 6
E1000_STATUS_ASDV_1000 = 2 << 8
E1000_MDIC_DATA_MASK = 0xFFFF
E1000_MDIC_REG_SHIFT = 16
E1000_MDIC_PHY_SHIFT = 21
E1000_MDIC_OP_WRITE = 1 << 26
E1000_MDIC_OP_READ = 2 << 26
E1000_MDIC_READY = 1 << 28
E1000_MDIC_INT_EN = 1 << 29
E1000_MDIC_ERROR = 1 << 30

E1000_ICR_TXDW = 1 << 0
E1000_ICR_TXQE = 1 << 1
E1000_ICR_LSC = 1 << 2
E1000_ICR_RXSEQ = 1 << 3
E1000_ICR_RXDMT0 = 1 << 4
E1000_ICR_RXO = 1 << 6
E1000_ICR_RXT0 = 1 << 7
E1000_ICR_MDAC = 1 << 9
E1000_ICR_RXCFG = 1 << 10
E1000_ICR_TXD_LOW = 1 << 15
E1000_ICR_SRPD = 1 << 16
E1000_ICR_INT_ASSERTED = 1 << 31
E1000_ICR_VALID = 0x0001F6DF          # the causes the 82540 implements

E1000_RCTL_EN = 1 << 1
E1000_RCTL_SBP = 1 << 2
E1000_RCTL_UPE = 1 << 3
E1000_RCTL_MPE = 1 << 4
E1000_RCTL_LPE = 1 << 5
E1000_RCTL_LBM_MASK = 3 << 6
E1000_RCTL_RDMTS_SHIFT = 8
E1000_RCTL_MO_SHIFT = 12
E1000_RCTL_BAM = 1 << 15
E1000_RCTL_BSIZE_SHIFT = 16
E1000_RCTL_VFE = 1 << 18
E1000_RCTL_BSEX = 1 << 25
E1000_RCTL_SECRC = 1 << 26

E1000_TCTL_EN = 1 << 1
E1000_TCTL_PSP = 1 << 3

# transmit descriptors
E1000_TXD_CMD_EOP = 0x01
E1000_TXD_CMD_IFCS = 0x02
E1000_TXD_CMD_IC = 0x04             # legacy: insert checksum (CSO/CSS)
E1000_TXD_CMD_TSE = 0x04            # extended: TCP segmentation
E1000_TXD_CMD_RS = 0x08
E1000_TXD_CMD_RPS = 0x10
E1000_TXD_CMD_DEXT = 0x20
E1000_TXD_CMD_VLE = 0x40
E1000_TXD_CMD_IDE = 0x80
E1000_TXD_STAT_DD = 0x01
E1000_TXD_DTYP_CONTEXT = 0x0
E1000_TXD_DTYP_DATA = 0x1
E1000_TXD_POPTS_IXSM = 0x01
E1000_TXD_POPTS_TXSM = 0x02
E1000_TUCMD_TCP = 0x01              # context TUCMD: 1 = TCP, 0 = UDP
E1000_TUCMD_IP = 0x02               # 1 = IPv4, 0 = IPv6
# receive descriptor status
E1000_RXD_STAT_DD = 0x01
E1000_RXD_STAT_EOP = 0x02
E1000_RXD_STAT_IXSM = 0x04          # "ignore checksum indication": no receive checksum offload
E1000_RXD_STAT_VP = 0x08            # the 802.1Q tag was stripped into `special`

DESC_SIZE = 16
ETH_ALEN = 6
ETH_HLEN = 14
ETH_ZLEN = 60                        # minimum frame without FCS: shorter frames are padded on receive
ETH_FCS_LEN = 4
MAX_RX_FRAME = 1522                  # without RCTL.LPE (VLAN-tagged maximum, FCS included)
MAX_RX_FRAME_LPE = 16384
MAX_TX_PACKET = 0x40000              # a packet longer than this (TSO headers + payload) stops the queue


class FramePort(Protocol):
    """Where transmitted frames go (a tap adapter, a test, a switch)."""

    def send(self, frame: bytes) -> None: ...


@dataclass
class TxContext:
    """The last TCP/IP context descriptor (offload parameters for the packets that follow)."""
    ipcss: int = 0
    ipcso: int = 0
    ipcse: int = 0
    tucss: int = 0
    tucso: int = 0
    tucse: int = 0
    paylen: int = 0
    tucmd: int = 0
    hdrlen: int = 0
    mss: int = 0


@dataclass
class E1000State(PciDeviceState):
    """Everything the guest can see change: the MAC registers by offset, the EEPROM wires and words, the PHY,
    the transmit context and the packet being assembled; counters of what the model did."""
    regs: dict[int, int] = field(default_factory=dict)
    eeprom: list[int] = field(default_factory=list)
    microwire: MicrowireState = field(default_factory=MicrowireState)
    phy: PhyState = field(default_factory=PhyState)
    ioaddr: int = 0
    link_connected: bool = True
    tx_context: TxContext = field(default_factory=TxContext)
    tx_packet: bytearray = field(default_factory=bytearray)
    tx_popts: int = 0
    tx_first: bool = True
    tx_vlan: int | None = None
    tx_stopped: str = ""             # why the transmit queue stopped ("" = running)
    rx_stopped: str = ""
    tx_frames: int = 0
    rx_frames: int = 0
    rx_dropped: int = 0
    rx_filtered: int = 0
    unknown_accesses: int = 0


def _stat_registers() -> list[Register]:
    names = {CRCERRS: "crcerrs", MPC: "mpc", GPRC: "gprc", BPRC: "bprc", MPRC: "mprc", GPTC: "gptc",
             GORCL: "gorcl", GORCH: "gorch", GOTCL: "gotcl", GOTCH: "gotch", RNBC: "rnbc", RUC: "ruc",
             ROC: "roc", TORL: "torl", TORH: "torh", TOTL: "totl", TOTH: "toth", TPR: "tpr", TPT: "tpt",
             MPTC: "mptc", BPTC: "bptc", TSCTC: "tsctc", TSCTFC: "tsctfc"}
    return [Register(off, names.get(off, f"stat_{off:#x}"), width=4, read="_read_stat", write="_write_ignore")
            for off in range(STATS_START, STATS_END, 4)]


def _registers() -> tuple[Register, ...]:
    r = Register
    regs = [
        r(CTRL, "ctrl", 4, reset=E1000_CTRL_SLU | E1000_CTRL_FD | E1000_CTRL_SPD_1000 | E1000_CTRL_ASDE,
          write="_write_ctrl"),
        r(STATUS, "status", 4, read="_read_status", write="_write_ignore"),
        r(EECD, "eecd", 4, read="_read_eecd", write="_write_eecd"),
        r(EERD, "eerd", 4, write="_write_eerd"),
        r(CTRL_EXT, "ctrl_ext", 4),
        r(FLA, "fla", 4),
        r(MDIC, "mdic", 4, reset=E1000_MDIC_READY, write="_write_mdic"),
        r(FCAL, "fcal", 4), r(FCAH, "fcah", 4, writable=0xFFFF), r(FCT, "fct", 4, writable=0xFFFF),
        r(VET, "vet", 4, reset=0x8100, writable=0xFFFF),
        r(ICR, "icr", 4, read="_read_icr", write="_write_icr"),
        r(ITR, "itr", 4, writable=0xFFFF),
        r(ICS, "ics", 4, read="_read_icr_peek", write="_write_ics"),
        r(IMS, "ims", 4, write="_write_ims"),
        r(IMC, "imc", 4, read="_read_zero", write="_write_imc"),
        r(RCTL, "rctl", 4, writable=0x07FFFFFE, write="_write_rctl"),
        r(FCTTV, "fcttv", 4, writable=0xFFFF),
        r(TXCW, "txcw", 4), r(RXCW, "rxcw", 4, writable=0),
        r(TCTL, "tctl", 4, reset=0x3F << 12 | 0x0F << 4 | E1000_TCTL_PSP, write="_write_tctl"),
        r(TIPG, "tipg", 4), r(AIT, "ait", 4, writable=0xFFFF),
        r(LEDCTL, "ledctl", 4, reset=0x07068302),
        r(PBA, "pba", 4, reset=0x00100030, writable=0xFFFF),
        r(FCRTL, "fcrtl", 4, writable=0x8000FFF8), r(FCRTH, "fcrth", 4, writable=0xFFF8),
        r(RDBAL, "rdbal", 4, writable=0xFFFFFFF0, write="_write_rx_ring"),
        r(RDBAH, "rdbah", 4, write="_write_rx_ring"),
        r(RDLEN, "rdlen", 4, writable=0x000FFF80, write="_write_rx_ring"),
        r(RDH, "rdh", 4, writable=0xFFFF, write="_write_rx_ring"),
        r(RDT, "rdt", 4, writable=0xFFFF, write="_write_rdt"),
        r(RDTR, "rdtr", 4, writable=0x8000FFFF),
        r(RXDCTL, "rxdctl", 4, reset=0x00010000),
        r(RADV, "radv", 4, writable=0xFFFF),
        r(RSRPD, "rsrpd", 4, writable=0xFFF),
        r(TXDMAC, "txdmac", 4, writable=1),
        r(TDBAL, "tdbal", 4, writable=0xFFFFFFF0, write="_write_tx_ring"),
        r(TDBAH, "tdbah", 4, write="_write_tx_ring"),
        r(TDLEN, "tdlen", 4, writable=0x000FFF80, write="_write_tx_ring"),
        r(TDH, "tdh", 4, writable=0xFFFF, write="_write_tx_ring"),
        r(TDT, "tdt", 4, writable=0xFFFF, write="_write_tdt"),
        r(TIDV, "tidv", 4, writable=0xFFFF),
        r(TXDCTL, "txdctl", 4),
        r(TADV, "tadv", 4, writable=0xFFFF),
        r(TSPMT, "tspmt", 4, reset=0x01000400),
        r(RXCSUM, "rxcsum", 4, reset=0x00000300, writable=0x7FF),
        r(WUC, "wuc", 4), r(WUFC, "wufc", 4), r(WUS, "wus", 4, w1c=0xFFFFFFFF, writable=0),
        r(MANC, "manc", 4),
    ]
    regs += [r(MTA + 4 * i, f"mta[{i}]", 4) for i in range(MTA_COUNT)]
    for i in range(RA_ENTRIES):
        regs.append(r(RA + 8 * i, f"ral[{i}]", 4))
        regs.append(r(RA + 8 * i + 4, f"rah[{i}]", 4, writable=0x800FFFFF))
    regs += [r(VFTA + 4 * i, f"vfta[{i}]", 4) for i in range(VFTA_COUNT)]
    regs += _stat_registers()
    return tuple(regs)


REGISTERS = _registers()
REGISTER_AT = {reg.offset: reg for reg in REGISTERS}


def _csum_add(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The 16-bit ones'-complement sum (unfolded is fine: folded at the end) of big-endian words."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return start + sum(struct.unpack(f">{len(data) // 2}H", data))


def _csum_fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _insert_checksum(frame: bytearray, css: int, cso: int, cse: int, extra: int = 0) -> bool:
    """Sum frame[css..cse] (cse 0: to the end), plus `extra`, complemented into frame[cso:cso+2]. False (and
    nothing written) when the offsets do not fit the frame."""
    end = len(frame) if cse == 0 else min(cse + 1, len(frame))
    if css >= end or cso + 2 > len(frame):
        return False
    struct.pack_into(">H", frame, cso, _csum_fold(_csum_add(memoryview(frame)[css:end], extra)))
    return True


class E1000(PciDevice):
    """The 82540EM. `memory`: the DMA view of guest RAM; `mac`: six bytes or "52:54:00:12:34:56" (default: a
    random locally administered 52:54:00:xx:xx:xx); `port`: where transmitted frames go (`attach_port` later
    works too)."""

    VENDOR_ID = VENDOR_ID
    DEVICE_ID = DEVICE_ID
    REVISION = REVISION
    CLASS_CODE = PCI_CLASS_NETWORK_ETHERNET
    SUBSYSTEM_VENDOR_ID = SUBSYSTEM_VENDOR_ID
    SUBSYSTEM_ID = SUBSYSTEM_ID
    INTERRUPT_PIN = 1

    def __init__(self, name: str, memory: "GuestMemory", mac: bytes | str | None = None,
                 port: FramePort | None = None) -> None:
        super().__init__(name)
        if isinstance(mac, str):
            mac = parse_mac(mac)
        self.mac = bytes(mac) if mac else b"\x52\x54\x00" + os.urandom(3)
        if len(self.mac) != ETH_ALEN:
            raise ValueError(f"{name}: MAC must be 6 bytes")
        self.memory = memory                # the DMA space: guest RAM, or a TranslatedDma behind the IOMMU
        self.port = port
        self.rx_ready: Callable[[], None] | None = None    # called when the driver posts receive buffers
        self.state = E1000State(eeprom=build_eeprom(self.mac, VENDOR_ID, DEVICE_ID, SUBSYSTEM_VENDOR_ID,
                                                    SUBSYSTEM_ID))
        self.microwire = Microwire(self.state.microwire, self.state.eeprom)
        self.phy = Phy(self.state.phy)
        self._warned: set[str] = set()
        self._readers: dict[int, Callable[[], int]] = {}
        self._writers: dict[int, Callable[[int], None]] = {}
        for reg in REGISTERS:
            if reg.read == "_read_stat":
                reader = self._stat_reader(reg.offset)
            else:
                reader = getattr(self, reg.read) if reg.read else self._plain_reader(reg)
            if reg.write in ("_write_rx_ring", "_write_tx_ring"):
                writer = self._ring_writer(reg, reg.write == "_write_tx_ring")
            else:
                writer = getattr(self, reg.write) if reg.write else self._plain_writer(reg)
            self._readers[reg.offset], self._writers[reg.offset] = reader, writer
        self.mmio_region = MemoryRegion.io(f"{name}-mmio", MMIO_SIZE, self.mmio_read, self.mmio_write, owner=name)
        self.mmio_region.describe = self.register_name
        self.io_region = MemoryRegion.io(f"{name}-io", IO_SIZE, self.io_read, self.io_write, owner=name)
        self.io_region.describe = lambda off: f"{name}.{'ioaddr' if off < 4 else 'iodata' if off < 8 else off}"
        self.add_bar(MMIO_BAR, self.mmio_region)
        self.add_bar(IO_BAR, self.io_region, io=True)
        self._reset_mac()

    # --- plumbing ----------------------------------------------------------------------------------------------
    def attach_dma(self, space) -> None:
        """Put the card behind an IOMMU: descriptors and buffers are then I/O virtual addresses."""
        self.memory = space

    @classmethod
    def create(cls, context, net) -> "E1000":
        """The registry's factory (`--nic tap,ifname=TAP,model=e1000`, `--device e1000,ifname=TAP`): the card on
        the guest's RAM, its frames on the tap (opened, or created, now)."""
        m = context.machine
        device = cls(context.name, m.guest_memory, mac=net.mac)
        if net.romfile:
            device.load_option_rom(net.romfile)
        E1000Tap(device, m.iothread, tap=net.tap)
        return device

    def load_option_rom(self, path: str) -> None:
        """Put the option ROM in `path` (iPXE's `efi-e1000.rom`, say) behind the expansion ROM BAR, where firmware
        finds, copies and runs it; the BAR is the file's size rounded up to a power of two."""
        with open(path, "rb") as f:
            data = f.read()
        size = max(2048, 1 << (len(data) - 1).bit_length())
        self.add_rom_bar(MemoryRegion.rom(f"{self.name}-rom", data, size, owner=self.name))

    def attach_port(self, port: FramePort | None) -> None:
        self.port = port

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + msg, self.name, *args)

    def register_name(self, offset: int) -> str:
        reg = REGISTER_AT.get(offset & ~3)
        return f"{self.name}.{reg.name}" if reg else f"{self.name}+{offset:#x}"

    def _plain_reader(self, reg: Register) -> Callable[[], int]:
        regs, off = self.state.regs, reg.offset
        return lambda: regs.get(off, 0)

    def _plain_writer(self, reg: Register) -> Callable[[int], None]:
        off, writable, w1c = reg.offset, 0xFFFFFFFF if reg.writable is None else reg.writable, reg.w1c

        def write(value: int) -> None:
            regs = self.state.regs
            old = regs.get(off, 0)
            regs[off] = (old & ~writable & ~w1c) | (value & writable & ~w1c) | (old & w1c & ~value)
        return write

    def _set(self, off: int, value: int) -> None:
        self.state.regs[off] = value & 0xFFFFFFFF

    def _get(self, off: int) -> int:
        return self.state.regs.get(off, 0)

    # --- region callbacks: the vCPU thread (and IODATA) ------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        with self.lock:
            try:
                if size == 8:
                    return self._reg_read(offset) | (self._reg_read(offset + 4) << 32)
                value = self._reg_read(offset & ~3)
                return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)
            except Exception:                   # a bug here must not take the vCPU loop down
                log.exception("%s: read of %#x failed", self.name, offset)
                return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            try:
                if size == 8:
                    self._reg_write(offset, value & 0xFFFFFFFF)
                    self._reg_write(offset + 4, value >> 32)
                    return
                if size != 4 or offset & 3:         # narrow: merge into the dword (side-effect registers see it)
                    base, shift = offset & ~3, 8 * (offset & 3)
                    mask = ((1 << (8 * size)) - 1) << shift
                    old = self._get(base) if base in REGISTER_AT and REGISTER_AT[base].read is None else 0
                    self._reg_write(base, (old & ~mask) | ((value << shift) & mask))
                    return
                self._reg_write(offset, value)
            except Exception:
                log.exception("%s: write of %#x to %#x failed", self.name, value, offset)

    def _reg_read(self, offset: int) -> int:
        reader = self._readers.get(offset)
        if reader is None:
            self._unknown(offset, "read")
            return 0
        return reader() & 0xFFFFFFFF

    def _reg_write(self, offset: int, value: int) -> None:
        writer = self._writers.get(offset)
        if writer is None:
            self._unknown(offset, "write")
            return
        writer(value & 0xFFFFFFFF)

    def _unknown(self, offset: int, what: str) -> None:
        self.state.unknown_accesses += 1
        if what == "write":
            self._warn_once(f"reg-{offset:#x}", "%s of unimplemented register %#x ignored", what, offset)

    def io_read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset < 4:
                return (self.state.ioaddr >> (8 * offset)) & ((1 << (8 * size)) - 1)
            if 4 <= offset < 8:
                return (self.mmio_read(self.state.ioaddr, 4) >> (8 * (offset - 4))) & ((1 << (8 * size)) - 1)
            return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset == IOADDR and size == 4:
                self.state.ioaddr = value & (MMIO_SIZE - 4)
            elif offset == IODATA and size == 4:
                self.mmio_write(self.state.ioaddr, 4, value)
            else:
                self._warn_once("io-narrow", "I/O window access of %d bytes at %#x ignored", size, offset)

    # --- register hooks ----------------------------------------------------------------------------------------
    def _read_zero(self) -> int:
        return 0

    def _write_ignore(self, value: int) -> None:
        pass

    def _write_ctrl(self, value: int) -> None:
        if value & E1000_CTRL_RST:
            log.debug("%s: software reset", self.name)
            self._reset_mac()
            return
        if value & E1000_CTRL_PHY_RST:
            self.phy.reset()
        self._set(CTRL, value & ~(E1000_CTRL_RST | E1000_CTRL_PHY_RST))
        self._update_link()

    def _link_up(self) -> bool:
        return self.state.link_connected and bool(self._get(CTRL) & E1000_CTRL_SLU)

    def _read_status(self) -> int:
        value = E1000_STATUS_FD | E1000_STATUS_SPEED_1000 | E1000_STATUS_ASDV_1000
        if self._link_up():
            value |= E1000_STATUS_LU
        return value

    def _update_link(self, signal: bool = True) -> None:
        up = self._link_up()
        was = bool(self._get(STATUS) & E1000_STATUS_LU)
        self._set(STATUS, E1000_STATUS_LU if up else 0)       # remembers the level last reported
        if signal and up != was:
            self._raise(E1000_ICR_LSC)

    def set_link(self, connected: bool) -> None:
        """Plug or unplug the virtual cable: PHY and STATUS.LU follow, and the driver gets an LSC interrupt."""
        with self.lock:
            self.state.link_connected = bool(connected)
            self.phy.link = bool(connected)
            self._update_link()

    def _read_eecd(self) -> int:
        return self.microwire.read_eecd()

    def _write_eecd(self, value: int) -> None:
        self.microwire.write_eecd(value)

    def _write_eerd(self, value: int) -> None:
        if not value & E1000_EERD_START:
            self._set(EERD, value & ~E1000_EERD_DONE)
            return
        addr = (value >> E1000_EERD_ADDR_SHIFT) & 0xFF
        data = self.state.eeprom[addr] if addr < EEPROM_WORDS else 0xFFFF
        self._set(EERD, (addr << E1000_EERD_ADDR_SHIFT) | E1000_EERD_DONE | (data << E1000_EERD_DATA_SHIFT))

    def _write_mdic(self, value: int) -> None:
        reg = (value >> E1000_MDIC_REG_SHIFT) & 0x1F
        phy = (value >> E1000_MDIC_PHY_SHIFT) & 0x1F
        op = value & (3 << 26)
        data = value & E1000_MDIC_DATA_MASK
        result = value & ~(E1000_MDIC_READY | E1000_MDIC_ERROR)
        if phy != PHY_ADDRESS or op not in (E1000_MDIC_OP_READ, E1000_MDIC_OP_WRITE):
            result |= E1000_MDIC_ERROR
        elif op == E1000_MDIC_OP_READ:
            result = (result & ~E1000_MDIC_DATA_MASK) | self.phy.read(reg)
        elif self.phy.write(reg, data):
            if self.state.link_connected:
                self._raise(E1000_ICR_LSC)          # renegotiated (instantly)
        self._set(MDIC, result | E1000_MDIC_READY)
        if value & E1000_MDIC_INT_EN:
            self._raise(E1000_ICR_MDAC)

    def _read_icr(self) -> int:
        value = self._get(ICR)
        self._set(ICR, 0)                          # read-to-clear
        self._update_irq()
        return value

    def _read_icr_peek(self) -> int:
        return self._get(ICR)

    def _write_icr(self, value: int) -> None:          # writing 1s clears those causes
        self._set(ICR, self._get(ICR) & ~value)
        self._update_irq()

    def _write_ics(self, value: int) -> None:
        self._raise(value & E1000_ICR_VALID)

    def _write_ims(self, value: int) -> None:
        self._set(IMS, self._get(IMS) | (value & E1000_ICR_VALID))
        self._update_irq()

    def _write_imc(self, value: int) -> None:
        self._set(IMS, self._get(IMS) & ~value)
        self._update_irq()

    def _raise(self, causes: int) -> None:
        if causes:
            self._set(ICR, self._get(ICR) | causes)
            self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self._get(ICR) & self._get(IMS))
        if level != self.state.intx_level:
            self.set_intx(level)

    def _write_tctl(self, value: int) -> None:
        old = self._get(TCTL)
        self._set(TCTL, value)
        if value & E1000_TCTL_EN and not old & E1000_TCTL_EN:
            self._transmit()

    def _write_rctl(self, value: int) -> None:
        old = self._get(RCTL)
        self._set(RCTL, value & 0x07FFFFFE)
        if value & E1000_RCTL_EN and not old & E1000_RCTL_EN:
            self._wake_receiver()       # buffers posted (RDT) before the receiver was on: the tap side resumes now

    def _wake_receiver(self) -> None:
        """Tell the back end there are receive buffers again (it stops reading the tap while there are none)."""
        callback = self.rx_ready
        if callback is not None and self._rx_free() > 0:
            callback()

    def _ring_writer(self, reg: Register, tx: bool) -> Callable[[int], None]:
        """Base, length and head registers: store, and restart a queue a bad ring had stopped."""
        plain = self._plain_writer(reg)

        def write(value: int) -> None:
            plain(value)
            if tx:
                self.state.tx_stopped = ""
            else:
                self.state.rx_stopped = ""
        return write

    def _write_rdt(self, value: int) -> None:
        self._set(RDT, value & 0xFFFF)
        if self.state.rx_stopped.startswith("rdt"):
            self.state.rx_stopped = ""
        self._wake_receiver()

    def _write_tdt(self, value: int) -> None:
        self._set(TDT, value & 0xFFFF)
        if self.state.tx_stopped.startswith("tdt"):
            self.state.tx_stopped = ""
        self._transmit()

    # --- statistics ----------------------------------------------------------------------------------------------
    def _count(self, off: int, n: int = 1) -> None:
        regs = self.state.regs
        value = regs.get(off, 0) + n
        high = STAT_PAIRS.get(off)
        if high is not None:
            if value > 0xFFFFFFFF:
                regs[high] = (regs.get(high, 0) + (value >> 32)) & 0xFFFFFFFF
            regs[off] = value & 0xFFFFFFFF
        else:
            regs[off] = min(value, 0xFFFFFFFF)        # counters saturate

    def _stat_reader(self, off: int) -> Callable[[], int]:
        def read() -> int:
            return self.state.regs.pop(off, 0)        # read-to-clear
        return read

    # --- reset ---------------------------------------------------------------------------------------------------
    def _reset_mac(self) -> None:
        """The device's own reset (power-on and CTRL.RST): registers to their reset values, the receive address
        0 loaded from the EEPROM, queues idle. Configuration space is not touched."""
        st = self.state
        st.regs.clear()
        for reg in REGISTERS:
            if reg.reset:
                st.regs[reg.offset] = reg.reset
        mac = self.mac
        st.regs[RA] = int.from_bytes(mac[:4], "little")
        st.regs[RA + 4] = int.from_bytes(mac[4:], "little") | (1 << 31)     # AV
        self.microwire.reset()
        self.phy.reset()
        st.ioaddr = 0
        st.tx_context = TxContext()
        st.tx_packet = bytearray()
        st.tx_popts, st.tx_first, st.tx_vlan = 0, True, None
        st.tx_stopped = st.rx_stopped = ""
        self._update_link(signal=False)
        self._update_irq()

    def reset(self) -> None:
        """Machine reset: PCI configuration as plugged, the controller as at power-on."""
        with self.lock:
            super().reset()
            self.phy.link = self.state.link_connected
            self._reset_mac()

    # --- transmit ------------------------------------------------------------------------------------------------
    def _ring(self, bal: int, bah: int, dlen: int) -> tuple[int, int]:
        base = (self._get(bah) << 32) | (self._get(bal) & ~0xF)
        return base, (self._get(dlen) & 0xFFF80) // DESC_SIZE

    def _transmit(self) -> None:
        st = self.state
        if not self._get(TCTL) & E1000_TCTL_EN or st.tx_stopped:
            return
        base, n = self._ring(TDBAL, TDBAH, TDLEN)
        head, tail = self._get(TDH), self._get(TDT)
        if head == tail:
            return
        if n == 0:
            return self._stop_tx("tdlen", "TDLEN is 0 with TDT %d", tail)
        if head >= n or tail >= n:
            return self._stop_tx("tdt", "TDH %d / TDT %d beyond the %d-descriptor ring", head, tail, n)
        done = 0
        try:
            while head != tail and not st.tx_stopped:
                addr = base + head * DESC_SIZE
                desc = self.memory.view(addr, DESC_SIZE, write=True)
                report = self._tx_descriptor(desc)
                if report:
                    desc[12] = desc[12] | E1000_TXD_STAT_DD
                head = (head + 1) % n
                done += 1
                if done > n:                     # cannot happen (head meets tail), but never loop forever
                    break
        except GuestMemoryError as e:
            self._stop_tx("ring-mem", "transmit ring at %#x: %s", base, e)
        self._set(TDH, head)
        if done:
            self._raise(E1000_ICR_TXDW | (E1000_ICR_TXQE if head == tail else 0))

    def _stop_tx(self, key: str, msg: str, *args: object) -> None:
        self.state.tx_stopped = key
        self.state.tx_packet = bytearray()
        self.state.tx_first = True
        self._warn_once(f"tx-{key}", "transmit queue stopped: " + msg, *args)

    def _tx_descriptor(self, desc: memoryview) -> bool:
        """Process one descriptor; True when its status should be written back (RS)."""
        st = self.state
        lower = int.from_bytes(desc[8:12], "little")
        cmd = lower >> 24
        if cmd & E1000_TXD_CMD_DEXT:
            dtyp = (lower >> 20) & 0xF
            if dtyp == E1000_TXD_DTYP_CONTEXT:
                c = st.tx_context
                c.ipcss, c.ipcso, c.ipcse = desc[0], desc[1], int.from_bytes(desc[2:4], "little")
                c.tucss, c.tucso, c.tucse = desc[4], desc[5], int.from_bytes(desc[6:8], "little")
                c.paylen, c.tucmd = lower & 0xFFFFF, cmd
                c.hdrlen, c.mss = desc[13], int.from_bytes(desc[14:16], "little")
                return bool(cmd & E1000_TXD_CMD_RS)
            if dtyp != E1000_TXD_DTYP_DATA:
                self._warn_once("tx-dtyp", "transmit descriptor type %d ignored", dtyp)
                return bool(cmd & E1000_TXD_CMD_RS)
            length = lower & 0xFFFFF
            if st.tx_first:
                st.tx_popts = desc[13]
        else:
            length = lower & 0xFFFF
            if st.tx_first:
                st.tx_popts = 0
        if st.tx_first:
            st.tx_vlan = None
        self._tx_append(int.from_bytes(desc[0:8], "little"), length)
        if st.tx_stopped:
            return False
        if cmd & E1000_TXD_CMD_VLE:
            st.tx_vlan = int.from_bytes(desc[14:16], "little")
        st.tx_first = False
        if cmd & E1000_TXD_CMD_EOP:
            packet, st.tx_packet, st.tx_first = st.tx_packet, bytearray(), True
            if not cmd & E1000_TXD_CMD_DEXT:
                if cmd & E1000_TXD_CMD_IC:
                    _insert_checksum(packet, desc[13], desc[10], 0)      # CSS, CSO
                self._send(packet)
            elif cmd & E1000_TXD_CMD_TSE:
                self._send_tso(packet)
            else:
                self._offload_checksums(packet, st.tx_popts, None)
                self._send(packet)
        return bool(cmd & (E1000_TXD_CMD_RS | E1000_TXD_CMD_RPS))

    def _tx_append(self, addr: int, length: int) -> None:
        st = self.state
        if length == 0:
            return
        if len(st.tx_packet) + length > MAX_TX_PACKET:
            self._stop_tx("too-long", "packet over %d bytes", MAX_TX_PACKET)
            return
        try:
            st.tx_packet += self.memory.read(addr, length)
        except GuestMemoryError as e:
            self._stop_tx("buf-mem", "transmit buffer %#x+%#x: %s", addr, length, e)

    def _offload_checksums(self, frame: bytearray, popts: int, l4_length: int | None) -> None:
        """POPTS IXSM/TXSM with the current context. For TSO segments `l4_length` is added to the L4 sum (the
        driver's pseudo-header sum leaves the length out)."""
        c = self.state.tx_context
        if popts & E1000_TXD_POPTS_IXSM:
            _insert_checksum(frame, c.ipcss, c.ipcso, c.ipcse)
        if popts & E1000_TXD_POPTS_TXSM:
            _insert_checksum(frame, c.tucss, c.tucso, c.tucse, l4_length or 0)

    def _send_tso(self, packet: bytearray) -> None:
        """TCP/UDP segmentation: HDRLEN bytes of headers, then the payload cut into MSS pieces; per segment the
        IP length (and IPv4 id), the TCP sequence number and flags (or UDP length) are fixed and checksums
        inserted as the first data descriptor's POPTS asks."""
        c, popts = self.state.tx_context, self.state.tx_popts
        hdrlen, mss = c.hdrlen, c.mss
        if hdrlen == 0 or hdrlen > len(packet) or mss == 0 or c.ipcss + 20 > hdrlen or c.tucss >= hdrlen:
            self._warn_once("tso-bad", "TSO context (hdrlen %d, mss %d) does not fit a %d-byte packet; sent as is",
                            hdrlen, mss, len(packet))
            self._send(packet)
            return
        header, payload = packet[:hdrlen], memoryview(packet)[hdrlen:]
        ipv4, tcp = bool(c.tucmd & E1000_TUCMD_IP), bool(c.tucmd & E1000_TUCMD_TCP)
        ip_id = int.from_bytes(header[c.ipcss + 4:c.ipcss + 6], "big") if ipv4 else 0
        seq = int.from_bytes(header[c.tucss + 4:c.tucss + 8], "big") if tcp and c.tucss + 14 <= hdrlen else None
        offset = 0
        total = len(payload)
        while True:
            chunk = payload[offset:offset + mss]
            last = offset + len(chunk) >= total
            seg = bytearray(header) + chunk
            if ipv4:
                struct.pack_into(">H", seg, c.ipcss + 2, len(seg) - c.ipcss)
                struct.pack_into(">H", seg, c.ipcss + 4, (ip_id + offset // mss) & 0xFFFF)
            elif c.ipcss + 40 <= hdrlen:
                struct.pack_into(">H", seg, c.ipcss + 4, len(seg) - c.ipcss - 40)
            if seq is not None:
                struct.pack_into(">I", seg, c.tucss + 4, (seq + offset) & 0xFFFFFFFF)
                if not last:
                    seg[c.tucss + 13] &= ~0x09                        # FIN, PSH only on the last segment
            elif not tcp and c.tucss + 8 <= hdrlen:
                struct.pack_into(">H", seg, c.tucss + 4, len(seg) - c.tucss)
            self._offload_checksums(seg, popts, len(seg) - c.tucss)
            self._send(seg)
            offset += len(chunk)
            if last or not chunk:
                break

    def _send(self, frame: bytearray) -> None:
        st = self.state
        if st.tx_vlan is not None and len(frame) >= 12:
            frame[12:12] = struct.pack(">HH", self._get(VET) & 0xFFFF, st.tx_vlan)
        n = len(frame)
        st.tx_frames += 1
        self._count(GPTC)
        self._count(TPT)
        self._count(GOTCL, n + ETH_FCS_LEN)
        self._count(TOTL, n + ETH_FCS_LEN)
        if n >= ETH_ALEN and frame[0] & 1:
            self._count(BPTC if frame[:ETH_ALEN] == b"\xff" * ETH_ALEN else MPTC)
        port = self.port
        if port is None:
            return
        try:
            port.send(bytes(frame))
        except Exception as e:                        # the back end's trouble is not the guest's
            self._warn_once("tx-port", "frame port failed: %s", e)

    # --- receive -------------------------------------------------------------------------------------------------
    def _rx_free(self) -> int:
        """Descriptors the driver has given the device (RDH up to, not including, RDT)."""
        _, n = self._ring(RDBAL, RDBAH, RDLEN)
        head, tail = self._get(RDH), self._get(RDT)
        if n == 0 or head >= n or tail >= n:
            return 0
        return (tail - head) % n

    def can_receive(self) -> bool:
        with self.lock:
            return bool(self._get(RCTL) & E1000_RCTL_EN) and not self.state.rx_stopped and self._rx_free() > 0

    def _rx_buffer_size(self) -> int:
        rctl = self._get(RCTL)
        bsize = (rctl >> E1000_RCTL_BSIZE_SHIFT) & 3
        if rctl & E1000_RCTL_BSEX:
            return (0, 16384, 8192, 4096)[bsize] or 2048
        return (2048, 1024, 512, 256)[bsize]

    def _accept(self, frame: bytes) -> bool:
        """Receive address filtering: exact RAL/RAH matches, promiscuous modes, broadcast, multicast table."""
        rctl = self._get(RCTL)
        dst = frame[:ETH_ALEN]
        if dst[0] & 1:
            if dst == b"\xff" * ETH_ALEN:
                return bool(rctl & (E1000_RCTL_BAM | E1000_RCTL_MPE))
            if rctl & E1000_RCTL_MPE:
                return True
            mo = (rctl >> E1000_RCTL_MO_SHIFT) & 3
            hash_value = ((dst[4] >> (4 - mo)) | (dst[5] << (4 + mo))) & 0xFFF
            if self._get(MTA + 4 * (hash_value >> 5)) >> (hash_value & 31) & 1:
                return True
        elif rctl & E1000_RCTL_UPE:
            return True
        low, high = int.from_bytes(dst[:4], "little"), int.from_bytes(dst[4:6], "little")
        for i in range(RA_ENTRIES):
            rah = self._get(RA + 8 * i + 4)
            if rah & (1 << 31) and self._get(RA + 8 * i) == low and rah & 0xFFFF == high:
                return True
        return False

    def receive(self, frame: bytes) -> bool:
        """A frame from the wire (no FCS, no vnet header). True: delivered or filtered out by the receive
        address filters; False: not delivered (receiver off, no free receive descriptor, ring unusable), the
        frame is dropped and counted (MPC)."""
        with self.lock:
            try:
                return self._receive(frame)
            except Exception:
                log.exception("%s: receive failed", self.name)
                return False

    def _receive(self, frame: bytes) -> bool:
        st = self.state
        rctl = self._get(RCTL)
        if not rctl & E1000_RCTL_EN or len(frame) < ETH_HLEN:
            return False
        limit = MAX_RX_FRAME_LPE if rctl & E1000_RCTL_LPE else MAX_RX_FRAME
        if len(frame) + ETH_FCS_LEN > limit:
            self._count(ROC)
            st.rx_dropped += 1
            return True                   # the wire delivered it; the MAC refuses it: nothing to retry
        if not self._accept(frame):
            st.rx_filtered += 1
            return True
        vlan_tci = None
        if len(frame) >= ETH_HLEN + 4 and int.from_bytes(frame[12:14], "big") == self._get(VET) & 0xFFFF:
            tci = int.from_bytes(frame[14:16], "big")
            vid = tci & 0xFFF
            if rctl & E1000_RCTL_VFE and not self._get(VFTA + 4 * (vid >> 5)) >> (vid & 31) & 1:
                st.rx_filtered += 1
                return True
            if self._get(CTRL) & E1000_CTRL_VME:                         # strip the tag into the descriptor
                frame, vlan_tci = bytes(frame[:12]) + bytes(frame[16:]), tci
        if len(frame) < ETH_ZLEN:
            frame = bytes(frame) + bytes(ETH_ZLEN - len(frame))
        data = bytes(frame)
        if not rctl & E1000_RCTL_SECRC:
            data += struct.pack("<I", zlib.crc32(frame) & 0xFFFFFFFF)
        base, n = self._ring(RDBAL, RDBAH, RDLEN)
        bufsize = self._rx_buffer_size()
        needed = -(-len(data) // bufsize)
        if st.rx_stopped:
            return self._rx_drop()
        head, tail = self._get(RDH), self._get(RDT)
        if n and (head >= n or tail >= n):
            st.rx_stopped = "rdt"
            self._warn_once("rx-rdt", "receive queue stopped: RDH %d / RDT %d beyond the %d-descriptor ring",
                            head, tail, n)
            return self._rx_drop()
        if self._rx_free() < needed:
            return self._rx_drop()
        try:
            offset = 0
            for i in range(needed):
                addr = base + head * DESC_SIZE
                desc = self.memory.view(addr, DESC_SIZE, write=True)
                buf = int.from_bytes(desc[0:8], "little")
                piece = data[offset:offset + bufsize]
                self.memory.view(buf, len(piece), write=True)[:] = piece
                offset += len(piece)
                last = i == needed - 1
                status = E1000_RXD_STAT_DD | E1000_RXD_STAT_IXSM
                if last:
                    status |= E1000_RXD_STAT_EOP | (E1000_RXD_STAT_VP if vlan_tci is not None else 0)
                desc[8:16] = struct.pack("<HHBBH", len(piece), 0, status, 0,
                                         vlan_tci if last and vlan_tci is not None else 0)
                head = (head + 1) % n
        except GuestMemoryError as e:
            st.rx_stopped = "ring-mem"
            self._warn_once("rx-mem", "receive queue stopped: %s", e)
            self._set(RDH, head)
            return self._rx_drop()
        self._set(RDH, head)
        st.rx_frames += 1
        n_bytes = len(data) if not rctl & E1000_RCTL_SECRC else len(data) + ETH_FCS_LEN
        self._count(GPRC)
        self._count(TPR)
        self._count(GORCL, n_bytes)
        self._count(TORL, n_bytes)
        if frame[0] & 1:
            self._count(BPRC if frame[:ETH_ALEN] == b"\xff" * ETH_ALEN else MPRC)
        causes = E1000_ICR_RXT0
        rdmts = (rctl >> E1000_RCTL_RDMTS_SHIFT) & 3
        if rdmts < 3 and self._rx_free() <= n >> (rdmts + 1):
            causes |= E1000_ICR_RXDMT0
        self._raise(causes)
        return True

    def _rx_drop(self) -> bool:
        self.state.rx_dropped += 1
        self._count(MPC)
        self._count(RNBC)
        self._raise(E1000_ICR_RXO)
        return False

    # --- inspection ------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        d = super().describe()
        st = self.state
        d["e1000"] = {"mac": ":".join(f"{b:02x}" for b in self.mac), "link": self._link_up(),
                      "tx_frames": st.tx_frames, "rx_frames": st.rx_frames, "rx_dropped": st.rx_dropped,
                      "tx_stopped": st.tx_stopped or None, "rx_stopped": st.rx_stopped or None}
        return d

    def close(self) -> None:
        closer = getattr(self.port, "close", None)
        if closer is not None:
            closer()


class E1000Tap:
    """Connects an `E1000` to a host tap: frames the guest sends are written to the tap; frames the tap delivers
    are handed to `receive` on the I/O thread. The tap is opened with `pyhv.runtime.tap.open_tap`, i.e. with
    IFF_VNET_HDR and a 12-byte header: this adapter writes a zeroed header before each frame and strips the
    header from each frame read (no offloads are enabled on the tap, so the kernel never sends GSO or
    partially-checksummed frames). When the guest has no free receive descriptor the tap is not read (the
    kernel queues, then drops) until the driver posts buffers (RDT)."""

    def __init__(self, device: E1000, iothread: "IoThread", tap: str | None = None,
                 tap_fd: int | None = None, vnet_hdr: bool = True) -> None:
        self.device = device
        self.iothread = iothread
        if tap_fd is not None:
            self.fd, self.tap_name = tap_fd, f"fd{tap_fd}"
            os.set_blocking(tap_fd, False)
            self.hdr = VNET_HDR_SIZE if vnet_hdr else 0
        elif tap:
            self.fd, self.tap_name = open_tap(tap)
            self.hdr = VNET_HDR_SIZE
        else:
            raise TapError("e1000 needs a tap (a name or an open file descriptor)")
        self._zero_hdr = bytes(self.hdr)
        self._buf = bytearray(65536 + self.hdr)
        self._polling = False
        self.stats = {"rx_packets": 0, "tx_packets": 0, "tx_errors": 0}
        device.attach_port(self)
        device.rx_ready = self._rx_ready
        self._poll(True)

    def send(self, frame: bytes) -> None:
        try:
            os.writev(self.fd, [self._zero_hdr, frame] if self.hdr else [frame])
            self.stats["tx_packets"] += 1
        except OSError:
            self.stats["tx_errors"] += 1            # tap down or full: the frame is lost, as on a wire

    def _poll(self, on: bool) -> None:
        if on != self._polling and self.fd >= 0:
            self._polling = on
            if on:
                self.iothread.add_reader(self.fd, self._readable)
            else:
                self.iothread.remove_reader(self.fd)

    def _rx_ready(self) -> None:
        if not self._polling:
            self.iothread.call_soon(self._poll, True)

    def _readable(self) -> None:
        for _ in range(64):
            if not self.device.can_receive():
                self._poll(False)                   # resumed by the driver's RDT write
                return
            try:
                n = os.readv(self.fd, [self._buf])
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("%s: tap read failed: %s", self.device.name, e.strerror)
                self._poll(False)
                return
            if n <= self.hdr:
                continue
            self.stats["rx_packets"] += 1
            self.device.receive(bytes(self._buf[self.hdr:n]))

    def close(self) -> None:
        if self.fd >= 0:
            self._poll(False)
            fd, self.fd = self.fd, -1
            if self.iothread._thread is None:
                os.close(fd)
            else:
                self.iothread.call_soon(os.close, fd)
