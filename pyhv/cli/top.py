"""`pyhv top`: a running VM's exits, live, like `kvm_stat` but by device and with pyhv's handling time.

    pyhv top NAME|QMP-SOCKET            # a terminal view refreshed every second; q or Ctrl-C quits
    pyhv top NAME --once --json         # one sample over --interval seconds, as JSON, for scripts

It reads QMP's `x-pyhv-exits` (pyhv/machine/machine.py `exits_report`) twice and shows the difference: exits/s by
reason and by device with the time pyhv spent handling them, each vCPU's state, exit rate and CPU use, the I/O
thread's wake-ups and load, and the virtqueues' depths. Totals since the VM started are in the JSON too.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time

from pyhv.errors import PyhvError

CLEAR = "\x1b[H\x1b[2J"


def _delta_table(now: dict, before: dict, dt: float) -> dict[str, dict]:
    out = {}
    for key, cell in now.items():
        old = before.get(key, {"count": 0, "ns": 0})
        count = cell["count"] - old["count"]
        ns = cell["ns"] - old["ns"]
        out[key] = {"count": count, "per_s": count / dt if dt > 0 else 0.0, "handler_ms": ns / 1e6,
                    "avg_us": ns / count / 1e3 if count else 0.0, "total": cell["count"]}
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["count"], kv[0])))


def _cpu_percent(now: dict, before: dict, dt: float) -> dict[str, float]:
    return {k: 100 * (now.get(k, 0.0) - before.get(k, 0.0)) / dt if dt > 0 else 0.0 for k in ("user", "system")}


def rates(before: dict, now: dict) -> dict:
    """What changed between two `x-pyhv-exits` samples, per second."""
    dt = now["monotonic"] - before["monotonic"]
    total, old = now["total"], before["total"]
    vcpus = []
    for v, w in zip(now["vcpus"], before["vcpus"]):
        exits = v["exits"] - w["exits"]
        vcpus.append({"cpu-index": v["cpu-index"], "state": v["state"], "exits_per_s": exits / dt if dt > 0 else 0,
                      "handling_percent": 100 * (v["handling_ns"] - w["handling_ns"]) / 1e9 / dt if dt > 0 else 0,
                      "cpu_percent": _cpu_percent(v["cpu-time"], w["cpu-time"], dt)})
    io, io_old = now["iothread"], before["iothread"]
    return {
        "interval_s": dt, "state": now["state"],
        "exits": total["exits"] - old["exits"],
        "exits_per_s": (total["exits"] - old["exits"]) / dt if dt > 0 else 0.0,
        "handling_percent": 100 * (total["handling_ns"] - old["handling_ns"]) / 1e9 / dt if dt > 0 else 0.0,
        "by_reason": _delta_table(total["by_reason"], old["by_reason"], dt),
        "by_device": _delta_table(total["by_device"], old["by_device"], dt),
        "vcpus": vcpus,
        "iothread": {"wakeups_per_s": (io["wakeups"] - io_old["wakeups"]) / dt if dt > 0 else 0.0,
                     "callbacks_per_s": (io["callbacks"] - io_old["callbacks"]) / dt if dt > 0 else 0.0,
                     "busy_percent": 100 * (io["busy_ns"] - io_old["busy_ns"]) / 1e9 / dt if dt > 0 else 0.0,
                     "cpu_percent": _cpu_percent(io["cpu-time"], io_old["cpu-time"], dt)},
        "virtqueues": now["virtqueues"],
        "totals": {"exits": total["exits"], "by_reason": {k: v["count"] for k, v in total["by_reason"].items()},
                   "by_device": {k: v["count"] for k, v in total["by_device"].items()}},
    }


def render(view: dict, title: str, refresh_ms: float | None = None, rows: int = 12) -> str:
    lines = [f"pyhv top: {title}   state {view['state']}   {view['exits_per_s']:,.0f} exits/s   "
             f"pyhv handling {view['handling_percent']:.1f}% of a CPU   (interval {view['interval_s']:.2f} s)"]
    row = "  {:<32}{:>12}{:>12}{:>12}{:>14}"
    for heading, table in (("by reason", view["by_reason"]), ("by device", view["by_device"])):
        lines.append("")
        lines.append(row.format(heading, "exits/s", "avg us", "handler ms", "total"))
        for name, cell in list(table.items())[:rows]:
            lines.append(row.format(name[:32], f"{cell['per_s']:,.0f}", f"{cell['avg_us']:.2f}",
                                    f"{cell['handler_ms']:.1f}", f"{cell['total']:,}"))
    lines.append("")
    lines.append("  {:<10}{:<10}{:>12}{:>12}{:>10}{:>10}".format("vCPU", "state", "exits/s", "handling%", "user%",
                                                               "sys%"))
    for v in view["vcpus"]:
        lines.append("  {:<10}{:<10}{:>12}{:>12.1f}{:>10.1f}{:>10.1f}".format(
            v["cpu-index"], v["state"], f"{v['exits_per_s']:,.0f}", v["handling_percent"],
            v["cpu_percent"]["user"], v["cpu_percent"]["system"]))
    io = view["iothread"]
    lines.append(f"  I/O thread: {io['wakeups_per_s']:,.0f} wake-ups/s, {io['callbacks_per_s']:,.0f} callbacks/s, "
                 f"busy {io['busy_percent']:.1f}%, CPU user {io['cpu_percent']['user']:.1f}% "
                 f"sys {io['cpu_percent']['system']:.1f}%")
    if view["virtqueues"]:
        lines.append("  virtqueue depths: " + "   ".join(
            f"{name} [{', '.join('-' if d is None else str(d) for d in depths)}]"
            for name, depths in view["virtqueues"].items()))
    footer = "  q quits"
    if refresh_ms is not None:
        footer += f"   refresh {refresh_ms:.1f} ms"
    lines += ["", footer]
    return "\n".join(lines) + "\n"


def qmp_path(target: str, state_dir: str | None) -> str:
    if os.path.exists(target) and not os.path.isdir(target):
        return target
    from pyhv.cli.lifecycle import Domain, default_state_dir
    dom = Domain(state_dir or default_state_dir(), target)
    if not dom.defined:
        raise PyhvError(f"pyhv top: {target} is neither a QMP socket nor a defined domain")
    return dom.qmp_path


def _keypress(timeout: float) -> str:
    if not sys.stdin.isatty():
        time.sleep(timeout)
        return ""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return os.read(sys.stdin.fileno(), 16).decode(errors="replace") if ready else ""


def cmd_top(args: argparse.Namespace) -> int:
    from pyhv.monitor.client import QmpClient, QmpError
    path = qmp_path(args.target, getattr(args, "state_dir", None))
    try:
        client = QmpClient(path)
    except OSError as e:
        raise PyhvError(f"pyhv top: cannot connect to {path}: {e.strerror or e}") from None
    try:
        before = client.execute("x-pyhv-exits")
        if args.once:
            time.sleep(args.interval)
            view = rates(before, client.execute("x-pyhv-exits"))  # type: ignore[arg-type]
            print(json.dumps(view, indent=1) if args.json else render(view, args.target), end="\n" if args.json else "")
            return 0
        return _live(client, before, args)  # type: ignore[arg-type]
    except (QmpError, ConnectionError) as e:
        raise PyhvError(f"pyhv top: {e}") from None
    finally:
        client.sock.close()


def _live(client: object, before: dict, args: argparse.Namespace) -> int:
    import termios
    import tty
    old = None
    if sys.stdin.isatty():
        old = termios.tcgetattr(sys.stdin)
        tty.setcbreak(sys.stdin)
    refresh_ms = None
    try:
        while True:
            if "q" in _keypress(args.interval).lower():
                return 0
            t0 = time.perf_counter()
            now = client.execute("x-pyhv-exits")  # type: ignore[attr-defined]
            text = render(rates(before, now), args.target, refresh_ms)
            sys.stdout.write(CLEAR + text)
            sys.stdout.flush()
            refresh_ms = (time.perf_counter() - t0) * 1e3
            before = now
    except KeyboardInterrupt:
        return 0
    finally:
        if old is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`pyhv top`'s options (the caller adds the common ones)."""
    p = sub.add_parser("top", help="a running VM's exits live: by reason and device, vCPUs, I/O thread, virtqueues",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="NAME|QMP-SOCKET", help="a domain name (pyhv define) or a `--qmp` socket path")
    p.add_argument("--once", action="store_true", help="print one sample and exit")
    p.add_argument("--json", action="store_true", help="with --once: the sample as JSON")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--state-dir", help="where domains are kept (default: $XDG_STATE_HOME/pyhv)")
    p.set_defaults(handler=cmd_top)
    return p
