"""Guest assets: the Linux guests pyhv's tests and users boot.

`build_guest(flavour)` returns a `GuestAssets` (bzImage, vmlinux, gzip initramfs, manifest) for the stock Debian
kernel or pyhv's small kernel, built into the cache from Debian packages fetched with `apt-get download`. The
guest's console protocol is in `pyhv.assets.protocol`.
"""
from pyhv.assets.errors import GuestAssetError
from pyhv.assets.guest import FLAVOURS, GuestAssets, build_guest, default_flavour, load_manifest

__all__ = ["FLAVOURS", "GuestAssetError", "GuestAssets", "build_guest", "default_flavour", "load_manifest"]
