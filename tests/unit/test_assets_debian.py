"""Debian package resolution: control-file parsing, dependency picking, and reuse of apt's answers while the
package lists stay the same."""
from __future__ import annotations

import pytest

from pyhv.assets import debian
from pyhv.assets.errors import GuestAssetError

SHOW = """Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
Size: 1480
SHA256: 45457bcf
Description: Linux for 64-bit PCs (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on PCs.

Package: linux-image-amd64
Version: 6.1.176-1
"""


def test_parse_control_reads_the_first_stanza():
    fields = debian.parse_control(SHOW)
    assert fields["Version"] == "6.1.192-2"
    assert fields["Description"].endswith("use on PCs.")
    pkg = debian.DebPackage("linux-image-amd64", "1:6.1.192-2", "amd64", 1480, "", fields["Depends"])
    assert debian.first_dependency(pkg, "linux-image-") == "linux-image-6.1.0-56-amd64"
    assert pkg.key == "linux-image-amd64_1_6.1.192-2"
    with pytest.raises(GuestAssetError):
        debian.first_dependency(pkg, "linux-headers-")


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """apt-cache replaced by a counter over SHOW; the apt state is one file we can touch."""
    state = tmp_path / "lists"
    state.mkdir()
    (state / "Packages").write_text("one")
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(debian, "APT_STATE_DIRS", (str(state),))
    calls = []

    def show(name):
        calls.append(name)
        return debian.parse_control(SHOW) if name == "linux-image-amd64" else {}
    monkeypatch.setattr(debian, "_apt_cache_show", show)
    monkeypatch.setattr(debian, "refresh_package_lists", lambda progress: False)
    return state, calls


def test_resolutions_are_reused_until_the_package_lists_change(fake_apt):
    state, calls = fake_apt
    first = debian.resolve("linux-image-amd64")
    assert (first.version, first.size, first.sha256) == ("6.1.192-2", 1480, "45457bcf")
    assert debian.resolve("linux-image-amd64") == first
    assert calls == ["linux-image-amd64"]
    (state / "Packages").write_text("two, after apt-get update")
    assert debian.resolve("linux-image-amd64") == first
    assert calls == ["linux-image-amd64"] * 2


def test_unknown_package(fake_apt):
    with pytest.raises(GuestAssetError, match="not known to apt"):
        debian.resolve("no-such-package")
