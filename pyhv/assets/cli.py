"""`pyhv guest build` and `pyhv guest path`: the command-line side of guest assets."""
from __future__ import annotations

import argparse
import json

from pyhv.assets.guest import FLAVOURS, build_guest, default_flavour, load_manifest
from pyhv.assets.progress import Progress

EPILOG = """\
examples:
  pyhv guest build                      # default kernel: mini on PVM hosts, stock elsewhere
  pyhv guest build --kernel stock --add ./tool:/bin/tool
  pyhv guest path --kernel mini         # JSON: bzimage, vmlinux, initramfs, kernel_release
  pyhv run --kernel "$(pyhv guest path --field vmlinux)" --initrd "$(pyhv guest path --field initramfs)" \\
           --append 'console=ttyS0 pyhv.cmd="uname -r"'

cache: $PYHV_CACHE or ~/.cache/pyhv. The guest's console protocol (PYHV-INIT marker, pyhv.cmd, agent mode) is
described in pyhv/assets/protocol.py.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `guest` with its `build` and `path` subcommands."""
    guest = subparsers.add_parser("guest", help="build the Linux test guests (kernel + busybox initramfs)",
                                  description="Build and locate pyhv's Linux guest kernels and initramfs images.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = guest.add_subparsers(dest="guest_command", metavar="SUBCOMMAND", required=True,
                               parser_class=type(guest))
    build = sub.add_parser("build", help="download, unpack and build a kernel and initramfs into the cache")
    build.add_argument("--kernel", choices=FLAVOURS, help="stock: Debian's kernel with virtio modules; mini: a small "
                       "kernel built from linux-source-6.1 (default: mini on PVM hosts, stock elsewhere)")
    build.add_argument("--add", action="append", default=[], metavar="HOST:GUEST",
                       help="put a host file or directory at GUEST (absolute path) in the initramfs; repeatable")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    build.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    path = sub.add_parser("path", help="print the artifacts of the last build (without --add) as JSON")
    path.add_argument("--kernel", choices=FLAVOURS, help="which build (default as for build)")
    path.add_argument("--field", choices=("bzimage", "vmlinux", "initramfs", "initramfs_uncompressed",
                                          "kernel_release", "manifest"),
                      help="print only this value")
    guest.set_defaults(handler=cmd_guest)
    return guest


def _print(data: dict, field: str | None) -> None:
    print(data[field] if field else json.dumps(data, indent=1))


def cmd_guest(args: argparse.Namespace) -> int:
    if args.guest_command == "build":
        assets = build_guest(args.kernel, args.add, args.force, Progress(quiet=args.quiet))
        _print(assets.as_dict(), None)
        return 0
    _print(load_manifest(args.kernel or default_flavour()).as_dict(), args.field)
    return 0
