"""The initramfs contents (with a stand-in busybox), --add parsing, and what names a rebuild."""
from __future__ import annotations

import gzip
import stat

import pytest

from pyhv.assets.errors import GuestAssetError
from pyhv.assets.initramfs import AddedFile, InitramfsSpec, compress

from test_assets_cpio import parse_newc


@pytest.fixture
def fake_busybox(tmp_path):
    """An executable that answers --list-full like busybox."""
    path = tmp_path / "busybox"
    path.write_text("#!/bin/sh\nprintf 'bin/busybox\\nbin/sh\\nsbin/insmod\\nusr/bin/sha256sum\\n'\n")
    path.chmod(0o755)
    return path


def members(spec: InitramfsSpec) -> dict[str, dict]:
    return {"/" + m["name"]: m for m in parse_newc(spec.build_uncompressed())}


def test_layout(fake_busybox, tmp_path):
    module = tmp_path / "virtio.ko"
    module.write_bytes(b"\x7fELF module")
    files = members(InitramfsSpec(fake_busybox, modules=[("virtio", module)]))
    assert files["/init"]["mode"] == stat.S_IFREG | 0o755 and files["/init"]["data"].startswith(b"#!/bin/sh\n")
    assert b"for m in virtio; do" in files["/init"]["data"]
    assert files["/bin/busybox"]["data"] == fake_busybox.read_bytes()
    assert files["/bin/sh"]["mode"] == stat.S_IFLNK | 0o777 and files["/bin/sh"]["data"] == b"/bin/busybox"
    assert files["/sbin/insmod"]["data"] == b"/bin/busybox"
    assert "/usr/bin/sha256sum" not in files          # busybox's shell runs it by name; no link needed
    assert stat.S_ISCHR(files["/dev/console"]["mode"])
    assert (files["/dev/console"]["rdevmajor"], files["/dev/console"]["rdevminor"]) == (5, 1)
    assert files["/bin/pyhv-exit"]["mode"] == stat.S_IFREG | 0o755
    assert files["/sbin/mkfs.ext2"]["data"].endswith(b'exec mke2fs "$@"\n')
    assert files["/lib/modules/virtio.ko"]["data"] == b"\x7fELF module"
    for path in ("/proc", "/sys", "/dev", "/tmp", "/root"):
        assert stat.S_ISDIR(files[path]["mode"])


def test_added_files_and_directories(fake_busybox, tmp_path):
    tool = tmp_path / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o750)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (tree / "link").symlink_to("sub/data.bin")
    added = [AddedFile.parse(f"{tool}:/usr/local/bin/tool"), AddedFile.parse(f"{tree}:/opt/tree/")]
    files = members(InitramfsSpec(fake_busybox, added=added))
    assert files["/usr/local/bin/tool"]["mode"] == stat.S_IFREG | 0o750
    assert files["/opt/tree/sub/data.bin"]["data"] == b"\x00\x01"
    assert files["/opt/tree/link"]["mode"] == stat.S_IFLNK | 0o777 and files["/opt/tree/link"]["data"] == b"sub/data.bin"


@pytest.mark.parametrize("spec", ["nocolon", "/etc/passwd:relative", ":/x", "/does/not/exist:/x", "/etc/passwd:/"])
def test_bad_add_specs(spec):
    with pytest.raises(GuestAssetError):
        AddedFile.parse(spec)


def test_fingerprint_follows_content_and_mode(tmp_path):
    f = tmp_path / "f"
    f.write_text("one")
    added = AddedFile.parse(f"{f}:/f")
    first = added.fingerprint()
    assert added.fingerprint() == first
    f.write_text("two")
    second = added.fingerprint()
    assert second != first
    f.chmod(0o700)
    assert added.fingerprint() != second


def test_images_are_reproducible(fake_busybox):
    image = InitramfsSpec(fake_busybox).build_uncompressed()
    assert image == InitramfsSpec(fake_busybox).build_uncompressed()
    assert compress(image) == compress(image) and gzip.decompress(compress(image)) == image
