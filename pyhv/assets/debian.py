"""Debian packages as build inputs: resolve with `apt-cache`, fetch with `apt-get download` (no root needed),
unpack with `dpkg-deb -x`, all into the cache. Nothing is installed on the host.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pyhv.assets.cache import cache_root, cache_subdir, digest, file_sha256, move_dir_into_place, write_atomic
from pyhv.assets.errors import GuestAssetError
from pyhv.assets.progress import Progress

log = logging.getLogger(__name__)

APT_HINT = "check the apt sources, then run `apt-get update` as root"
APT_STATE_DIRS = ("/var/lib/apt/lists", "/etc/apt")


_lists_refreshed = False


class DownloadError(GuestAssetError):
    """apt-get download failed (often a stale package list naming versions the archive no longer has)."""


def refresh_package_lists(progress: Progress) -> bool:
    """Runs `apt-get update` once per process when root (true if it ran now and succeeded): the retry when apt
    does not know a package or a download failed (stale or missing package lists)."""
    global _lists_refreshed
    if os.geteuid() != 0 or _lists_refreshed:
        return False
    _lists_refreshed = True
    progress.step("apt does not know a package or a download failed: running apt-get update and trying again")
    return _run(["apt-get", "update", "-qq"]).returncode == 0


@dataclass(frozen=True)
class DebPackage:
    """A package version as apt's candidate describes it."""
    name: str
    version: str
    architecture: str
    size: int
    sha256: str
    depends: str = ""

    @property
    def key(self) -> str:
        """NAME_VERSION with characters unsafe in file names replaced."""
        return re.sub(r"[^A-Za-z0-9.+~_-]", "_", f"{self.name}_{self.version}")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as e:
        raise GuestAssetError(f"{cmd[0]} not found", "pyhv guest build needs Debian's apt and dpkg") from e


def parse_control(text: str) -> dict[str, str]:
    """The first stanza of deb822 control text (`apt-cache show` output) as a dict; continuation lines joined."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def apt_state() -> str:
    """A fingerprint of what decides apt's candidates (package lists, sources, preferences): resolutions made
    under the same fingerprint are reused. (This Debian image keeps no apt binary cache, so each `apt-cache`
    call re-reads all package lists: seconds on a busy machine.)"""
    entries = []
    for base in APT_STATE_DIRS:
        for root, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                entries.append((os.path.join(root, name), st.st_size, st.st_mtime_ns))
    return digest(entries)


def _apt_cache_show(name: str) -> dict[str, str]:
    proc = _run(["apt-cache", "show", "--no-all-versions", name])
    return parse_control(proc.stdout) if proc.returncode == 0 else {}


def resolve(name: str, progress: Progress | None = None) -> DebPackage:
    """apt's candidate version of a package (after one `apt-get update` if apt has no list naming it, as on a
    machine whose package lists were never fetched)."""
    memo_path = cache_root() / "apt-candidates.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    state = apt_state()
    if memo.get("state") == state and name in memo.get("packages", {}):
        return DebPackage(**memo["packages"][name])
    fields = _apt_cache_show(name)
    if "Version" not in fields and refresh_package_lists(progress or Progress()):
        state = apt_state()
        fields = _apt_cache_show(name)
    if "Version" not in fields:
        raise GuestAssetError(f"package {name} is not known to apt", APT_HINT)
    package = DebPackage(name=fields["Package"], version=fields["Version"],
                         architecture=fields.get("Architecture", ""), size=int(fields.get("Size", "0")),
                         sha256=fields.get("SHA256", ""), depends=fields.get("Depends", ""))
    packages = memo.get("packages", {}) if memo.get("state") == state else {}
    packages[name] = asdict(package)
    write_atomic(memo_path, json.dumps({"state": state, "packages": packages}, indent=1).encode())
    return package


def first_dependency(package: DebPackage, prefix: str) -> str:
    """The first package named in Depends that starts with `prefix` (e.g. the kernel a metapackage points at)."""
    for alternative in package.depends.split(","):
        name = alternative.split("|")[0].split("(")[0].strip()
        if name.startswith(prefix):
            return name
    raise GuestAssetError(f"{package.name} {package.version} depends on no {prefix}* package", APT_HINT)


def _apt_get_download(package: DebPackage, workdir: Path) -> subprocess.CompletedProcess:
    cmd = ["apt-get", "download", "-q", f"{package.name}={package.version}"]
    if os.geteuid() == 0:
        cmd[1:1] = ["-o", "APT::Sandbox::User=root"]   # root downloading into a private cache directory
    return _run(cmd, cwd=workdir)


def download(package: DebPackage, progress: Progress) -> Path:
    """The .deb in the cache (fetched if missing or damaged), checked against apt's SHA256."""
    debs = cache_subdir("debs")
    final = debs / f"{package.key}.deb"
    if final.exists() and (not package.sha256 or file_sha256(final) == package.sha256):
        return final
    started = time.monotonic()
    progress.step(f"downloading {package.name} {package.version} ({package.size / 1e6:.1f} MB)")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        proc = _apt_get_download(package, Path(tmp))
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DownloadError(f"apt-get download {package.name}={package.version} failed: {last}", APT_HINT)
        files = list(Path(tmp).glob("*.deb"))
        if len(files) != 1:
            raise GuestAssetError(f"apt-get download {package.name} left {len(files)} .deb files")
        if package.sha256 and file_sha256(files[0]) != package.sha256:
            raise GuestAssetError(f"{files[0].name}: SHA256 differs from apt's index", APT_HINT)
        files[0].replace(final)
    progress.done(f"downloaded {final.name}", started)
    return final


def unpack(package: DebPackage, progress: Progress) -> Path:
    """The package's files, unpacked once into pkgs/NAME_VERSION/."""
    final = cache_subdir("pkgs") / package.key
    if final.is_dir():
        return final
    deb = download(package, progress)
    started = time.monotonic()
    progress.step(f"unpacking {deb.name}")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{package.key}."))
    try:
        proc = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if proc.returncode != 0:
            raise GuestAssetError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
        move_dir_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.done(f"unpacked {package.name}", started)
    return final


def fetch(name: str, progress: Progress) -> tuple[DebPackage, Path]:
    """Resolve, download and unpack a package; returns it and its unpacked root."""
    package = resolve(name, progress)
    return package, unpack(package, progress)
