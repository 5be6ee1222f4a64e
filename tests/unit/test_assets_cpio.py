"""pyhv's newc cpio writer: headers, alignment, member types, parents before children; read back by our own
parser and by GNU cpio."""
from __future__ import annotations

import io
import shutil
import stat
import subprocess

import pytest

from pyhv.assets.cpio import NEWC_HEADER_SIZE, Archive, CpioEntry, write_newc

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor", "rdevmajor",
          "rdevminor", "namesize", "check")


def parse_newc(data: bytes) -> list[dict]:
    """A reader written from the format description, independent of the writer's code."""
    members, pos = [], 0
    while True:
        assert pos % 4 == 0, f"header at unaligned offset {pos}"
        header = data[pos:pos + NEWC_HEADER_SIZE]
        assert header[:6] == b"070701"
        member = {name: int(header[6 + 8 * i:14 + 8 * i], 16) for i, name in enumerate(FIELDS)}
        name_start = pos + NEWC_HEADER_SIZE
        raw_name = data[name_start:name_start + member["namesize"]]
        assert raw_name.endswith(b"\0")
        member["name"] = raw_name[:-1].decode()
        data_start = (name_start + member["namesize"] + 3) & ~3
        member["data"] = data[data_start:data_start + member["filesize"]]
        assert all(b == 0 for b in data[name_start + member["namesize"]:data_start]), "name padding not zero"
        pos = (data_start + member["filesize"] + 3) & ~3
        if member["name"] == "TRAILER!!!":
            assert pos == len(data)
            return members
        members.append(member)


def sample() -> Archive:
    archive = Archive()
    archive.add(CpioEntry.file("/bin/tool", b"#!/bin/sh\necho hi\n", 0o755))
    archive.add(CpioEntry.symlink("/bin/sh", "/bin/busybox"))
    archive.add(CpioEntry.char_device("/dev/console", 5, 1))
    archive.add(CpioEntry.file("/etc/odd", b"x" * 5, 0o600))     # sizes that need padding
    archive.add(CpioEntry.directory("/tmp", 0o1777))
    return archive


def written(archive: Archive) -> bytes:
    out = io.BytesIO()
    size = archive.write(out)
    assert size == len(out.getvalue())
    return out.getvalue()


def test_members_round_trip_with_types_and_modes():
    members = {m["name"]: m for m in parse_newc(written(sample()))}
    assert set(members) == {"bin", "bin/tool", "bin/sh", "dev", "dev/console", "etc", "etc/odd", "tmp"}
    assert members["bin/tool"]["mode"] == stat.S_IFREG | 0o755
    assert members["bin/tool"]["data"] == b"#!/bin/sh\necho hi\n"
    assert members["bin/sh"]["mode"] == stat.S_IFLNK | 0o777 and members["bin/sh"]["data"] == b"/bin/busybox"
    console = members["dev/console"]
    assert stat.S_ISCHR(console["mode"]) and (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert members["tmp"]["mode"] == stat.S_IFDIR | 0o1777 and members["tmp"]["nlink"] == 2
    assert members["etc/odd"]["data"] == b"xxxxx"
    assert len({m["ino"] for m in members.values()}) == len(members)
    assert all(m["uid"] == 0 and m["gid"] == 0 and m["mtime"] == 0 for m in members.values())


def test_directories_come_before_their_contents():
    names = [m["name"] for m in parse_newc(written(sample()))]
    for i, name in enumerate(names):
        parent = name.rpartition("/")[0]
        if parent:
            assert parent in names[:i], f"{name} before its directory {parent}"


def test_output_is_reproducible():
    assert written(sample()) == written(sample())


def test_add_replaces_a_file_but_not_a_directory():
    archive = sample()
    archive.add(CpioEntry.file("/bin/tool", b"new", 0o700))
    assert archive.entries["/bin/tool"].data == b"new"
    with pytest.raises(ValueError):
        archive.add(CpioEntry.file("/bin", b"x"))


def test_rejects_values_that_do_not_fit_a_header_field():
    with pytest.raises(ValueError):
        write_newc([CpioEntry("big", stat.S_IFREG | 0o644, uid=1 << 32)], io.BytesIO())


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed (scripts/install-deps)")
def test_gnu_cpio_reads_the_archive(tmp_path):
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=written(sample()), capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in lines}
    assert by_name["bin/tool"].startswith("-rwxr-xr-x")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("-> /bin/busybox")
    assert by_name["dev/console"].startswith("crw-------") and "5,   1" in by_name["dev/console"]
    assert by_name["tmp"].startswith("drwxrwxrwt")
    archive = Archive()
    archive.add(CpioEntry.file("/a/b/c.txt", b"content\n", 0o640))
    subprocess.run(["cpio", "-idm", "--quiet"], input=written(archive), cwd=tmp_path, check=True)
    extracted = tmp_path / "a" / "b" / "c.txt"
    assert extracted.read_bytes() == b"content\n"
    assert stat.S_IMODE(extracted.stat().st_mode) == 0o640
