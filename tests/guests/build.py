"""Build the project's test guests (tests/guests/*.S) into flat 64 KiB firmware images with Debian's gcc/binutils.

    python3 tests/guests/build.py hello            # prints the path of the image
    python3 tests/guests/build.py exitloop -D MODE=1 -D COUNT=100000

Images are cached by a hash of their sources and defines under $PYHV_CACHE/guests (default ~/.cache/pyhv).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GUESTS = Path(__file__).resolve().parent
ROM_SIZE = 0x10000


def cache_dir() -> Path:
    base = os.environ.get("PYHV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyhv")
    path = Path(base) / "guests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(name: str, defines: dict[str, int | str] | None = None) -> Path:
    """Assemble and link tests/guests/<name>.S; returns the path of the cached flat image."""
    defines = dict(defines or {})
    source = GUESTS / f"{name}.S"
    if not source.exists():
        raise FileNotFoundError(f"no test guest {source}")
    digest = hashlib.sha256()
    for inc in sorted(GUESTS.glob("*.inc")) + [source]:
        digest.update(inc.name.encode() + inc.read_bytes())
    digest.update(repr(sorted(defines.items())).encode())
    out = cache_dir() / f"{name}-{digest.hexdigest()[:16]}.bin"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        obj, elf = Path(tmp) / "guest.o", Path(tmp) / "guest.bin"
        cmd = ["gcc", "-c", "-x", "assembler-with-cpp", "-nostdlib", "-I", str(GUESTS), "-o", str(obj), str(source)]
        cmd += [f"-D{k}={v}" for k, v in defines.items()]
        subprocess.run(cmd, check=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0", "-e", "0", "--oformat", "binary", "-o", str(elf),
                        str(obj)], check=True)
        data = elf.read_bytes()
        if len(data) != ROM_SIZE:
            raise RuntimeError(f"{name}: image is {len(data)} bytes, expected {ROM_SIZE} (RESET_VECTOR missing?)")
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(data)
        tmp_out.replace(out)
    return out


ELF_LOAD_ADDRESS = 0x1000000         # where a C guest is linked: 16 MiB, as a Linux kernel


def build_elf(name: str) -> Path:
    """Compile tests/guests/<name>.c, freestanding, into a 64-bit ELF that pyhv boots with `--kernel` (entered at
    its 64-bit entry point, in long mode at CPL 0); returns the path of the cached ELF."""
    source = GUESTS / f"{name}.c"
    if not source.exists():
        raise FileNotFoundError(f"no test guest {source}")
    digest = hashlib.sha256(source.read_bytes() + (GUESTS / "entry64.h").read_bytes()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{digest}.elf"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        elf = Path(tmp) / "guest.elf"
        subprocess.run(["gcc", "-O2", "-ffreestanding", "-fno-stack-protector", "-fno-pic", "-no-pie",
                        "-mno-red-zone", "-mgeneral-regs-only", "-fno-builtin", "-nostdlib", "-static",
                        f"-Wl,-Ttext={ELF_LOAD_ADDRESS:#x}", "-Wl,-e,_start", "-Wl,--build-id=none",
                        "-Wl,-z,max-page-size=4096", "-o", str(elf), str(source)], check=True)
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(elf.read_bytes())
        tmp_out.replace(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("-D", action="append", default=[], metavar="NAME=VALUE")
    args = p.parse_args()
    defines = dict(d.split("=", 1) for d in args.D)
    print(build(args.name, defines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
