"""`IoThread`: one thread running a `selectors` loop over file descriptors (eventfds, tap, sockets, the terminal),
timers, and callbacks posted from other threads. Device back ends do their host I/O here, off the vCPU threads."""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from typing import Callable

from pyhv.runtime.sandbox import confined

log = logging.getLogger(__name__)


class Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class IoThread:
    def __init__(self, name: str = "pyhv-io") -> None:
        self.name = name
        self.sandbox: str | None = None          # "io": the thread enters runtime/sandbox.py's filter first
        self.selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.selector.register(self._wake_fd, selectors.EVENT_READ, self._drain_wake)
        self._calls: deque[tuple[Callable, tuple]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = [0, 0, 0]         # wake-ups, callbacks run, ns spent running them (`pyhv top`, QMP)

    # --- registration (thread-safe: changes are applied on the loop thread) ------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.call_soon(self._register, fd, callback)

    def remove_reader(self, fd: int) -> None:
        self.call_soon(self._unregister, fd)

    def _register(self, fd: int, callback: Callable[[], None]) -> None:
        try:
            self.selector.register(fd, selectors.EVENT_READ, callback)
        except KeyError:
            self.selector.modify(fd, selectors.EVENT_READ, callback)

    def _unregister(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_soon(self, fn: Callable, *args: object) -> None:
        self._calls.append((fn, args))
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, fn)
        with self._lock:
            heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        self._wake()
        return timer

    def _wake(self) -> None:
        if threading.current_thread() is not self._thread:
            os.eventfd_write(self._wake_fd, 1)

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    # --- loop ------------------------------------------------------------------------------------------------
    @property
    def native_id(self) -> int:
        thread = self._thread
        return thread.native_id or 0 if thread is not None else 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=confined(self.sandbox, self._run), name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None and self._thread is not threading.current_thread():
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self.selector.close()
        os.close(self._wake_fd)

    def _run(self) -> None:
        while not self._stopping:
            timeout = None
            with self._lock:
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
            if self._calls:
                timeout = 0
            events = self.selector.select(timeout)
            woke = time.perf_counter_ns()
            for key, _ in events:
                self._call(key.data)
            calls = len(events)
            while self._calls:
                fn, args = self._calls.popleft()
                self._call(fn, *args)
                calls += 1
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._timers or self._timers[0][0] > now:
                        break
                    _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    self._call(timer.fn)
                    calls += 1
            stats = self.stats
            stats[0] += 1
            stats[1] += calls
            stats[2] += time.perf_counter_ns() - woke

    @staticmethod
    def _call(fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except Exception:   # a failing back end must not take the I/O thread (and every device) with it
            log.exception("I/O thread callback %r failed", fn)
