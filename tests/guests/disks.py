"""Build the project's test disk images (raw) for firmware boot tests, cached like the test guests.

    python3 tests/guests/disks.py bootsector       # a boot sector + payload, prints the image path
    python3 tests/guests/disks.py grub             # a GRUB (grub-pc-bin) disk with an ext2 partition

bootsector: sector 0 is tests/guests/bootsector.S, sectors 1..SECTORS a deterministic payload whose 16-bit word
sum the boot sector checks after reading it through int 13h; exit status 33 ((0x10 << 1) | 1) means it matched.
"""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import GUESTS, cache_dir  # noqa: E402

BOOTSECTOR_SECTORS = 64
BOOTSECTOR_OK = 0x10
DISK_SIZE = 8 << 20


def payload(sectors: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(sectors * 512))


def word_sum(data: bytes) -> int:
    return sum(int.from_bytes(data[i:i + 2], "little") for i in range(0, len(data), 2)) & 0xFFFF


def _cached(name: str, *parts: bytes) -> tuple[Path, bool]:
    digest = hashlib.sha256(b"".join(parts)).hexdigest()[:16]
    out = cache_dir() / f"{name}-{digest}.img"
    return out, out.exists()


def bootsector_disk(sectors: int = BOOTSECTOR_SECTORS, corrupt: bool = False) -> Path:
    """A raw disk whose boot sector reads `sectors` sectors and checks them (corrupt=True: one byte differs from
    what the boot sector expects, so it must report a mismatch)."""
    source = GUESTS / "bootsector.S"
    data = payload(sectors)
    out, done = _cached("bootsector", source.read_bytes(), str((sectors, corrupt)).encode())
    if done:
        return out
    expected = word_sum(data)
    if corrupt:
        data = bytes([data[0] ^ 1]) + data[1:]
    with tempfile.TemporaryDirectory() as tmp:
        obj, binary = Path(tmp) / "bs.o", Path(tmp) / "bs.bin"
        subprocess.run(["gcc", "-c", "-x", "assembler-with-cpp", "-nostdlib", f"-DSECTORS={sectors}",
                        f"-DEXPECTED={expected}", "-o", str(obj), str(source)], check=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x7c00", "-e", "_start", "--oformat", "binary", "-o",
                        str(binary), str(obj)], check=True)
        boot = binary.read_bytes()
        if len(boot) != 512 or boot[510:] != b"\x55\xaa":
            raise RuntimeError(f"boot sector is {len(boot)} bytes")
        image = bytearray(DISK_SIZE)
        image[:512] = boot
        image[512:512 + len(data)] = data
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(image)
        tmp_out.replace(out)
    return out


PXE_TOKEN_PLACEHOLDER = b"@" * 16


def pxe_program(token: bytes) -> bytes:
    """tests/guests/pxeboot.S linked at 0x7c00 with `token` (16 bytes) in place of its placeholder."""
    if len(token) != len(PXE_TOKEN_PLACEHOLDER):
        raise ValueError("the PXE token is 16 bytes")
    source = GUESTS / "pxeboot.S"
    out, done = _cached("pxeboot", source.read_bytes(), (GUESTS / "lib16.inc").read_bytes(),
                        (GUESTS / "common.inc").read_bytes())
    if not done:
        with tempfile.TemporaryDirectory() as tmp:
            obj, binary = Path(tmp) / "pxe.o", Path(tmp) / "pxe.bin"
            subprocess.run(["gcc", "-c", "-x", "assembler-with-cpp", "-nostdlib", "-I", str(GUESTS), "-o", str(obj),
                            str(source)], check=True)
            subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x7c00", "-e", "_start", "--oformat", "binary",
                            "-o", str(binary), str(obj)], check=True)
            tmp_out = out.with_suffix(".tmp")
            tmp_out.write_bytes(binary.read_bytes())
            tmp_out.replace(out)
    program = out.read_bytes()
    if program.count(PXE_TOKEN_PLACEHOLDER) != 1:
        raise RuntimeError(f"{out}: no single token placeholder")
    return program.replace(PXE_TOKEN_PLACEHOLDER, token)


def main() -> int:
    kind = sys.argv[1] if len(sys.argv) > 1 else "bootsector"
    if kind == "bootsector":
        print(bootsector_disk())
    elif kind == "grub":
        from grubdisk import grub_disk
        print(grub_disk())
    else:
        print(f"unknown disk {kind!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
