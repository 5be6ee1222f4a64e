"""The guest-asset cache: `$PYHV_CACHE` or `~/.cache/pyhv`, shared by every pyhv checkout of a user.

Layout (below the cache root):
    debs/                      .deb files fetched by `apt-get download`
    pkgs/NAME_VERSION/         their unpacked contents (`dpkg-deb -x`)
    src/linux-source-VERSION/  the unpacked kernel source tree (for the mini kernel)
    kernel/mini-build/         the mini kernel's out-of-tree build directory (kept for incremental rebuilds)
    kernel/FLAVOUR-KEY/        bzImage and vmlinux, KEY a hash of their inputs
    initramfs/FLAVOUR-KEY.*    initramfs images (.cpio, .cpio.gz), KEY a hash of their inputs; .json: the
                               manifest of a build with --add files
    guest-FLAVOUR.json         the manifest of the last `pyhv guest build` of that flavour without --add
    locks/                     flock files: concurrent builds of one flavour (several test runs) take turns
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

CACHE_ENV = "PYHV_CACHE"


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pyhv")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_subdir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(name: str, on_wait: "callable | None" = None) -> Iterator[None]:
    """Holds an exclusive flock on locks/NAME.lock; calls on_wait() once if another process holds it."""
    path = cache_subdir("locks") / f"{name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (names inputs of a build)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def move_dir_into_place(tmp: Path, final: Path, replace: bool = False) -> None:
    """Moves a fully written directory to `final`. If `final` already exists (another process made the same thing
    meanwhile) it is kept and `tmp` removed, unless `replace`. The directory is made readable to all."""
    os.chmod(tmp, 0o755)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
