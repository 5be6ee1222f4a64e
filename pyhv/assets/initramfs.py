"""The guest initramfs: Debian's busybox-static, pyhv's /init, kernel modules and files added with --add,
written by pyhv's own newc writer, kept both gzip-compressed and uncompressed.

The uncompressed image is for PVM hosts: there the kernel's gzip inflate runs in emulated kernel mode, and in a
QEMU instruction count (-icount) of the mini kernel's boot to /init it doubled the kernel's instructions (~86 M
with the .cpio.gz, ~43 M with the .cpio).

    /bin/busybox + symlinks for LINKED_APPLETS, /sbin/mkfs.ext2 (a mke2fs wrapper),
    /etc/udhcpc/default.script      so `udhcpc -i eth0` configures the interface
    /init, /bin/pyhv-exit                 see pyhv.assets.init_script and pyhv.assets.protocol
    /lib/modules/NAME.ko                  stock kernel only, decompressed, loaded by /init in dependency order
    /dev/console (c 5 1)                  the kernel opens it for /init's stdin/stdout before devtmpfs exists
    /etc/passwd, /etc/group, /etc/fstab, /proc, /sys, /dev, /tmp, /root, /mnt, /run, /var
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.assets.cpio import Archive, CpioEntry
from pyhv.assets.errors import GuestAssetError
from pyhv.assets.init_script import MODULE_DIR, PYHV_EXIT, render_init
from pyhv.assets.modules import read_module

EMPTY_DIRS = ("/proc", "/sys", "/dev", "/tmp", "/root", "/mnt", "/run", "/var", "/etc", MODULE_DIR)
ETC_FILES = {
    "/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "/etc/group": b"root:x:0:\n",
    # /init mounts these with one `mount -a`: on PVM hosts every fork+exec costs the guest about a second
    "/etc/fstab": (b"proc /proc proc defaults 0 0\nsysfs /sys sysfs defaults 0 0\n"
                   b"devtmpfs /dev devtmpfs defaults 0 0\ntmpfs /tmp tmpfs defaults 0 0\n"),
}
MKFS_EXT2 = b'#!/bin/sh\n# busybox-static has mke2fs (which makes ext2) but no mkfs.ext2 name\nexec mke2fs "$@"\n'
# busybox udhcpc runs this with the lease in its environment (interface, ip, mask, router, dns).
UDHCPC_SCRIPT = b"""#!/bin/sh
# udhcpc's hook: configure the interface from the lease ($interface, $ip, $mask, $router, $dns)
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
esac
exit 0
"""
GZIP_LEVEL = 6


@dataclass(frozen=True)
class AddedFile:
    """`--add HOST:GUEST`: a host file or directory (copied recursively) at an absolute guest path."""
    host: Path
    guest: str

    @classmethod
    def parse(cls, spec: str) -> "AddedFile":
        host, sep, guest = spec.rpartition(":")
        if not sep or not host or not guest.startswith("/") or guest.rstrip("/") == "":
            raise GuestAssetError(f"--add {spec!r}: expected HOST:GUEST with an absolute GUEST path",
                                  "e.g. --add ./tool:/bin/tool")
        path = Path(host).expanduser()
        if not path.exists():
            raise GuestAssetError(f"--add {spec!r}: {host} does not exist")
        return cls(path.resolve(), "/" + guest.strip("/"))

    def walk(self) -> list[tuple[Path, str]]:
        """(host path, guest path) for it and everything below it, parents first."""
        if not self.host.is_dir():
            return [(self.host, self.guest)]
        items = [(self.host, self.guest)]
        for root, dirs, files in os.walk(self.host):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                host = Path(root) / name
                items.append((host, self.guest + "/" + host.relative_to(self.host).as_posix()))
        return items

    def fingerprint(self) -> list:
        """What names the file's contribution to the image: guest paths, modes, contents' hashes."""
        out = []
        for host, guest in self.walk():
            st = host.lstat()
            if stat.S_ISREG(st.st_mode):
                out.append([guest, st.st_mode, hashlib.sha256(host.read_bytes()).hexdigest()])
            elif stat.S_ISLNK(st.st_mode):
                out.append([guest, st.st_mode, os.readlink(host)])
            else:
                out.append([guest, st.st_mode])
        return out


# Which applets get a symlink. Debian's busybox-static runs every applet by name from its shell and from its own
# exec (FEATURE_SH_STANDALONE, FEATURE_PREFER_APPLETS; through /proc/self/exe once /proc is mounted), so links are
# only needed for what runs before /proc exists or is exec'd by path from outside busybox. Each link costs the
# guest's boot: on PVM hosts the kernel's unpacking of 268 links took ~5 s of emulated kernel time.
# `busybox --install -s` in the guest makes the rest.
LINKED_APPLETS = ("bin/sh", "bin/mount", "bin/umount", "bin/ls", "bin/cat", "bin/echo", "bin/sync", "sbin/reboot",
                  "sbin/poweroff", "sbin/insmod")


def busybox_applets(busybox: Path) -> list[str]:
    """Paths (relative to /) of the applets the binary offers, from `busybox --list-full`."""
    try:
        proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestAssetError(f"cannot list the applets of {busybox}: {e}") from e
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


@dataclass
class InitramfsSpec:
    busybox: Path
    modules: list[tuple[str, Path]] = field(default_factory=list)     # (name, file), in load order
    added: list[AddedFile] = field(default_factory=list)

    def init_script(self) -> str:
        return render_init([name for name, _ in self.modules])

    def archive(self) -> Archive:
        archive = Archive()
        for path in EMPTY_DIRS:
            archive.add(CpioEntry.directory(path, 0o1777 if path == "/tmp" else 0o755))
        archive.add(CpioEntry.char_device("/dev/console", 5, 1))
        archive.add(CpioEntry.file("/bin/busybox", self.busybox.read_bytes(), 0o755))
        offered = set(busybox_applets(self.busybox))
        for applet in LINKED_APPLETS:
            if applet in offered:
                archive.add(CpioEntry.symlink("/" + applet, "/bin/busybox"))
        archive.add(CpioEntry.file("/sbin/mkfs.ext2", MKFS_EXT2, 0o755))
        archive.add(CpioEntry.file("/etc/udhcpc/default.script", UDHCPC_SCRIPT, 0o755))
        for name, data in ETC_FILES.items():
            archive.add(CpioEntry.file(name, data))
        archive.add(CpioEntry.file("/init", self.init_script().encode(), 0o755))
        archive.add(CpioEntry.file("/bin/pyhv-exit", PYHV_EXIT.encode(), 0o755))
        for name, path in self.modules:
            archive.add(CpioEntry.file(f"{MODULE_DIR}/{name}.ko", read_module(path)))
        for added in self.added:
            for host, guest in added.walk():
                st = host.lstat()
                perm = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    archive.add(CpioEntry.symlink(guest, os.readlink(host)))
                elif stat.S_ISDIR(st.st_mode):
                    archive.add(CpioEntry.directory(guest, perm))
                elif stat.S_ISREG(st.st_mode):
                    archive.add(CpioEntry.file(guest, host.read_bytes(), perm))
                else:
                    raise GuestAssetError(f"--add {host}: only files, directories and symlinks can be added")
        return archive

    def build_uncompressed(self) -> bytes:
        """The newc image (reproducible: fixed inode numbers and mtimes)."""
        raw = io.BytesIO()
        self.archive().write(raw)
        return raw.getvalue()


def compress(image: bytes) -> bytes:
    """gzip with a fixed header mtime, so equal images compress to equal files."""
    return gzip.compress(image, compresslevel=GZIP_LEVEL, mtime=0)
