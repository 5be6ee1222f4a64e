"""A bootable disk made with Debian's GRUB (grub-pc-bin), for firmware boot tests: no mounting, no root needed.

Layout (raw, 8 MiB):
    LBA 0        GRUB's boot.img (its first 440 bytes) + an MBR partition table with one Linux partition
    LBA 1..      core.img from grub-mkimage (diskboot + kernel + modules + an embedded configuration); boot.img
                 loads it from LBA 1 and diskboot's default block list continues at LBA 2, so no grub-bios-setup
    LBA 2048..   partition 1: ext2 made by mke2fs -d from a directory holding /hello.txt

The embedded script (run by GRUB's kernel parser: plain commands, no `if`) puts GRUB's console on the serial
port, prints a marker, `cat`s /hello.txt from the ext2 partition of the BIOS's first disk (SeaBIOS's virtio-blk
driver behind int 13h) and writes 0x10 to the debug-exit port 0xf4 (exit status 33). A test checks the file's
text on the serial console: GRUB prints an error instead when it cannot read it.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import cache_dir  # noqa: E402

GRUB_DIR = Path("/usr/lib/grub/i386-pc")
HELLO = "hello from an ext2 file on a virtio disk, read by GRUB through SeaBIOS\n"
MODULES = ["biosdisk", "part_msdos", "ext2", "iorw", "echo", "cat", "serial", "terminal"]
DISK_SIZE = 8 << 20
PART_START = 2048
MBR_PARTITION_TABLE = 0x1BE
MBR_CODE_SIZE = 440
PARTITION_TYPE_LINUX = 0x83
CONFIG = """\
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
echo "grub: reading (hd0,msdos1)/hello.txt"
cat (hd0,msdos1)/hello.txt
echo "grub: done"
outb 0xf4 0x10
"""


def available() -> str | None:
    """None if the tools are there, else what is missing."""
    for tool in ("grub-mkimage", "mke2fs"):
        if shutil.which(tool) is None and not Path("/sbin", tool).exists():
            return f"{tool} is not installed (scripts/install-deps)"
    if not (GRUB_DIR / "boot.img").exists():
        return "grub-pc-bin is not installed (scripts/install-deps)"
    return None


def _mke2fs() -> str:
    return shutil.which("mke2fs") or "/sbin/mke2fs"


def grub_disk() -> Path:
    missing = available()
    if missing:
        raise RuntimeError(missing)
    version = subprocess.run(["grub-mkimage", "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((version + CONFIG + HELLO + " ".join(MODULES)).encode()).hexdigest()[:16]
    out = cache_dir() / f"grub-{key}.img"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "early.cfg").write_text(CONFIG)
        core = t / "core.img"
        subprocess.run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core), "-p",
                        "(hd0,msdos1)/boot/grub", "-c", str(t / "early.cfg"), *MODULES], check=True)
        core_data = core.read_bytes()
        if 1 + len(core_data) // 512 + 1 >= PART_START:
            raise RuntimeError(f"core.img is {len(core_data)} bytes, too big for the gap before the partition")
        root = t / "root"
        root.mkdir()
        (root / "hello.txt").write_text(HELLO)
        part_sectors = (DISK_SIZE // 512) - PART_START
        part = t / "part.img"
        subprocess.run([_mke2fs(), "-q", "-F", "-t", "ext2", "-L", "pyhv", "-d", str(root), str(part),
                        str(part_sectors // 2)], check=True, capture_output=True)
        image = bytearray(DISK_SIZE)
        image[:MBR_CODE_SIZE] = (GRUB_DIR / "boot.img").read_bytes()[:MBR_CODE_SIZE]
        entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", PARTITION_TYPE_LINUX, b"\xfe\xff\xff",
                            PART_START, part_sectors)
        image[MBR_PARTITION_TABLE:MBR_PARTITION_TABLE + 16] = entry
        image[510:512] = b"\x55\xaa"
        image[512:512 + len(core_data)] = core_data
        part_data = part.read_bytes()
        image[PART_START * 512:PART_START * 512 + len(part_data)] = part_data
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(image)
        tmp_out.replace(out)
    return out


if __name__ == "__main__":
    print(grub_disk())
