"""`build_guest`: a kernel flavour plus a matching initramfs, rebuilt only when an input changed, with a manifest.

Inputs that name the artifacts: the kernel package's version (stock) or the source package's version and the
config fragment's hash (mini); busybox-static's version; the code that writes the initramfs (its /init included);
the module list; the path, mode and content hash of every --add file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from pyhv.assets import cpio, debian, init_script, initramfs
from pyhv.assets.cache import cache_root, cache_subdir, digest, file_sha256, locked, write_atomic
from pyhv.assets.debian import DownloadError
from pyhv.assets.errors import GuestAssetError
from pyhv.assets.initramfs import AddedFile, InitramfsSpec
from pyhv.assets.kernel import Kernel, mini_kernel, stock_kernel
from pyhv.assets.modules import ModuleIndex
from pyhv.assets.progress import Progress

log = logging.getLogger(__name__)

FLAVOURS = ("mini", "stock")
BUSYBOX_PACKAGE = "busybox-static"
# What /init loads on the stock kernel (virtio is modular there); their dependencies are added in load order.
STOCK_MODULES = ["virtio", "virtio_ring", "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net",
                 "virtio_console", "virtio_rng", "e1000"]
# The code whose output is the initramfs: editing it rebuilds the image.
INITRAMFS_CODE = [Path(m.__file__) for m in (cpio, init_script, initramfs)]


@dataclass
class GuestAssets:
    """What `pyhv guest build` produced for one kernel flavour."""
    flavour: str
    kernel_release: str
    bzimage: Path
    vmlinux: Path
    initramfs: Path                   # gzip-compressed newc
    initramfs_uncompressed: Path      # the same newc image uncompressed: boots faster on PVM
    manifest: Path

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def default_flavour() -> str:
    """The mini kernel on PVM hosts (the stock kernel boots far too slowly there), the stock kernel elsewhere."""
    from pyhv.kvm.flavour import detect_flavour
    return "mini" if detect_flavour().is_pvm else "stock"


def manifest_path(flavour: str) -> Path:
    return cache_root() / f"guest-{flavour}.json"


def load_manifest(flavour: str) -> GuestAssets:
    """The artifacts of the last build of a flavour without --add files (GuestAssetError if there was none)."""
    path = manifest_path(flavour)
    try:
        data = json.loads(path.read_text())
        assets = GuestAssets(flavour, data["kernel_release"], Path(data["bzimage"]), Path(data["vmlinux"]),
                             Path(data["initramfs"]), Path(data["initramfs_uncompressed"]), path)
    except (OSError, ValueError, KeyError) as e:
        raise GuestAssetError(f"no {flavour} guest has been built", f"run `pyhv guest build --kernel {flavour}`") \
            from e
    for p in (assets.bzimage, assets.vmlinux, assets.initramfs, assets.initramfs_uncompressed):
        if not p.exists():
            raise GuestAssetError(f"{p} is missing", f"run `pyhv guest build --kernel {flavour}`")
    return assets


def _modules(kernel: Kernel) -> list[tuple[str, Path]]:
    if kernel.modules_root is None:
        return []
    index = ModuleIndex.scan(kernel.modules_root)
    return [(name, index.paths[name]) for name in index.load_order(STOCK_MODULES)]


def _build(flavour: str, added: list[AddedFile], force: bool, progress: Progress) -> GuestAssets:
    kernel = mini_kernel(progress, force=force) if flavour == "mini" else stock_kernel(progress, force=force)
    busybox_pkg, busybox_root = debian.fetch(BUSYBOX_PACKAGE, progress)
    spec = InitramfsSpec(busybox_root / "bin" / "busybox", _modules(kernel), added)
    inputs = {
        "kernel": kernel.inputs,
        "busybox": busybox_pkg.version,
        "code": [hashlib.sha256(p.read_bytes()).hexdigest() for p in INITRAMFS_CODE],
        "modules": [name for name, _ in spec.modules],
        "added": [a.fingerprint() for a in added],
    }
    raw = cache_subdir("initramfs") / f"{flavour}-{digest(inputs)}.cpio"
    image = raw.with_name(raw.name + ".gz")
    if force or not image.exists() or not raw.exists():
        started = time.monotonic()
        progress.step(f"writing the initramfs ({len(spec.modules)} modules, {len(added)} added paths)")
        data = spec.build_uncompressed()
        write_atomic(raw, data)
        write_atomic(image, initramfs.compress(data))
        progress.done(f"wrote {image.name}, {len(data) / 1e6:.1f} MB, {image.stat().st_size / 1e6:.1f} MB "
                      "compressed", started)
    # The plain build's manifest is what `pyhv guest path` shows; a build with --add files keeps its own.
    path = manifest_path(flavour) if not added else raw.with_suffix(".json")
    manifest = {
        "flavour": flavour, "kernel_release": kernel.release,
        "bzimage": str(kernel.bzimage), "vmlinux": str(kernel.vmlinux), "initramfs": str(image),
        "initramfs_uncompressed": str(raw),
        "inputs": inputs, "sha256": {name: file_sha256(p) for name, p in
                                     (("bzimage", kernel.bzimage), ("initramfs", image))},
    }
    write_atomic(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return GuestAssets(flavour, kernel.release, kernel.bzimage, kernel.vmlinux, image, raw, path)


def build_guest(flavour: str | None = None, add: Iterable[str | AddedFile] = (), force: bool = False,
                progress: Progress | None = None) -> GuestAssets:
    """Builds (or finds in the cache) a guest kernel and initramfs. Concurrent builds of one flavour (several test
    runs on one machine) take turns through a lock in the cache; what flavours share is written atomically."""
    flavour = flavour or default_flavour()
    if flavour not in FLAVOURS:
        raise GuestAssetError(f"unknown kernel flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    progress = progress or Progress()
    added = [a if isinstance(a, AddedFile) else AddedFile.parse(a) for a in add]
    with locked(f"guest-{flavour}", on_wait=lambda: progress.step(f"waiting for another {flavour} guest build")):
        try:
            return _build(flavour, added, force, progress)
        except DownloadError:
            if not debian.refresh_package_lists(progress):
                raise
            return _build(flavour, added, force, progress)
