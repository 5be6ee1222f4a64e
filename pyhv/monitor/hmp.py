"""The human monitor commands QMP's `human-monitor-command` runs (QEMU's HMP, the subset pyhv has).

Like QEMU, an unknown or failing HMP command is not a QMP error: its message is the returned text.
"""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from pyhv.monitor import commands as qmp

if TYPE_CHECKING:
    from pyhv.monitor.qmp import QmpServer

HELP = """\
info mtree        memory and I/O region trees
info registers    the registers of the current vCPU (cpu-index)
info pci          PCI functions
info block        block devices
info cpus         vCPUs and their host threads
info status       run state
info version      pyhv version
stop | cont | system_reset | system_powerdown | quit
"""


@qmp.command("human-monitor-command", command_line=(str, True), cpu_index=(int, False))
def run_hmp(server: "QmpServer", command_line: str, cpu_index: int = 0) -> str:
    try:
        words = shlex.split(command_line)
    except ValueError as e:
        return f"{e}\r\n"
    if not words:
        return ""
    head, rest = words[0], words[1:]
    if head in ("help", "?"):
        return HELP
    if head in ("info", "i"):
        if not rest:
            return "info: missing argument (try 'help')\r\n"
        what = rest[0]
        handler = INFO.get(what)
        if handler is None:
            return f"unknown info command: '{what}'\r\n"
        return handler(server, cpu_index)
    simple = {"stop": "stop", "cont": "cont", "c": "cont", "system_reset": "system_reset",
              "system_powerdown": "system_powerdown"}
    if head in simple:
        try:
            qmp.COMMANDS[simple[head]].call(server, {})
        except qmp.QmpCommandError as e:
            return f"Error: {e.desc}\r\n"
        return ""
    if head in ("quit", "q"):
        server.machine.shutdown(0, "host-qmp-quit")
        return ""
    return f"unknown command: '{head}'\r\n"


def _info_registers(server: "QmpServer", cpu_index: int) -> str:
    vcpus = server.machine.vcpus
    if not 0 <= cpu_index < len(vcpus):
        return f"CPU#{cpu_index} does not exist\r\n"
    return f"CPU#{cpu_index}\r\n" + server.machine.cpu_state(vcpus[cpu_index]).rstrip("\n") + "\r\n"


def _info_pci(server: "QmpServer", cpu_index: int) -> str:
    lines = []
    for bus in qmp.query_pci(server):
        for dev in bus["devices"]:
            ident = dev["id"]
            lines.append(f"  Bus {dev['bus']:2d}, device {dev['slot']:3d}, function {dev['function']}:")
            desc = dev["class_info"].get("desc") or f"Class {dev['class_info']['class']:04x}"
            lines.append(f"    {desc}: PCI device {ident['vendor']:04x}:{ident['device']:04x}")
            lines.append(f"      PCI subsystem {ident['subsystem-vendor']:04x}:{ident['subsystem']:04x}")
            if "irq" in dev:
                lines.append(f"      IRQ {dev['irq']}.")
            for region in dev["regions"]:
                kind = "I/O at" if region["type"] == "io" else "Memory at"
                end = region["address"] + region["size"] - 1
                lines.append(f"      BAR{region['bar']}: {kind} {region['address']:#x} [{end:#x}].")
            lines.append(f"      id \"{dev['qdev_id']}\"")
    return "\r\n".join(lines) + "\r\n" if lines else ""


def _info_block(server: "QmpServer", cpu_index: int) -> str:
    lines = []
    for dev in qmp.query_block(server):
        inserted = dev.get("inserted")
        if inserted:
            ro = " (ro)" if inserted["ro"] else ""
            lines.append(f"{dev['device']}: {inserted['file']} ({inserted['drv']}{ro})")
        else:
            lines.append(f"{dev['device']}: [not inserted]")
    return "\r\n".join(lines) + "\r\n" if lines else ""


def _info_cpus(server: "QmpServer", cpu_index: int) -> str:
    return "".join(f"{'*' if c['cpu-index'] == cpu_index else ' '}CPU #{c['cpu-index']}: thread_id={c['thread-id']}\r\n"
                   for c in qmp.query_cpus_fast(server))


def _info_status(server: "QmpServer", cpu_index: int) -> str:
    return f"VM status: {qmp.query_status(server)['status']}\r\n"


def _info_version(server: "QmpServer", cpu_index: int) -> str:
    v = qmp.version_info()["qemu"]
    return f"{v['major']}.{v['minor']}.{v['micro']} (pyhv)\r\n"


INFO = {"mtree": lambda s, c: s.machine.dump_mtree().replace("\n", "\r\n") + "\r\n",
        "registers": _info_registers, "pci": _info_pci, "block": _info_block, "cpus": _info_cpus,
        "status": _info_status, "version": _info_version}
