"""virtio-console (virtio 1.2 §5.3), one port: receiveq 0 (host -> guest) and transmitq 1 (guest -> host), on a
character back end (`pyhv.runtime.chardev.Chardev`, the same host ends the UART uses: stdio, file, socket, pty, none).

Features: VIRTIO_CONSOLE_F_SIZE (the console's columns and rows in the configuration space; `resize` changes
them and signals a configuration change) and VIRTIO_CONSOLE_F_EMERG_WRITE (a 4-byte write of `emerg_wr` at
configuration offset 8 outputs its low byte, usable before the queues are set up). No MULTIPORT: `max_nr_ports`
reads 0 and there is no control queue.

Output: every device-readable byte of a transmitq chain goes to the chardev's `write`, in order. Input: bytes the
chardev delivers (on the I/O thread) fill posted receiveq buffers; while the driver has posted none (or the
device is not running yet) they wait in a bounded buffer (`rx_limit`, 64 KiB by default) and are delivered when
buffers arrive. Input beyond the bound is dropped, counted in `state.rx_dropped` and logged (once).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyhv.virtio.device import COMMON_FEATURES, VIRTIO_ID_CONSOLE, VirtioDevice, bits
from pyhv.virtio.queue import DescriptorChain, VirtQueueError, scatter

if TYPE_CHECKING:
    from pyhv.runtime.chardev import Chardev
    from pyhv.runtime.iothread import IoThread

log = logging.getLogger(__name__)

# §5.3.3 feature bits
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RX_QUEUE = 0          # receiveq(port0)
TX_QUEUE = 1          # transmitq(port0)
QUEUE_SIZE = 256

# §5.3.4 struct virtio_console_config
CONFIG_COLS = 0
CONFIG_ROWS = 2
CONFIG_MAX_NR_PORTS = 4
CONFIG_EMERG_WR = 8
CONFIG_SIZE = 12

RX_LIMIT = 64 * 1024

OFFERED = COMMON_FEATURES | bits(VIRTIO_CONSOLE_F_SIZE, VIRTIO_CONSOLE_F_EMERG_WRITE)


@dataclass
class VirtioConsoleState:
    cols: int = 80
    rows: int = 25
    rx_pending: bytearray = field(default_factory=bytearray)   # host input waiting for receive buffers
    rx_bytes: int = 0          # delivered into receive buffers
    rx_dropped: int = 0        # input dropped because rx_pending was full
    tx_bytes: int = 0          # written to the chardev from the transmitq
    emerg_bytes: int = 0       # written to the chardev through emerg_wr


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-console"

    @classmethod
    def create(cls, context, options) -> "VirtioConsole":
        from pyhv.runtime.chardev import ChardevSpec
        chardev = context.machine.open_chardev(ChardevSpec.parse(options.chardev, "virtio-console chardev="))
        return cls(chardev, context.machine.iothread, name=context.name)

    def __init__(self, chardev: "Chardev | None" = None, iothread: "IoThread | None" = None,
                 name: str | None = None, cols: int = 80, rows: int = 25, rx_limit: int = RX_LIMIT) -> None:
        """`chardev`: the host end (None: output discarded, no input); with `iothread` its input is attached
        here (`chardev.attach(self.receive, iothread)`); without, the caller feeds `receive` itself."""
        super().__init__(name)
        if chardev is None:
            from pyhv.runtime.chardev import NullChardev
            chardev = NullChardev()
        self.chardev = chardev
        self.rx_limit = rx_limit
        self.state = VirtioConsoleState(cols=cols & 0xFFFF, rows=rows & 0xFFFF)
        if iothread is not None:
            chardev.attach(self.receive, iothread)

    # --- identity and configuration ----------------------------------------------------------------------
    def device_features(self) -> int:
        return OFFERED

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", self.state.cols, self.state.rows, 0, 0)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset == CONFIG_EMERG_WR and size == 4:
            self.state.emerg_bytes += 1
            self._output(bytes([value & 0xFF]))
            return
        super().config_write(offset, size, value)

    def resize(self, cols: int, rows: int) -> None:
        """The host's terminal changed size: new cols/rows in the configuration, and a configuration change
        for a running driver (which reads them with VIRTIO_CONSOLE_F_SIZE)."""
        with self.lock:
            cols, rows = cols & 0xFFFF, rows & 0xFFFF
            if (cols, rows) == (self.state.cols, self.state.rows):
                return
            self.state.cols, self.state.rows = cols, rows
            notify = self.active
        if notify:
            self.on_config_change()

    # --- host side -----------------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Input from the chardev (I/O thread): into receive buffers, or held (bounded) until there are some."""
        if not data:
            return
        with self.lock:
            st = self.state
            room = self.rx_limit - len(st.rx_pending)
            if len(data) > room:
                st.rx_dropped += len(data) - max(room, 0)
                self.warn_once("rx-full", "%d bytes of input wait for the driver's receive buffers: further input "
                               "is dropped (%d bytes now; state.rx_dropped counts)", len(st.rx_pending),
                               len(data) - max(room, 0))
                data = data[:max(room, 0)]
            st.rx_pending += data
            if self.active and not self.broken:
                try:
                    self._deliver()
                except VirtQueueError as e:
                    self.needs_reset(str(e))

    def _output(self, data: bytes) -> None:
        try:
            self.chardev.write(data)
        except OSError as e:
            self.warn_once("output", "console output failed: %s", e)

    # --- queues --------------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        if queue_index == TX_QUEUE:
            self.serve(self.queues[TX_QUEUE], self._transmit)
        elif queue_index == RX_QUEUE:
            self._deliver()

    def _transmit(self, chain: DescriptorChain) -> int:
        if chain.writable_len:
            self.warn_once("tx-writable", "transmit chain with %d device-writable bytes (ignored)",
                           chain.writable_len)
        if chain.readable_len:
            self.state.tx_bytes += chain.readable_len
            self._output(chain.read_all())
        return 0

    def _deliver(self) -> None:
        """Fill receive buffers with pending input (under the lock)."""
        q = self.queues[RX_QUEUE] if len(self.queues) > RX_QUEUE else None
        st = self.state
        if q is None or not st.rx_pending:
            return
        delivered = False
        while st.rx_pending:
            chain = q.pop()
            if chain is None:
                # out of buffers: ask for a kick when the driver posts more (then `process` comes here again)
                if q.enable_notification():
                    continue
                break
            if chain.readable_len:
                self.warn_once("rx-readable", "receive chain with %d device-readable bytes (ignored)",
                               chain.readable_len)
            n = scatter(chain.writable, bytes(st.rx_pending[:chain.writable_len]))
            del st.rx_pending[:n]
            st.rx_bytes += n
            q.push(chain, n)
            delivered = True
        if delivered:
            self.signal_used(q)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.state.rx_pending.clear()        # input for the old driver instance goes with it
