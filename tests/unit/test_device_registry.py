"""The device registry: names as users write them (NAME, NAME-pci, NAME-device), options, help, and errors."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pyhv import registry
from pyhv.config import VmConfig
from pyhv.devices.device_type import PCI, PLATFORM, DeviceType
from pyhv.errors import ConfigError


def test_virtio_names_pick_the_transport():
    dtype, transport = registry.lookup("virtio-rng-pci", "pc")
    assert dtype.name == "virtio-rng" and transport == PCI
    assert registry.lookup("virtio-rng", "pc") == (dtype, PCI)
    assert registry.lookup("testdev", "microvm")[1] == PLATFORM


@pytest.mark.parametrize("text,machine,message", [
    ("gpu", "pc", "unknown device 'gpu'"),
    ("virtio-rng-pci", "microvm", "needs --machine pc"),
    ("virtio-rng,foo=1", "pc", "takes no options"),
    ("testdev-pci", "pc", "unknown device"),
    ("vhost-user-blk-pci", "pc", "no socket"),
])
def test_bad_devices_are_one_clear_error(text, machine, message):
    with pytest.raises(ConfigError, match=message):
        registry.parse_device(text, machine)


@dataclass
class ScratchOptions:
    port: int = 0x510
    wide: bool = False
    label: str = "x"


def test_a_device_defined_outside_pyhv_is_one_registration(tmp_path):
    dtype = registry.register(DeviceType("scratch-test", "a test's own device", lambda ctx, opts: None,
                                         options=ScratchOptions))
    try:
        spec = registry.parse_device("scratch-test,port=0x700,wide=on,label=hello", "microvm")
        assert spec.type is dtype and spec.transport == PLATFORM
        assert spec.options == ScratchOptions(0x700, True, "hello")
        assert "scratch-test" in registry.help_text()
        with pytest.raises(ConfigError, match="unknown option 'colour=red'"):
            registry.parse_device("scratch-test,colour=red", "pc")
        with pytest.raises(ConfigError, match="port=zz is not a number"):
            registry.parse_device("scratch-test,port=zz", "pc")
        kernel = tmp_path / "k"
        kernel.write_bytes(b"x")
        assert [s.type.name for s in VmConfig(kernel=str(kernel), devices=["scratch-test"]).validate()
                .device_specs()] == ["scratch-test"]
        with pytest.raises(ValueError, match="already registered"):
            registry.register(dtype)
    finally:
        registry.unregister("scratch-test")


def test_drives_and_nics_are_registry_devices(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4096))
    config = VmConfig(machine="pc", kernel=str(disk), devices=[f"virtio-blk-pci,file={disk},bootindex=3"])
    config.drives = [registry.DriveConfig.parse(str(disk))]
    specs = config.validate().device_specs()
    assert [(s.type.name, s.boot_index(0)) for s in specs] == [("virtio-blk", 1000), ("virtio-blk", 3)]
    microvm = VmConfig(kernel=str(disk), drives=[registry.DriveConfig.parse(str(disk))]).validate()
    assert [(s.type.name, s.transport) for s in microvm.device_specs()] == [("virtio-blk", "mmio")]
    with pytest.raises(ConfigError, match="needs --machine pc"):
        VmConfig(kernel=str(disk), devices=[f"vhost-user-blk,socket={disk}"]).validate()
