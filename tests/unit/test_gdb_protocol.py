"""The GDB remote protocol's framing and pyhv's x86-64 register model, without a VM."""
import xml.etree.ElementTree as ET

from pyhv.arch.x86.gdb_registers import NUMBER, REGISTERS, RegisterFile, target_xml
from pyhv.kvm import structs as S
from pyhv.machine.guest_debug import _aligned_pieces
from pyhv.monitor.gdb_packets import MAX_PACKET, PacketReader, checksum, escape, frame, unescape
from pyhv.monitor.gdbstub import _xfer, parse_gdb_address


def test_frame_has_the_checksum_gdb_expects():
    assert frame(b"OK") == b"$OK#9a"                  # gdb's manual: 'O' + 'K' = 0x9a
    assert frame(b"") == b"$#00"


def test_escape_round_trip_covers_every_special_byte():
    data = bytes(range(256))
    escaped = escape(data)
    assert not any(b in escaped for b in b"#$*")
    assert unescape(escaped) == data
    assert unescape(b"a}") == b"a"                    # a dangling escape is dropped, not a crash


def test_reader_splits_packets_at_any_byte():
    stream = b"+$qSupported:xmlRegisters=i386#" + b"%02x" % checksum(b"qSupported:xmlRegisters=i386") + b"\x03$g#67"
    for cut in range(len(stream)):
        reader = PacketReader()
        events = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [e.kind for e in events] == ["ack", "packet", "interrupt", "packet"]
        assert events[1].data == b"qSupported:xmlRegisters=i386" and events[3].data == b"g"


def test_reader_reports_bad_checksums_and_recovers():
    reader = PacketReader()
    events = reader.feed(b"noise$g#00$g#zz$g#67")
    assert [e.kind for e in events] == ["bad", "bad", "packet"]
    assert events[0].data == b"checksum mismatch"


def test_reader_refuses_an_oversized_packet_without_buffering_it():
    reader = PacketReader()
    body = b"M0," + b"0" * (4 * MAX_PACKET)
    events = reader.feed(b"$" + body + b"#%02x" % checksum(body) + b"$g#67")
    assert [e.kind for e in events] == ["bad", "packet"]
    assert len(reader._body or b"") == 0


def test_reader_restarts_on_a_new_packet_start():
    assert [e.kind for e in PacketReader().feed(b"$m0,4$g#67")] == ["bad", "packet"]


def test_target_description_numbers_every_register_in_order():
    root = ET.fromstring(target_xml().split(b"\n", 2)[2])   # past the XML declaration and DOCTYPE
    regs = root.findall(".//reg")
    assert [r.get("name") for r in regs] == [r.name for r in REGISTERS]
    assert [int(r.get("regnum")) for r in regs] == list(range(len(REGISTERS)))
    assert root.find("architecture").text == "i386:x86-64"
    features = [f.get("name") for f in root.findall("feature")]
    assert features[:3] == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"]


def test_xfer_pages_the_document():
    doc = target_xml()
    first = _xfer(doc, 0, 0x100)
    assert first[:1] == b"m" and first[1:] == doc[:0x100]
    last = _xfer(doc, len(doc) - 10, 0x100)
    assert last == b"l" + doc[-10:]


def _register_file(cr0: int = 0x80050033) -> RegisterFile:
    regs = S.kvm_regs(rax=0x1122334455667788, rip=0xFFFFFFFF81000000, rflags=0x246)
    sregs = S.kvm_sregs(cr0=cr0, cr3=0x1000)
    sregs.cs.selector, sregs.cs.base, sregs.fs.base = 0x10, 0, 0x7F0000001000
    return RegisterFile(regs, sregs, S.kvm_fpu(fcw=0x37F, ftwx=0x01, mxcsr=0x1F80))


def test_registers_serialise_in_gdbs_layout():
    rf = _register_file()
    blob = rf.all_values()
    assert len(blob) == sum(r.bits for r in REGISTERS) // 8
    assert blob[:8] == (0x1122334455667788).to_bytes(8, "little")
    assert rf.value(NUMBER["rip"]) == (0xFFFFFFFF81000000).to_bytes(8, "little")
    assert rf.value(NUMBER["eflags"]) == (0x246).to_bytes(4, "little")
    assert rf.value(NUMBER["cs"]) == (0x10).to_bytes(4, "little")
    assert rf.value(NUMBER["fs_base"]) == (0x7F0000001000).to_bytes(8, "little")
    assert rf.value(NUMBER["cr3"]) == (0x1000).to_bytes(8, "little")
    assert int.from_bytes(rf.value(NUMBER["ftag"]), "little") == 0xFFFC   # st0 valid, the others empty
    assert int.from_bytes(rf.value(NUMBER["mxcsr"]), "little") == 0x1F80


def test_register_writes_land_in_the_right_structure():
    rf = _register_file()
    assert rf.update(NUMBER["rbx"], (42).to_bytes(8, "little")) == {"regs"} and rf.regs.rbx == 42
    assert rf.update(NUMBER["cr4"], (0x20).to_bytes(8, "little")) == {"sregs"} and rf.sregs.cr4 == 0x20
    assert rf.update(NUMBER["xmm1"], bytes(range(16))) == {"fpu"} and bytes(rf.fpu.xmm[16:32]) == bytes(range(16))
    whole = _register_file()
    assert whole.update_all(rf.all_values()) == {"regs", "sregs", "fpu"}
    assert whole.all_values() == rf.all_values()


def test_real_mode_rip_is_the_linear_address():
    rf = _register_file(cr0=0x10)
    rf.sregs.cs.base, rf.regs.rip = 0xF0000, 0x2B
    assert rf.value(NUMBER["rip"]) == (0xF002B).to_bytes(8, "little")
    rf.update(NUMBER["rip"], (0xF0030).to_bytes(8, "little"))
    assert rf.regs.rip == 0x30


def test_watch_ranges_split_into_debug_register_pieces():
    assert _aligned_pieces(0x1000, 8) == [(0x1000, 8)]
    assert _aligned_pieces(0x1003, 4) == [(0x1003, 1), (0x1004, 2), (0x1006, 1)]
    assert _aligned_pieces(0x1000, 0) == [(0x1000, 1)]


def test_gdb_address_forms():
    assert parse_gdb_address("tcp::1234") == ("127.0.0.1", 1234)
    assert parse_gdb_address("tcp:0.0.0.0:99") == ("0.0.0.0", 99)
    assert parse_gdb_address(":0") == ("127.0.0.1", 0)
