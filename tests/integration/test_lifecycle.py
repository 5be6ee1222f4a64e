"""virsh-like lifecycle commands end to end: real `pyhv` processes in the background running the project's
test guests, state kept in files under a per-test --state-dir."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kvm


def domain_xml(name: str, firmware: str) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82e</uuid>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <loader readonly='yes' type='rom'>{firmware}</loader>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='pty'>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"""


@pytest.fixture
def virsh(tmp_path):
    state = tmp_path / "s"

    def run(*args: str, input: bytes = b"", check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "pyhv.cli", *args, "--state-dir", str(state)], input=input,
                              capture_output=True, timeout=120)
        if check:
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc
    run.state = state
    yield run
    for dom in state.glob("*/pid"):                # never leave a VM behind
        run("destroy", dom.parent.name, check=False)


def states(virsh, *flags: str) -> dict[str, tuple[str, str]]:
    out = virsh("list", *flags).stdout.decode().splitlines()[2:]
    return {cols[1]: (cols[0], " ".join(cols[2:])) for cols in (line.split() for line in out) if cols}


def console(virsh, name: str, typed: bytes, after_escape: bytes = b"") -> bytes:
    """Attach `pyhv console`, type, wait for the guest's echo, detach with Ctrl-]; returns what was shown."""
    proc = subprocess.Popen([sys.executable, "-m", "pyhv.cli", "console", name, "--state-dir", str(virsh.state)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    try:
        proc.stdin.write(typed)
        proc.stdin.flush()
        while typed not in out.split(b"(Ctrl + ])", 1)[-1]:
            data = os.read(proc.stdout.fileno(), 4096)
            assert data, f"console ended early: {out!r} {proc.stderr.read()!r}"
            out += data
        proc.stdin.write(b"\x1d" + after_escape)
        proc.stdin.close()
        out += proc.stdout.read()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    return out


def define_and_start(virsh, domain_file, name: str, firmware: str) -> int:
    """Define and start a domain running `firmware`; the pid of its pyhv process."""
    virsh("define", str(domain_file(domain_xml(name, firmware)).path))
    virsh("start", name)
    return int(states(virsh)[name][0])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_define_start_console_suspend_resume_shutdown_destroy_undefine(virsh, guest, domain_file):
    xml = domain_file(domain_xml("echo1", guest("echoloop", BUSY=0)))
    assert b"Domain 'echo1' defined" in virsh("define", str(xml.path)).stdout
    assert states(virsh) == {}
    assert states(virsh, "--all") == {"echo1": ("-", "shut off")}

    assert b"Domain 'echo1' started" in virsh("start", "echo1").stdout
    pid, state = states(virsh)["echo1"]
    assert state == "running" and pid_alive(int(pid))
    d = virsh.state / "echo1"
    assert stat.S_IMODE(os.stat(d / "qmp.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / "console.sock").st_mode) == 0o600
    assert virsh("start", "echo1", check=False).returncode == 2          # already running

    out = console(virsh, "echo1", b"ping")
    assert b"Connected to domain 'echo1'" in out
    assert b"pyhv echo guest ready" in out                                # what the guest wrote before
    out = console(virsh, "echo1", b"pong", after_escape=b"typed after the escape")   # attach again
    assert b"pong" in out and b"after the escape" not in out
    log = (d / "console.log").read_bytes()
    assert b"pyhv echo guest ready" in log and b"ping" in log and b"pong" in log

    virsh("suspend", "echo1")
    assert states(virsh)["echo1"][1] == "paused"
    info = virsh("dominfo", "echo1").stdout.decode()
    assert "State:          paused" in info and "3e3fce45-4f53-4fa7-bb32-11f34168b82e" in info
    virsh("resume", "echo1")
    assert states(virsh)["echo1"][1] == "running"

    assert b"is being shutdown" in virsh("shutdown", "echo1").stdout
    assert states(virsh)["echo1"][1] == "running"         # this guest has no power button: it keeps running

    assert virsh("undefine", "echo1", check=False).returncode == 2       # running: destroy it first
    assert b"Domain 'echo1' destroyed" in virsh("destroy", "echo1").stdout
    assert not pid_alive(int(pid))
    assert states(virsh, "--all") == {"echo1": ("-", "shut off")}
    assert not (d / "pid").exists() and not (d / "qmp.sock").exists()
    assert virsh("suspend", "echo1", check=False).returncode == 2        # not running

    virsh("undefine", "echo1")
    assert states(virsh, "--all") == {}
    assert b"failed to get domain 'echo1'" in virsh("start", "echo1", check=False).stderr


def test_destroy_a_busy_guest(virsh, guest, domain_file):
    pid = define_and_start(virsh, domain_file, "busy", guest("echoloop", BUSY=1))
    virsh("destroy", "busy")
    assert not pid_alive(pid)
    assert states(virsh, "--all") == {"busy": ("-", "shut off")}


def test_destroy_a_pyhv_that_does_not_answer(virsh, guest, domain_file):
    """A frozen pyhv (SIGSTOP: its QMP server never answers) is killed by destroy."""
    pid = define_and_start(virsh, domain_file, "frozen", guest("echoloop", BUSY=0))
    os.kill(pid, signal.SIGSTOP)
    try:
        virsh("destroy", "frozen")
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert states(virsh, "--all") == {"frozen": ("-", "shut off")}


def test_list_notices_a_killed_vm_process(virsh, guest, domain_file):
    pid = define_and_start(virsh, domain_file, "victim", guest("echoloop", BUSY=0))
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):                                   # SIGKILL is prompt
        time.sleep(0.01)
    proc = virsh("list")
    assert "victim" not in states(virsh)
    assert f"the pyhv process (pid {pid}) died" in proc.stderr.decode()
    assert states(virsh, "--all") == {"victim": ("-", "crashed")}
    assert f"pid {pid}" in virsh("dominfo", "victim").stdout.decode()
    virsh("start", "victim")                                # a crashed domain starts again
    assert states(virsh)["victim"][1] == "running"


def test_a_guest_that_ends_by_itself_is_shut_off(virsh, guest, domain_file):
    xml = domain_file(domain_xml("short", guest("hello")))
    virsh("define", str(xml.path))
    virsh("start", "short")
    for _ in range(600):
        if states(virsh, "--all")["short"][1] == "shut off":
            break
        time.sleep(0.05)
    assert states(virsh, "--all") == {"short": ("-", "shut off")}
    assert b"hello from real mode" in (virsh.state / "short" / "console.log").read_bytes()


SEABIOS = "/usr/share/seabios/bios.bin"


@pytest.mark.skipif(not os.path.exists(SEABIOS), reason="Debian's seabios package is not installed")
def test_seabios_domain_managed_through_its_qmp_socket(virsh, domain_file):
    """Third-party firmware as the guest; the domain's QMP socket serves any client (here QEMU's qemu.qmp)."""
    import asyncio

    from qemu.qmp import QMPClient

    xml = domain_file(domain_xml("seabios", SEABIOS).replace("<memory unit='MiB'>16</memory>",
                                                              "<memory unit='MiB'>64</memory>"))
    virsh("define", str(xml.path))
    virsh("start", "seabios")

    async def body() -> dict:
        client = QMPClient("test")
        await client.connect(str(virsh.state / "seabios" / "qmp.sock"))
        stats: dict = {}
        while not stats.get("by_port", {}).get("0x0402"):      # SeaBIOS logs to the debug console port
            stats = await client.execute("query-exit-stats")
            await asyncio.sleep(0.05)
        regs = await client.execute("human-monitor-command", {"command-line": "info registers"})
        await client.disconnect()
        return {"stats": stats, "regs": regs}
    result = asyncio.run(asyncio.wait_for(body(), 120))
    assert result["stats"]["by_port"]["0x0402"]["device"] == "debugcon"
    assert result["regs"].startswith("CPU#0")
    virsh("suspend", "seabios")
    assert states(virsh)["seabios"][1] == "paused"
    virsh("destroy", "seabios")
    assert states(virsh, "--all") == {"seabios": ("-", "shut off")}
