"""--sandbox under KVM: a running VM's vCPU and I/O threads are refused execve (the test hook: a function run on
the vCPU thread, as the GDB stub runs its register reads), the vCPU threads sockets too; with --sandbox off they
are not, so the filter is what refuses."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from pyhv.config import VmConfig
from pyhv.machine.machine import Machine
from pyhv.runtime.chardev import ChardevSpec

pytestmark = pytest.mark.kvm


def on_io_thread(machine: Machine, fn):
    done = threading.Event()
    box: list = []

    def call() -> None:
        try:
            box.append(fn())
        except BaseException as e:         # handed back to the test
            box.append(e)
        done.set()
    machine.iothread.call_soon(call)
    assert done.wait(10)
    return box[0]


def refused(result) -> bool:
    return isinstance(result, PermissionError)


def try_execve():
    os.execv("/bin/true", ["true"])         # would replace the whole pyhv process: the test would end here


def make_socket():
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    return "socket made"


@pytest.mark.parametrize("sandbox", [True, False], ids=["on", "off"])
def test_the_guest_facing_threads_cannot_execve(guest, sandbox):
    machine = Machine(VmConfig(firmware=guest("counter"), serial=ChardevSpec("none"), sandbox=sandbox))
    try:
        machine.start()
        deadline = time.monotonic() + 30
        while machine.guest_memory.read_int(0x500, 4) < 1000:
            assert time.monotonic() < deadline, "the guest never started counting"
            time.sleep(0.05)
        vcpu = machine.vcpus[0]
        try:
            vcpu_socket = vcpu.call(make_socket)
        except PermissionError as e:
            vcpu_socket = e
        io_socket = on_io_thread(machine, make_socket)
        if sandbox:
            try:
                vcpu.call(try_execve)
                raise AssertionError("execve on the vCPU thread was not refused")
            except PermissionError:
                pass
            assert refused(on_io_thread(machine, try_execve))
            assert refused(vcpu_socket) and io_socket == "socket made"
            before = machine.guest_memory.read_int(0x500, 4)
            time.sleep(0.2)
            assert machine.guest_memory.read_int(0x500, 4) > before        # the VM runs on
        else:
            assert vcpu_socket == "socket made" and io_socket == "socket made"
    finally:
        machine.shutdown(0)
        machine.wait()
        machine.close()
