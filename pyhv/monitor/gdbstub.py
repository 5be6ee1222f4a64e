"""A GDB remote stub (`pyhv run --gdb tcp::1234`, QEMU's `-s`): Debian's gdb debugs the guest as QEMU's gdbstub
allows, with vCPUs as threads.

Packets served (gdb's manual, "Remote Protocol"): qSupported, qXfer:features:read (the x86-64 target description
of pyhv/arch/x86/gdb_registers.py), QStartNoAckMode, `?`, g/G, p/P, m/M/X (guest-linear addresses, translated
through the guest's page tables), c/s and vCont (continue and step per vCPU), Z0/z0 (int3) and Z1/z1 (debug
register) breakpoints, Z2-Z4 watchpoints, qfThreadInfo/qsThreadInfo, H, T, qC, qAttached, Ctrl-C (0x03),
D (detach: the VM runs on) and k (kill: the VM ends). Anything else gets the empty reply ("not supported").

One debugger at a time: a second connection is told so (an `E.` error reply to whatever it sends) and closed.
A bad checksum or an oversized packet gets a NAK, a packet that fails gets an error reply, a client that
vanishes (even half way through a packet) detaches: in every case the stub keeps serving and the VM keeps
running. The stub runs on its own thread with a `selectors` loop; the machine's `GuestDebugger` does the work.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from typing import TYPE_CHECKING, Callable

from pyhv.arch.x86.gdb_registers import REGISTERS, RegisterFile, target_xml
from pyhv.errors import ConfigError
from pyhv.machine.guest_debug import SIGINT, DebugError, StopEvent
from pyhv.monitor.gdb_packets import MAX_PACKET, PacketReader, frame

if TYPE_CHECKING:
    from pyhv.machine.machine import Machine
    from pyhv.machine.vcpu import VcpuThread

log = logging.getLogger(__name__)

BUSY = b"E.pyhv: another debugger is already attached to this VM"
SUPPORTED = (f"PacketSize={MAX_PACKET:x};qXfer:features:read+;QStartNoAckMode+;vContSupported+;"
             "swbreak+;hwbreak+").encode()
Z_KINDS = {1: "exec", 2: "write", 3: "read", 4: "access"}


def parse_gdb_address(text: str) -> tuple[str, int]:
    """QEMU's -gdb syntax: `tcp:HOST:PORT`, `tcp::PORT` (all interfaces... as QEMU: localhost here), `:PORT`."""
    spec = text[4:] if text.startswith("tcp:") else text
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--gdb {text!r}: expected tcp:HOST:PORT or tcp::PORT", "for example --gdb tcp::1234")
    return host or "127.0.0.1", int(port)


class GdbStub:
    def __init__(self, machine: "Machine", address: tuple[str, int]) -> None:
        self.machine = machine
        self.debugger = machine.debugger
        try:
            self.listener = socket.create_server(address, reuse_port=False)
        except OSError as e:
            raise ConfigError(f"--gdb: cannot listen on {address[0]}:{address[1]}: {e.strerror}",
                              "choose another port") from None
        self.address = self.listener.getsockname()[:2]
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.selector.register(self.wake_fd, selectors.EVENT_READ, "wake")
        self.client: socket.socket | None = None
        self.reader = PacketReader()
        self.no_ack = False
        self.waiting = False           # gdb waits for a stop reply (after c/s/vCont)
        self.g_thread = 0              # vCPU for register and memory packets (Hg)
        self.last_stop: StopEvent | None = None
        self.packets = self.bad_packets = self.refused = 0
        self.closed = False
        self.thread: threading.Thread | None = None
        self.debugger.on_stop = lambda event: self._wake()
        machine.listeners.append(self._on_machine_event)
        self.handlers: dict[str, Callable[[bytes], bytes | None]] = {
            "?": self._stop_reason, "g": self._read_registers, "G": self._write_registers,
            "p": self._read_register, "P": self._write_register, "m": self._read_memory, "M": self._write_memory,
            "X": self._write_binary, "c": self._continue, "s": self._step, "Z": self._insert, "z": self._remove,
            "H": self._set_thread, "T": self._thread_alive, "D": self._detach, "k": self._kill,
        }

    # --- thread and sockets -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="gdbstub", daemon=True)
        self.thread.start()
        log.info("gdb stub listening on %s:%d", *self.address)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(5)
        if self.machine.debugger.on_stop is not None:
            self.debugger.on_stop = None
        if self._on_machine_event in self.machine.listeners:
            self.machine.listeners.remove(self._on_machine_event)
        for sock in (self.client, self.listener):
            if sock is not None:
                sock.close()
        self.selector.close()
        os.close(self.wake_fd)

    def _wake(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def _on_machine_event(self, event: str, data: dict) -> None:
        if event == "SHUTDOWN":
            self._wake()

    def _loop(self) -> None:
        while not self.closed:
            for key, _ in self.selector.select(1.0):
                try:
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        os.eventfd_read(self.wake_fd)
                        self._report_stop()
                    elif key.data == "client":
                        self._receive()
                    else:
                        self._refuse(key.fileobj)  # type: ignore[arg-type]
                except Exception:               # a bug in one packet must not end the stub
                    log.exception("gdb stub: internal error")
        if self.client is not None:
            self._drop_client(detach=self.machine.state != "shutdown")

    def _accept(self) -> None:
        try:
            sock, peer = self.listener.accept()
        except OSError:
            return
        if self.client is not None:
            self.refused += 1
            log.warning("gdb stub: refused a second debugger from %s (one is attached)", peer)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, "busy")
            return
        sock.setblocking(True)
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client, self.reader, self.no_ack, self.waiting = sock, PacketReader(), False, False
        self.selector.register(sock, selectors.EVENT_READ, "client")
        log.info("gdb stub: debugger attached from %s:%d; the VM is stopped", *peer[:2])
        if self.machine.state in ("running", "paused", "debug"):
            self.debugger.halt()
        self.last_stop = StopEvent(self.g_thread)

    def _refuse(self, sock: socket.socket) -> None:
        """A second client: answer whatever it sends with an error that says why, then close it."""
        try:
            data = sock.recv(4096)
            if data:
                sock.sendall(b"+" + frame(BUSY))
        except OSError:
            data = b""
        self.selector.unregister(sock)
        sock.close()

    def _drop_client(self, detach: bool) -> None:
        sock, self.client = self.client, None
        if sock is None:
            return
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self.waiting = False
        if detach:
            self.debugger.detach()
        log.info("gdb stub: debugger detached; the VM runs")

    def _send(self, data: bytes, packet: bool = True) -> None:
        if self.client is None:
            return
        try:
            self.client.sendall(frame(data) if packet else data)
        except OSError:
            self._drop_client(detach=True)

    # --- input ----------------------------------------------------------------------------------------------------
    def _receive(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop_client(detach=self.machine.state != "shutdown")
            return
        for event in self.reader.feed(data):
            if event.kind == "interrupt":
                self._interrupt()
            elif event.kind == "bad":
                self.bad_packets += 1
                log.debug("gdb stub: bad packet (%s)", event.data.decode())
                if not self.no_ack:
                    self._send(b"-", packet=False)
            elif event.kind == "packet":
                self.packets += 1
                if not self.no_ack:
                    self._send(b"+", packet=False)
                reply = self._dispatch(event.data)
                if reply is not None:
                    self._send(reply)
            if self.client is None:
                return

    def _dispatch(self, packet: bytes) -> bytes | None:
        if self.waiting and packet[:1] not in (b"?",):
            return None                          # gdb only talks while the target runs to interrupt it
        try:
            if packet.startswith(b"q") or packet.startswith(b"Q"):
                return self._query(packet)
            if packet.startswith(b"v"):
                return self._v_packet(packet)
            handler = self.handlers.get(chr(packet[0])) if packet else None
            return handler(packet[1:]) if handler is not None else b""
        except DebugError as e:
            log.debug("gdb stub: %s: %s", packet[:40], e)
            return b"E14"
        except (ValueError, IndexError, KeyError) as e:
            log.debug("gdb stub: malformed packet %r: %s", packet[:40], e)
            return b"E01"

    # --- stops ----------------------------------------------------------------------------------------------------
    def _report_stop(self) -> None:
        if self.machine.state == "shutdown":
            if self.client is not None:
                status = self.machine.exit_status or 0
                self._send(b"W%02x" % (status & 0xFF))
                self._drop_client(detach=False)
            return
        if not self.waiting:
            return
        event = self.debugger.take_event()
        if event is None:
            return
        self.debugger.halt()
        self.waiting = False
        self._send(self._stop_reply(event))

    def _interrupt(self) -> None:
        if not self.waiting:
            return
        self.debugger.halt()
        self.waiting = False
        event = self.debugger.take_event() or StopEvent(self.g_thread, SIGINT)
        self._send(self._stop_reply(event))

    def _stop_reply(self, event: StopEvent) -> bytes:
        self.last_stop = event
        self.g_thread = event.vcpu
        reply = b"T%02x" % event.signal
        if event.kind in ("watch", "rwatch", "awatch"):
            reply += b"%s:%x;" % (event.kind.encode(), event.address)
        elif event.kind:
            reply += event.kind.encode() + b":;"
        return reply + b"thread:%x;" % (event.vcpu + 1)

    def _stop_reason(self, _: bytes) -> bytes:
        return self._stop_reply(self.last_stop or StopEvent(self.g_thread))

    def _run(self, step: set[int], run: set[int] | None) -> None:
        if self.debugger.pending:                 # another vCPU already stopped: report it first
            self.waiting = True
            self._wake()
            return
        self.waiting = True
        self.debugger.resume(step, run)

    def _continue(self, args: bytes) -> bytes | None:
        if args:
            self._set_pc(self.g_thread, int(args, 16))
        self._run(set(), None)
        return None

    def _step(self, args: bytes) -> bytes | None:
        if args:
            self._set_pc(self.g_thread, int(args, 16))
        self._run({self.g_thread}, set())
        return None

    def _v_packet(self, packet: bytes) -> bytes | None:
        if packet == b"vCont?":
            return b"vCont;c;C;s;S;t"
        if packet == b"vMustReplyEmpty":
            return b""
        if packet.startswith(b"vCont;"):
            ids = [v.id for v in self.machine.vcpus]
            choice: dict[int, str] = {}
            for action in packet[6:].split(b";"):
                kind, _, thread = action.partition(b":")
                letter = chr(kind[0]).lower()
                if letter not in "cst":
                    raise ValueError(f"vCont action {kind!r}")
                targets = ids if not thread or thread in (b"-1", b"0") else [self._vcpu_id(thread)]
                for i in targets:
                    choice.setdefault(i, letter)
            step = {i for i, letter in choice.items() if letter == "s"}
            run = {i for i, letter in choice.items() if letter == "c"}
            if not step and not run:
                return b"OK"
            self._run(step, run)
            return None
        return b""

    # --- queries --------------------------------------------------------------------------------------------------
    def _query(self, packet: bytes) -> bytes:
        name, _, args = packet.partition(b":")
        if name == b"qSupported":
            return SUPPORTED
        if name == b"QStartNoAckMode":
            self._send(b"OK")
            self.no_ack = True
            return None  # type: ignore[return-value]
        if name == b"qXfer" and args.startswith(b"features:read:target.xml:"):
            offset, _, length = args.rpartition(b":")[2].partition(b",")
            return _xfer(target_xml(), int(offset, 16), int(length, 16))
        if name == b"qXfer":
            return b"E00"
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v.id + 1) for v in self.machine.vcpus)
        if name == b"qsThreadInfo":
            return b"l"
        if name == b"qC":
            return b"QC%x" % (self.g_thread + 1)
        if name == b"qAttached":
            return b"1"
        if name == b"qSymbol":
            return b"OK"
        if packet.startswith(b"qThreadExtraInfo,"):
            vcpu = self._vcpu(packet.split(b",", 1)[1])
            return f"vCPU {vcpu.id}".encode().hex().encode()
        return b""

    # --- threads --------------------------------------------------------------------------------------------------
    def _vcpu_id(self, thread: bytes) -> int:
        number = int(thread, 16)
        if not 1 <= number <= len(self.machine.vcpus):
            raise DebugError(f"no thread {thread.decode()}")
        return number - 1

    def _vcpu(self, thread: bytes | None = None) -> "VcpuThread":
        if thread is None or thread in (b"0", b"-1"):
            return self.machine.vcpus[self.g_thread]
        return self.machine.vcpus[self._vcpu_id(thread)]

    def _set_thread(self, args: bytes) -> bytes:
        kind, thread = args[:1], args[1:]
        if thread not in (b"0", b"-1"):
            vcpu_id = self._vcpu_id(thread)
            if kind == b"g":
                self.g_thread = vcpu_id
        return b"OK"

    def _thread_alive(self, args: bytes) -> bytes:
        self._vcpu_id(args)
        return b"OK"

    # --- registers ------------------------------------------------------------------------------------------------
    def _registers(self, vcpu: "VcpuThread") -> RegisterFile:
        v = vcpu.vcpu
        return vcpu.call(lambda: RegisterFile(v.get_regs(), v.get_sregs(), v.get_fpu()))  # type: ignore[return-value]

    def _store(self, vcpu: "VcpuThread", regs: RegisterFile, changed: set[str]) -> None:
        v = vcpu.vcpu

        def store() -> None:
            if "sregs" in changed:
                v.set_sregs(regs.sregs)
            if "regs" in changed:
                v.set_regs(regs.regs)
            if "fpu" in changed:
                v.set_fpu(regs.fpu)
        vcpu.call(store)

    def _set_pc(self, vcpu_id: int, pc: int) -> None:
        vcpu = self.machine.vcpus[vcpu_id]
        regs = self._registers(vcpu)
        regs.regs.rip = pc
        self._store(vcpu, regs, {"regs"})

    def _read_registers(self, _: bytes) -> bytes:
        return self._registers(self._vcpu()).all_values().hex().encode()

    def _write_registers(self, args: bytes) -> bytes:
        vcpu = self._vcpu()
        regs = self._registers(vcpu)
        self._store(vcpu, regs, regs.update_all(bytes.fromhex(args.decode())))
        return b"OK"

    def _read_register(self, args: bytes) -> bytes:
        number = int(args, 16)
        if number >= len(REGISTERS):
            return b"E00"
        return self._registers(self._vcpu()).value(number).hex().encode()

    def _write_register(self, args: bytes) -> bytes:
        number, _, value = args.partition(b"=")
        n = int(number, 16)
        if n >= len(REGISTERS):
            return b"E00"
        vcpu = self._vcpu()
        regs = self._registers(vcpu)
        self._store(vcpu, regs, regs.update(n, bytes.fromhex(value.decode())))
        return b"OK"

    # --- memory ---------------------------------------------------------------------------------------------------
    def _read_memory(self, args: bytes) -> bytes:
        address, _, length = args.partition(b",")
        n = min(int(length, 16), MAX_PACKET // 2)
        return self.debugger.read(self._vcpu(), int(address, 16), n).hex().encode()

    def _write_memory(self, args: bytes) -> bytes:
        where, _, data = args.partition(b":")
        address, _, length = where.partition(b",")
        payload = bytes.fromhex(data.decode())
        if len(payload) != int(length, 16):
            raise ValueError("M: length does not match the data")
        self.debugger.write(self._vcpu(), int(address, 16), payload)
        return b"OK"

    def _write_binary(self, args: bytes) -> bytes:
        where, _, data = args.partition(b":")
        address, _, length = where.partition(b",")
        if len(data) != int(length, 16):
            raise ValueError("X: length does not match the data")
        if data:
            self.debugger.write(self._vcpu(), int(address, 16), data)
        return b"OK"

    # --- breakpoints and watchpoints ------------------------------------------------------------------------------
    def _breakpoint_args(self, args: bytes) -> tuple[int, int, int]:
        kind, address, length = args.split(b",")[:3]
        return int(kind), int(address, 16), int(length.split(b";")[0], 16)

    def _insert(self, args: bytes) -> bytes:
        kind, address, length = self._breakpoint_args(args)
        if kind == 0:
            self.debugger.insert_sw_breakpoint(self._vcpu(), address)
        elif kind in Z_KINDS:
            self.debugger.insert_hw(Z_KINDS[kind], address, length)
        else:
            return b""
        return b"OK"

    def _remove(self, args: bytes) -> bytes:
        kind, address, length = self._breakpoint_args(args)
        if kind == 0:
            self.debugger.remove_sw_breakpoint(address)
        elif kind in Z_KINDS:
            self.debugger.remove_hw(Z_KINDS[kind], address, length)
        else:
            return b""
        return b"OK"

    # --- the session ----------------------------------------------------------------------------------------------
    def _detach(self, _: bytes) -> bytes | None:
        self._send(b"OK")
        self._drop_client(detach=True)
        return None

    def _kill(self, _: bytes) -> bytes | None:
        log.info("gdb stub: kill requested by the debugger")
        self._drop_client(detach=False)
        self.machine.shutdown(0, "killed by gdb")
        return None


def _xfer(document: bytes, offset: int, length: int) -> bytes:
    chunk = document[offset:offset + min(length, MAX_PACKET - 16)]
    return (b"l" if offset + len(chunk) >= len(document) else b"m") + chunk
