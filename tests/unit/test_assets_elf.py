"""ELF reading for guest assets: .modinfo dependencies of kernel modules (plain and compressed), the PVH note of a
vmlinux, and the vmlinux inside a bzImage."""
from __future__ import annotations

import gzip
import lzma
import struct

import pytest

from pyhv.assets import elf
from pyhv.assets.errors import GuestAssetError
from pyhv.assets.kernel import extract_vmlinux
from pyhv.assets.modules import ModuleIndex, module_depends, module_name, parse_modinfo, read_module


def make_elf(sections: list[tuple[str, int, bytes]]) -> bytes:
    """A minimal ELF64 little-endian relocatable file with the given (name, sh_type, contents) sections."""
    names = b"\0"
    offsets = []
    for name, _, _ in sections + [(".shstrtab", 3, b"")]:
        offsets.append(len(names))
        names += name.encode() + b"\0"
    body = b""
    headers = [b"\0" * 64]
    pos = 64
    for (_name, sh_type, data), name_off in zip(sections + [(".shstrtab", 3, names)], offsets):
        headers.append(struct.pack("<IIQQQQIIQQ", name_off, sh_type, 0, 0, pos + len(body), len(data), 0, 0, 1, 0))
        body += data
    shoff = 64 + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers),
                                 len(headers) - 1)
    return header + body + b"".join(headers)


def note(name: str, note_type: int, desc: bytes) -> bytes:
    raw = name.encode() + b"\0"
    return (struct.pack("<III", len(raw), len(desc), note_type) + raw + b"\0" * (-len(raw) % 4) + desc
            + b"\0" * (-len(desc) % 4))


def module(depends: str) -> bytes:
    return make_elf([(".text", 1, b"\x90" * 8),
                     (".modinfo", 1, b"license=GPL\0depends=" + depends.encode() + b"\0name=x\0vermagic=6.1\0")])


def test_modinfo_and_depends():
    data = module("virtio,virtio_ring")
    assert parse_modinfo(data)["license"] == ["GPL"]
    assert module_depends(data) == ["virtio", "virtio_ring"]
    assert module_depends(module("")) == []


def test_module_names_and_compressed_modules(tmp_path):
    assert module_name("virtio-rng.ko") == "virtio_rng"
    assert module_name("/x/net_failover.ko.xz") == "net_failover"
    plain = module("b")
    (tmp_path / "a.ko").write_bytes(plain)
    (tmp_path / "b-c.ko.xz").write_bytes(lzma.compress(module("")))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.ko.gz").write_bytes(gzip.compress(module("b_c")))
    assert read_module(tmp_path / "b-c.ko.xz") == module("")
    index = ModuleIndex.scan(tmp_path)
    assert set(index.paths) == {"a", "b_c", "b"}
    assert index.load_order(["a"]) == ["b_c", "b", "a"]


def test_pvh_entry_note():
    vmlinux = make_elf([(".text", 1, b"\x90" * 16),
                        (".note.Xen", 7, note("Xen", 6, b"linux\0") + note("Xen", 18, struct.pack("<I", 0x1000450))),
                        (".note.gnu", 7, note("GNU", 3, b"\x01\x02\x03\x04"))])
    assert elf.pvh_entry(vmlinux) == 0x1000450
    assert elf.pvh_entry(make_elf([(".note.gnu", 7, note("GNU", 3, b"abcd"))])) is None
    with pytest.raises(ValueError):
        elf.pvh_entry(b"MZ not an ELF" + b"\0" * 64)


def make_bzimage(payload: bytes, setup_sects: int = 3, payload_offset: int = 0x40) -> bytes:
    setup = bytearray(512 * (setup_sects + 1))
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    return bytes(setup) + b"\xcc" * payload_offset + payload + b"\0\0\0\0"


@pytest.mark.parametrize("compress", [lambda b: gzip.compress(b), lambda b: lzma.compress(b, format=lzma.FORMAT_XZ)])
def test_extract_vmlinux(compress):
    vmlinux = make_elf([(".text", 1, b"\x90" * 100)])
    assert extract_vmlinux(make_bzimage(compress(vmlinux))) == vmlinux


def test_extract_vmlinux_rejects_other_files():
    with pytest.raises(GuestAssetError):
        extract_vmlinux(b"\0" * 4096)
    with pytest.raises(GuestAssetError):
        extract_vmlinux(make_bzimage(b"BZh91AY&SY" + b"\0" * 30))
