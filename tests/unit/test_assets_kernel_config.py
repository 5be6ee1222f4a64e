"""The mini kernel's config fragment and the check that Kconfig kept it."""
from __future__ import annotations

from pyhv.assets.kernel import MINI_CONFIG, config_mismatches, parse_config


def test_parse_config():
    values = parse_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="text"\n# a comment\nCONFIG_D=64\n')
    assert values == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"text"', "CONFIG_D": "64"}


def test_mismatches_name_what_kconfig_dropped():
    fragment = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y"}
    final = {"CONFIG_A": "y", "CONFIG_B": "y"}
    assert config_mismatches(fragment, final) == ["CONFIG_B: asked n, got y", "CONFIG_C: asked y, got n"]
    assert config_mismatches({"CONFIG_X": "n"}, {}) == []


def test_fragment_keeps_what_pvm_and_the_tests_need():
    values = parse_config(MINI_CONFIG.read_text())
    required = {
        "CONFIG_PVH": "y",                       # vmlinux carries the PVH entry note (direct boot)
        "CONFIG_DEVPORT": "y",                   # /dev/port: pyhv-exit writes the debug-exit port
        "CONFIG_BLK_DEV_INITRD": "y", "CONFIG_RD_GZIP": "y",
        "CONFIG_BINFMT_SCRIPT": "y",             # /init is a shell script
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y", "CONFIG_VIRTIO_PCI": "y", "CONFIG_VIRTIO_BLK": "y",
        "CONFIG_VIRTIO_NET": "y", "CONFIG_HW_RANDOM_VIRTIO": "y", "CONFIG_EXT4_USE_FOR_EXT2": "y",
        # a hypercall from a non-PVM guest kernel never completes on PVM
        "CONFIG_PARAVIRT": "n", "CONFIG_KVM_GUEST": "n", "CONFIG_PTP_1588_CLOCK_KVM": "n",
        "CONFIG_MODULES": "n",                   # everything built in: the initramfs carries no modules
    }
    assert {k: values.get(k) for k in required} == required
