"""The 82540EM model without KVM, driven the way Linux's e1000 driver drives it: PCI identity and BARs, the
EEPROM through EERD and bit-banged Microwire, reset through the I/O window, the PHY through MDIC, link and
interrupts, transmit (legacy, multi-descriptor, checksum offload, TSO) and receive rings, and a hostile guest."""
from __future__ import annotations

import socket
import struct
import zlib

import pytest

from pyhv.devices.net import e1000 as e
from pyhv.devices.net import e1000_eeprom as ee
from pyhv.devices.net.e1000 import E1000, E1000Tap
from pyhv.devices.pci.constants import PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from pyhv.memory import GuestMemory, MemoryRegion

from pci_helpers import Board, FakeLine

RAM = 1 << 20
BAR0, BAR1 = 0xE0000000, 0xC000
DEVFN = 3 << 3
MAC = bytes.fromhex("525400123456")
TX_RING, TX_BUFS = 0x10000, 0x20000
RX_RING, RX_BUFS = 0x30000, 0x40000
N_DESC = 8


class Port:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


class Rig:
    def __init__(self) -> None:
        self.board = Board()
        self.board.system.add_subregion(0, MemoryRegion.ram("ram", RAM))
        self.mem = GuestMemory(self.board.memory)
        self.port = Port()
        self.dev = E1000("e1000", self.mem, mac=MAC, port=self.port)
        self.board.bus.plug(self.dev, 3)
        self.line = FakeLine()
        self.dev.intx_out = self.line.set_level
        b = self.board
        b.cfg_write(DEVFN, 0x10, 4, BAR0)
        b.cfg_write(DEVFN, 0x14, 4, BAR1)
        b.cfg_write(DEVFN, 0x04, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER)

    def r32(self, off: int) -> int:
        return self.board.memory.read(BAR0 + off, 4)

    def w32(self, off: int, value: int) -> None:
        self.board.memory.write(BAR0 + off, 4, value)

    # --- what e1000_hw.c does ------------------------------------------------------------------------------
    def eerd(self, word: int) -> int:
        self.w32(e.EERD, (word << 8) | ee.E1000_EERD_START)
        v = self.r32(e.EERD)
        assert v & ee.E1000_EERD_DONE
        return v >> 16

    def _clk(self, eecd: int) -> int:
        self.w32(e.EECD, eecd | ee.E1000_EECD_SK)
        self.w32(e.EECD, eecd & ~ee.E1000_EECD_SK)
        return eecd & ~ee.E1000_EECD_SK

    def microwire_read(self, first: int, count: int) -> list[int]:
        """e1000_acquire_eeprom / shift_out / shift_in / standby / release, as Linux does for the 82540."""
        eecd = self.r32(e.EECD)
        assert eecd & ee.E1000_EECD_PRES and not eecd & ee.E1000_EECD_SIZE       # 64-word Microwire
        self.w32(e.EECD, eecd | ee.E1000_EECD_REQ)
        eecd = self.r32(e.EECD)
        assert eecd & ee.E1000_EECD_GNT
        eecd &= ~(ee.E1000_EECD_DI | ee.E1000_EECD_SK)
        self.w32(e.EECD, eecd)
        eecd |= ee.E1000_EECD_CS
        self.w32(e.EECD, eecd)
        words = []
        for i in range(count):
            for value, bits in ((ee.EEPROM_READ_OPCODE_MICROWIRE, 3), (first + i, 6)):
                for b in range(bits - 1, -1, -1):
                    eecd = (eecd & ~ee.E1000_EECD_DI) | (ee.E1000_EECD_DI if value >> b & 1 else 0)
                    self.w32(e.EECD, eecd)
                    eecd = self._clk(eecd)
            eecd &= ~ee.E1000_EECD_DI
            self.w32(e.EECD, eecd)
            data = 0
            for _ in range(16):
                data <<= 1
                self.w32(e.EECD, eecd | ee.E1000_EECD_SK)
                if self.r32(e.EECD) & ee.E1000_EECD_DO:
                    data |= 1
                self.w32(e.EECD, eecd)
            words.append(data)
            # standby: CS low, clock, CS high
            eecd &= ~(ee.E1000_EECD_CS | ee.E1000_EECD_SK)
            self.w32(e.EECD, eecd)
            eecd = self._clk(eecd)
            eecd |= ee.E1000_EECD_CS
            self.w32(e.EECD, eecd)
        eecd &= ~(ee.E1000_EECD_CS | ee.E1000_EECD_DI | ee.E1000_EECD_REQ)
        self.w32(e.EECD, eecd)
        return words

    def phy_read(self, reg: int, phy: int = 1) -> int:
        self.w32(e.MDIC, (reg << 16) | (phy << 21) | e.E1000_MDIC_OP_READ)
        v = self.r32(e.MDIC)
        assert v & e.E1000_MDIC_READY
        assert not v & e.E1000_MDIC_ERROR
        return v & 0xFFFF

    def phy_write(self, reg: int, value: int) -> None:
        self.w32(e.MDIC, (reg << 16) | (1 << 21) | e.E1000_MDIC_OP_WRITE | value)
        assert self.r32(e.MDIC) & e.E1000_MDIC_READY

    def setup_tx(self) -> None:
        self.mem.write(TX_RING, bytes(N_DESC * 16))
        self.w32(e.TDBAL, TX_RING)
        self.w32(e.TDBAH, 0)
        self.w32(e.TDLEN, N_DESC * 16)
        self.w32(e.TDH, 0)
        self.w32(e.TDT, 0)
        self.w32(e.TCTL, e.E1000_TCTL_EN | e.E1000_TCTL_PSP)
        self.w32(e.IMS, e.E1000_ICR_TXDW | e.E1000_ICR_RXT0 | e.E1000_ICR_LSC | e.E1000_ICR_RXDMT0)

    def tx_desc(self, i: int, addr: int, data: bytes, cmd: int, extra: bytes = b"\0\0\0\0") -> None:
        self.mem.write(addr, data)
        self.mem.write(TX_RING + 16 * i, struct.pack("<QHBB", addr, len(data), 0, cmd) + extra)

    def setup_rx(self, rctl: int = 0, n: int = N_DESC, posted: int = N_DESC - 1, bufsize: int = 2048) -> None:
        for i in range(n):
            self.mem.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUFS + i * bufsize, 0))
        self.w32(e.RDBAL, RX_RING)
        self.w32(e.RDBAH, 0)
        self.w32(e.RDLEN, n * 16)
        self.w32(e.RDH, 0)
        self.w32(e.RDT, posted)
        self.w32(e.IMS, e.E1000_ICR_RXT0)
        self.w32(e.RCTL, e.E1000_RCTL_EN | e.E1000_RCTL_BAM | rctl)

    def rx_desc(self, i: int) -> tuple[int, int, int, int]:
        addr, length, csum, status, errors, special = struct.unpack("<QHHBBH", self.mem.read(RX_RING + 16 * i, 16))
        return addr, length, status, errors


@pytest.fixture
def rig() -> Rig:
    return Rig()


def checksum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(proto: int, l4: bytes, src=b"\x0a\0\0\x01", dst=b"\x0a\0\0\x02") -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x1234, 0x4000, 64, proto, 0, src, dst)
    return ip + l4


def pseudo_sum(ip: bytes, length: int | None) -> int:
    """The partial sum Linux leaves in the L4 checksum field (length omitted for TSO)."""
    ph = ip[12:20] + struct.pack(">BBH", 0, ip[9], length or 0)
    s = sum(struct.unpack(">6H", ph))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def eth(dst: bytes, payload: bytes, ethertype: int = 0x0800, src: bytes = MAC) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


# --- identity ----------------------------------------------------------------------------------------------------
def test_pci_identity_and_bars(rig: Rig) -> None:
    b = rig.board
    assert b.cfg_read(DEVFN, 0x00, 2) == 0x8086 == e.VENDOR_ID
    assert b.cfg_read(DEVFN, 0x02, 2) == 0x100E == e.DEVICE_ID
    assert b.cfg_read(DEVFN, 0x2C, 2) == 0x8086 and b.cfg_read(DEVFN, 0x2E, 2) == 0x001E
    assert b.cfg_read(DEVFN, 0x08, 4) >> 8 == 0x020000
    assert b.cfg_read(DEVFN, 0x3D, 1) == 1                                       # INTA#
    b.cfg_write(DEVFN, 0x04, 2, 0)
    b.cfg_write(DEVFN, 0x10, 4, 0xFFFFFFFF)
    assert b.cfg_read(DEVFN, 0x10, 4) == 0xFFFE0000                              # 128 KiB memory
    b.cfg_write(DEVFN, 0x14, 4, 0xFFFFFFFF)
    assert b.cfg_read(DEVFN, 0x14, 4) == 0xFFFFFFC1                              # 64 bytes I/O
    assert rig.dev.name == "e1000"


# --- EEPROM ------------------------------------------------------------------------------------------------------
def test_eeprom_eerd_mac_and_checksum(rig: Rig) -> None:
    words = [rig.eerd(i) for i in range(64)]
    mac = b"".join(struct.pack("<H", w) for w in words[:3])
    assert mac == MAC
    assert sum(words) & 0xFFFF == 0xBABA
    assert words[ee.EEPROM_DEVICE_ID] == 0x100E and words[ee.EEPROM_VENDOR_ID] == 0x8086
    assert words[ee.EEPROM_SUBSYSTEM_ID] == 0x001E and words[ee.EEPROM_SUBSYSTEM_VENDOR] == 0x8086
    assert words == rig.dev.state.eeprom


def test_eeprom_microwire_bitbang_like_linux(rig: Rig) -> None:
    assert rig.microwire_read(0, 3) == rig.dev.state.eeprom[:3]
    words = rig.microwire_read(0, 64)
    assert words == rig.dev.state.eeprom
    assert sum(words) & 0xFFFF == 0xBABA
    assert rig.microwire_read(0x3F, 1) == [rig.dev.state.eeprom[0x3F]]


def test_receive_address_loaded_from_eeprom(rig: Rig) -> None:
    assert rig.r32(e.RA) == int.from_bytes(MAC[:4], "little")
    assert rig.r32(e.RA + 4) == int.from_bytes(MAC[4:], "little") | (1 << 31)


# --- reset, PHY, link, interrupts ---------------------------------------------------------------------------------
def test_reset_through_io_window(rig: Rig) -> None:
    ports = rig.board.ports
    rig.w32(e.IMS, e.E1000_ICR_TXDW)
    rig.w32(e.RA, 0)
    rig.w32(e.RCTL, e.E1000_RCTL_EN)
    ctrl = rig.r32(e.CTRL)
    ports.write(BAR1, 4, e.CTRL)                 # IOADDR
    assert ports.read(BAR1, 4) == e.CTRL
    assert ports.read(BAR1 + 4, 4) == ctrl       # IODATA reads through
    ports.write(BAR1 + 4, 4, ctrl | e.E1000_CTRL_RST)
    assert not rig.r32(e.CTRL) & e.E1000_CTRL_RST  # self-clearing
    assert rig.r32(e.IMS) == 0 and rig.r32(e.RCTL) == 0
    assert rig.r32(e.RA) == int.from_bytes(MAC[:4], "little")


def test_phy_through_mdic(rig: Rig) -> None:
    assert rig.phy_read(ee.PHY_ID1) == 0x0141
    assert rig.phy_read(ee.PHY_ID2) == 0x0C20
    assert ((rig.phy_read(ee.PHY_ID1) << 16) | rig.phy_read(ee.PHY_ID2)) & 0xFFFFFFF0 == 0x01410C20   # M88E1011
    status = rig.phy_read(ee.PHY_STATUS)
    assert status & ee.MII_SR_LINK_STATUS and status & ee.MII_SR_AUTONEG_COMPLETE
    rig.phy_write(ee.PHY_AUTONEG_ADV, 0x0DE1)
    assert rig.phy_read(ee.PHY_AUTONEG_ADV) == 0x0DE1
    assert rig.phy_read(ee.PHY_LP_ABILITY) != 0
    rig.phy_write(ee.PHY_CTRL, rig.phy_read(ee.PHY_CTRL) | ee.MII_CR_RESET)
    assert not rig.phy_read(ee.PHY_CTRL) & ee.MII_CR_RESET             # self-clearing
    rig.w32(e.MDIC, (ee.PHY_ID1 << 16) | (2 << 21) | e.E1000_MDIC_OP_READ)   # no PHY at address 2
    v = rig.r32(e.MDIC)
    assert v & e.E1000_MDIC_READY and v & e.E1000_MDIC_ERROR


def test_link_status_and_lsc(rig: Rig) -> None:
    status = rig.r32(e.STATUS)
    assert status & e.E1000_STATUS_LU and status & e.E1000_STATUS_FD
    assert status & 0xC0 == e.E1000_STATUS_SPEED_1000
    assert not status & 0x20                                          # not TBI: copper
    rig.r32(e.ICR)
    rig.w32(e.IMS, e.E1000_ICR_LSC)
    assert rig.r32(e.IMS) == e.E1000_ICR_LSC
    rig.w32(e.ICS, e.E1000_ICR_LSC)                                    # what e1000_open does
    assert rig.line.level
    assert rig.r32(e.ICR) == e.E1000_ICR_LSC
    assert not rig.line.level and rig.r32(e.ICR) == 0                  # read-to-clear
    rig.dev.set_link(False)
    assert rig.line.level and not rig.r32(e.STATUS) & e.E1000_STATUS_LU
    assert not rig.phy_read(ee.PHY_STATUS) & ee.MII_SR_LINK_STATUS
    rig.r32(e.ICR)
    rig.dev.set_link(True)
    assert rig.r32(e.ICR) & e.E1000_ICR_LSC and rig.r32(e.STATUS) & e.E1000_STATUS_LU
    # SLU off and on again: a link change each way
    rig.w32(e.CTRL, rig.r32(e.CTRL) & ~e.E1000_CTRL_SLU)
    assert not rig.r32(e.STATUS) & e.E1000_STATUS_LU
    rig.r32(e.ICR)
    rig.w32(e.CTRL, rig.r32(e.CTRL) | e.E1000_CTRL_SLU)
    assert rig.r32(e.ICR) & e.E1000_ICR_LSC
    rig.w32(e.IMC, 0xFFFFFFFF)
    rig.w32(e.ICS, e.E1000_ICR_LSC)
    assert not rig.line.level                                          # masked


def test_unknown_registers_read_zero(rig: Rig) -> None:
    assert rig.r32(0x0F00) == 0
    rig.w32(0x0F00, 0x1234)
    assert rig.r32(0x0F00) == 0
    assert rig.board.memory.read(BAR0 + e.STATUS, 2) == rig.r32(e.STATUS) & 0xFFFF   # narrow reads


# --- transmit ----------------------------------------------------------------------------------------------------
def test_transmit_two_frames_one_multi_descriptor(rig: Rig) -> None:
    rig.setup_tx()
    f1 = eth(b"\xff" * 6, bytes(range(50)))
    f2 = eth(b"\x02" * 6, bytes(range(200)) * 5)
    eop_rs = e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS | e.E1000_TXD_CMD_IFCS
    rig.tx_desc(0, TX_BUFS, f1, eop_rs)
    rig.tx_desc(1, TX_BUFS + 0x1000, f2[:14], e.E1000_TXD_CMD_IFCS)
    rig.tx_desc(2, TX_BUFS + 0x2000, f2[14:600], e.E1000_TXD_CMD_IFCS)
    rig.tx_desc(3, TX_BUFS + 0x3000, f2[600:], eop_rs)
    assert not rig.line.level
    rig.w32(e.TDT, 4)
    assert rig.port.frames == [f1, f2]
    assert rig.r32(e.TDH) == 4
    sta = [rig.mem.read(TX_RING + 16 * i + 12, 1)[0] for i in range(4)]
    assert sta[0] & e.E1000_TXD_STAT_DD and sta[3] & e.E1000_TXD_STAT_DD
    assert not sta[1] & e.E1000_TXD_STAT_DD and not sta[2] & e.E1000_TXD_STAT_DD   # no RS: no write-back
    assert rig.line.level
    icr = rig.r32(e.ICR)
    assert icr & e.E1000_ICR_TXDW
    assert not rig.line.level
    assert rig.r32(e.GPTC) == 2 and rig.r32(e.TPT) == 2
    assert rig.r32(e.GPTC) == 0                                                    # read-to-clear
    assert rig.r32(e.GOTCL) == len(f1) + len(f2) + 8
    assert rig.r32(e.BPTC) == 1


def test_transmit_ring_wraps(rig: Rig) -> None:
    rig.setup_tx()
    eop_rs = e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS
    frames = [eth(b"\x02" * 6, bytes([i]) * 60) for i in range(12)]
    for i, f in enumerate(frames[:6]):
        rig.tx_desc(i, TX_BUFS + i * 0x100, f, eop_rs)
    rig.w32(e.TDT, 6)
    for j, f in enumerate(frames[6:]):
        i = (6 + j) % N_DESC
        rig.tx_desc(i, TX_BUFS + i * 0x100, f, eop_rs)
    rig.w32(e.TDT, (6 + 6) % N_DESC)
    assert rig.port.frames == frames and rig.r32(e.TDH) == 4


def test_transmit_legacy_checksum_insertion(rig: Rig) -> None:
    rig.setup_tx()
    udp = struct.pack(">HHHH", 1000, 2000, 8 + 20, 0) + b"x" * 20
    ip = ipv4_packet(17, udp)
    frame = eth(b"\x02" * 6, ip)
    css, cso = 14 + 20, 14 + 20 + 6
    # the driver preloads the pseudo-header sum; CSS..end is summed and stored at CSO
    pre = bytearray(frame)
    struct.pack_into(">H", pre, cso, pseudo_sum(ip, len(udp)))
    rig.mem.write(TX_BUFS, bytes(pre))
    rig.mem.write(TX_RING, struct.pack("<QHBBBBH", TX_BUFS, len(pre), cso,
                                       e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS | e.E1000_TXD_CMD_IC, 0, css, 0))
    rig.w32(e.TDT, 1)
    out = rig.port.frames[0]
    l4 = out[css:]
    assert checksum(ip[12:20] + struct.pack(">BBH", 0, 17, len(l4)) + l4) == 0


def context_desc(ipcss, ipcso, ipcse, tucss, tucso, tucse, paylen, tucmd, hdrlen=0, mss=0) -> bytes:
    lower = paylen | (e.E1000_TXD_DTYP_CONTEXT << 20) | ((tucmd | e.E1000_TXD_CMD_DEXT) << 24)
    return struct.pack("<BBHBBHIBBH", ipcss, ipcso, ipcse, tucss, tucso, tucse, lower, 0, hdrlen, mss)


def data_desc(addr, length, dcmd, popts) -> bytes:
    lower = length | (e.E1000_TXD_DTYP_DATA << 20) | ((dcmd | e.E1000_TXD_CMD_DEXT) << 24)
    return struct.pack("<QIBBH", addr, lower, 0, popts, 0)


def test_transmit_context_checksum_offload(rig: Rig) -> None:
    rig.setup_tx()
    tcp = struct.pack(">HHIIBBHHH", 1234, 80, 1, 0, 5 << 4, 0x18, 1000, 0, 0) + b"payload!" * 10
    ip = bytearray(ipv4_packet(6, tcp))
    frame = bytearray(eth(b"\x02" * 6, bytes(ip)))
    struct.pack_into(">H", frame, 14 + 20 + 16, pseudo_sum(bytes(ip), len(tcp)))   # CHECKSUM_PARTIAL
    rig.mem.write(TX_BUFS, bytes(frame))
    rig.mem.write(TX_RING, context_desc(14, 14 + 10, 14 + 19, 34, 34 + 16, 0, 0, e.E1000_TUCMD_IP |
                                        e.E1000_TUCMD_TCP))
    rig.mem.write(TX_RING + 16, data_desc(TX_BUFS, len(frame), e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS,
                                          e.E1000_TXD_POPTS_TXSM | e.E1000_TXD_POPTS_IXSM))
    rig.w32(e.TDT, 2)
    out = rig.port.frames[0]
    assert checksum(out[14:34]) == 0                                                     # IPv4 header
    assert checksum(out[26:34] + struct.pack(">BBH", 0, 6, len(out) - 34) + out[34:]) == 0   # TCP


def test_transmit_tso(rig: Rig) -> None:
    rig.setup_tx()
    payload = bytes(range(256)) * 12                                                 # 3072 bytes
    tcp_hdr = bytearray(struct.pack(">HHIIBBHHH", 1234, 80, 1000, 0, 5 << 4, 0x19, 1000, 0, 0))   # PSH|FIN|ACK? 0x19
    ip_hdr = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 0, 0x100, 0x4000, 64, 6, 0, b"\x0a\0\0\x01",
                                   b"\x0a\0\0\x02"))
    struct.pack_into(">H", tcp_hdr, 16, pseudo_sum(bytes(ip_hdr), None))             # length left out for TSO
    header = eth(b"\x02" * 6, bytes(ip_hdr + tcp_hdr))
    hdrlen, mss = len(header), 1000
    rig.mem.write(TX_BUFS, header)
    rig.mem.write(TX_BUFS + 0x1000, payload)
    rig.mem.write(TX_RING, context_desc(14, 24, 33, 34, 50, 0, len(payload), e.E1000_TUCMD_IP | e.E1000_TUCMD_TCP |
                                        e.E1000_TXD_CMD_TSE, hdrlen, mss))
    popts = e.E1000_TXD_POPTS_TXSM | e.E1000_TXD_POPTS_IXSM
    rig.mem.write(TX_RING + 16, data_desc(TX_BUFS, hdrlen, e.E1000_TXD_CMD_TSE, popts))
    rig.mem.write(TX_RING + 32, data_desc(TX_BUFS + 0x1000, len(payload), e.E1000_TXD_CMD_TSE |
                                          e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS, popts))
    rig.w32(e.TDT, 3)
    segs = rig.port.frames
    assert [len(s) - hdrlen for s in segs] == [1000, 1000, 1000, 72]
    assert b"".join(s[hdrlen:] for s in segs) == payload
    for k, s in enumerate(segs):
        ip = s[14:34]
        assert struct.unpack(">H", ip[2:4])[0] == len(s) - 14
        assert struct.unpack(">H", ip[4:6])[0] == 0x100 + k
        assert checksum(ip) == 0
        tcp = s[34:]
        assert struct.unpack(">I", tcp[4:8])[0] == 1000 + 1000 * k
        assert checksum(ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp)) + tcp) == 0
        last = k == len(segs) - 1
        assert bool(tcp[13] & 0x09) == last                                          # FIN/PSH on the last only
    assert rig.mem.read(TX_RING + 32 + 12, 1)[0] & e.E1000_TXD_STAT_DD


# --- receive -----------------------------------------------------------------------------------------------------
def test_receive_frame(rig: Rig) -> None:
    rig.setup_rx()
    frame = eth(MAC, bytes(range(100)), src=b"\x02" * 6)
    assert rig.dev.receive(frame)
    addr, length, status, errors = rig.rx_desc(0)
    assert length == len(frame) + 4                                            # FCS kept (RCTL.SECRC clear)
    assert status & e.E1000_RXD_STAT_DD and status & e.E1000_RXD_STAT_EOP and errors == 0
    data = rig.mem.read(addr, length)
    assert data[:len(frame)] == frame
    assert data[len(frame):] == struct.pack("<I", zlib.crc32(frame))
    assert rig.r32(e.RDH) == 1
    assert rig.line.level
    assert rig.r32(e.ICR) & e.E1000_ICR_RXT0
    assert not rig.line.level
    assert rig.r32(e.GPRC) == 1 and rig.r32(e.TPR) == 1 and rig.r32(e.GORCL) == length


def test_receive_strip_crc_pad_and_filters(rig: Rig) -> None:
    rig.setup_rx(rctl=e.E1000_RCTL_SECRC)
    arp = eth(b"\xff" * 6, b"a" * 28, ethertype=0x0806, src=b"\x02" * 6)       # 42 bytes: padded to 60
    assert rig.dev.receive(arp)
    assert rig.rx_desc(0)[1] == 60
    assert rig.dev.receive(eth(b"\x02\0\0\0\0\x09", b"x" * 50))                 # not ours: filtered
    assert rig.r32(e.RDH) == 1 and rig.dev.state.rx_filtered == 1
    mcast = b"\x33\x33\x00\x00\x00\x01"
    assert rig.dev.receive(eth(mcast, b"m" * 50)) and rig.r32(e.RDH) == 1       # MTA empty: filtered
    h = ((mcast[4] >> 4) | (mcast[5] << 4)) & 0xFFF                              # MO = 0
    rig.w32(e.MTA + 4 * (h >> 5), 1 << (h & 31))
    assert rig.dev.receive(eth(mcast, b"m" * 50)) and rig.r32(e.RDH) == 2
    rig.w32(e.RCTL, rig.r32(e.RCTL) | e.E1000_RCTL_UPE)
    assert rig.dev.receive(eth(b"\x02\0\0\0\0\x09", b"x" * 50)) and rig.r32(e.RDH) == 3
    assert rig.r32(e.BPRC) == 1 and rig.r32(e.MPRC) == 1


def test_receive_spans_small_buffers(rig: Rig) -> None:
    rig.setup_rx(rctl=(3 << e.E1000_RCTL_BSIZE_SHIFT) | e.E1000_RCTL_SECRC, bufsize=256)   # 256-byte buffers
    frame = eth(MAC, bytes(range(256)) * 2 + b"tail", src=b"\x02" * 6)          # 530 bytes: 3 buffers
    assert rig.dev.receive(frame)
    descs = [rig.rx_desc(i) for i in range(3)]
    assert [d[1] for d in descs] == [256, 256, len(frame) - 512]
    assert [bool(d[2] & e.E1000_RXD_STAT_EOP) for d in descs] == [False, False, True]
    assert all(d[2] & e.E1000_RXD_STAT_DD for d in descs)
    assert b"".join(rig.mem.read(d[0], d[1]) for d in descs) == frame
    assert rig.r32(e.RDH) == 3


def test_receive_without_descriptors_drops_and_counts(rig: Rig) -> None:
    rig.setup_rx(posted=2)
    frame = eth(MAC, b"z" * 60, src=b"\x02" * 6)
    assert rig.dev.receive(frame) and rig.dev.receive(frame)
    rig.r32(e.ICR)
    assert rig.dev.can_receive() is False
    assert rig.dev.receive(frame) is False
    assert rig.dev.receive(frame) is False
    assert rig.r32(e.MPC) == 2 and rig.r32(e.MPC) == 0
    assert rig.r32(e.ICR) & e.E1000_ICR_RXO
    woken = []
    rig.dev.rx_ready = lambda: woken.append(1)
    rig.w32(e.RDT, 5)                                                            # the driver refills
    assert woken and rig.dev.receive(frame) and rig.r32(e.RDH) == 3


def test_receive_descriptor_minimum_threshold(rig: Rig) -> None:
    rig.setup_rx(posted=N_DESC - 1)                                               # RDMTS 0: half the ring
    frame = eth(MAC, b"z" * 60, src=b"\x02" * 6)
    for _ in range(2):
        rig.dev.receive(frame)
    assert not rig.r32(e.ICR) & e.E1000_ICR_RXDMT0                               # 5 free of 8
    rig.dev.receive(frame)
    assert rig.r32(e.ICR) & e.E1000_ICR_RXDMT0                                   # 4 free: half the ring


def test_vlan_strip_filter_and_insert(rig: Rig) -> None:
    rig.setup_rx(rctl=e.E1000_RCTL_SECRC)
    rig.w32(e.CTRL, rig.r32(e.CTRL) | e.E1000_CTRL_VME)
    inner = b"v" * 60
    tagged = MAC + b"\x02" * 6 + struct.pack(">HH", 0x8100, 0x2005) + struct.pack(">H", 0x0800) + inner
    assert rig.dev.receive(tagged)
    addr, length, status, _ = rig.rx_desc(0)
    special = struct.unpack("<H", rig.mem.read(RX_RING + 14, 2))[0]
    assert status & e.E1000_RXD_STAT_VP and special == 0x2005
    assert rig.mem.read(addr, length) == MAC + b"\x02" * 6 + struct.pack(">H", 0x0800) + inner
    rig.w32(e.RCTL, rig.r32(e.RCTL) | e.E1000_RCTL_VFE)                          # VLAN 5 not in the VFTA
    assert rig.dev.receive(tagged) and rig.r32(e.RDH) == 1
    rig.w32(e.VFTA, 1 << 5)
    assert rig.dev.receive(tagged) and rig.r32(e.RDH) == 2
    # transmit: VLE inserts VET + the special field after the addresses
    rig.setup_tx()
    frame = eth(b"\x02" * 6, b"t" * 50)
    rig.mem.write(TX_BUFS, frame)
    rig.mem.write(TX_RING, struct.pack("<QHBBBBH", TX_BUFS, len(frame), 0, e.E1000_TXD_CMD_EOP |
                                       e.E1000_TXD_CMD_RS | e.E1000_TXD_CMD_VLE, 0, 0, 0x3007))
    rig.w32(e.TDT, 1)
    assert rig.port.frames == [frame[:12] + struct.pack(">HH", 0x8100, 0x3007) + frame[12:]]


def test_receiver_disabled(rig: Rig) -> None:
    rig.setup_rx()
    rig.w32(e.RCTL, 0)
    assert rig.dev.receive(eth(MAC, b"z" * 60)) is False


def test_enabling_the_receiver_after_posting_buffers_wakes_the_tap_side(rig: Rig) -> None:
    """A driver may write RDT before RCTL.EN (nicbench does): the back end, which stopped reading while
    the receiver was off, is told to resume by the enable as it would be by an RDT write."""
    calls = []
    rig.dev.rx_ready = lambda: calls.append(1)
    rig.setup_rx()
    rctl = rig.r32(e.RCTL)
    rig.w32(e.RCTL, 0)
    calls.clear()
    rig.w32(e.RCTL, rctl)
    assert calls == [1]
    rig.w32(e.RCTL, rctl)                               # already on: nothing new to say
    assert calls == [1]


# --- hostile guest -----------------------------------------------------------------------------------------------
def snapshot(rig: Rig) -> bytes:
    return rig.mem.read(0, RAM)


def test_hostile_tx_ring_outside_ram(rig: Rig) -> None:
    rig.setup_tx()
    before = snapshot(rig)
    rig.w32(e.TDBAL, 0xF0000000)                      # no RAM there
    rig.w32(e.TDT, 3)
    assert rig.port.frames == [] and rig.dev.state.tx_stopped
    assert rig.r32(e.TDH) == 0
    rig.w32(e.TDT, 4)                                 # stays stopped, never raises
    assert snapshot(rig) == before
    # the driver programs a good ring again: the queue runs
    rig.w32(e.TDBAL, TX_RING)
    rig.w32(e.TDH, 0)
    rig.tx_desc(0, TX_BUFS, eth(b"\x02" * 6, b"ok" * 30), e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS)
    rig.w32(e.TDT, 1)
    assert len(rig.port.frames) == 1


def test_hostile_tx_descriptors(rig: Rig) -> None:
    rig.setup_tx()
    rig.w32(e.TDT, N_DESC + 5)                        # beyond the ring
    assert rig.dev.state.tx_stopped and rig.r32(e.TDH) == 0
    rig.w32(e.TDT, 0)
    # buffer outside RAM, then a huge chain without EOP
    rig.mem.write(TX_RING, struct.pack("<QHBBI", 0xFFFF0000, 1000, 0, e.E1000_TXD_CMD_EOP, 0))
    rig.w32(e.TDT, 1)
    assert rig.port.frames == [] and rig.dev.state.tx_stopped == "buf-mem"
    rig.w32(e.TDH, 0)
    rig.w32(e.TDT, 0)
    for i in range(N_DESC):
        rig.mem.write(TX_RING + 16 * i, struct.pack("<QHBBI", 0, 0xFFFF, 0, e.E1000_TXD_CMD_RS, 0))
    rig.w32(e.TDT, N_DESC - 1)
    rig.w32(e.TDT, 0)                                  # keeps going round: bounded by MAX_TX_PACKET
    for _ in range(3):
        rig.w32(e.TDT, (rig.r32(e.TDH) + N_DESC - 1) % N_DESC)
    assert rig.port.frames == [] and rig.dev.state.tx_stopped == "too-long"
    rig.w32(e.TDLEN, 0)
    rig.w32(e.TDT, 3)                                  # TDLEN 0
    assert rig.port.frames == []


def test_hostile_rx(rig: Rig) -> None:
    frame = eth(MAC, b"z" * 60, src=b"\x02" * 6)
    rig.setup_rx()
    before = snapshot(rig)
    rig.w32(e.RDLEN, 0)
    assert rig.dev.receive(frame) is False
    rig.w32(e.RDLEN, N_DESC * 16)
    rig.w32(e.RDBAL, 0xF0000000)
    assert rig.dev.receive(frame) is False and rig.dev.state.rx_stopped
    assert rig.dev.receive(frame) is False
    rig.w32(e.RDBAL, RX_RING)
    rig.w32(e.RDT, 200)                               # beyond the ring
    assert rig.dev.receive(frame) is False
    assert snapshot(rig) == before
    rig.w32(e.RDH, 0)
    rig.w32(e.RDT, 3)
    rig.mem.write(RX_RING, struct.pack("<QQ", RAM - 10, 0))          # buffer runs off the end of RAM
    assert rig.dev.receive(frame) is False
    assert rig.mem.read(RAM - 10, 10) == bytes(10)
    rig.w32(e.RDH, 0)                                 # reprogrammed: a good buffer works again
    rig.mem.write(RX_RING, struct.pack("<QQ", RX_BUFS, 0))
    assert rig.dev.receive(frame) and rig.r32(e.RDH) == 1


def test_device_reset(rig: Rig) -> None:
    rig.setup_tx()
    rig.setup_rx()
    rig.w32(e.ICS, e.E1000_ICR_RXT0)
    assert rig.line.level
    rig.dev.reset()
    assert not rig.line.level
    assert rig.board.cfg_read(DEVFN, 0x10, 4) == 0                    # BARs unmapped
    assert rig.dev.mmio_read(e.TDLEN, 4) == 0 and rig.dev.mmio_read(e.RCTL, 4) == 0
    assert rig.dev.mmio_read(e.STATUS, 4) & e.E1000_STATUS_LU
    assert rig.dev.state.eeprom[:3] == [int.from_bytes(MAC[i:i + 2], "little") for i in (0, 2, 4)]


# --- tap adapter ---------------------------------------------------------------------------------------------------
class FakeIoThread:
    _thread = None

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}

    def add_reader(self, fd, cb):
        self.readers[fd] = cb

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def call_soon(self, fn, *args):
        fn(*args)


def test_tap_adapter_with_socketpair(rig: Rig) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    io = FakeIoThread()
    tap = E1000Tap(rig.dev, io, tap_fd=ours.detach())
    try:
        assert tap.fd in io.readers
        rig.setup_tx()
        frame = eth(b"\x02" * 6, b"out" * 20)
        rig.tx_desc(0, TX_BUFS, frame, e.E1000_TXD_CMD_EOP | e.E1000_TXD_CMD_RS)
        rig.w32(e.TDT, 1)
        assert theirs.recv(2048) == bytes(12) + frame               # zeroed vnet header, then the frame
        incoming = eth(MAC, b"in" * 40, src=b"\x02" * 6)
        theirs.send(bytes(12) + incoming)
        io.readers[tap.fd]()                                          # not set up for receive: stops polling
        assert tap.fd not in io.readers
        rig.setup_rx(rctl=e.E1000_RCTL_SECRC)                         # RDT write resumes polling
        assert tap.fd in io.readers
        io.readers[tap.fd]()
        addr, length, status, _ = rig.rx_desc(0)
        assert status & e.E1000_RXD_STAT_DD and rig.mem.read(addr, length) == incoming
    finally:
        tap.close()
        theirs.close()


def test_option_rom_behind_the_expansion_rom_bar(rig: Rig, tmp_path) -> None:
    """romfile=: the BAR sizes to the file rounded up to a power of two, decodes only when enabled, reads the file
    back and ignores writes (firmware copies the ROM out of it)."""
    rom = bytes([0x55, 0xAA, 0x20]) + bytes(range(256)) * 20            # 5123 bytes: an 8 KiB BAR
    path = tmp_path / "test.rom"
    path.write_bytes(rom)
    rig.dev.load_option_rom(str(path))
    b = rig.board
    b.cfg_write(DEVFN, 0x30, 4, 0xFFFFF800)
    assert b.cfg_read(DEVFN, 0x30, 4) == 0xFFFFE000                              # 8 KiB, not enabled
    b.cfg_write(DEVFN, 0x30, 4, 0xFEB00000)                                       # placed, still disabled
    assert b.memory.read(0xFEB00000, 2) != 0xAA55
    b.cfg_write(DEVFN, 0x30, 4, 0xFEB00001)
    assert bytes(b.memory.read(0xFEB00000 + i, 1) for i in range(len(rom))) == rom
    b.memory.write(0xFEB00000, 2, 0)
    assert b.memory.read(0xFEB00000, 2) == 0xAA55
