"""Kernel images pyhv boots: a bzImage (decompressed on the host, once, into its vmlinux ELF) or an ELF vmlinux,
entered through its PVH note (XEN_ELFNOTE_PHYS32_ENTRY) or at its 64-bit entry point.

Decompressing the bzImage's payload on the host skips the kernel's own decompressor, which on PVM hosts runs
emulated instruction by instruction (seconds), and on hardware still costs tens of milliseconds.
"""
from __future__ import annotations

import bz2
import hashlib
import logging
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from pyhv.arch.x86.bootparams import SetupHeader, synthetic_header
from pyhv.errors import GuestImageError

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

# compressed-payload formats by magic (what arch/x86/boot/compressed supports)
PAYLOAD_FORMATS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89\x4c\x5a\x4f", "lzo"),
)


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes          # file contents (p_filesz bytes)
    memsz: int


@dataclass
class KernelImage:
    """A kernel ready to load: ELF segments, entry points, and the setup header for the zero page."""
    path: str
    segments: list[Segment]
    entry64: int                  # 64-bit entry (startup_64), physical
    pvh_entry: int | None         # 32-bit PVH entry, physical (None: the kernel has no PVH note)
    setup_header: bytes           # from the bzImage, or synthesized for a bare vmlinux
    cmdline_size: int
    initrd_addr_max: int
    from_bzimage: bool
    decompressed_from: str | None = None   # payload format decompressed on the host

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)


def cache_dir() -> Path:
    base = os.environ.get("PYHV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyhv")
    return Path(base) / "vmlinux"


def payload_format(payload: bytes) -> str | None:
    for magic, name in PAYLOAD_FORMATS:
        if payload.startswith(magic):
            return name
    return None


def _external(tool: str, args: list[str], data: bytes, fmt: str) -> bytes:
    if shutil.which(tool) is None:
        raise GuestImageError(f"the kernel's payload is {fmt}-compressed and Python cannot decompress it",
                              f"install Debian's {tool} package, or boot the kernel's vmlinux instead")
    proc = subprocess.run([tool, *args], input=data, capture_output=True)
    if proc.returncode != 0 and not proc.stdout:
        raise GuestImageError(f"{tool} could not decompress the kernel payload: {proc.stderr.decode().strip()}")
    return proc.stdout


def decompress_payload(payload: bytes) -> tuple[bytes, str]:
    """The vmlinux ELF inside a bzImage payload (which ends with the 4-byte uncompressed size)."""
    fmt = payload_format(payload)
    if fmt is None:
        raise GuestImageError("the bzImage payload is in an unknown compression format")
    try:
        if fmt == "gzip":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif fmt in ("xz", "lzma"):
            dec = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
            out = dec.decompress(payload)
        elif fmt == "bzip2":
            out = bz2.BZ2Decompressor().decompress(payload)
        elif fmt == "zstd":
            out = _external("zstd", ["-d", "-c", "-q"], payload, fmt)
        elif fmt == "lz4":
            out = _external("lz4", ["-d", "-c", "-q"], payload, fmt)
        else:
            out = _external("lzop", ["-d", "-c", "-q"], payload, fmt)
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as e:
        raise GuestImageError(f"cannot decompress the kernel's {fmt} payload: {e}")
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if fmt != "gzip" and len(out) != expected:
        log.debug("payload decompressed to %d bytes, header says %d", len(out), expected)
    if not out.startswith(ELF_MAGIC):
        raise GuestImageError(f"the kernel's {fmt} payload does not hold an ELF vmlinux")
    return out, fmt


def parse_elf(data: bytes, path: str) -> tuple[list[Segment], int, int | None]:
    """PT_LOAD segments by physical address, the entry point, and the PVH entry from the ELF notes."""
    if not data.startswith(ELF_MAGIC) or len(data) < 64:
        raise GuestImageError(f"{path}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise GuestImageError(f"{path}: not a 64-bit little-endian ELF (a 32-bit kernel?)")
    (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIQQQIHHH", data, 16)
    if e_machine != 62:
        raise GuestImageError(f"{path}: ELF machine {e_machine} is not x86-64")
    if e_phoff + e_phnum * e_phentsize > len(data) or e_phentsize < 56:
        raise GuestImageError(f"{path}: truncated ELF program headers")
    segments: list[Segment] = []
    pvh: int | None = None
    for i in range(e_phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_offset + p_filesz > len(data):
            raise GuestImageError(f"{path}: ELF segment {i} reaches past the end of the file")
        if p_type == PT_LOAD and p_memsz:
            if p_filesz > p_memsz:
                raise GuestImageError(f"{path}: ELF segment {i} has more file than memory bytes")
            segments.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
        elif p_type == PT_NOTE:
            pvh = _find_pvh_note(data[p_offset:p_offset + p_filesz]) or pvh
    if not segments:
        raise GuestImageError(f"{path}: ELF has no loadable segments")
    return segments, e_entry, pvh


def _find_pvh_note(notes: bytes) -> int | None:
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        off += 12
        name = notes[off:off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = notes[off:off + descsz]
        off += (descsz + 3) & ~3
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return struct.unpack_from("<Q" if len(desc) >= 8 else "<I", desc)[0] & 0xFFFFFFFF
    return None


def load_kernel(path: str) -> KernelImage:
    """Read `path` (bzImage or ELF vmlinux) into a KernelImage; a bzImage's payload is decompressed on the
    host and the result cached by the bzImage's hash."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GuestImageError(f"kernel file {path}: {e.strerror}")
    if data.startswith(ELF_MAGIC):
        segments, entry, pvh = parse_elf(data, path)
        return KernelImage(path, segments, entry, pvh, synthetic_header(), 2048, 0x7FFFFFFF, False)
    if len(data) > 0x206 and data[0x202:0x206] == b"HdrS":
        hdr = SetupHeader.parse(data, path)
        vmlinux, fmt = _cached_vmlinux(data, hdr, path)
        segments, entry, pvh = parse_elf(vmlinux, f"{path} (decompressed payload)")
        return KernelImage(path, segments, entry, pvh, hdr.raw, hdr.cmdline_size, hdr.initrd_addr_max, True, fmt)
    raise GuestImageError(f"kernel file {path} is neither a bzImage nor an ELF vmlinux",
                          "give the kernel's vmlinuz/bzImage or its vmlinux")


def _cached_vmlinux(data: bytes, hdr: SetupHeader, path: str) -> tuple[bytes, str]:
    digest = hashlib.sha256(data).hexdigest()[:32]
    kernel = data[hdr.kernel_offset:]
    payload = kernel[hdr.payload_offset:hdr.payload_offset + hdr.payload_length]
    fmt = payload_format(payload) or "unknown"
    cached = cache_dir() / f"{digest}.elf"
    try:
        return cached.read_bytes(), fmt
    except OSError:
        pass
    vmlinux, fmt = decompress_payload(payload)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(vmlinux)
        tmp.replace(cached)
        log.info("decompressed %s (%s, %d bytes) into %s", path, fmt, len(vmlinux), cached)
    except OSError as e:
        log.warning("cannot cache the decompressed kernel in %s: %s", cached, e.strerror)
    return vmlinux, fmt
