"""Kernel modules for the stock kernel's initramfs: names, dependencies and load order computed on the host.

Debian's kernel package ships no modules.dep (depmod runs at install time), so the order comes from each module's
`.modinfo` ELF section (NUL-separated `key=value` strings; `depends=a,b` names the modules it needs). Compressed
modules (.ko.xz, .ko.gz, .ko.zst) are decompressed on the host, so busybox `insmod` always gets a plain ELF.
"""
from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.assets import elf
from pyhv.assets.errors import GuestAssetError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(path: Path | str) -> str:
    """The kernel's name of a module file: virtio-rng.ko.xz -> virtio_rng."""
    name = Path(path).name
    for suffix in MODULE_SUFFIXES[::-1]:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed if the file is compressed."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise GuestAssetError(f"{path.name} is zstd-compressed and zstd is not installed",
                                  "run scripts/install-deps")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


def parse_modinfo(elf_bytes: bytes) -> dict[str, list[str]]:
    """`.modinfo` as key -> values (keys such as alias or parm repeat)."""
    section = elf.section(elf_bytes, ".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


def module_depends(elf_bytes: bytes) -> list[str]:
    values = parse_modinfo(elf_bytes).get("depends", [""])
    return [d.replace("-", "_") for d in ",".join(values).split(",") if d]


@dataclass
class ModuleIndex:
    """The modules under a directory, by name; dependencies read on demand."""
    paths: dict[str, Path] = field(default_factory=dict)
    _depends: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: Path) -> "ModuleIndex":
        index = cls()
        for path in sorted(root.rglob("*.ko*")):
            if path.name.endswith(MODULE_SUFFIXES):
                index.paths.setdefault(module_name(path), path)
        return index

    def depends(self, name: str) -> list[str]:
        if name not in self._depends:
            self._depends[name] = module_depends(read_module(self.paths[name]))
        return self._depends[name]

    def load_order(self, wanted: list[str]) -> list[str]:
        return load_order(wanted, self.depends, set(self.paths))


def load_order(wanted: list[str], depends, available: set[str]) -> list[str]:
    """Every module in `wanted` and what it needs, each after its dependencies (depth-first, stable).

    `depends(name)` returns a module's direct dependencies. Raises GuestAssetError for a module that is not
    available and ValueError for a dependency cycle."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError("module dependency cycle: " + " -> ".join(chain + (name,)))
        if name not in available:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise GuestAssetError(f"kernel module {name}{via} is not in the kernel package")
        state[name] = "visiting"
        for dep in depends(name):
            visit(dep, chain + (name,))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order
