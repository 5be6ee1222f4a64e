"""`pyhv vhost-user-backend`: serve one of pyhv's virtio back ends on a vhost-user socket.

    pyhv vhost-user-backend --type blk --socket /run/disk.sock --image disk.raw [--read-only] [--cache none]
    pyhv vhost-user-backend --type rng --socket /run/rng.sock
    pyhv vhost-user-backend --type net --socket /run/net.sock --tap tap0

It runs until SIGTERM or SIGINT, serving one front end at a time and waiting for the next after a disconnect.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from pyhv.errors import ConfigError

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  pyhv vhost-user-backend --type blk --socket /tmp/blk.sock --image disk.raw
  qemu-system-x86_64 -M q35 -object memory-backend-memfd,id=m,size=256M,share=on -numa node,memdev=m \\
      -chardev socket,id=c,path=/tmp/blk.sock -device vhost-user-blk-pci,chardev=c ...
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("vhost-user-backend", help="serve a pyhv virtio back end (blk, net, rng) over vhost-user",
                       description="Serve one of pyhv's virtio device back ends to a vhost-user front end "
                                   "(QEMU or pyhv) on a Unix socket.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", required=True, choices=("blk", "net", "rng"), help="the virtio device")
    p.add_argument("--socket", "--socket-path", dest="socket", required=True, metavar="PATH",
                   help="Unix socket to listen on (a stale socket there is replaced)")
    blk = p.add_argument_group("blk")
    blk.add_argument("--image", "--blk-file", dest="image", metavar="FILE", help="raw disk image")
    blk.add_argument("--read-only", action="store_true", help="refuse writes; the image is opened read-only")
    blk.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                     help="none: O_DIRECT, bypassing the host page cache (default: writeback)")
    blk.add_argument("--serial", help="serial number the guest reads (up to 20 bytes)")
    blk.add_argument("--num-queues", type=int, default=1, metavar="N", help="request queues (default: 1)")
    blk.add_argument("--queue-size", type=int, default=1024, metavar="N",
                     help="largest queue size; seg_max is 2 less (default: 1024)")
    blk.add_argument("--no-locking", dest="locking", action="store_false",
                     help="do not lock the image as QEMU does (by default another writer, or a writer beside "
                          "readers, is refused)")
    net = p.add_argument_group("net")
    net.add_argument("--tap", metavar="NAME", help="tap interface to attach (created if missing)")
    net.add_argument("--mac", help="MAC address in the device's configuration space")
    return p


def make_device(args: argparse.Namespace, iothread):
    if args.type == "blk":
        from pyhv.virtio.blk import VirtioBlk
        if not args.image:
            raise ConfigError("--type blk needs --image FILE")
        if not 1 <= args.num_queues <= 64:
            raise ConfigError(f"--num-queues {args.num_queues}: must be between 1 and 64")
        if args.queue_size < 4 or args.queue_size > 32768 or args.queue_size & (args.queue_size - 1):
            raise ConfigError(f"--queue-size {args.queue_size}: must be a power of 2 from 4 to 32768")
        return VirtioBlk(args.image, readonly=args.read_only, cache=args.cache, serial=args.serial,
                         num_queues=args.num_queues, queue_size=args.queue_size, locking=args.locking)
    if args.type == "rng":
        from pyhv.virtio.rng import VirtioRng
        return VirtioRng()
    from pyhv.virtio.net import VirtioNet
    if not args.tap:
        raise ConfigError("--type net needs --tap NAME")
    return VirtioNet(args.tap, mac=args.mac, iothread=iothread)


def cmd_vhost_user_backend(args: argparse.Namespace) -> int:
    from pyhv.runtime.iothread import IoThread
    from pyhv.vhost.backend import VhostUserBackend

    iothread = IoThread("pyhv-vhost")
    device = make_device(args, iothread)
    backend = VhostUserBackend(device, args.socket, iothread)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backend.start()
    iothread.start()
    print(f"pyhv: vhost-user {args.type} back end listening on {args.socket}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        done = threading.Event()
        backend.close()
        iothread.call_soon(done.set)
        done.wait(10)
        iothread.stop()
    return 0
