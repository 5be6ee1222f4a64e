"""Sidecore emulation (`--sidecore`): a thread of its own polls the virtqueues of the VM's virtio-blk and
virtio-net devices, so the guest never has to notify them.

Samecore (the default) waits for the driver's notification: a write to the notify register that KVM turns into
an ioeventfd signal (or, without ioeventfd, an exit to pyhv). With a poller the devices are `polled`: they keep
the driver's notifications suppressed all the time (VRING_USED_F_NO_NOTIFY, or with VIRTIO_F_EVENT_IDX an
avail_event the driver has already passed), and the poller looks at each available ring itself, serving what is
new on its own thread.

Back-off: after work the poller looks again at once (yielding the GIL) for SPIN_NS, then sleeps, doubling the
sleep from MIN_SLEEP up to MAX_SLEEP while nothing comes. An idle polled VM therefore costs one look per device
every MAX_SLEEP (well under 1 % of a core); the price is up to MAX_SLEEP of latency for the first request after
an idle spell. On a host with fewer cores than vCPUs plus one, the poller competes with the vCPUs it serves.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyhv.runtime.sandbox import confined

if TYPE_CHECKING:
    from pyhv.virtio.device import VirtioDevice

log = logging.getLogger(__name__)

SPIN_NS = 200_000            # keep looking this long after the last work
MIN_SLEEP = 20e-6
MAX_SLEEP = 2e-3


@dataclass
class PollerStats:
    looks: int = 0            # passes over the devices
    busy_looks: int = 0       # passes that found work
    sleeps: int = 0
    devices: list[str] = field(default_factory=list)


class QueuePoller:
    def __init__(self, devices: list["VirtioDevice"], name: str = "pyhv-sidecore") -> None:
        self.devices = list(devices)
        self.name = name
        self.stats = PollerStats(devices=[d.name for d in self.devices])
        self._stop = threading.Event()
        self._running = threading.Event()          # cleared while the VM is paused
        self._running.set()
        self._look = threading.Lock()              # held for one pass over the devices
        self._thread: threading.Thread | None = None
        self.sandbox: str | None = None          # "io": the thread enters runtime/sandbox.py's filter first
        self._failed: set[str] = set()
        for device in self.devices:
            device.polled = True

    def start(self) -> None:
        if self._thread is None and self.devices:
            self._thread = threading.Thread(target=confined(self.sandbox, self._run), name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()                        # a paused poller must see the stop too
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def pause(self) -> None:
        """Stop serving until resume(); when this returns no pass is in progress, so the devices do not touch guest
        memory on the poller's behalf (the VM is paused: QMP `stop`, a snapshot)."""
        self._running.clear()
        with self._look:
            pass

    def resume(self) -> None:
        self._running.set()

    def _run(self) -> None:
        last_work = time.monotonic_ns()
        delay = 0.0
        while not self._stop.is_set():
            if not self._running.is_set():
                self._running.wait()
                last_work, delay = time.monotonic_ns(), 0.0
                continue
            work = False
            with self._look:
                if not self._running.is_set():
                    continue
                for device in self.devices:
                    try:
                        work |= device.poll()
                    except Exception:                   # a device bug must not stop the others' polling
                        if device.name not in self._failed:
                            self._failed.add(device.name)
                            log.exception("%s: polling failed (logged once)", device.name)
            self.stats.looks += 1
            if work:
                self.stats.busy_looks += 1
                last_work, delay = time.monotonic_ns(), 0.0
                continue
            if time.monotonic_ns() - last_work < SPIN_NS:
                time.sleep(0)                       # lets the vCPU and I/O threads have the GIL
                continue
            delay = min(MAX_SLEEP, max(MIN_SLEEP, delay * 2))
            self.stats.sleeps += 1
            self._stop.wait(delay)

    def describe(self) -> dict:
        s = self.stats
        return {"devices": s.devices, "looks": s.looks, "busy_looks": s.busy_looks, "sleeps": s.sleeps}
