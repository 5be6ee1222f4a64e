#!/usr/bin/env python3
"""QMP latency figures for pyhv (and QEMU on the same guest, for a ratio), on the project's echo test guest.

    python3 bench/qmp_latency.py [--cycles 200] [--queries 1000] [--clients 4] [--no-qemu]

Prints, for each VMM: the median (and p90) of a `stop` -> STOP event -> `cont` -> RESUME event cycle and of its
two halves, the median `query-status` round trip on one connection, and `--queries` query-status commands
spread over `--clients` concurrent connections (errors counted, wall time), after which the guest must still
echo its serial input. Each client is a plain blocking socket (the protocol as on the wire), so the figures
are the server's, not a client library's. Not a test: nothing here gates CI.
"""
from __future__ import annotations

import argparse
import faulthandler
import signal
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "guests"))

import build as guest_build  # noqa: E402

from pyhv.monitor.client import QmpClient, QmpError  # noqa: E402


class Client(QmpClient):
    """pyhv's small blocking QMP client (plain socket, no asyncio), so the figures are the server's."""

    def call(self, command: str, **arguments: object) -> dict:
        try:
            return {"return": self.execute(command, **arguments)}
        except QmpError as e:
            return {"error": {"class": e.error_class, "desc": e.desc}}


def wait_for_socket(path: str, proc: subprocess.Popen) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            Client(path).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError("QMP socket did not come up")


def start_pyhv(rom: str, qmp: str, serial: str, clients: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyhv.cli", "run", "--firmware", rom, "--memory", "16M",
                             "--qmp", f"unix:{qmp}", "--serial", f"socket:{serial}"], cwd=ROOT,
                            stderr=subprocess.DEVNULL)


def start_qemu(rom: str, qmp: str, serial: str, clients: int) -> subprocess.Popen:
    """QEMU serves one client per monitor socket: one more monitor per concurrent client (qmp.sock.N)."""
    monitors = [arg for i in range(clients) for arg in ("-qmp", f"unix:{qmp}.{i},server=on,wait=off")]
    return subprocess.Popen(["qemu-system-x86_64", "-M", "pc", "-accel", "kvm", "-m", "16", "-bios", rom,
                             "-nodefaults", "-display", "none", "-qmp", f"unix:{qmp},server=on,wait=off",
                             *monitors, "-chardev", f"socket,id=s0,path={serial},server=on,wait=off",
                             "-serial", "chardev:s0"], stderr=subprocess.DEVNULL)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(name: str, start, rom: str, cycles: int, queries: int, clients: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="pyhv-bench-")
    qmp, serial = os.path.join(tmp, "qmp.sock"), os.path.join(tmp, "serial.sock")
    proc = start(rom, qmp, serial, clients)
    one_socket = name == "pyhv"                 # pyhv serves every client on one socket
    try:
        wait_for_socket(qmp, proc)
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.settimeout(30)
        for _ in range(400):
            try:
                console.connect(serial)
                break
            except OSError:
                time.sleep(0.025)
        c = Client(qmp)
        stop_half, cont_half, cycle = [], [], []
        for _ in range(cycles):
            t0 = time.perf_counter()
            c.call("stop")
            c.wait_event("STOP", 30)
            t1 = time.perf_counter()
            c.call("cont")
            c.wait_event("RESUME", 30)
            t2 = time.perf_counter()
            stop_half.append(t1 - t0)
            cont_half.append(t2 - t1)
            cycle.append(t2 - t0)
        rtt = []
        for _ in range(queries):
            t0 = time.perf_counter()
            reply = c.call("query-status")
            rtt.append(time.perf_counter() - t0)
            assert reply["return"]["running"], reply
        c.close()

        errors = []
        per_client = queries // clients
        barrier = threading.Barrier(clients)

        def worker(index: int) -> None:
            try:
                client = Client(qmp if one_socket else f"{qmp}.{index}")
                barrier.wait()
                for _ in range(per_client):
                    reply = client.call("query-status")
                    if "return" not in reply or reply["return"]["status"] != "running":
                        errors.append(reply)
                client.close()
            except Exception as e:          # counted, reported
                errors.append(repr(e))
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_wall = time.perf_counter() - t0
        if one_socket:                              # the guest still runs: it echoes its input (under QEMU
            console.sendall(b"alive?")              # the echo guest prints its banner but echoes nothing:
            echoed = b""                            # there, query-status alone says it runs)
            while b"alive?" not in echoed:
                echoed += console.recv(4096)
        check = Client(qmp)
        still_running = check.call("query-status")["return"]["status"] == "running"
        check.call("quit")
        check.close()
        console.close()
        proc.wait(30)
        return {"vmm": name, "cycle_ms": statistics.median(cycle) * 1e3, "cycle_p90_ms": pct(cycle, 0.9) * 1e3,
                "stop_ms": statistics.median(stop_half) * 1e3, "cont_ms": statistics.median(cont_half) * 1e3,
                "rtt_us": statistics.median(rtt) * 1e6, "rtt_p90_us": pct(rtt, 0.9) * 1e6,
                "concurrent": per_client * clients, "concurrent_errors": len(errors),
                "concurrent_wall_s": concurrent_wall, "guest_running": still_running}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)      # `kill -USR1` shows where it waits
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--no-qemu", action="store_true", help="measure pyhv only")
    args = p.parse_args()
    rom = str(guest_build.build("echoloop", {"BUSY": 0}))
    results = [measure("pyhv", start_pyhv, rom, args.cycles, args.queries, args.clients)]
    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        try:
            results.append(measure("qemu", start_qemu, rom, args.cycles, args.queries, args.clients))
        except Exception as e:
            print(f"qemu: not measured ({e})", file=sys.stderr)
    print(f"QMP latency on the echo test guest ({args.cycles} stop/cont cycles, {args.queries} query-status; "
          f"{args.queries} more from {args.clients} concurrent clients)")
    print(f"{'vmm':<6}{'stop->STOP->cont->RESUME':>26}{'stop->STOP':>12}{'cont->RESUME':>14}"
          f"{'query-status RTT':>18}{'concurrent':>24}")
    for r in results:
        conc = (f"{r['concurrent']} in {r['concurrent_wall_s']:.2f}s, {r['concurrent_errors']} err, "
                f"{'running' if r['guest_running'] else 'NOT RUNNING'}")
        print(f"{r['vmm']:<6}{r['cycle_ms']:>15.2f} ms (p90 {r['cycle_p90_ms']:.2f}){r['stop_ms']:>9.2f} ms"
              f"{r['cont_ms']:>11.2f} ms{r['rtt_us']:>10.0f} us (p90 {r['rtt_p90_us']:.0f}) {conc}")
    if len(results) == 2:
        a, b = results
        print(f"ratio pyhv/qemu: cycle {a['cycle_ms'] / b['cycle_ms']:.2f}x, query-status RTT "
              f"{a['rtt_us'] / b['rtt_us']:.2f}x")
    return 0 if all(r["concurrent_errors"] == 0 and r["guest_running"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
