"""Network interface controllers emulated as PCI functions (virtio-net lives in `pyhv/virtio/`)."""
