"""virsh-like lifecycle commands: `pyhv define | start | list | console | shutdown | destroy | suspend | resume |
undefine | dominfo`, and `pyhv domxml-to-args`.

State lives in files, so it survives the CLI exiting (no daemon): under `$XDG_STATE_HOME/pyhv` (default
`~/.local/state/pyhv`) or `--state-dir DIR`, one folder per domain:

    NAME/domain.xml     the definition (`define` copies the XML given; `start` runs it)
    NAME/pid            pid of the running `pyhv run` process (written by --pidfile, removed when it exits)
    NAME/qmp.sock       its QMP socket          NAME/console.sock   its serial console (one client at a time)
    NAME/console.log    everything the guest wrote to its serial port (appended across runs)
    NAME/pyhv.log       pyhv's own messages     NAME/died           why the last run ended abnormally

`start` runs `pyhv run --domain NAME/domain.xml --qmp ... --serial socket:...,logfile=... --pidfile ...` as a
detached background process: the same code path as a foreground `pyhv run`. The other commands talk QMP to
it. A `pid` file whose process is gone means pyhv died without cleaning up (SIGKILL, a crash): the first
command that notices records it in `died`, and the domain shows as `crashed` until it is started again.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from dataclasses import dataclass
from typing import Callable

from pyhv.errors import ConfigError, PyhvError

CTRL_RBRACKET = 0x1D                      # virsh console's escape: Ctrl-]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
SUN_PATH_MAX = 107
_NAME_RE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")


class DomainError(PyhvError):
    """A lifecycle command that cannot be done in the domain's current state (or an unknown domain)."""


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pyhv")


@dataclass
class DomainStatus:
    state: str                 # running | paused | shut off | crashed
    pid: int | None = None
    reason: str = ""


class Domain:
    def __init__(self, state_dir: str, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ConfigError(f"domain name {name!r} cannot be used as a file name",
                              "use letters, digits and . _ + - (not starting with .)")
        self.name = name
        self.dir = os.path.join(state_dir, name)

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def xml_path(self) -> str:
        return self.file("domain.xml")

    @property
    def qmp_path(self) -> str:
        return self.file("qmp.sock")

    @property
    def console_path(self) -> str:
        return self.file("console.sock")

    def defined(self) -> bool:
        return os.path.isfile(self.xml_path)

    def require_defined(self) -> "Domain":
        if not self.defined():
            raise DomainError(f"failed to get domain '{self.name}'", "see pyhv list --all")
        return self

    def config(self):
        from pyhv.cli.domain_xml import load_domain_xml
        return load_domain_xml(self.xml_path)[0]

    def read_pid(self) -> int | None:
        try:
            with open(self.file("pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _process_alive(self, pid: int) -> bool:
        """The pid is a live (not zombie) `pyhv run` of this domain: its command line names our QMP socket."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return False
        return state not in ("Z", "X") and os.fsencode(self.qmp_path) in cmdline

    def status(self) -> DomainStatus:
        pid = self.read_pid()
        if pid is None:
            died = _read_text(self.file("died"))
            return DomainStatus("crashed", None, died) if died else DomainStatus("shut off")
        if not self._process_alive(pid):
            reason = f"the pyhv process (pid {pid}) died without shutting the VM down"
            self._record_death(reason)
            return DomainStatus("crashed", None, reason)
        try:
            with self.qmp(timeout=5) as client:
                status = client.execute("query-status")["status"]
        except (OSError, PyhvError, ValueError) as e:
            return DomainStatus("running", pid, f"its monitor does not answer: {e}")
        return DomainStatus({"paused": "paused", "shutdown": "shutting down"}.get(status, "running"), pid)

    def _record_death(self, reason: str) -> None:
        with open(self.file("died"), "w") as f:
            f.write(reason + "\n")
        for name in ("pid", "qmp.sock", "console.sock"):
            try:
                os.unlink(self.file(name))
            except OSError:
                pass

    def qmp(self, timeout: float = 10.0):
        from pyhv.monitor.client import QmpClient
        return QmpClient(self.qmp_path, timeout=timeout)

    def running_status(self) -> DomainStatus:
        status = self.require_defined().status()
        if status.pid is None:
            raise DomainError(f"domain '{self.name}' is not running ({status.state})")
        return status


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


# --- commands ------------------------------------------------------------------------------------------------
def cmd_define(args: argparse.Namespace) -> int:
    from pyhv.cli.domain_xml import load_domain_xml
    config, warnings = load_domain_xml(args.file)
    for warning in warnings:
        print(f"pyhv: warning: {warning}", file=sys.stderr)
    dom = Domain(args.state_dir, config.name)
    os.makedirs(dom.dir, mode=0o700, exist_ok=True)
    with open(args.file, "rb") as src:
        data = src.read()
    tmp = dom.xml_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dom.xml_path)
    print(f"Domain '{config.name}' defined from {args.file}")
    return 0


def start_command(dom: Domain) -> list[str]:
    """The `pyhv run` command line `start` runs for a domain."""
    return [sys.executable, "-m", "pyhv.cli", "run", "--domain", dom.xml_path, "--qmp", f"unix:{dom.qmp_path}",
            "--serial", f"socket:{dom.console_path},logfile={dom.file('console.log')}",
            "--pidfile", dom.file("pid")]


def cmd_start(args: argparse.Namespace) -> int:
    dom = Domain(args.state_dir, args.name).require_defined()
    status = dom.status()
    if status.pid is not None:
        raise DomainError(f"domain '{dom.name}' is already active ({status.state})")
    dom.config()                               # a definition that no longer validates fails here, in one line
    for path in (dom.qmp_path, dom.console_path):
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ConfigError(f"{path} is too long for a Unix socket", "use a shorter --state-dir")
    for name in ("died", "qmp.sock", "console.sock"):
        try:
            os.unlink(dom.file(name))
        except OSError:
            pass
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # holds pyhv/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(dom.file("pyhv.log"), "ab") as log, open(os.devnull, "rb") as devnull:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(start_command(dom))}\n".encode())
        log.flush()
        proc = subprocess.Popen(start_command(dom), stdin=devnull, stdout=log, stderr=log, cwd="/", env=env,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            if code in (2, 3):
                tail = _read_text(dom.file("pyhv.log")).splitlines()[-1:] or ["(no message)"]
                raise DomainError(f"domain '{dom.name}' failed to start: {tail[0]}",
                                  f"see {dom.file('pyhv.log')}")
            print(f"Domain '{dom.name}' started (and has already ended, exit status {code})")
            return 0
        try:
            with dom.qmp(timeout=2) as client:
                client.execute("query-status")
            print(f"Domain '{dom.name}' started")
            return 0
        except (OSError, PyhvError, ValueError):
            time.sleep(0.05)
    proc.kill()
    raise DomainError(f"domain '{dom.name}' did not start within {START_TIMEOUT:.0f} s",
                      f"see {dom.file('pyhv.log')}")


def all_domains(state_dir: str) -> list[Domain]:
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    return [Domain(state_dir, n) for n in names if _NAME_RE.match(n) and os.path.isfile(
        os.path.join(state_dir, n, "domain.xml"))]


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for dom in all_domains(args.state_dir):
        status = dom.status()
        if status.pid is None and not args.all:
            if status.state == "crashed":   # say so once, even without --all: the user expects it running
                print(f"pyhv: {dom.name}: {status.reason}", file=sys.stderr)
            continue
        rows.append((str(status.pid) if status.pid else "-", dom.name, status.state))
    width = max([len(r[1]) for r in rows] + [4])
    print(f" {'Id':<8} {'Name':<{width}}   State")
    print("-" * (16 + width))
    for pid, name, state in rows:
        print(f" {pid:<8} {name:<{width}}   {state}")
    print()
    return 0


def cmd_dominfo(args: argparse.Namespace) -> int:
    from pyhv.config import format_size
    dom = Domain(args.state_dir, args.name).require_defined()
    config = dom.config()
    status = dom.status()
    rows = [("Id", str(status.pid) if status.pid else "-"), ("Name", config.name), ("UUID", config.uuid or ""),
            ("OS Type", "hvm"), ("State", status.state), ("CPU(s)", str(config.cpus)),
            ("Max memory", f"{config.memory // 1024} KiB"), ("Used memory", f"{config.memory // 1024} KiB"),
            ("Persistent", "yes"), ("Machine", config.machine), ("Memory", format_size(config.memory))]
    if status.reason:
        rows.append(("Reason", status.reason))
    if status.pid:
        rows += [("QMP socket", dom.qmp_path), ("Console socket", dom.console_path)]
    rows += [("Console log", dom.file("console.log")), ("Definition", dom.xml_path)]
    for key, value in rows:
        print(f"{key + ':':<16}{value}")
    return 0


def _qmp_command(command: str, done: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        dom = Domain(args.state_dir, args.name)
        dom.running_status()
        with dom.qmp() as client:
            client.execute(command)
        print(f"Domain '{dom.name}' {done}")
        return 0
    return run


cmd_suspend = _qmp_command("stop", "suspended")
cmd_resume = _qmp_command("cont", "resumed")


def cmd_shutdown(args: argparse.Namespace) -> int:
    """Ask the guest to power off (QMP system_powerdown): the guest decides, as with virsh shutdown."""
    dom = Domain(args.state_dir, args.name)
    dom.running_status()
    with dom.qmp() as client:
        client.execute("system_powerdown")
    print(f"Domain '{dom.name}' is being shutdown")
    return 0


def _wait_gone(dom: Domain, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dom._process_alive(pid):
            return True
        time.sleep(0.02)
    return False


def cmd_destroy(args: argparse.Namespace) -> int:
    """Stop the VM now: QMP quit, then SIGTERM, then SIGKILL for a pyhv that does not answer."""
    dom = Domain(args.state_dir, args.name)
    pid = dom.running_status().pid
    assert pid is not None
    try:
        with dom.qmp(timeout=5) as client:
            client.execute("quit")
        answered = True
    except (OSError, PyhvError, ValueError):
        answered = False                           # a pyhv that does not answer gets signals at once
    if not (answered and _wait_gone(dom, pid, STOP_TIMEOUT)):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(dom, pid, STOP_TIMEOUT / 2):
                break
    for name in ("pid", "qmp.sock", "console.sock"):   # pyhv removes them itself, unless it had to be killed
        try:
            os.unlink(dom.file(name))
        except OSError:
            pass
    print(f"Domain '{dom.name}' destroyed")
    return 0


def cmd_undefine(args: argparse.Namespace) -> int:
    dom = Domain(args.state_dir, args.name).require_defined()
    if dom.status().pid is not None:
        raise DomainError(f"domain '{dom.name}' is running", f"pyhv destroy {dom.name} first")
    import shutil
    shutil.rmtree(dom.dir)
    print(f"Domain '{dom.name}' has been undefined")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    dom = Domain(args.state_dir, args.name)
    dom.running_status()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(dom.console_path)
    except OSError as e:
        raise DomainError(f"cannot attach to the console of '{dom.name}': {e.strerror}") from None
    out = sys.stdout.buffer
    out.write(f"Connected to domain '{dom.name}'\r\nEscape character is ^] (Ctrl + ])\r\n".encode())
    out.flush()
    return relay_console(sock, sys.stdin.fileno() if sys.stdin else -1, sys.stdout.fileno())


def relay_console(sock: socket.socket, in_fd: int, out_fd: int) -> int:
    """Copy between the console socket and the terminal until Ctrl-], end of input or the VM's end."""
    saved = None
    if in_fd >= 0 and os.isatty(in_fd):
        saved = termios.tcgetattr(in_fd)
        tty.setraw(in_fd)
    watch = [sock.fileno()] + ([in_fd] if in_fd >= 0 else [])
    try:
        while True:
            ready, _, _ = select.select(watch, [], [])
            if sock.fileno() in ready:
                data = sock.recv(65536)
                if not data:
                    break                          # the VM ended
                os.write(out_fd, data)
            if in_fd in ready:
                data = os.read(in_fd, 4096)
                if not data:
                    break
                escape = data.find(bytes([CTRL_RBRACKET]))
                if escape >= 0:
                    sock.sendall(data[:escape])
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        sock.close()
    os.write(out_fd, b"\r\n")
    return 0


def cmd_domxml_to_args(args: argparse.Namespace) -> int:
    from pyhv.cli.domain_xml import load_domain_xml
    from pyhv.cli.runargs import config_to_args
    config, warnings = load_domain_xml(args.file)
    for warning in warnings:
        print(f"pyhv: warning: {warning}", file=sys.stderr)
    print(shlex.join(["pyhv", "run", *config_to_args(config)]))
    return 0


def add_parsers(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    def add(name: str, handler: Callable, help: str, arg: str | None = "name") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if arg == "name":
            p.add_argument("name", help="the domain's name")
        elif arg == "file":
            p.add_argument("file", help="a libvirt domain XML file")
        if name != "domxml-to-args":
            p.add_argument("--state-dir", default=default_state_dir(),
                           help="where domains are kept (default: $XDG_STATE_HOME/pyhv, ~/.local/state/pyhv)")
        add_common(p)
        p.set_defaults(handler=handler)
        return p

    add("domxml-to-args", cmd_domxml_to_args, "print the pyhv run command line of a domain XML file", "file")
    add("define", cmd_define, "define (or redefine) a domain from its XML", "file")
    add("start", cmd_start, "start a defined domain in the background")
    p = add("list", cmd_list, "list domains (running ones; --all: every defined one)", None)
    p.add_argument("--all", action="store_true", help="also domains that are not running")
    add("console", cmd_console, "attach to a domain's serial console (Ctrl-] detaches)")
    add("shutdown", cmd_shutdown, "ask the guest to power off")
    add("destroy", cmd_destroy, "stop a domain now")
    add("suspend", cmd_suspend, "pause a domain's vCPUs")
    add("resume", cmd_resume, "resume a suspended domain")
    add("undefine", cmd_undefine, "remove a domain's definition (and its logs)")
    add("dominfo", cmd_dominfo, "show a domain's definition and state")
