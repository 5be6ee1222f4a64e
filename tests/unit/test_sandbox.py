"""The seccomp filter (pyhv/runtime/sandbox.py), installed on a thread of this process: what it refuses, what it
lets through (threads, files, the allowed network calls), and that other threads stay free."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import threading

import pytest

from pyhv.runtime import sandbox

pytestmark = pytest.mark.skipif(not sandbox.supported(), reason="seccomp filters are built for Linux x86-64")


def in_sandbox(role: str, fn):
    """Run fn on a new thread that entered the `role` filter; its return value, or the exception it raised."""
    out: list = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as e:         # handed back to the test
            out.append(e)
    thread = threading.Thread(target=sandbox.confined(role, body))
    thread.start()
    thread.join(30)
    assert out, "the sandboxed thread did not finish"
    return out[0]


def attempt(call) -> str:
    try:
        call()
        return "allowed"
    except PermissionError:
        return "EPERM"


def raw_setuid(uid: int) -> str:
    """setuid(2) for this thread alone: glibc's wrapper makes every thread of the process call it and aborts the
    process when they disagree, which is what happens to a sandboxed thread's caller outside a test."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(sandbox.PRIVILEGES["setuid"], uid) == 0:
        return "allowed"
    return "EPERM" if ctypes.get_errno() == errno.EPERM else f"errno {ctypes.get_errno()}"


def test_a_sandboxed_thread_cannot_spawn_but_can_work():
    def probe():
        results = {"execve": attempt(lambda: os.execv("/bin/true", ["true"])),
                   "fork": attempt(lambda: subprocess.run(["/bin/true"])),
                   "setuid": raw_setuid(os.getuid()),
                   "chroot": attempt(lambda: os.chroot("/"))}
        fd = os.open("/dev/null", os.O_RDONLY)              # ordinary work goes on
        os.close(fd)
        child: list = []
        t = threading.Thread(target=lambda: child.append(attempt(lambda: os.execv("/bin/true", ["true"]))))
        t.start()                                           # threads start (clone3 -> ENOSYS -> clone)
        t.join()
        results["thread's child execve"] = child[0]         # and inherit the filter
        return results
    assert in_sandbox("io", probe) == {"execve": "EPERM", "fork": "EPERM", "setuid": "EPERM", "chroot": "EPERM",
                                       "thread's child execve": "EPERM"}
    assert subprocess.run(["/bin/true"]).returncode == 0    # this thread was never filtered


def test_only_vcpu_threads_lose_the_network_calls():
    def make_socket():
        socket.socketpair()[0].close()
        return "allowed"
    assert in_sandbox("io", make_socket) == "allowed"        # a vhost-user front end reconnects from the I/O thread
    assert isinstance(in_sandbox("vcpu", make_socket), PermissionError)


def test_the_filter_jumps_stay_within_the_program():
    for denied in sandbox.ROLES.values():
        program = sandbox.build_filter(denied)
        insns = [sandbox._INSN.unpack_from(program, i) for i in range(0, len(program), sandbox._INSN.size)]
        for at, (code, jt, jf, _k) in enumerate(insns):
            if code & 0x07 == 0x05:                         # BPF_JMP: both targets inside, never past the end
                assert at + 1 + max(jt, jf) < len(insns)
        assert insns[-1][0] == sandbox.BPF_RET_K and insns[-2][0] == sandbox.BPF_RET_K
