"""Booting the project's Linux guest (pyhv guest build) with pyhv for a test: one `pyhv run` whose /init runs a
command (pyhv.cmd) and ends the VM with its status. Commands should avoid pipelines: on PVM hosts a program exec'd
while others are runnable intermittently dies of SIGSEGV (pyhv/assets/init_script.py, PVM_NOTE)."""
from __future__ import annotations

import subprocess
import sys

from pyhv.assets.protocol import encode_command

BOOT_TIMEOUT = 600


def boot(assets, *extra: str, command: str, memory: str = "128M", kernel: str | None = None,
         initrd: str | None = None, timeout: float = BOOT_TIMEOUT,
         prefix: tuple[str, ...] = (), append: str = "") -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of pyhv booting `assets` with `extra` options; `prefix` wraps the command
    (e.g. `ip netns exec NS`); `append`: more kernel parameters."""
    cmd = [*prefix, sys.executable, "-m", "pyhv.cli", "run", "--kernel", kernel or str(assets.bzimage),
           "--initrd", initrd or str(assets.initramfs_uncompressed), "--memory", memory,
           "--append", f"console=ttyS0 reboot=k panic=-1 {append} {encode_command(command)}".replace("  ", " "),
           "--stats", *extra]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
