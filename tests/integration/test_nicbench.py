"""The project guest of the emulation-models bench (tests/guests/nicbench.c, booted as a 64-bit ELF): its polling
drivers for pyhv's e1000 and virtio-net move frames both ways through a tap, the host counts them on the tap
with a packet socket, and the exit statistics show each model's shape: one e1000 register write per frame, a
notification exit per frame without ioeventfd, none with ioeventfd or sidecore polling."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "guests"))
from build import build_elf  # noqa: E402

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parent.parent.parent
FRAMES = 300

# In the namespace: count the guest's frames arriving on the tap (tx), or send frames into it until told (rx).
TAP_PEER = textwrap.dedent("""
    import select, socket, sys, time
    tap, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)       # SO_RCVBUFFORCE: a polled device sends in bursts
    s.bind((tap, 0x88b5))
    print("ready", flush=True)
    if mode == "tx":
        seqs, lengths = set(), set()
        s.settimeout(60)
        while len(seqs) < int(sys.argv[4]):
            f = s.recv(4096)
            seqs.add(int.from_bytes(f[14:22], "little")); lengths.add(len(f))
        print("seqs=%d min=%d max=%d lengths=%s" % (len(seqs), min(seqs), max(seqs), sorted(lengths)), flush=True)
    else:
        frame = b"\\xff" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x01" + b"\\x88\\xb5" + bytes(size - 14)
        s.setblocking(False)
        while not select.select([sys.stdin], [], [], 0)[0]:
            try:
                s.send(frame)
            except OSError:
                time.sleep(0.0005)
""")


@pytest.fixture(scope="module")
def nicbench():
    return build_elf("nicbench")


def run(nicbench, netns, tmp_path, mode: str, size: int, nic: list[str]):
    tap = f"nb{random.randrange(1 << 24):x}"
    for cmd in (["tuntap", "add", "dev", tap, "mode", "tap"], ["link", "set", tap, "up"]):
        subprocess.run(["ip", "-n", netns, *cmd], check=True)
    peer = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", TAP_PEER, tap, mode, str(size),
                             str(FRAMES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert peer.stdout.readline().strip() == "ready"
    stats = tmp_path / f"{mode}.json"
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "pyhv.cli", "run", "-M", "pc", "--kernel",
             str(nicbench), "--append", f"mode={mode} count={FRAMES} size={size}", "--serial", "stdio",
             "--stats-json", str(stats), *[a.format(tap=tap) for a in nic]],
            input=b"g", capture_output=True, timeout=120, cwd=ROOT)
        peer.stdin.close()
        seen = peer.stdout.read()
        peer.wait(timeout=60)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 33, out + proc.stderr.decode(errors="replace")[-2000:]
    result = next(line for line in out.splitlines() if line.startswith("NICBENCH driver="))
    fields = dict(kv.split("=", 1) for kv in result.split()[1:])
    return fields, seen, json.loads(stats.read_text())


@pytest.mark.parametrize("model,nic", [
    ("e1000", ["--nic", "tap,ifname={tap},model=e1000"]),
    ("virtio-exits", ["--nic", "tap,ifname={tap}", "--no-ioeventfd"]),
    ("virtio-sidecore", ["--nic", "tap,ifname={tap}", "--sidecore"]),
])
def test_frames_both_ways_and_the_exits_each_model_costs(nicbench, netns, tmp_path, model, nic):
    fields, seen, stats = run(nicbench, netns, tmp_path, "tx", 1500, nic)
    assert fields["driver"] == ("e1000" if model == "e1000" else "virtio-net")
    assert seen.split()[0] == f"seqs={FRAMES}" and "min=0" in seen and f"max={FRAMES - 1}" in seen, seen
    assert "lengths=[1500]" in seen, seen
    mmio = {name: v["count"] for name, v in stats["by_mmio"].items()}
    if model == "e1000":
        assert mmio["e1000-0-mmio"] >= FRAMES                      # a TDT write per frame, each one an exit
    elif model == "virtio-exits":
        assert mmio["virtio-net0-notify"] == FRAMES                 # a notification per frame reaches pyhv
    else:
        assert "virtio-net0-notify" not in mmio and sum(stats["virtio"]["virtio-net0"]["notifications"]) == 0

    fields, _, stats = run(nicbench, netns, tmp_path, "rx", 64, nic)
    assert fields["mode"] == "rx" and fields["frames"] == str(FRAMES)
    if model == "e1000":
        assert stats["by_mmio"]["e1000-0-mmio"]["count"] >= FRAMES  # an RDT write per frame given back


def test_no_device_is_a_clear_failure(nicbench, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyhv.cli", "run", "-M", "pc", "--kernel", str(nicbench),
                           "--serial", "stdio"], input=b"", capture_output=True, timeout=60, cwd=ROOT)
    assert proc.returncode == (0x11 << 1) | 1
    assert b"no e1000 or virtio-net on bus 0" in proc.stdout

