"""The sidecore poller against a virtio-blk back end on crafted rings: requests are served without a
notification, a broken ring does not stop the poller, and an idle poller sleeps instead of spinning."""
from __future__ import annotations

import time

from pyhv.virtio.blk import VirtioBlk
from pyhv.virtio.poller import MAX_SLEEP, QueuePoller
from virtq_driver import FakeMemory, RingDriver


class Flaky:
    """A device whose poll raises: the poller must log it and keep serving the others."""
    name = "flaky"
    polled = False
    calls = 0

    def poll(self) -> bool:
        self.calls += 1
        raise RuntimeError("boom")


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


READ_SECTOR_0 = (0).to_bytes(4, "little") + bytes(4) + (0).to_bytes(8, "little")   # VIRTIO_BLK_T_IN, sector 0


def polled_disk(tmp_path, *others):
    """A virtio-blk on a 4 KiB image behind a started poller (with `others` before it), its ring driver and the
    interrupts it raised."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xab" * 4096)
    blk = VirtioBlk(str(image))
    mem = FakeMemory()
    d = RingDriver(mem, size=16)
    q = d.queue(event_idx=True)
    interrupts: list[int] = []
    poller = QueuePoller([*others, blk])
    assert blk.polled
    blk.activate(mem, [q], interrupts.append, blk.device_features())
    poller.start()
    return blk, d, interrupts, poller


def test_poller_serves_a_request_nobody_notified_and_survives_a_failing_device(tmp_path):
    flaky = Flaky()
    blk, d, interrupts, poller = polled_disk(tmp_path, flaky)
    try:
        head = d.add([(READ_SECTOR_0, False), (512, True), (1, True)])
        d.publish(head)                             # no notify() call: the poller must find it
        assert wait_for(lambda: d.take_used() != [] or bool(interrupts)), "the poller never served the request"
        assert blk.notifications == [0]
        assert flaky.calls > 0 and poller.stats.busy_looks >= 1
        looks = poller.stats.looks
        time.sleep(0.3)                             # idle: sleeps of up to MAX_SLEEP, not a busy loop
        assert poller.stats.looks - looks < 0.3 / MAX_SLEEP * 3
        assert poller.stats.sleeps > 0
    finally:
        poller.stop()
        blk.close()


def test_a_paused_poller_serves_nothing_until_resumed(tmp_path):
    """QMP `stop` pauses the poller with the vCPUs: a request the guest made available stays untouched (no used
    entry, no interrupt) until `cont`, and pause() returns only once no pass is in progress."""
    blk, d, interrupts, poller = polled_disk(tmp_path)
    try:
        poller.pause()
        looks = poller.stats.looks
        head = d.add([(READ_SECTOR_0, False), (512, True), (1, True)])
        d.publish(head)
        time.sleep(0.2)
        assert d.take_used() == [] and interrupts == [] and poller.stats.looks == looks
        poller.resume()
        assert wait_for(lambda: bool(interrupts)), "the resumed poller never served the request"
        assert [h for h, _ in d.take_used()] == [head]
    finally:
        poller.stop()
        blk.close()
