"""--drive parsing and validation."""
from __future__ import annotations

import pytest

from pyhv.config import DriveConfig, VmConfig
from pyhv.errors import ConfigError


def test_full_spec(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    d = DriveConfig.parse(f"file={img},readonly=on,cache=none,serial=ABC,num-queues=4,bootindex=2")
    assert (d.file, d.readonly, d.cache, d.serial, d.num_queues, d.bootindex) == (str(img), True, "none", "ABC", 4, 2)
    d.validate()
    assert DriveConfig.parse(str(img)).file == str(img)                 # bare path
    assert DriveConfig.parse(f"{img},readonly=off").readonly is False


@pytest.mark.parametrize("spec, message", [
    ("file=x,readonly=maybe", "readonly=maybe"),
    ("file=x,num-queues=two", "num-queues=two is not a number"),
    ("file=x,colour=red", "unknown option 'colour'"),
    ("readonly=on", "no file"),
    ("file=x,oops", "'oops' is not KEY=VALUE"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        DriveConfig.parse(spec)


def test_validation(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match="cache=weird"):
        DriveConfig(str(img), cache="weird").validate()
    with pytest.raises(ConfigError, match="num-queues=0"):
        DriveConfig(str(img), num_queues=0).validate()
    with pytest.raises(ConfigError, match="no such file"):
        DriveConfig(str(tmp_path / "missing")).validate()
    assert [s.transport for s in VmConfig(drives=[DriveConfig(str(img))]).validate().device_specs()] == ["mmio"]
