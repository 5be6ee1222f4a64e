"""Shared test fixtures.

Tests marked `kvm` need a usable /dev/kvm: without one they are skipped with the reason, unless
PYHV_REQUIRE_KVM=1 (as in CI), where they fail instead.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guests"))

import build as guest_build  # noqa: E402  (tests/guests/build.py)


def kvm_unavailable_reason() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        return f"/dev/kvm unusable: {e.strerror}"
    os.close(fd)
    return None


def pytest_runtest_setup(item):
    if "kvm" not in item.keywords:
        return
    reason = kvm_unavailable_reason()
    if reason is not None:
        if os.environ.get("PYHV_REQUIRE_KVM") == "1":
            pytest.fail(f"PYHV_REQUIRE_KVM=1 but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def guest():
    """guest(name, **defines) -> path of a built test guest image (tests/guests/<name>.S)."""
    def build(name: str, **defines) -> str:
        return str(guest_build.build(name, defines))
    return build


@dataclass
class PyhvResult:
    status: int
    stdout: str
    stderr: str


@pytest.fixture
def pyhv_run():
    """pyhv_run(*args, timeout=60, input=None) runs `python -m pyhv.cli` in a subprocess."""
    def run(*args: str, timeout: float = 60, input: bytes | None = None, env: dict | None = None) -> PyhvResult:
        proc = subprocess.run([sys.executable, "-m", "pyhv.cli", *args], capture_output=True, timeout=timeout,
                              input=input if input is not None else b"", cwd=ROOT,
                              env={**os.environ, **(env or {})})
        return PyhvResult(proc.returncode, proc.stdout.decode(errors="replace"),
                          proc.stderr.decode(errors="replace"))
    return run


def _build_linux_guest(request, flavour: str):
    """Builds (or finds in $PYHV_CACHE / ~/.cache/pyhv) a Linux guest, with its progress shown on the terminal."""
    from pyhv.assets import build_guest
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return build_guest(flavour)


@pytest.fixture(scope="session")
def linux_guest(request):
    """pyhv's small kernel + busybox initramfs (pyhv.assets.GuestAssets: bzimage, vmlinux, initramfs, kernel_release),
    built once per run; a cold build takes minutes (see README, "Guest assets"). Console protocol:
    pyhv.assets.protocol."""
    return _build_linux_guest(request, "mini")


@pytest.fixture(scope="session")
def stock_guest(request):
    """Debian's stock kernel + busybox initramfs with the virtio and e1000 modules (pyhv.assets.GuestAssets)."""
    return _build_linux_guest(request, "stock")


@dataclass
class DomainFile:
    path: Path
    libvirt_xml: str          # the domain as libvirt's own parser reads it back (virsh dumpxml)


@pytest.fixture
def domain_file(tmp_path):
    """domain_file(xml_text, name="vm.xml") writes a domain XML file and checks that it is libvirt's XML:
    `virt-xml-validate FILE domain` (the RNG schema) and `virsh -c test:///default define` + `dumpxml` (libvirt's
    real parser, no daemon). Every domain XML the tests feed pyhv goes through here."""
    import xml.etree.ElementTree as ET

    missing = [tool for tool in ("virt-xml-validate", "virsh") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (Debian's libvirt-clients; scripts/install-deps installs it)"
        if os.environ.get("PYHV_REQUIRE_KVM") == "1":      # CI: everything must run
            pytest.fail(reason)
        pytest.skip(reason)

    def write(text: str, name: str = "vm.xml") -> DomainFile:
        path = tmp_path / name
        path.write_text(text)
        check = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
        assert check.returncode == 0, f"virt-xml-validate rejects {name}: {check.stdout}{check.stderr}"
        dom_name = ET.fromstring(text).findtext("name")
        dump = subprocess.run(["virsh", "-q", "-c", "test:///default", f"define {path}; dumpxml {dom_name}"],
                              capture_output=True, text=True)
        assert dump.returncode == 0, f"libvirt rejects {name}: {dump.stderr}"
        libvirt_xml = dump.stdout[dump.stdout.index("<domain"):]
        return DomainFile(path, libvirt_xml)
    return write


@pytest.fixture
def netns():
    """A network namespace of this test's own (removed afterwards), for taps and servers the guest talks to."""
    name = f"pyhv-t{os.getpid()}-{random.randrange(1 << 30)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)
