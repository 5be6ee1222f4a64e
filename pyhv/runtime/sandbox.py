"""`--sandbox on`: the vCPU and I/O threads run under a seccomp filter once they start (QEMU's `-sandbox`).

The threads that touch what the guest controls (the vCPU loops emulating its I/O, the I/O thread serving its
virtqueues, the sidecore poller) are the ones a bug turned exploit would run in. Each installs, for itself
only (no SECCOMP_FILTER_FLAG_TSYNC; threads it starts later inherit it), a classic-BPF filter that answers EPERM
to the system calls a VMM never makes once running. The monitor, GDB and migration threads and the main
thread are left free: they start `exec:` migrations, accept connections and exit the process.

Like QEMU's -sandbox since 2.11 it is a deny list by category, not an allow list: CPython's own system calls
(allocators, imports, signal handling, thread start) change with its version and build, and an allow list that
misses one kills the VM at the worst moment. The categories (`DENIED`):

- spawn: execve, execveat, fork, vfork; clone without CLONE_THREAD (a new process); clone3 answers ENOSYS, as
  under QEMU's sandbox, since its flags are behind a pointer the filter cannot read (glibc falls back to clone)
- debug and kernel: ptrace, process_vm_readv/writev, module and kexec loading, bpf, kernel knobs (iopl,
  ioperm, syslog, acct, personality, uselib, ...), userfaultfd, keyrings
- mounts and namespaces: mount, umount2, the new mount API, pivot_root, chroot, setns, unshare, handle opens
- clocks and power: settimeofday, clock_settime, adjtimex, clock_adjtime, reboot, swapon/swapoff
- privileges: set*uid/set*gid, setgroups, capset
- network, vCPU threads only: socket, socketpair, bind, listen, accept, accept4, connect (the I/O thread keeps
  them: a vhost-user front end reconnects from it)

A set*id call made through glibc from a sandboxed thread aborts the whole process: glibc has every thread repeat
it and aborts when one of them fails, the outcome one wants from a thread trying to change its privileges.
Calls from another ABI than x86-64 (i386 `int 0x80`, x32) are refused too, or they would bypass the numbers.
The cost is one short BPF program per system call of those threads: five instructions for the numbers below the
lowest one refused (41; KVM_RUN is ioctl, 16), about 70 for the others (see bench/exits.py's sandbox figure).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import platform
import struct
import threading
from typing import Callable

log = logging.getLogger(__name__)

SPAWN = {"execve": 59, "execveat": 322, "fork": 57, "vfork": 58}
DEBUG_AND_KERNEL = {"ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kexec_load": 246,
                    "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
                    "bpf": 321, "iopl": 172, "ioperm": 173, "syslog": 103, "acct": 163, "personality": 135,
                    "uselib": 134, "ustat": 136, "sysfs": 139, "_sysctl": 156, "vhangup": 153, "quotactl": 179,
                    "lookup_dcookie": 212, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249}
MOUNTS_AND_NAMESPACES = {"mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "setns": 308,
                         "unshare": 272, "open_by_handle_at": 304, "name_to_handle_at": 303, "open_tree": 428,
                         "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
                         "mount_setattr": 442}
CLOCKS_AND_POWER = {"settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305,
                    "reboot": 169, "swapon": 167, "swapoff": 168}
PRIVILEGES = {"setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116,
              "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "capset": 126}
NETWORK = {"socket": 41, "socketpair": 53, "bind": 49, "listen": 50, "accept": 43, "accept4": 288, "connect": 42}
DENIED = {**SPAWN, **DEBUG_AND_KERNEL, **MOUNTS_AND_NAMESPACES, **CLOCKS_AND_POWER, **PRIVILEGES}
ROLES = {"vcpu": {**DENIED, **NETWORK}, "io": DENIED}
NR_CLONE, NR_CLONE3 = 56, 435
CLONE_THREAD = 0x10000
X32_SYSCALL_BIT = 0x40000000

# classic BPF (linux/filter.h, linux/seccomp.h, linux/audit.h)
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
DATA_NR, DATA_ARCH, DATA_ARG0 = 0, 4, 16            # struct seccomp_data offsets
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
_INSN = struct.Struct("=HBBI")                      # struct sock_filter: code, jt, jf, k


def build_filter(denied: dict[str, int]) -> bytes:
    """The filter's instructions: kill another ABI, EPERM for `denied`, for clone without CLONE_THREAD and for
    x32 numbers, ENOSYS for clone3, allow the rest. Numbers below the lowest one refused (read, write, ioctl and
    so KVM_RUN, poll, mmap, ...) are allowed after five instructions."""
    numbers = sorted(set(denied.values()))
    prog: list[tuple[int, int, int, int]] = []
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    prog.append((BPF_LD_W_ABS, 0, 0, DATA_ARCH))
    prog.append((BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS))
    prog.append((BPF_LD_W_ABS, 0, 0, DATA_NR))
    prog.append((BPF_JGE_K, 1, 0, min(numbers + [NR_CLONE, NR_CLONE3])))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))          # the hot path: KVM_RUN is an ioctl (16)
    prog.append((BPF_JGE_K, 0, 1, X32_SYSCALL_BIT))
    prog.append((BPF_RET_K, 0, 0, eperm))
    prog.append((BPF_JEQ_K, 0, 1, NR_CLONE3))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS))
    prog.append((BPF_JEQ_K, 0, 4, NR_CLONE))
    prog.append((BPF_LD_W_ABS, 0, 0, DATA_ARG0))                # the low 32 bits of clone's flags
    prog.append((BPF_JSET_K, 1, 0, CLONE_THREAD))
    prog.append((BPF_RET_K, 0, 0, eperm))                      # a new process
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))          # a new thread
    for i, nr in enumerate(numbers):                           # each: equal -> the EPERM return at the end
        prog.append((BPF_JEQ_K, len(numbers) - i, 0, nr))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((BPF_RET_K, 0, 0, eperm))
    return b"".join(_INSN.pack(*insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_PROGRAMS = {role: build_filter(denied) for role, denied in ROLES.items()}
_refused_once = threading.Lock()
_warned = False


def confined(role: str | None, run: Callable[[], None]) -> Callable[[], None]:
    """A thread body that enters the `role` filter first (`run` itself when role is None: no sandbox)."""
    if role is None:
        return run

    def body() -> None:
        enter(role)
        run()
    return body


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() == "x86_64"


def enter(role: str) -> bool:
    """Put the calling thread under the `role` filter ("vcpu" or "io"); False (logged once) if the kernel refuses.
    Irreversible for this thread."""
    global _warned
    program = _PROGRAMS[role]
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _INSN.size, ctypes.addressof(buf))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        e = ctypes.get_errno()
        with _refused_once:
            if not _warned:
                _warned = True
                log.warning("--sandbox: the kernel refused the seccomp filter (%s); threads run without it",
                            errno.errorcode.get(e, e))
        return False
    return True
