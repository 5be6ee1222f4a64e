"""libvirt domain XML -> `VmConfig` (`pyhv run --domain vm.xml`, `pyhv define vm.xml`), and back.

pyhv reads the part of libvirt's format that it can honour:

    <domain type='kvm'>             name, uuid, title, description, metadata
      <memory unit='MiB'>256</memory> <currentMemory>      (units as libvirt: b, KB, k/KiB, MB, M/MiB, ... G, T)
      <vcpu>2</vcpu>
      <os> <type arch='x86_64' machine='pc|microvm'>hvm</type> <loader type='rom'>  <kernel> <initrd>
           <cmdline> <boot dev='hd'/> </os>
      <memoryBacking> <source type='memfd'/> <access mode='shared'/> </memoryBacking>
      <cpu mode='host-passthrough|host-model'/>   <features> <acpi/> <apic/> <pae/> </features>   <clock offset='utc'/>
      <on_poweroff>destroy</on_poweroff> <on_reboot>restart|destroy</on_reboot> <on_crash>destroy</on_crash>
      <devices>
        <disk type='file' device='disk'> <driver name='qemu' type='raw' cache= queues=/> <source file=/>
              <target dev='vdX' bus='virtio'/> <readonly/> <serial>
        <interface type='ethernet'> <target dev='TAP'/> <mac address=/> <model type='virtio|e1000'/> <rom file=/>
        <serial|console type='pty|file|stdio|unix|null'> <source path=/> <target port='0'/>
        <iommu model='intel'/>

Everything else is collected while parsing (each element or attribute that no rule read) and reported in one
warning, never silently dropped. Values pyhv cannot honour (a qcow2 disk, a SATA bus, a q35 machine) are errors
that name the element path, like invalid values and malformed XML.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

from pyhv.runtime.chardev import ChardevSpec
from pyhv.config import DriveConfig, KiB, NetConfig, VmConfig
from pyhv.errors import ConfigError

UNITS = {"b": 1, "bytes": 1, "KB": 1000, "k": KiB, "KiB": KiB, "MB": 1000 ** 2, "M": KiB ** 2, "MiB": KiB ** 2,
         "GB": 1000 ** 3, "G": KiB ** 3, "GiB": KiB ** 3, "TB": 1000 ** 4, "T": KiB ** 4, "TiB": KiB ** 4}
SERIAL_TYPES = {"pty": "pty", "file": "file", "stdio": "stdio", "unix": "socket", "null": "none"}
_DISK_DEV_RE = re.compile(r"^vd[a-z]+$")


class _Reader:
    """Walks a domain tree, remembering which elements and attributes a rule consumed."""

    def __init__(self, root: ET.Element, source: str) -> None:
        self.root = root
        self.source = source
        self.parents = {child: parent for parent in root.iter() for child in parent}
        self.used: set[int] = {id(root)}
        self.used_attrs: set[tuple[int, str]] = set()

    def path(self, elem: ET.Element, attr: str | None = None) -> str:
        parts = []
        node: ET.Element | None = elem
        while node is not None:
            parent = self.parents.get(node)
            if parent is None:
                parts.append(node.tag)
            else:
                same = [c for c in parent if c.tag == node.tag]
                parts.append(node.tag if len(same) == 1 else f"{node.tag}[{same.index(node) + 1}]")
            node = parent
        text = "/" + "/".join(reversed(parts))
        return f"{text}/@{attr}" if attr else text

    def error(self, elem: ET.Element, message: str, attr: str | None = None, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path(elem, attr)}: {message}", hint)

    def children(self, elem: ET.Element, tag: str) -> list[ET.Element]:
        found = [c for c in elem if c.tag == tag]
        self.used.update(id(c) for c in found)
        return found

    def child(self, elem: ET.Element, tag: str, required: bool = False) -> ET.Element | None:
        found = self.children(elem, tag)
        if len(found) > 1:
            raise self.error(found[1], f"<{tag}> is given more than once")
        if not found:
            if required:
                raise self.error(elem, f"<{tag}> is missing")
            return None
        return found[0]

    def attr(self, elem: ET.Element, name: str, default: str | None = None, allowed: tuple[str, ...] = (),
             required: bool = False) -> str | None:
        value = elem.get(name)
        if value is None:
            if required:
                raise self.error(elem, f"attribute {name!r} is missing")
            return default
        self.used_attrs.add((id(elem), name))
        if allowed and value not in allowed:
            raise self.error(elem, f"{value!r} is not supported by pyhv", name,
                             f"use {' or '.join(repr(a) for a in allowed)}")
        return value

    def text(self, elem: ET.Element, required: bool = True) -> str:
        value = (elem.text or "").strip()
        if required and not value:
            raise self.error(elem, "is empty")
        return value

    def child_text(self, elem: ET.Element, tag: str) -> str | None:
        node = self.child(elem, tag)
        return None if node is None else self.text(node)

    def unused(self) -> list[str]:
        out: list[str] = []

        def walk(elem: ET.Element) -> None:
            if id(elem) not in self.used:
                out.append(self.path(elem))
                return
            for name, value in elem.attrib.items():
                if (id(elem), name) not in self.used_attrs:
                    out.append(f"{self.path(elem, name)}={value!r}")
            for c in elem:
                walk(c)
        walk(self.root)
        return out


def parse_domain_xml(text: str | bytes, source: str = "domain XML") -> tuple[VmConfig, list[str]]:
    """Returns the validated config and the warnings (at most one about unsupported elements, plus any about
    values pyhv adjusts). Raises `ConfigError` naming the element path for anything invalid."""
    _refuse_dtd(text, source)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        line, column = e.position
        raise ConfigError(f"{source}: not well-formed XML: line {line}, column {column + 1}: "
                          f"{str(e).split(':')[0]}") from None
    if root.tag != "domain":
        raise ConfigError(f"{source}: the root element is <{root.tag}>, not <domain>")
    r = _Reader(root, source)
    config = VmConfig(serial=ChardevSpec("none"), on_reset="restart")     # libvirt's defaults
    warnings: list[str] = []

    r.attr(root, "type", allowed=("kvm",), required=True)
    r.attr(root, "id")
    for tag in ("title", "description", "metadata"):       # descriptive only: nothing to run
        for node in r.children(root, tag):
            r.used.update(id(n) for n in node.iter())
            r.used_attrs.update((id(n), a) for n in node.iter() for a in n.attrib)
    config.name = r.child_text(root, "name") or _missing(r, root, "name")
    if "/" in config.name:
        raise r.error(r.child(root, "name"), f"name {config.name!r} contains '/'")
    uuid = r.child_text(root, "uuid")
    if uuid is not None:
        config.uuid = uuid
    _memory(r, root, config, warnings)
    vcpu = r.child(root, "vcpu", required=True)
    r.attr(vcpu, "placement", allowed=("static",))
    config.cpus = _int(r, vcpu, r.text(vcpu))
    _os(r, root, config)
    _features(r, root, config)
    lifecycle = {"on_poweroff": ("destroy",), "on_reboot": ("restart", "destroy"), "on_crash": ("destroy",)}
    for tag, allowed in lifecycle.items():
        node = r.child(root, tag)
        if node is None:
            continue
        value = r.text(node)
        if value not in allowed:
            raise r.error(node, f"{value!r} is not supported by pyhv", hint=f"use {' or '.join(allowed)}")
        if tag == "on_reboot":
            config.on_reset = "restart" if value == "restart" else "exit"
    devices = r.child(root, "devices")
    if devices is not None:
        _devices(r, devices, config)
    unused = r.unused()
    if unused:
        warnings.insert(0, f"{source}: unsupported elements ignored: {', '.join(unused)}")
    try:
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e.message}", e.hint) from None
    return config, warnings


class _DtdFound(Exception):
    pass


def _refuse_dtd(text: str | bytes, source: str) -> None:
    """Refuse a document type declaration before anything is expanded: libvirt's domain XML never needs one, and
    it is what entity expansion bombs and external entities (a file or URL read into the config) rely on."""
    probe = expat.ParserCreate()

    def found(*_args) -> None:
        raise _DtdFound()
    probe.StartDoctypeDeclHandler = found
    probe.EntityDeclHandler = found
    probe.ExternalEntityRefHandler = found
    try:
        probe.Parse(text, True)
    except _DtdFound:
        raise ConfigError(f"{source}: a DOCTYPE (DTD) at line {probe.CurrentLineNumber} is not allowed in domain "
                          "XML", "entities and external references are refused; remove the <!DOCTYPE ...>") from None
    except expat.ExpatError:
        pass                        # not well-formed: ElementTree says where, below


def load_domain_xml(path: str) -> tuple[VmConfig, list[str]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return parse_domain_xml(data, path)


def _missing(r: _Reader, elem: ET.Element, tag: str) -> str:
    raise r.error(elem, f"<{tag}> is missing")


def _int(r: _Reader, elem: ET.Element, text: str, attr: str | None = None) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise r.error(elem, f"{text!r} is not a number", attr) from None


def _size(r: _Reader, elem: ET.Element) -> int:
    unit = r.attr(elem, "unit", "KiB")
    if unit not in UNITS:
        raise r.error(elem, f"unknown unit {unit!r}", "unit", "use b, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)")
    return _int(r, elem, r.text(elem)) * UNITS[unit]


def _memory(r: _Reader, root: ET.Element, config: VmConfig, warnings: list[str]) -> None:
    memory = r.child(root, "memory", required=True)
    r.attr(memory, "dumpCore", allowed=("on", "off"))
    config.memory = _size(r, memory)
    current = r.child(root, "currentMemory")
    if current is not None:
        current_size = _size(r, current)
        if current_size > config.memory:
            raise r.error(current, "is larger than <memory>")
        if current_size < config.memory:
            warnings.append(f"{r.source}: pyhv has no memory balloon: the guest gets all of <memory> "
                            f"({config.memory >> 20} MiB), not <currentMemory>")
    backing = r.child(root, "memoryBacking")
    if backing is not None:
        source = r.child(backing, "source")
        access = r.child(backing, "access")
        memfd = source is not None and r.attr(source, "type", allowed=("memfd", "anonymous")) == "memfd"
        shared = access is not None and r.attr(access, "mode", allowed=("shared", "private")) == "shared"
        if memfd != shared:
            raise r.error(backing, "pyhv shares memory exactly when it is memfd-backed",
                          hint="give <source type='memfd'/> and <access mode='shared'/> together")
        config.memory_backend = "memfd" if memfd else "anon"


def _os(r: _Reader, root: ET.Element, config: VmConfig) -> None:
    os_node = r.child(root, "os", required=True)
    os_type = r.child(os_node, "type", required=True)
    if r.text(os_type) != "hvm":
        raise r.error(os_type, f"{r.text(os_type)!r} is not supported by pyhv", hint="use hvm")
    r.attr(os_type, "arch", allowed=("x86_64",))
    machine = r.attr(os_type, "machine")
    if machine is not None:
        if machine == "microvm":
            config.machine = "microvm"
        elif machine == "pc" or machine.startswith("pc-i440fx"):
            config.machine = "pc"
        else:
            raise r.error(os_type, f"machine {machine!r} is not supported by pyhv", "machine",
                          "use pc (an i440FX PC) or microvm")
    loader = r.child(os_node, "loader")
    if loader is not None:
        r.attr(loader, "type", allowed=("rom",))
        r.attr(loader, "readonly", allowed=("yes",))
        config.firmware = r.text(loader)
    config.kernel = r.child_text(os_node, "kernel")
    config.initrd = r.child_text(os_node, "initrd")
    cmdline = r.child(os_node, "cmdline")
    if cmdline is not None:
        config.append = r.text(cmdline, required=False)
    boots = [b for b in os_node if b.tag == "boot"]
    if len(boots) == 1 and boots[0].get("dev") == "hd":   # libvirt's default; SeaBIOS boots the disk anyway
        r.children(os_node, "boot")
        r.attr(boots[0], "dev")


def _features(r: _Reader, root: ET.Element, config: VmConfig) -> None:
    cpu = r.child(root, "cpu")
    if cpu is not None:                           # host-passthrough: the host's CPUID as KVM offers it;
        mode = r.attr(cpu, "mode", allowed=("host-passthrough", "host-model"))   # host-model: pyhv's choice
        r.attr(cpu, "check", allowed=("none", "partial"))
        r.attr(cpu, "migratable")
        config.cpu_model = "host" if mode == "host-passthrough" else "auto"
    features = r.child(root, "features")
    config.acpi = features is not None and bool(r.children(features, "acpi"))   # libvirt: no <acpi/>, no ACPI
    if features is not None:
        for tag in ("apic", "pae"):               # always there on a pyhv machine
            r.children(features, tag)
    clocks = [c for c in root if c.tag == "clock"]
    if len(clocks) == 1 and len(clocks[0]) == 0 and clocks[0].attrib == {"offset": "utc"}:
        r.children(root, "clock")                 # the RTC runs on the host's UTC time; other clocks: warned
        r.attr(clocks[0], "offset")


def _devices(r: _Reader, devices: ET.Element, config: VmConfig) -> None:
    for disk in r.children(devices, "disk"):
        config.drives.append(_disk(r, disk))
    for iface in r.children(devices, "interface"):
        config.nets.append(_interface(r, iface))
    iommus = r.children(devices, "iommu")
    if len(iommus) > 1:
        raise r.error(iommus[1], "a second IOMMU: pyhv has one remapping unit for all devices")
    if iommus:
        config.iommu = r.attr(iommus[0], "model", allowed=("intel",), required=True)
    serials = r.children(devices, "serial")
    if len(serials) > 1:
        r.used.difference_update(id(s) for s in serials[1:])   # one UART: the others are reported
    if serials:
        config.serial = _chardev(r, serials[0], "serial")
    for console in r.children(devices, "console"):
        target = r.child(console, "target")
        kind = r.attr(target, "type", "serial") if target is not None else "serial"
        if kind != "serial":
            r.used.discard(id(console))           # a virtio console: not a device pyhv has
            continue
        spec = _chardev(r, console, "console")
        if not serials:
            config.serial = spec
            serials = [console]
        elif spec != config.serial:
            raise r.error(console, f"the console ({spec}) differs from serial port 0 ({config.serial}), "
                                   "which it stands for")


def _disk(r: _Reader, disk: ET.Element) -> DriveConfig:
    r.attr(disk, "type", allowed=("file",), required=True)
    r.attr(disk, "device", allowed=("disk",))
    source = r.child(disk, "source", required=True)
    drive = DriveConfig(r.attr(source, "file", required=True))
    driver = r.child(disk, "driver")
    if driver is not None:
        r.attr(driver, "name", allowed=("qemu",))
        drive.format = r.attr(driver, "type", "raw", allowed=("raw",))
        drive.cache = r.attr(driver, "cache", drive.cache, allowed=("writeback", "none"))
        queues = r.attr(driver, "queues")
        if queues is not None:
            drive.num_queues = _int(r, driver, queues, "queues")
    target = r.child(disk, "target", required=True)
    r.attr(target, "bus", "virtio", allowed=("virtio",))
    dev = r.attr(target, "dev", required=True)
    if not _DISK_DEV_RE.match(dev):
        raise r.error(target, f"{dev!r} is not a virtio disk name", "dev", "use vda, vdb, ...")
    drive.readonly = r.child(disk, "readonly") is not None
    drive.serial = r.child_text(disk, "serial")
    return drive


def _interface(r: _Reader, iface: ET.Element) -> NetConfig:
    r.attr(iface, "type", allowed=("ethernet",), required=True)
    target = r.child(iface, "target")
    if target is None:
        raise r.error(iface, "<target dev='TAP'/> is missing",
                      hint="pyhv attaches to an existing tap device: name it in <target dev=.../>")
    net = NetConfig(r.attr(target, "dev", required=True))
    r.attr(target, "managed", allowed=("no",))
    mac = r.child(iface, "mac")
    if mac is not None:
        net.mac = r.attr(mac, "address", required=True)
    model = r.child(iface, "model")
    if model is not None:
        net.model = r.attr(model, "type", required=True, allowed=("virtio", "e1000"))
    rom = r.child(iface, "rom")
    if rom is not None:
        net.romfile = r.attr(rom, "file", required=True)
    return net


def _chardev(r: _Reader, node: ET.Element, what: str) -> ChardevSpec:
    kind = r.attr(node, "type", required=True)
    if kind not in SERIAL_TYPES:
        raise r.error(node, f"{what} type {kind!r} is not supported by pyhv", "type",
                      f"use {', '.join(SERIAL_TYPES)}")
    target = r.child(node, "target")
    if target is not None:
        r.attr(target, "port", "0", allowed=("0",))
        if what == "serial":
            r.attr(target, "type", allowed=("isa-serial",))
            model = r.child(target, "model")
            if model is not None:
                r.attr(model, "name", allowed=("isa-serial",))
    path = None
    if kind in ("file", "unix"):
        source = r.child(node, "source", required=True)
        path = r.attr(source, "path", required=True)
        if kind == "unix":
            r.attr(source, "mode", "bind", allowed=("bind",))
    elif kind == "pty":
        source = r.child(node, "source")        # libvirt fills in the pty it allocated: informational
        if source is not None:
            r.attr(source, "path")
    return ChardevSpec(SERIAL_TYPES[kind], path)


# --- VmConfig -> domain XML ------------------------------------------------------------------------------------
def config_to_domain_xml(config: VmConfig) -> str:
    """The domain XML of `config`. libvirt has no words for pyhv's debugcon, testdev, accounting, nested-safe
    CPU model, PVM work-around, sandbox or drive locking switches: those stay at their defaults when the XML is
    read back."""
    def el(tag: str, text: str, **attrs: str) -> str:
        a = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
        return f"<{tag}{a}>{escape(text)}</{tag}>"

    lines = ["<domain type='kvm'>", f"  {el('name', config.name)}"]
    if config.uuid:
        lines.append(f"  {el('uuid', config.uuid)}")
    lines += [f"  {el('memory', str(config.memory // KiB), unit='KiB')}", f"  {el('vcpu', str(config.cpus))}"]
    if config.memory_backend == "memfd":
        lines += ["  <memoryBacking>", "    <source type='memfd'/>", "    <access mode='shared'/>",
                  "  </memoryBacking>"]
    if config.cpu_model == "host":
        lines.append("  <cpu mode='host-passthrough'/>")
    lines += ["  <os>", f"    {el('type', 'hvm', arch='x86_64', machine=config.machine)}"]
    if config.firmware:
        lines.append(f"    {el('loader', config.firmware, readonly='yes', type='rom')}")
    for tag, value in (("kernel", config.kernel), ("initrd", config.initrd), ("cmdline", config.append)):
        if value:
            lines.append(f"    {el(tag, value)}")
    lines.append("  </os>")
    if config.acpi:
        lines += ["  <features>", "    <acpi/>", "  </features>"]
    lines += ["  <on_poweroff>destroy</on_poweroff>",
              f"  <on_reboot>{'restart' if config.on_reset == 'restart' else 'destroy'}</on_reboot>",
              "  <devices>"]
    for i, drive in enumerate(config.drives):
        driver = {"name": "qemu", "type": drive.format, "cache": drive.cache}
        if drive.num_queues != 1:
            driver["queues"] = str(drive.num_queues)
        lines += ["    <disk type='file' device='disk'>",
                  "      <driver" + "".join(f" {k}={quoteattr(v)}" for k, v in driver.items()) + "/>",
                  f"      <source file={quoteattr(drive.file)}/>",
                  f"      <target dev={quoteattr(_disk_name(i))} bus='virtio'/>"]
        if drive.readonly:
            lines.append("      <readonly/>")
        if drive.serial is not None:
            lines.append(f"      {el('serial', drive.serial)}")
        lines.append("    </disk>")
    for net in config.nets:
        lines.append("    <interface type='ethernet'>")
        if net.mac:
            lines.append(f"      <mac address={quoteattr(net.mac)}/>")
        lines += [f"      <target dev={quoteattr(net.tap)} managed='no'/>",
                  f"      <model type={quoteattr(net.model)}/>"]
        if net.romfile:
            lines.append(f"      <rom file={quoteattr(net.romfile)}/>")
        lines.append("    </interface>")
    kinds = {v: k for k, v in SERIAL_TYPES.items()}
    if config.serial.kind != "none":
        kind = kinds[config.serial.kind]
        lines.append(f"    <serial type='{kind}'>")
        if config.serial.path:
            mode = " mode='bind'" if kind == "unix" else ""
            lines.append(f"      <source{mode} path={quoteattr(config.serial.path)}/>")
        lines += ["      <target port='0'/>", "    </serial>"]
    if config.iommu:
        lines.append(f"    <iommu model={quoteattr(config.iommu)}/>")
    lines += ["  </devices>", "</domain>", ""]
    return "\n".join(lines)


def _disk_name(index: int) -> str:
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("a") + rem) + name
    return "vd" + name

