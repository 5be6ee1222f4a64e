"""libvirt domain XML <-> VmConfig <-> `pyhv run` options. Every XML used here is checked by libvirt's own
schema and parser first (the `domain_file` fixture), so pyhv's XML is libvirt's XML."""
from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys

import pytest

from pyhv.runtime.chardev import ChardevSpec
from pyhv.cli.commands import build_parser, config_from_args
from pyhv.config import DriveConfig, MiB, NetConfig, VmConfig
from pyhv.cli.domain_xml import config_to_domain_xml, parse_domain_xml
from pyhv.errors import ConfigError
from pyhv.cli.runargs import config_to_args


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, size in (("bios.bin", 65536), ("vmlinux", 4096), ("initrd.img", 4096), ("disk0.img", 1 << 20),
                       ("disk1.img", 1 << 20)):
        path = tmp_path / name
        path.write_bytes(b"\x90" * size)
        paths[name] = str(path)
    return paths


def full_xml(f: dict, extra_devices: str = "", extra: str = "", vcpu: str = "<vcpu placement='static'>2</vcpu>",
             name: str = "full") -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>6a1c5e0e-6d4c-4c1f-9f0e-2f2b7a4f1d11</uuid>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  {vcpu}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{f['vmlinux']}</kernel>
    <initrd>{f['initrd.img']}</initrd>
    <cmdline>console=ttyS0 root=/dev/vda rw</cmdline>
    <loader readonly='yes' type='rom'>{f['bios.bin']}</loader>
  </os>
  {extra}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' queues='2'/>
      <source file='{f['disk0.img']}'/>
      <target dev='vda' bus='virtio'/>
      <serial>disk-zero</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{f['disk1.img']}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='ethernet'>
      <mac address='52:54:00:12:34:56'/>
      <target dev='tap-pyhv0' managed='no'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    {extra_devices}
  </devices>
</domain>
"""


def expected_full(f: dict) -> VmConfig:
    return VmConfig(name="full", uuid="6a1c5e0e-6d4c-4c1f-9f0e-2f2b7a4f1d11", machine="pc", memory=256 * MiB,
                    cpus=2, firmware=f["bios.bin"], kernel=f["vmlinux"], initrd=f["initrd.img"],
                    append="console=ttyS0 root=/dev/vda rw", serial=ChardevSpec("pty"), on_reset="restart",
                    drives=[DriveConfig(f["disk0.img"], cache="none", num_queues=2, serial="disk-zero"),
                            DriveConfig(f["disk1.img"], readonly=True)],
                    nets=[NetConfig("tap-pyhv0", "52:54:00:12:34:56")], acpi=False)   # no <features><acpi/>


def args_to_config(args: list[str]) -> VmConfig:
    parsed = build_parser().parse_args(["run", *args])
    parsed.argv = ["run", *args]
    return config_from_args(parsed)


def test_every_supported_element_is_read(domain_file, files):
    dom = domain_file(full_xml(files))
    config, warnings = parse_domain_xml(dom.path.read_text(), str(dom.path))
    assert config == expected_full(files)
    assert warnings == []


def test_xml_to_config_to_args_to_config_is_the_identity(domain_file, files):
    dom = domain_file(full_xml(files))
    config, _ = parse_domain_xml(dom.path.read_text())
    assert args_to_config(config_to_args(config)) == config


def test_what_libvirt_reads_back_gives_the_same_config(domain_file, files):
    """virsh dumpxml adds libvirt's defaults (clock, on_crash, boot dev, ...): pyhv reads them to the same VM."""
    dom = domain_file(full_xml(files))
    assert parse_domain_xml(dom.libvirt_xml)[0] == parse_domain_xml(dom.path.read_text())[0]


def test_config_to_xml_is_libvirt_xml_and_reads_back_equal(domain_file, files):
    config = expected_full(files)
    config.memory_backend = "memfd"
    config.cpu_model = "host"
    text = config_to_domain_xml(config)
    dom = domain_file(text, "generated.xml")
    again, warnings = parse_domain_xml(dom.path.read_text())
    assert again == config and warnings == []
    assert parse_domain_xml(dom.libvirt_xml)[0] == config


def test_json_config_and_flags_and_xml_give_the_same_config(domain_file, files, tmp_path):
    from pyhv.cli.runargs import load_json_config
    dom = domain_file(full_xml(files))
    from_xml, _ = parse_domain_xml(dom.path.read_text())
    json_path = tmp_path / "vm.json"
    json_path.write_text(json.dumps(from_xml.to_dict()))
    assert load_json_config(str(json_path)).validate() == from_xml
    assert args_to_config(["--config", str(json_path)]) == from_xml
    assert args_to_config(["--domain", str(dom.path)]) == from_xml


def test_options_given_with_domain_override_the_file(domain_file, files):
    dom = domain_file(full_xml(files))
    config = args_to_config(["--domain", str(dom.path), "--serial", "none", "--cpus", "1",
                             "--drive", f"file={files['disk1.img']}"])
    assert config.serial == ChardevSpec("none") and config.cpus == 1
    assert [d.file for d in config.drives] == [files["disk0.img"], files["disk1.img"], files["disk1.img"]]
    assert config.memory == 256 * MiB            # not given: the file's value stays


def test_features_acpi_turns_acpi_on_as_in_libvirt(domain_file, files):
    """libvirt: ACPI only with <features><acpi/>; pyhv writes it back, and `pyhv run --acpi` follows."""
    dom = domain_file(full_xml(files, extra="<features><acpi/><apic/></features>"))
    config, warnings = parse_domain_xml(dom.path.read_text(), "vm.xml")
    assert warnings == [] and config.acpi is True
    again, _ = parse_domain_xml(config_to_domain_xml(config), "again.xml")
    assert again.acpi is True
    config.acpi = False
    assert "<acpi/>" not in config_to_domain_xml(config)
    assert args_to_config(["--domain", str(dom.path), "--acpi", "off"]).acpi is False


UNSUPPORTED = [
    ("<features><hap/><apic/></features>", "/domain/features/hap"),
    ("<clock offset='localtime'/>", "/domain/clock"),
    ("<on_crash>destroy</on_crash><pm><suspend-to-mem enabled='no'/></pm>", "/domain/pm"),
    ("<cputune><shares>1024</shares></cputune>", "/domain/cputune"),
]
UNSUPPORTED_DEVICES = [
    ("<graphics type='vnc' port='-1'/>", "/domain/devices/graphics"),
    ("<input type='tablet' bus='usb'/>", "/domain/devices/input"),
    ("<memballoon model='virtio'/>", "/domain/devices/memballoon"),
    ("<video><model type='vga'/></video>", "/domain/devices/video"),
    ("<emulator>/usr/bin/qemu-system-x86_64</emulator>", "/domain/devices/emulator"),
    ("<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>", "/domain/devices/rng"),
    ("<serial type='pty'><target port='1'/></serial>", "/domain/devices/serial[2]"),
    ("<console type='pty'><target type='virtio' port='1'/></console>", "/domain/devices/console[2]"),
]


@pytest.mark.parametrize("extra,path", UNSUPPORTED)
def test_each_unsupported_element_is_warned(domain_file, files, extra, path):
    dom = domain_file(full_xml(files, extra=extra))
    config, warnings = parse_domain_xml(dom.path.read_text(), "vm.xml")
    assert config == expected_full(files)
    assert len(warnings) == 1 and warnings[0].startswith("vm.xml: unsupported elements ignored: ")
    assert path in warnings[0]


@pytest.mark.parametrize("extra,path", UNSUPPORTED_DEVICES)
def test_each_unsupported_device_is_warned(domain_file, files, extra, path):
    dom = domain_file(full_xml(files, extra_devices=extra))
    config, warnings = parse_domain_xml(dom.path.read_text(), "vm.xml")
    assert config == expected_full(files)
    assert len(warnings) == 1 and path in warnings[0]


def test_unsupported_attributes_and_elements_are_listed_in_one_warning(domain_file, files):
    dom = domain_file(full_xml(files, vcpu="<vcpu placement='static' cpuset='0-1'>2</vcpu>",
                               extra_devices="<graphics type='vnc' port='-1'/><memballoon model='none'/>"))
    _, warnings = parse_domain_xml(dom.path.read_text(), "vm.xml")
    assert len(warnings) == 1
    for path in ("/domain/vcpu/@cpuset='0-1'", "/domain/devices/graphics", "/domain/devices/memballoon"):
        assert path in warnings[0]


def test_current_memory_below_memory_is_a_warning(domain_file, files):
    text = full_xml(files).replace("<currentMemory unit='KiB'>262144</currentMemory>",
                                   "<currentMemory unit='MiB'>128</currentMemory>")
    _, warnings = parse_domain_xml(domain_file(text).path.read_text())
    assert any("no memory balloon" in w for w in warnings)


@pytest.mark.parametrize("changes,message", [
    ([("<target dev='vdb' bus='virtio'/>", "<target dev='sdb' bus='sata'/>")],
     "/domain/devices/disk[2]/target/@bus: 'sata' is not supported"),
    ([("type='raw' cache='none'", "type='qcow2' cache='none'")], "/domain/devices/disk[1]/driver/@type: 'qcow2'"),
    ([("machine='pc'", "machine='q35'")], "/domain/os/type/@machine: machine 'q35' is not supported"),
    ([("<interface type='ethernet'>", "<interface type='bridge'>"),
      ("<target dev='tap-pyhv0' managed='no'/>", "<source bridge='br0'/>")],
     "/domain/devices/interface/@type: 'bridge' is not supported"),
    ([("<interface type='ethernet'>", "<interface type='ethernet'>"),
      ("<target dev='tap-pyhv0' managed='no'/>", "")], "/domain/devices/interface: <target dev='TAP'/> is missing"),
    ([("<on_poweroff>destroy</on_poweroff>", "<on_poweroff>restart</on_poweroff>")],
     "/domain/on_poweroff: 'restart' is not supported"),
    ([("<serial type='pty'>", "<serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/>")],
     "/domain/devices/serial/@type: serial type 'tcp'"),
    ([("<mac address='52:54:00:12:34:56'/>", "<mac address='52:54:00:12:34:56'/><model type='rtl8139'/>"),
      ("<model type='virtio'/>", "")], "/domain/devices/interface/model/@type: 'rtl8139' is not supported"),
    ([("<console type='pty'>", "<console type='stdio'>")], "/domain/devices/console: the console (stdio) differs"),
    ([("<target dev='vdb' bus='virtio'/>", "<target dev='hdb' bus='virtio'/>")],
     "/domain/devices/disk[2]/target/@dev: 'hdb' is not a virtio disk name"),
    ([("<disk type='file' device='disk'>", "<disk type='block' device='disk'>"),
      ("<source file=", "<source dev=")], "/domain/devices/disk[1]/@type: 'block' is not supported"),
])
def test_values_pyhv_cannot_honour_name_the_element(domain_file, files, changes, message):
    text = full_xml(files)
    for old, new in changes:
        assert old in text
        text = text.replace(old, new, 1)
    dom = domain_file(text)
    with pytest.raises(ConfigError) as e:
        parse_domain_xml(dom.path.read_text(), "vm.xml")
    assert message in str(e.value)
    assert str(e.value).startswith("vm.xml: ")


@pytest.mark.parametrize("old,new,message", [
    ("<memory unit='MiB'>256</memory>", "<memory unit='MiB'>lots</memory>", "/domain/memory: 'lots' is not a number"),
    ("<memory unit='MiB'>256</memory>", "<memory unit='parsecs'>256</memory>", "/domain/memory/@unit: unknown unit"),
    ("<currentMemory unit='KiB'>262144</currentMemory>", "<currentMemory unit='GiB'>1</currentMemory>",
     "/domain/currentMemory: is larger than <memory>"),
    ("<mac address='52:54:00:12:34:56'/>", "<mac address='53:54:00:12:34:56'/>", "multicast"),
])
def test_invalid_values_name_the_element(files, old, new, message):
    """Values libvirt rejects as well (so these files are deliberately not libvirt XML)."""
    text = full_xml(files)
    assert old in text
    with pytest.raises(ConfigError) as e:
        parse_domain_xml(text.replace(old, new, 1), "vm.xml")
    assert message in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("<domain type='kvm'><name>x</name>", "not well-formed XML: line 1, column"),
    ("<domain type='kvm'><name>x</nam></domain>", "mismatched tag"),
    ("<vm/>", "the root element is <vm>, not <domain>"),
    ("<domain type='kvm'><memory>1024</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
     "/domain: <name> is missing"),
    ("<domain type='kvm'><name>x</name><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
     "/domain: <memory> is missing"),
    ("<domain type='kvm'><name>x</name><name>y</name></domain>", "/domain/name[2]: <name> is given more than once"),
    ("<domain type='xen'><name>x</name></domain>", "/domain/@type: 'xen' is not supported"),
])
def test_bad_xml_is_a_clear_error(text, message):
    with pytest.raises(ConfigError) as e:
        parse_domain_xml(text, "vm.xml")
    assert message in str(e.value)


def test_values_checked_by_vmconfig_name_the_file(domain_file, files):
    text = full_xml(files).replace("<vcpu placement='static'>2</vcpu>", "<vcpu placement='static'>500</vcpu>")
    with pytest.raises(ConfigError, match=r"^vm.xml: --cpus 500"):
        parse_domain_xml(domain_file(text).path.read_text(), "vm.xml")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyhv.cli", *args], capture_output=True, text=True, timeout=60)


def test_domxml_to_args_prints_an_equivalent_command_line(domain_file, files):
    dom = domain_file(full_xml(files, extra_devices="<graphics type='vnc' port='-1'/>"))
    proc = run_cli("domxml-to-args", str(dom.path))
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[:2] == ["pyhv", "run"]
    assert args_to_config(words[2:]) == parse_domain_xml(dom.path.read_text())[0]
    warning_lines = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warning_lines) == 1 and "/domain/devices/graphics" in warning_lines[0]


def test_cli_reports_a_bad_domain_in_one_line(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='kvm'><name>x</name><memory>oops</memory></domain>")
    for argv in (["domxml-to-args", str(bad)], ["run", "--domain", str(bad)], ["define", str(bad),
                                                                                "--state-dir", str(tmp_path)]):
        proc = run_cli(*argv)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0
        assert "/domain/memory: 'oops' is not a number" in proc.stderr


@pytest.mark.parametrize("text,message", [
    ("file=/nonexistent.img", "no such file"),
    ("readonly=on", "no file"),
    ("file=x,speed=9", "unknown option 'speed'"),
])
def test_bad_drive_option(text, message):
    with pytest.raises(ConfigError, match=message):
        DriveConfig.parse(text).validate()


def test_drive_and_nic_options_round_trip(files):
    drive = DriveConfig(files["disk0.img"], readonly=True, cache="none", serial="abc", num_queues=4)
    assert DriveConfig.parse(drive.to_arg()) == drive
    nic = NetConfig("tap7", "52:54:00:00:00:07")
    assert NetConfig.parse(nic.to_arg()) == nic
    with pytest.raises(ConfigError, match="only tap"):
        NetConfig.parse("user,ifname=x")


def test_pyhv_only_options_round_trip_through_args(files):
    """Options libvirt has no words for still survive config -> args -> config."""
    config = VmConfig(name="knobs", firmware=files["bios.bin"], cpu_model="nested-safe", boot_entry="pvh",
                      pvm_workarounds=False, emulation_fallbacks=False, pvm_syscall_fix="off", log_post=True,
                      accounting=False, devices=["testdev"], debugcon=ChardevSpec("file", "/tmp/debugcon.log"),
                      memory_backend="memfd", on_reset="restart").validate()
    assert args_to_config(config_to_args(config)) == config


def test_e1000_model_round_trips_through_domain_xml_and_the_command_line(domain_file, files):
    """<model type='e1000'/> is `--nic tap,ifname=TAP,model=e1000`; it means the e1000 device type on pc and is
    refused on microvm (no PCI bus)."""
    xml = full_xml(files).replace("<model type='virtio'/>", "<model type='e1000'/>")
    config, _ = parse_domain_xml(domain_file(xml).path.read_text(), "vm.xml")
    assert config.nets[0].model == "e1000"
    assert args_to_config(config_to_args(config)).nets == config.nets
    assert '<model type="e1000"/>' in config_to_domain_xml(config)          # (quoteattr's quotes)
    assert [s.type.name for s in config.device_specs()] == ["virtio-blk", "virtio-blk", "e1000"]
    config.machine = "microvm"
    with pytest.raises(ConfigError, match="model=e1000 needs --machine pc"):
        config.device_specs()


def test_e1000_option_rom_from_xml_command_line_and_device(domain_file, files, tmp_path):
    """<rom file=/> in an e1000 interface is `romfile=` on --nic and --device; a missing file, an empty one or a
    virtio-net with a ROM are clear errors."""
    rom = tmp_path / "efi-e1000.rom"
    rom.write_bytes(b"\x55\xaa" + bytes(3000))
    xml = full_xml(files).replace("<model type='virtio'/>", f"<model type='e1000'/><rom file='{rom}'/>")
    config, _ = parse_domain_xml(domain_file(xml).path.read_text(), "vm.xml")
    assert config.nets[0].romfile == str(rom)
    assert args_to_config(config_to_args(config)).nets == config.nets
    assert f'<rom file="{rom}"/>' in config_to_domain_xml(config)
    assert NetConfig.parse(f"tap,ifname=t0,model=e1000,romfile={rom}").romfile == str(rom)
    assert NetConfig.from_device_arg("e1000", f"ifname=t0,romfile={rom}", "").romfile == str(rom)
    with pytest.raises(ConfigError, match="unknown option"):
        NetConfig.from_device_arg("virtio-net", f"ifname=t0,romfile={rom}", "")
    with pytest.raises(ConfigError, match="romfile= needs model=e1000"):
        NetConfig("t0", romfile=str(rom)).validate()
    with pytest.raises(ConfigError, match="No such file"):
        NetConfig("t0", model="e1000", romfile=str(tmp_path / "missing.rom")).validate()
    (tmp_path / "empty.rom").write_bytes(b"")
    with pytest.raises(ConfigError, match="is 0 bytes"):
        NetConfig("t0", model="e1000", romfile=str(tmp_path / "empty.rom")).validate()


def test_iommu_round_trips_and_is_refused_where_it_cannot_work(domain_file, files, tmp_path):
    """<iommu model='intel'/> (libvirt's element) is `--iommu intel`: pc only, with ACPI (the DMAR table), and not
    in front of a vhost-user device (its back end would need the IOTLB protocol)."""
    xml = full_xml(files, extra_devices="<iommu model='intel'/>", extra="<features><acpi/></features>")
    config, warnings = parse_domain_xml(domain_file(xml).path.read_text(), "vm.xml")
    assert config.iommu == "intel" and not any("iommu" in w for w in warnings)
    assert args_to_config(config_to_args(config)).iommu == "intel"
    assert '<iommu model="intel"/>' in config_to_domain_xml(config)
    with pytest.raises(ConfigError, match="not supported"):
        parse_domain_xml(xml.replace("model='intel'", "model='smmuv3'"), "vm.xml")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "be.sock"))
    for change, message in ((dict(machine="microvm"), "needs --machine pc"), (dict(acpi=False), "needs --acpi on"),
                            (dict(devices=[f"vhost-user-rng,socket={tmp_path / 'be.sock'}"], memory_backend="memfd"),
                             "cannot sit behind --iommu")):
        bad = VmConfig(**{"machine": "pc", "iommu": "intel", **change})
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    listener.close()


BOMB = ('<?xml version="1.0"?>\n<!DOCTYPE domain [\n <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">\n'
        + "".join(f' <!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">\n' for i in range(9))
        + ']>\n<domain type="kvm"><name>&j;</name></domain>')
EXTERNAL = ('<?xml version="1.0"?>\n<!DOCTYPE domain [ <!ENTITY secret SYSTEM "file:///etc/passwd"> ]>\n'
            '<domain type="kvm"><name>&secret;</name><memory>128</memory></domain>')


@pytest.mark.parametrize("text", [BOMB, EXTERNAL, '<!DOCTYPE domain SYSTEM "http://example.com/d.dtd"><domain/>'],
                         ids=["entity-bomb", "external-entity", "external-dtd"])
def test_dtds_entity_bombs_and_external_entities_are_refused(text):
    with pytest.raises(ConfigError) as caught:       # at the declaration: before 10^9 characters are expanded
        parse_domain_xml(text, "dom.xml")
    assert str(caught.value).startswith("dom.xml: a DOCTYPE (DTD) at line"), caught.value
    assert "root:" not in str(caught.value)                     # nothing of /etc/passwd came in
