"""Guest kernels: Debian's stock kernel (extracted from its package) and pyhv's small kernel (built from Debian's
linux-source-6.1 with the repository's config fragment, out of tree, cached by the hash of its inputs).

Each yields a bzImage and the uncompressed `vmlinux` ELF (for direct boot through the PVH entry point).
"""
from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyhv.assets import debian, elf
from pyhv.assets.cache import cache_subdir, digest, move_dir_into_place, write_atomic
from pyhv.assets.errors import GuestAssetError
from pyhv.assets.progress import Progress

log = logging.getLogger(__name__)

STOCK_METAPACKAGE = "linux-image-amd64"
SOURCE_PACKAGE = "linux-source-6.1"
MINI_CONFIG = Path(__file__).with_name("mini-kernel.config")
# Bump when the build recipe below changes in a way that changes its output.
MINI_RECIPE = 1
BUILD_TOOLS = ("make", "gcc", "ld", "flex", "bison", "bc", "tar", "xz", "dpkg-deb")
DEPS_HINT = "run scripts/install-deps (as root) to install the kernel build dependencies"

# Linux boot protocol (Documentation/x86/boot.rst): setup header fields
SETUP_SECTS_OFFSET = 0x1F1
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"
PAYLOAD_OFFSET_OFFSET = 0x248      # payload_offset, payload_length (protocol 2.08+)
SECTOR = 512
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class Kernel:
    flavour: str            # "stock" | "mini"
    release: str            # what `uname -r` prints in the guest
    bzimage: Path
    vmlinux: Path
    inputs: dict
    modules_root: Path | None = None     # stock: the package's lib/modules/RELEASE/kernel


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed kernel ELF inside a bzImage (the payload the boot protocol's header points at)."""
    if bzimage[HEADER_MAGIC_OFFSET:HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC:
        raise GuestAssetError("not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[SETUP_SECTS_OFFSET] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, PAYLOAD_OFFSET_OFFSET)
    start = (setup_sects + 1) * SECTOR + payload_offset
    payload = bzimage[start:start + payload_length]
    if payload.startswith(GZIP_MAGIC):
        data = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    elif payload.startswith(XZ_MAGIC):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(ZSTD_MAGIC):
        data = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    else:
        raise GuestAssetError(f"bzImage payload compression {payload[:6].hex()} is not supported")
    if not data.startswith(elf.ELF_MAGIC):
        raise GuestAssetError("the bzImage payload is not an ELF kernel")
    return data


def _copy_into(tmp: Path, bzimage: Path, vmlinux: bytes) -> None:
    shutil.copyfile(bzimage, tmp / "bzImage")
    (tmp / "vmlinux").write_bytes(vmlinux)


def stock_kernel(progress: Progress, force: bool = False) -> Kernel:
    """The kernel package linux-image-amd64 depends on: its bzImage, the vmlinux inside it, its modules."""
    meta = debian.resolve(STOCK_METAPACKAGE, progress)
    package, root = debian.fetch(debian.first_dependency(meta, "linux-image-"), progress)
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise GuestAssetError(f"{package.name}: expected one boot/vmlinuz-*, found {len(images)}")
    release = images[0].name[len("vmlinuz-"):]
    out = cache_subdir("kernel") / f"stock-{package.key}"
    if force or not (out / "vmlinux").exists():
        started = time.monotonic()
        progress.step(f"extracting vmlinux from {images[0].name}")
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".stock."))
        try:
            _copy_into(tmp, images[0], extract_vmlinux(images[0].read_bytes()))
            move_dir_into_place(tmp, out, replace=force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress.done("extracted vmlinux", started)
    return Kernel("stock", release, out / "bzImage", out / "vmlinux",
                  {"package": package.name, "version": package.version},
                  modules_root=root / "lib" / "modules" / release / "kernel")


# ---- the mini kernel -------------------------------------------------------------------------------------------

def parse_config(text: str) -> dict[str, str]:
    """Kconfig lines as CONFIG_NAME -> value ('n' for "# CONFIG_NAME is not set")."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            values[m.group(1)] = "n"
    return values


def config_mismatches(fragment: dict[str, str], final: dict[str, str]) -> list[str]:
    """Fragment options the final .config does not have as asked (Kconfig dropped them: a missing dependency or
    a select from elsewhere)."""
    return [f"{name}: asked {want}, got {final.get(name, 'n')}"
            for name, want in fragment.items() if final.get(name, "n") != want]


def _check_tools() -> None:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise GuestAssetError(f"building the mini kernel needs {', '.join(missing)}", DEPS_HINT)


def build_jobs() -> int:
    """make -j: $PYHV_BUILD_JOBS, else the number of CPUs this process may use."""
    env = os.environ.get("PYHV_BUILD_JOBS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


def source_tree(package: debian.DebPackage, progress: Progress) -> Path:
    """The unpacked kernel source tree (streamed from the .deb's tarball; trees of other versions removed)."""
    base = cache_subdir("src")
    final = base / f"linux-source-{package.key}"
    if (final / "Makefile").exists():
        return final
    for old in base.glob("linux-source-*"):
        shutil.rmtree(old, ignore_errors=True)
    deb = debian.download(package, progress)
    started = time.monotonic()
    progress.step(f"unpacking the kernel source tree ({SOURCE_PACKAGE} {package.version})")
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".src."))
    try:
        tarball = f"./usr/src/{SOURCE_PACKAGE}.tar.xz"
        script = 'set -eo pipefail; dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" | tar -xJ -C "$3" --strip-components=1'
        proc = subprocess.run(["bash", "-c", script, "bash", str(deb), tarball, str(tmp)], capture_output=True,
                              text=True)
        if proc.returncode != 0 or not (tmp / "Makefile").exists():
            raise GuestAssetError(f"unpacking {deb.name} failed: {proc.stderr.strip()[-300:]}")
        move_dir_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.done("unpacked the kernel source tree", started)
    return final


def _make(src: Path, build: Path, targets: list[str], log_file, progress: Progress | None = None,
          jobs: int = 1, expected: int = 0) -> None:
    cmd = ["make", "-C", str(src), f"O={build}", "ARCH=x86_64", f"-j{jobs}", "KBUILD_BUILD_USER=pyhv",
           "KBUILD_BUILD_HOST=pyhv", *targets]
    log_file.write(f"$ {' '.join(cmd)}\n")
    log_file.flush()
    started = time.monotonic()
    steps = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "LC_ALL": "C"}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            if progress is not None and line.startswith("  ") and not line.startswith("   "):
                steps += 1
                share = f" of ~{expected}" if expected else ""
                progress.status(f"building the mini kernel: step {steps}{share}, "
                                f"{time.monotonic() - started:.0f} s, {line.split()[-1]}")
        status = proc.wait()
    log_file.write(f"# exit {status}, {steps} steps, {time.monotonic() - started:.1f} s\n")
    log_file.flush()
    if status != 0:
        raise GuestAssetError(f"kernel build failed (make {' '.join(targets)}): see {log_file.name}")
    if progress is not None and steps > expected:
        (build / ".pyhv-steps").write_text(str(steps))    # a full build's step count, for the next one


def mini_kernel(progress: Progress, force: bool = False, jobs: int | None = None) -> Kernel:
    """pyhv's small kernel: tinyconfig + mini-kernel.config from Debian's linux-source-6.1, built out of tree."""
    fragment_text = MINI_CONFIG.read_text()
    package = debian.resolve(SOURCE_PACKAGE, progress)
    # The options, not the file's text, name the build: editing a comment rebuilds nothing.
    inputs = {"package": package.name, "version": package.version,
              "config": digest(sorted(parse_config(fragment_text).items())), "recipe": MINI_RECIPE}
    out = cache_subdir("kernel") / f"mini-{digest(inputs)}"
    if not force and (out / "vmlinux").exists() and (out / "release").exists():
        return Kernel("mini", (out / "release").read_text().strip(), out / "bzImage", out / "vmlinux", inputs)
    _check_tools()
    src = source_tree(package, progress)
    build = cache_subdir("kernel") / f"mini-build-{package.key}"
    for old in build.parent.glob("mini-build-*"):
        if old != build:
            shutil.rmtree(old, ignore_errors=True)
    build.mkdir(exist_ok=True)
    jobs = jobs or build_jobs()
    started = time.monotonic()
    progress.step(f"building the mini kernel with make -j{jobs} in {build} (a few minutes on 2 CPUs)")
    with open(build / "pyhv-build.log", "w") as log_file:
        _make(src, build, ["tinyconfig"], log_file)
        merge = subprocess.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(build),
                                str(build / ".config"), str(MINI_CONFIG)], cwd=src, capture_output=True, text=True)
        log_file.write(merge.stdout + merge.stderr)
        if merge.returncode != 0:
            raise GuestAssetError(f"merging {MINI_CONFIG.name} failed: see {log_file.name}")
        _make(src, build, ["olddefconfig"], log_file)
        mismatches = config_mismatches(parse_config(fragment_text), parse_config((build / ".config").read_text()))
        if mismatches:
            raise GuestAssetError(f"{MINI_CONFIG.name}: Kconfig did not keep {'; '.join(mismatches)}",
                                  "fix the fragment's dependencies")
        steps_file = build / ".pyhv-steps"
        expected = int(steps_file.read_text()) if steps_file.exists() else 0
        _make(src, build, ["bzImage"], log_file, progress, jobs, expected)
    vmlinux = (build / "vmlinux").read_bytes()
    if elf.pvh_entry(vmlinux) is None:
        raise GuestAssetError("the mini kernel's vmlinux has no PVH entry note", "keep CONFIG_PVH=y")
    release = (build / "include/config/kernel.release").read_text().strip()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".mini."))
    try:
        _copy_into(tmp, build / "arch/x86/boot/bzImage", vmlinux)
        shutil.copyfile(build / ".config", tmp / "config")
        write_atomic(tmp / "release", release.encode() + b"\n")
        move_dir_into_place(tmp, out, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.done(f"built the mini kernel {release}", started)
    return Kernel("mini", release, out / "bzImage", out / "vmlinux", inputs)

