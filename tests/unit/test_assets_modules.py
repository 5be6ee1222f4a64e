"""The stock kernel's module load order, computed on the host from `depends=`."""
from __future__ import annotations

import pytest

from pyhv.assets.errors import GuestAssetError
from pyhv.assets.modules import load_order

# The shape of Debian 6.1's virtio modules.
DEPENDS = {
    "virtio": [], "virtio_ring": [], "virtio_pci_modern_dev": [], "virtio_pci_legacy_dev": [],
    "virtio_pci": ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev"],
    "virtio_blk": ["virtio", "virtio_ring"], "failover": [], "net_failover": ["failover"],
    "virtio_net": ["net_failover", "virtio_ring", "virtio"], "virtio_mmio": ["virtio", "virtio_ring"],
}


def order(wanted, depends=DEPENDS):
    return load_order(wanted, lambda name: depends[name], set(depends))


def test_dependencies_load_first_and_once():
    result = order(["virtio_net", "virtio_blk", "virtio_pci", "virtio_mmio"])
    assert sorted(result) == sorted(set(result))
    for name in result:
        for dep in DEPENDS[name]:
            assert result.index(dep) < result.index(name), f"{dep} must load before {name}"
    assert set(result) == set(DEPENDS)


def test_order_is_stable_and_follows_the_request():
    assert order(["virtio_blk"]) == ["virtio", "virtio_ring", "virtio_blk"]
    assert order(["virtio_blk", "virtio_net"]) == ["virtio", "virtio_ring", "virtio_blk", "failover",
                                                   "net_failover", "virtio_net"]
    assert order(["virtio-blk"]) == order(["virtio_blk"])


def test_missing_module_names_who_needs_it():
    without_ring = {name: deps for name, deps in DEPENDS.items() if name != "virtio_ring"}
    with pytest.raises(GuestAssetError, match="virtio_ring .*needed by virtio_blk"):
        order(["virtio_blk"], without_ring)


def test_cycle_is_reported():
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        order(["a"], {"a": ["b"], "b": ["a"]})
