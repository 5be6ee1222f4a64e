"""The 82540EM's serial EEPROM (a 64-word Microwire part, 93C46-style) and its M88E1011 copper PHY.

EEPROM: two ways in (8254x SDM 5.x and the EECD/EERD register descriptions):
- EERD (0x14): write START with the word address in bits 15:8; DONE (bit 4) and the data (bits 31:16) read back.
- EECD (0x10): the four Microwire wires as register bits (SK clock, CS chip select, DI data in, DO data out),
  bit-banged by software. Linux's e1000 reads the 82540's EEPROM this way: with CS high it clocks in a start bit
  and the READ opcode (binary 110, 3 bits), 6 address bits, then clocks 16 data bits out of DO, most significant
  first, then drops CS. The part keeps reading the following words while clocks continue (sequential read).

PHY: registers reached through MDIC (0x20), at PHY address 1. The PHY reports a 1000 Mb/s full-duplex link with
auto-negotiation complete as soon as the "cable" is connected: negotiation is instant here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

EEPROM_WORDS = 64
EEPROM_CHECKSUM_REG = 0x3F
EEPROM_SUM = 0xBABA
EEPROM_ID_LED_SETTINGS = 0x04
EEPROM_INIT_CONTROL1_REG = 0x0A
EEPROM_SUBSYSTEM_ID = 0x0B
EEPROM_SUBSYSTEM_VENDOR = 0x0C
EEPROM_DEVICE_ID = 0x0D
EEPROM_VENDOR_ID = 0x0E
EEPROM_INIT_CONTROL2_REG = 0x0F
EEPROM_INIT_CONTROL3_PORT_A = 0x24
EEPROM_READ_OPCODE_MICROWIRE = 0b110
EEPROM_ADDRESS_BITS = 6

# EECD bits
E1000_EECD_SK = 1 << 0
E1000_EECD_CS = 1 << 1
E1000_EECD_DI = 1 << 2
E1000_EECD_DO = 1 << 3
E1000_EECD_FWE_MASK = 3 << 4
E1000_EECD_REQ = 1 << 6
E1000_EECD_GNT = 1 << 7
E1000_EECD_PRES = 1 << 8
E1000_EECD_SIZE = 1 << 9          # 0: 64 words (6 address bits) for Microwire
E1000_EECD_WRITABLE = E1000_EECD_SK | E1000_EECD_CS | E1000_EECD_DI | E1000_EECD_FWE_MASK | E1000_EECD_REQ

# EERD bits (82540EM layout; the 82541/82547 use other positions)
E1000_EERD_START = 1 << 0
E1000_EERD_DONE = 1 << 4
E1000_EERD_ADDR_SHIFT = 8
E1000_EERD_DATA_SHIFT = 16


def build_eeprom(mac: bytes, vendor_id: int, device_id: int, subsystem_vendor_id: int,
                 subsystem_id: int) -> list[int]:
    """The 64 words: MAC in words 0-2 (little-endian byte pairs), the identity words the driver and option ROMs
    read, and the checksum word making the sum of all 64 words 0xBABA."""
    words = [0xFFFF] * EEPROM_WORDS
    for i in range(3):
        words[i] = mac[2 * i] | (mac[2 * i + 1] << 8)
    words[3] = 0x0000                           # compatibility: no flags set
    words[EEPROM_ID_LED_SETTINGS] = 0xFFFF      # "use the default LED configuration"
    words[5] = 0x0000                           # EEPROM image version
    words[8] = words[9] = 0x0000                # PBA number (part number): 0
    words[EEPROM_INIT_CONTROL1_REG] = 0x0000    # no LRST / ILOS / FRCSPD bits: autoneg, normal polarity
    words[EEPROM_SUBSYSTEM_ID] = subsystem_id
    words[EEPROM_SUBSYSTEM_VENDOR] = subsystem_vendor_id
    words[EEPROM_DEVICE_ID] = device_id
    words[EEPROM_VENDOR_ID] = vendor_id
    words[EEPROM_INIT_CONTROL2_REG] = 0x3000    # PAUSE + ASM_DIR: symmetric and asymmetric flow control
    words[EEPROM_INIT_CONTROL3_PORT_A] = 0x0000  # no APM (wake on LAN) enabled
    words[EEPROM_CHECKSUM_REG] = 0
    words[EEPROM_CHECKSUM_REG] = (EEPROM_SUM - sum(words)) & 0xFFFF
    return words


@dataclass
class MicrowireState:
    """The serial EEPROM's wires and shift state."""
    eecd: int = 0             # the software-driven bits as last written (SK, CS, DI, FWE, REQ)
    bits_in: int = 0          # command bits clocked in since CS rose (after the start bit)
    shift_in: int = 0
    reading: bool = False
    address: int = 0
    out_pos: int = -1         # data bit being presented on DO (0 = bit 15 of `address`)


class Microwire:
    """The Microwire state machine. `words` is the EEPROM contents (the device's state owns the list)."""

    def __init__(self, state: MicrowireState, words: list[int]) -> None:
        self.s = state
        self.words = words

    def reset(self) -> None:
        s = self.s
        s.eecd, s.bits_in, s.shift_in, s.reading, s.address, s.out_pos = 0, 0, 0, False, 0, -1

    def read_eecd(self) -> int:
        s = self.s
        value = (s.eecd & E1000_EECD_WRITABLE) | E1000_EECD_PRES
        if s.eecd & E1000_EECD_REQ:
            value |= E1000_EECD_GNT
        if not s.reading or s.out_pos < 0:
            value |= E1000_EECD_DO                        # idle: DO high ("ready")
        elif (self.words[s.address] >> (15 - s.out_pos)) & 1:
            value |= E1000_EECD_DO
        return value

    def write_eecd(self, value: int) -> None:
        s = self.s
        old = s.eecd
        s.eecd = value & E1000_EECD_WRITABLE
        if not value & E1000_EECD_CS:                     # CS low: deselect, command aborted or finished
            s.bits_in, s.shift_in, s.reading, s.out_pos = 0, 0, False, -1
            return
        rising = (value & E1000_EECD_SK) and not (old & E1000_EECD_SK)
        if not rising:
            return
        if s.reading:
            s.out_pos += 1
            if s.out_pos == 16:                           # sequential read: the next word
                s.out_pos = 0
                s.address = (s.address + 1) % len(self.words)
            return
        bit = 1 if value & E1000_EECD_DI else 0
        if s.bits_in == 0 and not bit and s.shift_in == 0:
            return                                        # leading zeros before the start bit are ignored
        s.shift_in = (s.shift_in << 1) | bit
        s.bits_in += 1
        if s.bits_in == 3 + EEPROM_ADDRESS_BITS:
            opcode = s.shift_in >> EEPROM_ADDRESS_BITS
            if opcode == EEPROM_READ_OPCODE_MICROWIRE:
                s.reading, s.address, s.out_pos = True, s.shift_in & (len(self.words) - 1), -1
            else:                                         # write/erase/EWEN/EWDS: the EEPROM is read-only here
                s.bits_in, s.shift_in = 0, 0


# --- PHY (M88E1011 / IEEE 802.3 clause 22 registers) ------------------------------------------------------------
PHY_ADDRESS = 1
PHY_CTRL = 0x00
PHY_STATUS = 0x01
PHY_ID1 = 0x02
PHY_ID2 = 0x03
PHY_AUTONEG_ADV = 0x04
PHY_LP_ABILITY = 0x05
PHY_AUTONEG_EXP = 0x06
PHY_NEXT_PAGE_TX = 0x07
PHY_LP_NEXT_PAGE = 0x08
PHY_1000T_CTRL = 0x09
PHY_1000T_STATUS = 0x0A
PHY_EXT_STATUS = 0x0F
M88E1000_PHY_SPEC_CTRL = 0x10
M88E1000_PHY_SPEC_STATUS = 0x11
M88E1000_INT_ENABLE = 0x12
M88E1000_INT_STATUS = 0x13
M88E1000_EXT_PHY_SPEC_CTRL = 0x14
M88E1000_RX_ERR_CNTR = 0x15
M88E1000_PHY_PAGE_SELECT = 0x1D
M88E1000_PHY_GEN_CONTROL = 0x1E

M88E1011_I_PHY_ID1 = 0x0141
M88E1011_I_PHY_ID2 = 0x0C20

MII_CR_SPEED_1000 = 0x0040
MII_CR_FULL_DUPLEX = 0x0100
MII_CR_RESTART_AUTO_NEG = 0x0200
MII_CR_POWER_DOWN = 0x0800
MII_CR_AUTO_NEG_EN = 0x1000
MII_CR_RESET = 0x8000
MII_SR_EXTENDED_CAPS = 0x0001
MII_SR_LINK_STATUS = 0x0004
MII_SR_AUTONEG_CAPS = 0x0008
MII_SR_AUTONEG_COMPLETE = 0x0020
MII_SR_PREAMBLE_SUPPRESS = 0x0040
MII_SR_EXTENDED_STATUS = 0x0100
MII_SR_10T_HD_CAPS = 0x0800
MII_SR_10T_FD_CAPS = 0x1000
MII_SR_100X_HD_CAPS = 0x2000
MII_SR_100X_FD_CAPS = 0x4000
PHY_STATUS_BASE = (MII_SR_EXTENDED_CAPS | MII_SR_AUTONEG_CAPS | MII_SR_PREAMBLE_SUPPRESS | MII_SR_EXTENDED_STATUS
                   | MII_SR_10T_HD_CAPS | MII_SR_10T_FD_CAPS | MII_SR_100X_HD_CAPS | MII_SR_100X_FD_CAPS)
# link partner: 10/100 half/full, pause and asymmetric pause, ACK; 1000T status: LP 1000 full/half, local/remote OK
PHY_LP_ABILITY_UP = 0x0DE1 | 0x4000
PHY_1000T_STATUS_UP = 0x3C00
PHY_EXT_STATUS_VALUE = 0x3000        # 1000BASE-T full and half duplex capable
# M88 specific status: 1000 Mb/s, full duplex, speed/duplex resolved, link (real time)
M88_SPEC_STATUS_UP = 0x8000 | 0x2000 | 0x0800 | 0x0400
M88_SPEC_STATUS_DOWN = 0x0000

PHY_RESET_VALUES = {
    PHY_CTRL: MII_CR_AUTO_NEG_EN | MII_CR_FULL_DUPLEX | MII_CR_SPEED_1000,
    PHY_ID1: M88E1011_I_PHY_ID1,
    PHY_ID2: M88E1011_I_PHY_ID2,
    PHY_AUTONEG_ADV: 0x0DE1,
    PHY_AUTONEG_EXP: 0x0001,
    PHY_NEXT_PAGE_TX: 0x2001,
    PHY_1000T_CTRL: 0x0300,
    PHY_EXT_STATUS: PHY_EXT_STATUS_VALUE,
    M88E1000_PHY_SPEC_CTRL: 0x0068,
    M88E1000_EXT_PHY_SPEC_CTRL: 0x0D60,
}
PHY_READ_ONLY = {PHY_STATUS, PHY_ID1, PHY_ID2, PHY_LP_ABILITY, PHY_AUTONEG_EXP, PHY_LP_NEXT_PAGE, PHY_1000T_STATUS,
                 PHY_EXT_STATUS, M88E1000_PHY_SPEC_STATUS, M88E1000_INT_STATUS, M88E1000_RX_ERR_CNTR}


@dataclass
class PhyState:
    regs: dict[int, int] = field(default_factory=lambda: dict(PHY_RESET_VALUES))
    reads: int = 0
    writes: int = 0


class Phy:
    """The copper PHY's registers; `link` is whether the cable is connected."""

    def __init__(self, state: PhyState) -> None:
        self.s = state
        self.link = True

    def reset(self) -> None:
        self.s.regs = dict(PHY_RESET_VALUES)

    def read(self, reg: int) -> int:
        self.s.reads += 1
        link = self.link and not self.s.regs.get(PHY_CTRL, 0) & MII_CR_POWER_DOWN
        if reg == PHY_STATUS:
            return PHY_STATUS_BASE | ((MII_SR_LINK_STATUS | MII_SR_AUTONEG_COMPLETE) if link else 0)
        if reg == PHY_LP_ABILITY:
            return PHY_LP_ABILITY_UP if link else 0
        if reg == PHY_1000T_STATUS:
            return PHY_1000T_STATUS_UP if link else 0
        if reg == M88E1000_PHY_SPEC_STATUS:
            return M88_SPEC_STATUS_UP if link else M88_SPEC_STATUS_DOWN
        return self.s.regs.get(reg, 0)

    def write(self, reg: int, value: int) -> bool:
        """Returns True when the write restarted auto-negotiation (the MAC may signal a link change)."""
        self.s.writes += 1
        value &= 0xFFFF
        if reg in PHY_READ_ONLY:
            return False
        if reg == PHY_CTRL:
            restart = bool(value & (MII_CR_RESTART_AUTO_NEG | MII_CR_RESET))
            if value & MII_CR_RESET:
                keep = self.s.regs.get(PHY_AUTONEG_ADV), self.s.regs.get(PHY_1000T_CTRL)
                self.reset()
                self.s.regs[PHY_AUTONEG_ADV], self.s.regs[PHY_1000T_CTRL] = keep
            # reset and restart-autoneg self-clear; negotiation completes at once
            self.s.regs[PHY_CTRL] = value & ~(MII_CR_RESET | MII_CR_RESTART_AUTO_NEG)
            return restart
        self.s.regs[reg] = value
        return False
