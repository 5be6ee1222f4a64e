#!/usr/bin/env python3
"""Emulation models side by side (`make bench-models`): two workloads, each through a tap in a network namespace of
its own, under each network device model pyhv has. The project guest (tests/guests/nicbench.c, a polling driver
of its own for the e1000 and virtio-net) sends or receives N frames of 64 and 1500 bytes: clean per-frame
figures. The small Linux kernel moves NBYTES each way over TCP with its own drivers. The models:

    e1000                 traditional emulation: Linux's e1000 driver, every register access a VM exit
    virtio-exits          virtio-net, notifications exit to pyhv (--no-ioeventfd)
    virtio-ioeventfd      virtio-net, notifications as KVM ioeventfds, interrupts as irqfds (the default)
    virtio-sidecore       virtio-net polled by a thread of its own (--sidecore): the guest never notifies
    vhost-user            virtio-net rings served by pyhv's own vhost-user back end, another process

For each, over the transfer only (QMP query-exit-stats and /proc/PID/stat sampled at the guest's go and at its
result, or when the guest connects and when the last byte arrives, with the tap's counters): exits that reached
pyhv per packet by reason, pyhv's CPU time per packet (user and system), the handlers' time per packet, MB/s and
packets/s (timed on the host side). Host-to-guest frames come from a packet socket on the tap, as fast as it takes
them; the guest counts the ones it receives.
Needs root (netns, tap). With matplotlib installed (`pip install -e .[bench]`), also writes a chart next to the table.

    python3 bench/models.py [--workload both|frames|tcp] [--frames 5000] [--bytes 1M] [--out bench/models]
                                                 # writes OUT.txt, OUT.json (and OUT.svg, OUT-frames.svg)

On a 2-core PVM host the guest kernel runs emulated: absolute MB/s are small, and the poller of the sidecore
model shares the two cores with the vCPU and the I/O thread, which a real sidecore (a dedicated core) would not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyhv.assets import build_guest  # noqa: E402
from pyhv.assets.protocol import command_output, encode_command  # noqa: E402
from pyhv.config import parse_size  # noqa: E402

HOST, GUEST = "10.213.9.1", "10.213.9.2"

# Prints "start" when the guest connects to 5001, sends N bytes, receives N on 5002, prints "end" and the time of
# each direction: the bench takes its snapshots at "start" and "end", so boot and set-up are not counted.
SERVER = textwrap.dedent("""
    import os, socket, sys, time
    N = int(sys.argv[2])
    data = os.urandom(N)
    def listen(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sys.argv[1], port)); s.listen(1); s.settimeout(900)
        c, _ = s.accept(); c.settimeout(900); return c
    c = listen(5001); print("start", flush=True); sys.stdin.readline()
    t = time.monotonic(); c.sendall(data); c.shutdown(socket.SHUT_WR)
    c.recv(1); h2g = time.monotonic() - t; c.close()
    c = listen(5002); t = None; n = 0
    while n < N:
        b = c.recv(1 << 20)
        if not b: break
        if t is None: t = time.monotonic()
        n += len(b)
    g2h = time.monotonic() - t
    print("end", flush=True); sys.stdin.readline()
    print("host_to_guest_s=%f" % h2g, flush=True); print("guest_to_host_s=%f" % g2h, flush=True)
    c.sendall(b"received\\n"); c.close()
""")


def process_cpu(pid: int) -> tuple[float, float]:
    """A process's user and user + system CPU seconds so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, (int(fields[11]) + int(fields[12])) / tick


class Snapshot:
    """Exit counts by reason, handler time, pyhv's CPU time and the tap's packet counters at one moment."""

    def __init__(self, qmp, pid: int, ns: str, tap: str) -> None:
        stats = qmp.execute("query-exit-stats")
        self.reasons = {k: v["count"] for k, v in stats["by_reason"].items()}
        self.handling_ns = stats["handling_ns"]
        self.user_s, self.cpu_s = process_cpu(pid)
        self.packets = sum(int(subprocess.run(["ip", "netns", "exec", ns, "cat",
                                               f"/sys/class/net/{tap}/statistics/{k}"],
                                              capture_output=True, text=True, check=True).stdout)
                           for k in ("rx_packets", "tx_packets"))


MODELS = [
    ("e1000", ["--nic", "tap,ifname={tap},model=e1000"]),
    ("virtio-exits", ["--nic", "tap,ifname={tap}", "--no-ioeventfd"]),
    ("virtio-ioeventfd", ["--nic", "tap,ifname={tap}"]),
    ("virtio-sidecore", ["--nic", "tap,ifname={tap}", "--sidecore"]),
    ("vhost-user", ["--memory-backend", "memfd", "--device", "vhost-user-net-pci,socket={socket}"]),
]


def guest_command(n: int) -> str:
    s = "/sys/class/net/eth0/statistics"
    return "\n".join([
        f"ip addr add {GUEST}/24 dev eth0", "ip link set eth0 up",
        f"for i in $(seq 30); do ping -c1 -W1 {HOST} >/dev/null 2>&1 && break; done",
        f"nc {HOST} 5001 > /tmp/rx", "echo rxlen=$(wc -c < /tmp/rx)",
        f"dd if=/dev/urandom of=/tmp/tx bs=64k count={max(1, n // 65536)} 2>/dev/null",
        f"nc {HOST} 5002 < /tmp/tx > /tmp/ack", "echo ack=$(cat /tmp/ack)",
        f"echo tx_packets=$(cat {s}/tx_packets)", f"echo rx_packets=$(cat {s}/rx_packets)",
    ])


@contextlib.contextmanager
def network(name: str, workdir: Path):
    """A namespace of its own with a tap (HOST's address on it) and, for the vhost-user model, pyhv's back end
    serving that tap; yields (namespace, tap, vhost-user socket, QMP socket, back end process or None)."""
    ns = f"pyhv-bm{os.getpid()}-{random.randrange(1 << 20)}"
    tap = f"bm{random.randrange(1 << 24):x}"
    socket_path, qmp_path = str(workdir / f"{tap}.sock"), str(workdir / f"{tap}.qmp")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    backend = None
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{HOST}/24", "dev", tap], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", tap, "up"], check=True)
        if name == "vhost-user":
            backend = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pyhv.cli",
                                        "vhost-user-backend", "--type", "net", "--socket", socket_path, "--tap", tap],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
            backend.stdout.readline()                       # "... listening on ..."
        yield ns, tap, socket_path, qmp_path, backend
    finally:
        if backend is not None and backend.poll() is None:
            backend.kill()
            backend.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def pyhv_command(ns: str, options: list[str], tap: str, socket_path: str, qmp_path: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "pyhv.cli", "run", "--machine", "pc", "--memory", "256M",
            "--serial", "stdio", "--qmp", f"unix:{qmp_path}", *args,
            *[o.format(tap=tap, socket=socket_path) for o in options]]


def run_model(name: str, options: list[str], assets, n: int, workdir: Path) -> dict:
    from pyhv.monitor.client import QmpClient
    proc = None
    with network(name, workdir) as (ns, tap, socket_path, qmp_path, _):
        try:
            server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, HOST, str(n)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            cmd = pyhv_command(ns, options, tap, socket_path, qmp_path,
                               "--kernel", str(assets.bzimage), "--initrd", str(assets.initramfs_uncompressed),
                               "--append", f"console=ttyS0 reboot=k panic=-1 {encode_command(guest_command(n))}")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
            snaps = []
            for marker in ("start", "end"):
                line = server.stdout.readline().strip()
                if line != marker:
                    raise SystemExit(f"{name}: the server said {line!r} instead of {marker!r}")
                with QmpClient(qmp_path) as qmp:
                    snaps.append(Snapshot(qmp, proc.pid, ns, tap))
                server.stdin.write("\n")
                server.stdin.flush()
            out = proc.stdout.read().decode(errors="replace")
            proc.wait(timeout=120)
            served = server.communicate(timeout=120)[0]
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    got = dict(line.split("=", 1) for line in (command_output(out) or "").splitlines() if "=" in line)
    host = dict(line.split("=", 1) for line in served.splitlines() if "=" in line)
    if got.get("ack") != "received" or int(got.get("rxlen", 0)) != n:
        raise SystemExit(f"{name}: the workload did not complete: {out[-1500:]}")
    a, b = snaps
    packets = b.packets - a.packets
    h2g, g2h = float(host["host_to_guest_s"]), float(host["guest_to_host_s"])
    return {"model": name, "packets": packets,
            "exits_per_packet": {k: (v - a.reasons.get(k, 0)) / packets for k, v in sorted(b.reasons.items())},
            "cpu_us_per_packet": (b.cpu_s - a.cpu_s) * 1e6 / packets,
            "user_us_per_packet": (b.user_s - a.user_s) * 1e6 / packets,
            "handler_us_per_packet": (b.handling_ns - a.handling_ns) / 1e3 / packets,
            "host_to_guest_MBps": n / h2g / 1e6, "guest_to_host_MBps": n / g2h / 1e6,
            "packets_per_s": packets / (h2g + g2h)}


# --- the project guest's workload: tests/guests/nicbench.c, a polling driver, N frames one way --------------------
# Sends frames of EtherType 0x88b5 into the tap as fast as the socket takes them, until stdin closes.
SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    size = int(sys.argv[2])
    frame = b"\\xff" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x01" + b"\\x88\\xb5" + bytes(size - 14)
    s.setblocking(False)
    sys.stdout.write("sending\\n"); sys.stdout.flush()
    import select
    while not select.select([sys.stdin], [], [], 0)[0]:
        try:
            s.send(frame)
        except BlockingIOError:
            time.sleep(0.0002)
        except OSError:
            time.sleep(0.001)
""")
SERIAL_DEVICES = ("serial", "debug-exit")       # the guest's own reporting, not the device under test


def device_exits(stats: dict) -> dict[str, int]:
    """Exits by reason, without the port I/O of the guest's serial console and debug exit."""
    reasons = {k: v["count"] for k, v in stats["by_reason"].items()}
    reporting = sum(v["count"] for v in stats.get("by_port", {}).values()
                    if str(v.get("device", "")).startswith(SERIAL_DEVICES))
    if "IO" in reasons:
        reasons["IO"] -= reporting
    return reasons


def run_frames(name: str, options: list[str], guest: Path, size: int, tx: bool, n: int, workdir: Path) -> dict:
    """One model, one direction, one frame size: exits and pyhv CPU per frame and the rate, between the guest's
    go and its result line (QMP statistics at the go, the --stats-json file at the end)."""
    from pyhv.monitor.client import QmpClient
    proc = sender = None
    stats_path = workdir / f"{name}-{size}-{tx}.json"
    with network(name, workdir) as (ns, tap, socket_path, qmp_path, backend):
        try:
            cmd = pyhv_command(ns, options, tap, socket_path, qmp_path, "--kernel", str(guest), "--stats-json",
                               str(stats_path), "--append", f"mode={'tx' if tx else 'rx'} count={n} size={size}")
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    cwd=ROOT)
            for line in proc.stdout:
                if line.startswith(b"NICBENCH ready"):
                    break
            else:
                raise SystemExit(f"{name}: the guest did not get ready")
            if not tx:
                sender = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, tap, str(size)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                sender.stdout.readline()
            with QmpClient(qmp_path) as qmp:
                start = qmp.execute("query-exit-stats")
            before, before_handling = device_exits(start), start["handling_ns"]
            cpu0 = [process_cpu(p.pid) for p in (proc, backend) if p is not None]
            t0 = time.monotonic()
            proc.stdin.write(b"g")
            proc.stdin.flush()
            result = b""
            for line in proc.stdout:
                if line.startswith(b"NICBENCH driver="):
                    result = line
                    break
            elapsed = time.monotonic() - t0
            cpu1 = [process_cpu(p.pid) for p in (proc, backend) if p is not None]
            proc.stdin.close()
            proc.wait(timeout=60)
        finally:
            for p in (proc, sender):
                if p is not None and p.poll() is None:
                    if p is sender:
                        p.stdin.close()
                        p.wait(timeout=10)
                    else:
                        p.kill()
                        p.wait()
    if not result:
        raise SystemExit(f"{name}: the guest printed no result")
    end = json.loads(stats_path.read_text())
    after = device_exits(end)
    return {"model": name, "size": size, "direction": "guest->host" if tx else "host->guest", "frames": n,
            "exits_per_frame": {k: (v - before.get(k, 0)) / n for k, v in sorted(after.items())
                                if v - before.get(k, 0) > 0},
            "cpu_us_per_frame": sum(b[1] - a[1] for a, b in zip(cpu0, cpu1)) * 1e6 / n,
            "handler_us_per_frame": (end["handling_ns"] - before_handling) / 1e3 / n,
            "frames_per_s": n / elapsed, "MBps": n * size / elapsed / 1e6}


def frames_table(results: list[dict]) -> str:
    reasons = sorted({r for res in results for r in res["exits_per_frame"]})
    head = (f"{'model':<18}{'dir':<13}{'bytes':>6}" + "".join(f"{r[:8] + '/frame':>15}" for r in reasons)
            + f"{'CPU us/frame':>14}{'handler us':>12}{'frames/s':>10}{'MB/s':>8}")
    lines = [f"Project guest (tests/guests/nicbench.c, a polling driver), {results[0]['frames']} frames one way per row, "
             "pc machine, 1 vCPU (exits: those that reached pyhv, the guest's serial reporting left out; CPU: pyhv's "
             "processes, user + system, back end included)", head]
    for r in results:
        lines.append(f"{r['model']:<18}{r['direction']:<13}{r['size']:>6}"
                     + "".join(f"{r['exits_per_frame'].get(x, 0):>15.2f}" for x in reasons)
                     + f"{r['cpu_us_per_frame']:>14.1f}{r['handler_us_per_frame']:>12.1f}"
                     + f"{r['frames_per_s']:>10.0f}{r['MBps']:>8.2f}")
    return "\n".join(lines)


def table(results: list[dict], n: int) -> str:
    reasons = sorted({r for res in results for r in res["exits_per_packet"]})
    head = (f"{'model':<20}{'pkts':>7}" + "".join(f"{r[:10] + '/pkt':>15}" for r in reasons)
            + f"{'CPU us/pkt':>12}{'user us/pkt':>12}{'handler us':>12}"
            + f"{'h->g MB/s':>11}{'g->h MB/s':>11}{'pkts/s':>9}")
    lines = [f"Linux TCP, {n >> 10} KiB each way, pc machine, 1 vCPU; per packet through the tap, transfer window only "
             "(exits: those that reached pyhv; CPU: pyhv's process, user + system)", head]
    for r in results:
        lines.append(f"{r['model']:<20}{r['packets']:>7}"
                     + "".join(f"{r['exits_per_packet'].get(x, 0):>15.2f}" for x in reasons)
                     + f"{r['cpu_us_per_packet']:>12.0f}{r['user_us_per_packet']:>12.0f}"
                     + f"{r['handler_us_per_packet']:>12.1f}{r['host_to_guest_MBps']:>11.2f}"
                     + f"{r['guest_to_host_MBps']:>11.2f}{r['packets_per_s']:>9.0f}")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["model"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(names, [sum(r["exits_per_packet"].values()) for r in results])
    axes[0].set_title("exits to pyhv per packet")
    axes[1].bar(names, [r["cpu_us_per_packet"] for r in results])
    axes[1].set_title("pyhv CPU µs per packet")
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [r["host_to_guest_MBps"] for r in results], width=0.4, label="host→guest")
    axes[2].bar([i + 0.2 for i in x], [r["guest_to_host_MBps"] for r in results], width=0.4, label="guest→host")
    axes[2].set_xticks(list(x), names)
    axes[2].set_title("MB/s")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    return True


def frames_chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results if r["size"] == 64]
    names = sorted({r["model"] for r in rows}, key=[m for m, _ in MODELS].index)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(names))
    for k, direction in enumerate(("guest->host", "host->guest")):
        by = {r["model"]: r for r in rows if r["direction"] == direction}
        off = -0.2 + 0.4 * k
        axes[0].bar([i + off for i in x], [sum(by[m]["exits_per_frame"].values()) if m in by else 0 for m in names],
                    width=0.4, label=direction)
        axes[1].bar([i + off for i in x], [by[m]["frames_per_s"] if m in by else 0 for m in names], width=0.4,
                    label=direction)
    axes[0].set_title("exits to pyhv per 64-byte frame")
    axes[1].set_title("64-byte frames per second")
    for ax in axes:
        ax.set_xticks(list(x), names)
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", default="1M", help="TCP payload each way (default 1M)")
    p.add_argument("--frames", type=int, default=5000, help="frames per row of the project-guest workload")
    p.add_argument("--sizes", default="64,1500", help="frame sizes of the project-guest workload")
    p.add_argument("--workload", choices=("tcp", "frames", "both"), default="both")
    p.add_argument("--out", default=str(ROOT / "bench" / "models"), help="OUT.txt, OUT.json (and OUT.svg)")
    p.add_argument("--models", default=",".join(m for m, _ in MODELS), help="comma-separated subset")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/models.py needs root (network namespaces and taps)")
    n = parse_size(args.bytes) if not args.bytes.isdigit() else int(args.bytes)
    wanted = args.models.split(",")
    results: dict[str, list[dict]] = {"tcp": [], "frames": []}
    texts = []
    with tempfile.TemporaryDirectory(prefix="pyhv-models-") as tmp:
        if args.workload in ("frames", "both"):
            sys.path.insert(0, str(ROOT / "tests" / "guests"))
            from build import build_elf
            guest = build_elf("nicbench")
            for name, options in MODELS:
                for size in map(int, args.sizes.split(",")):
                    for tx in (True, False):
                        if name in wanted:
                            print(f"running {name}, {size}-byte frames, {'tx' if tx else 'rx'} ...", file=sys.stderr,
                                  flush=True)
                            results["frames"].append(run_frames(name, options, guest, size, tx, args.frames,
                                                                Path(tmp)))
            texts.append(frames_table(results["frames"]))
        if args.workload in ("tcp", "both"):
            assets = build_guest("mini")
            for name, options in MODELS:
                if name in wanted:
                    print(f"running {name}, Linux TCP ...", file=sys.stderr, flush=True)
                    results["tcp"].append(run_model(name, options, assets, n, Path(tmp)))
            texts.append(table(results["tcp"], n))
    text = "\n\n".join(texts)
    print(text)
    out = Path(args.out)
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    charts = []
    if results["tcp"] and chart(results["tcp"], out.with_suffix(".svg")):
        charts.append(out.with_suffix(".svg"))
    frames_svg = out.with_name(out.name + "-frames.svg")
    if results["frames"] and frames_chart(results["frames"], frames_svg):
        charts.append(frames_svg)
    if charts:
        print("charts: " + ", ".join(map(str, charts)))
    else:
        print("(no chart: matplotlib is not installed; pip install -e '.[bench]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
