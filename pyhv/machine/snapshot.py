"""Snapshots: a paused VM's complete state in a directory, and a new process resuming it.

    DIR/memory.raw   every RAM and ROM block of the machine, page-aligned, one after the other
    DIR/state.json   {"sha256": ..., "body": {...}}: the format version, the VM's config, the memory layout, KVM's
                     VM state (clock, PIC/IOAPIC, PIT), each vCPU's state and each device's declared state

A vCPU's state is what KVM holds for it: regs, sregs, XSAVE (FPU/SSE/AVX), XCRs, every MSR of
KVM_GET_MSR_INDEX_LIST that it can read (TSC included, so guest time goes on where it stopped), LAPIC, pending
events, MP state, debug registers. A device's state is its `state` dataclass (DESIGN.md: declared once), written
field by field (pyhv/state_codec.py), or what its `snapshot_state()` returns (a virtio transport: registers and
queue positions); a device type opts in with `SNAPSHOT = True` once that is *all* it keeps, so a snapshot never
silently misses something. A VM with any other device is refused before anything is paused, naming the devices.

Restore builds the machine from the saved config, maps memory.raw over its RAM with MAP_PRIVATE | MAP_FIXED
(copy on write, as Firecracker: several VMs can start from one snapshot, none changes it), then loads the KVM and
device state. A wrong format or newer version, a state file whose checksum does not match, or a memory file of the
wrong size is refused with one line.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import time
from typing import TYPE_CHECKING, Any

from pyhv.state_codec import StateError, decode, encode
from pyhv.kvm import constants as C
from pyhv.kvm import structs as S
from pyhv.memory.ram import PAGE_SIZE, RamBlock
from pyhv.memory.region import MemoryRegion, RegionKind

if TYPE_CHECKING:
    from pyhv.kvm.system import Vcpu
    from pyhv.machine.machine import Machine

log = logging.getLogger(__name__)

FORMAT = "pyhv-snapshot"
VERSION = 1
STATE_FILE = "state.json"
MEMORY_FILE = "memory.raw"
IRQCHIPS = (C.KVM_IRQCHIP_PIC_MASTER, C.KVM_IRQCHIP_PIC_SLAVE, C.KVM_IRQCHIP_IOAPIC)


SnapshotError = StateError        # a snapshot that cannot be made or restored (the message says what, and why)


# --- memory --------------------------------------------------------------------------------------------------
def ram_blocks(root: MemoryRegion) -> list[tuple[str, RamBlock]]:
    """Every RAM and ROM block reachable from `root` (mapped or not), each once, in a stable order."""
    seen: dict[int, tuple[str, RamBlock]] = {}

    def walk(region: MemoryRegion) -> None:
        if region.kind in (RegionKind.RAM, RegionKind.ROM) and region.block is not None:
            seen.setdefault(id(region.block), (region.block.name, region.block))
        elif region.kind is RegionKind.ALIAS and region.alias_target is not None:
            walk(region.alias_target)
        for sub in region.subregions:
            walk(sub.region)
    walk(root)
    blocks = list(seen.values())
    names = [name for name, _ in blocks]
    if len(set(names)) != len(names):
        raise SnapshotError(f"RAM blocks with the same name: {sorted(n for n in names if names.count(n) > 1)}")
    return blocks


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MAP_FIXED = 0x10


def map_private(block: RamBlock, fd: int, offset: int) -> None:
    """Replace `block`'s pages, at the same address (KVM's memslots stay valid), by a private copy-on-write
    mapping of the file."""
    if block.fd is not None:
        raise SnapshotError(f"RAM block {block.name} is shared memory (memfd): restore into it is not supported")
    addr = _libc.mmap(block.host_addr, block.size, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | MAP_FIXED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value) or addr != block.host_addr:
        err = ctypes.get_errno()
        raise SnapshotError(f"mapping {block.name} from the memory file failed: {os.strerror(err)}")


# --- vCPUs -----------------------------------------------------------------------------------------------------
def _hex(struct: ctypes.Structure | bytes) -> str:
    return bytes(struct).hex()


def save_vcpu(vcpu: "Vcpu", msr_indices: list[int]) -> dict:
    """On the vCPU's thread, while it is out of KVM_RUN."""
    return {"regs": _hex(vcpu.get_regs()), "sregs": _hex(vcpu.get_sregs()), "xsave": vcpu.get_xsave().hex(),
            "xcrs": vcpu.get_xcrs().hex(), "lapic": _hex(vcpu.get_lapic()), "events": _hex(vcpu.get_vcpu_events()),
            "mp_state": vcpu.get_mp_state(), "debugregs": _hex(vcpu.get_debugregs()),
            "msrs": {f"{k:#x}": v for k, v in vcpu.readable_msrs(msr_indices).items()}}


def _struct(kind: type, text: str) -> Any:
    raw = bytes.fromhex(text)
    if len(raw) != ctypes.sizeof(kind):
        raise SnapshotError(f"{kind.__name__} in the state file is {len(raw)} bytes, KVM's is {ctypes.sizeof(kind)}")
    return kind.from_buffer_copy(raw)


MSR_IA32_TSC_DEADLINE = 0x6E0


def restore_vcpu(vcpu: "Vcpu", data: dict) -> None:
    """In QEMU's order: sregs (APIC base, modes), the LAPIC, the MSRs (the TSC among them), events and MP state; the
    TSC deadline last, once the LAPIC's timer is in deadline mode and the TSC is back (else KVM drops it and the
    guest's next timer interrupt never comes)."""
    vcpu.set_sregs(_struct(S.kvm_sregs, data["sregs"]))
    vcpu.set_regs(_struct(S.kvm_regs, data["regs"]))
    vcpu.set_xsave(bytes.fromhex(data["xsave"]))
    vcpu.set_xcrs(bytes.fromhex(data["xcrs"]))
    vcpu.set_lapic(_struct(S.kvm_lapic_state, data["lapic"]))
    msrs = {int(k, 16): v for k, v in data["msrs"].items()}
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    done = vcpu.set_msrs(msrs)
    if done != len(msrs):
        log.warning("snapshot restore: KVM took %d of %d MSRs (the first refused: %#x)", done, len(msrs),
                    list(msrs)[done])
    vcpu.set_vcpu_events(_struct(S.kvm_vcpu_events, data["events"]))
    vcpu.set_mp_state(data["mp_state"])
    vcpu.set_debugregs(_struct(S.kvm_debugregs, data["debugregs"]))
    if deadline is not None:
        vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})


# --- the whole VM ----------------------------------------------------------------------------------------------
def unsaveable_devices(machine: "Machine") -> list[str]:
    """Devices whose state a snapshot would miss (they have not declared it whole: `SNAPSHOT = True`), each with
    the reason it gives (`snapshot_refusal`, on the device or its back end) when it has one."""
    transports = getattr(machine.board, "transports", [])
    candidates = [*machine.devices.items(), *((t.name, t) for t in transports if t.name not in machine.devices)]
    out = []
    for name, device in candidates:
        if getattr(device, "SNAPSHOT", False):
            continue
        reason = getattr(device, "snapshot_refusal", None) or getattr(getattr(device, "backend", None),
                                                                      "snapshot_refusal", None)
        out.append(f"{name} ({reason})" if reason else name)
    return out


def check_saveable(machine: "Machine", what: str = "snapshot") -> None:
    missing = unsaveable_devices(machine)
    if missing:
        raise SnapshotError(f"cannot {what} this VM: {', '.join(missing)} do not declare their whole state yet "
                            "(snapshots and migration cover the platform and pc chipset devices and virtio-blk on "
                            "virtio-mmio for now)")


def capture_state(machine: "Machine") -> dict:
    """KVM's VM and vCPU state and every device's state, of a paused machine (JSON-ready)."""
    if machine.coalesced is not None:
        machine.coalesced.drain()
    msr_indices = machine.kvm.msr_index_list()
    vcpus = [v.call(lambda v=v: save_vcpu(v.vcpu, msr_indices)) for v in machine.vcpus]
    clock = machine.vm.get_clock()
    vm_state = {"clock": clock.clock, "irqchips": [_hex(machine.vm.get_irqchip(i)) for i in IRQCHIPS],
                "pit2": machine.vm.get_pit2().hex()}
    return {"vm": vm_state, "vcpus": vcpus,
            "devices": {name: device.snapshot_state() if hasattr(device, "snapshot_state") else encode(device.state)
                        for name, device in machine.devices.items()}}


def load_machine_state(machine: "Machine", body: dict) -> None:
    """The reverse of capture_state, into a machine that has not started."""
    vm = body["vm"]
    for text in vm["irqchips"]:
        machine.vm.set_irqchip(_struct(S.kvm_irqchip, text))
    machine.vm.set_pit2(bytes.fromhex(vm["pit2"]))
    if len(body["vcpus"]) != len(machine.vcpus):
        raise SnapshotError(f"the state has {len(body['vcpus'])} vCPUs, this VM {len(machine.vcpus)}")
    for v, data in zip(machine.vcpus, body["vcpus"]):
        restore_vcpu(v.vcpu, data)
    machine.vm.set_clock(S.kvm_clock_data(clock=vm["clock"]))
    for name, state in body["devices"].items():
        device = machine.devices.get(name)
        if device is None:
            raise SnapshotError(f"the state has a device {name!r} this VM does not")
        if hasattr(device, "restore_state"):
            device.restore_state(state)
        else:
            decode(state, device.state)
    for device in machine.devices.values():
        hook = getattr(device, "restored", None)
        if hook is not None:
            hook()
    if machine.syscall_repair is not None:        # PVM: armed before the first user-mode SYSCALL, not 100 ms later
        for v in machine.vcpus:
            machine.syscall_repair.try_arm(v.vcpu)


def _private_file(path: str, mode: str):
    """A new file only its owner can read (a snapshot holds the guest's RAM), never followed through a symlink."""
    try:
        os.unlink(path)                 # a leftover of an interrupted save (or something planted there)
    except FileNotFoundError:
        pass
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), mode)


def save(machine: "Machine", directory: str) -> dict:
    """Pause the VM (if it runs), write the snapshot, resume it. Returns figures (seconds, bytes)."""
    check_saveable(machine)
    if machine.state not in ("running", "paused", "debug"):
        raise SnapshotError(f"cannot snapshot a VM that is {machine.state}")
    os.makedirs(directory, exist_ok=True)
    started = time.monotonic()
    was_running = machine.state == "running"
    if was_running:
        machine.pause()
    try:
        paused_at = time.monotonic()
        cpu_and_devices = capture_state(machine)
        layout, size = [], 0
        memory_path = os.path.join(directory, MEMORY_FILE)
        with _private_file(memory_path + ".tmp", "wb") as f:
            for name, block in ram_blocks(machine.system_memory):
                layout.append({"name": name, "size": block.size, "offset": size})
                f.write(block.view)
                size += block.size
        os.replace(memory_path + ".tmp", memory_path)
        body = {"format": FORMAT, "version": VERSION, "created": time.time(), "config": machine.config.to_dict(),
                "memory": {"file": MEMORY_FILE, "size": size, "blocks": layout}, **cpu_and_devices,
                "machine_state": "running" if was_running else "paused"}
        text = json.dumps(body, sort_keys=True)
        state_path = os.path.join(directory, STATE_FILE)
        with _private_file(state_path + ".tmp", "w") as f:
            json.dump({"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": body}, f, sort_keys=True)
        os.replace(state_path + ".tmp", state_path)
        downtime = time.monotonic() - paused_at
    finally:
        if was_running:
            machine.resume()
    return {"seconds": time.monotonic() - started, "paused_seconds": downtime, "memory_bytes": size,
            "state_bytes": os.path.getsize(state_path)}


def load_state(directory: str) -> dict:
    """The checked body of DIR/state.json."""
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path) as f:
            outer = json.load(f)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such file (not a pyhv snapshot directory?)") from None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path}: unreadable or truncated ({e})") from None
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), dict):
        raise SnapshotError(f"{path}: not a pyhv snapshot state file")
    body = outer["body"]
    if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != outer.get("sha256"):
        raise SnapshotError(f"{path}: checksum mismatch (the file is corrupted)")
    if body.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a pyhv snapshot (format {body.get('format')!r})")
    if body.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot format version {body.get('version')} (this pyhv reads {VERSION})")
    return body


def restore(machine: "Machine", directory: str, body: dict) -> None:
    """Load a snapshot into a machine built from its config that has not started yet."""
    if machine.state != "created":
        raise SnapshotError("a snapshot restores into a VM that has not started")
    check_saveable(machine, "restore into")
    memory = body["memory"]
    path = os.path.join(directory, memory["file"])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size != memory["size"]:
            raise SnapshotError(f"{path}: {os.fstat(fd).st_size} bytes, the snapshot says {memory['size']}")
        blocks = dict(ram_blocks(machine.system_memory))
        if sorted(blocks) != sorted(b["name"] for b in memory["blocks"]):
            raise SnapshotError(f"{path}: RAM blocks {sorted(b['name'] for b in memory['blocks'])} do not match "
                                f"this machine's {sorted(blocks)}")
        for entry in memory["blocks"]:
            block = blocks[entry["name"]]
            if block.size != entry["size"] or entry["offset"] % PAGE_SIZE:
                raise SnapshotError(f"{path}: block {entry['name']} is {entry['size']} bytes, here {block.size}")
            map_private(block, fd, entry["offset"])
    finally:
        os.close(fd)
    load_machine_state(machine, body)
