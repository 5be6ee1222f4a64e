"""Run the project's Linux test guest under QEMU/TCG (q35, memfd-backed shared RAM as vhost-user needs) with extra
devices, and read back what its command printed (the /init console protocol: PYHV-INIT, PYHV-EXIT-STATUS=N)."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from dataclasses import dataclass

QEMU = "qemu-system-x86_64"
EXIT_RE = re.compile(r"PYHV-EXIT-STATUS=(\d+)\r?$", re.MULTILINE)


@dataclass
class GuestRun:
    status: int | None          # the command's exit status, None if the marker never came
    console: str

    def output(self) -> str:
        text = self.console.replace("\r\n", "\n")
        start = text.find("PYHV-INIT")
        start = text.find("\n", start) + 1 if start >= 0 else 0
        m = EXIT_RE.search(text, start)
        return text[start:m.start() if m else len(text)]

    def value(self, key: str) -> str:
        """The value printed by the guest as a line `key=value`."""
        m = re.search(rf"^{re.escape(key)}=(.*?)\r?$", self.console, re.MULTILINE)
        if not m:
            raise AssertionError(f"guest printed no {key}=...; console:\n{self.console[-3000:]}")
        return m.group(1).strip()


def qemu_command(guest, command: str, devices: list[str], memory: str = "256M") -> list[str]:
    if shutil.which(QEMU) is None:
        raise AssertionError(f"{QEMU} is missing: run scripts/install-deps")
    cmdline = "console=ttyS0 quiet panic=-1 pyhv.cmd64=" + base64.b64encode(command.encode()).decode()
    # maxcpus=2 although one vCPU runs: QEMU's TCG translates the guest's memory barriers and locked instructions
    # into real ones only when more than one vCPU is possible (CF_PARALLEL). With maxcpus=1 they are elided, which
    # is right for a guest alone with its emulated devices but not for one sharing rings with a vhost-user back
    # end in another process: the driver's "publish used_event, full barrier, re-read the used index" handshake
    # then misses the back end's update, and the ring stalls for good (seen as a hung 100 MiB TCP test).
    return [QEMU, "-accel", "tcg", "-M", "q35", "-m", memory, "-smp", "1,maxcpus=2", "-nodefaults",
            "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-object", f"memory-backend-memfd,id=mem,size={memory},share=on", "-numa", "node,memdev=mem",
            "-kernel", str(guest.bzimage), "-initrd", str(guest.initramfs), "-append", cmdline, *devices]


def run_guest(guest, command: str, devices: list[str], timeout: float = 600, memory: str = "256M") -> GuestRun:
    """Boot, run `command`, return what the console showed; a guest still running after `timeout` seconds is
    killed and comes back with status None and its console so far (the failing test shows where it hung)."""
    try:
        proc = subprocess.run(qemu_command(guest, command, devices, memory), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        out, err = (e.stdout or b""), (e.stderr or b"") + f"\n[QEMU killed after {timeout:g} s]".encode()
    console = out.decode(errors="replace") + err.decode(errors="replace")
    m = EXIT_RE.search(console)
    return GuestRun(int(m.group(1)) if m else None, console)


def vhost_user_blk(socket_path: str, extra: str = "") -> list[str]:
    return ["-chardev", f"socket,id=vublk,path={socket_path}",
            "-device", f"vhost-user-blk-pci,chardev=vublk,num-queues=1{extra}"]
