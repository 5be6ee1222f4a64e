"""The split virtqueue (virtio 1.2 §2.7), seen from the device side.

    q = VirtQueue(index, size, memory, desc_addr, avail_addr, used_addr, event_idx=True, indirect=True)
    q.disable_notification()
    while (chain := q.pop()) is not None:      # the next available chain, fully validated
        ... read chain.readable, fill chain.writable ...
        q.push(chain, written)                 # into the used ring
    if q.should_notify(): interrupt(q.index)   # VIRTQ_AVAIL_F_NO_INTERRUPT / used_event
    if q.enable_notification(): ...            # True: the driver added buffers meanwhile, pop again

`memory` is anything with `view(gpa, length, write=False) -> memoryview` that raises `GuestMemoryError` for a
range outside RAM: pyhv's `GuestMemory`, a device's `TranslatedDma` behind an IOMMU, or the vhost-user back end's
map of the front end's memory. If it also has `span(gpa) -> (start, end, view, readonly) | None` (the contiguous
range holding gpa), buffers inside the range of the previous one are sliced directly (a chain of 256 pages costs
one lookup, not 256).

Behind an IOMMU (`pyhv.memory.dma`): a buffer the IOMMU refuses (`DmaFault`) does not break the queue, it fails
the request: the chain comes out with `fault` set and without that buffer, and a device that does not handle
faults itself (`faults_to_device` False) never sees it: the queue returns it to the driver with nothing written.
virtio-blk handles them (IOERR in the status byte). A ring or an indirect table the IOMMU refuses is a
`VirtQueueError` (the device needs a reset). The rings are translated again when the IOMMU invalidated a
translation of the device (its `epoch` changed), so an unmapped ring is not used through a stale translation.

Everything the driver wrote is checked before the device sees it: ring addresses and alignment, the available
index (never more than `size` ahead of the device), descriptor indices, chain length (a loop in the descriptor
table or a chain longer than the queue), every buffer's address and length (inside RAM, in one piece), a
device-readable buffer after a device-writable one, indirect tables (feature negotiated, only as the head
descriptor, not combined with NEXT, a whole number of descriptors, no indirect inside indirect) and the 4 GiB
total of a chain. A violation raises `VirtQueueError`; the device then sets DEVICE_NEEDS_RESET and stops using the
queue. Zero-length descriptors are allowed (they count towards the chain length) but give no buffer.

Buffers are zero-copy memoryviews into guest memory, so the device can pass them to `os.preadv`/`os.pwritev` or a
socket directly. The queue reads each descriptor exactly once, so a driver changing the table under the device
cannot make a checked value differ from the used one.

Memory ordering: x86 keeps stores in order and loads in order, which the ring protocol needs, but may let a load
pass an earlier store. Where the protocol needs a full barrier (store the used index, then load used_event or the
avail flags; store avail_event, then load the avail index) `full_barrier()` issues one: acquiring an uncontended
lock is a locked read-modify-write, a full fence on x86. Without it the device and the driver can each miss the
other's update and neither notifies: a ring that stalls for good.
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field

from pyhv.memory.dma import DmaFault
from pyhv.memory.guest import GuestMemoryError

log = logging.getLogger(__name__)

# virtio 1.2 §2.7.5: struct virtq_desc flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# §2.7.6 / §2.7.8: ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")          # addr, len, flags, next
PAGE = 4096
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")       # id, len


_fence = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (the lock's atomic read-modify-write)."""
    _fence.acquire()
    _fence.release()


class VirtQueueError(Exception):
    """The driver broke the virtqueue rules; the device must not use this queue until it is reset."""


@dataclass(slots=True)
class DescriptorChain:
    """One available descriptor chain: its head index and its buffers, in order, as views into guest memory."""
    head: int
    readable: list[memoryview] = field(default_factory=list)      # device-readable (driver -> device)
    writable: list[memoryview] = field(default_factory=list)      # device-writable (device -> driver)
    readable_len: int = 0
    writable_len: int = 0
    fault: str | None = None            # the IOMMU refused a buffer of this chain (it is not in the lists)
    fault_at_end: bool = False          # ... the chain's last descriptor (virtio-blk's status byte) among them

    def read_all(self) -> bytes:
        """All device-readable bytes, concatenated (for small control messages)."""
        return b"".join(self.readable)


@dataclass
class VirtQueueState:
    """A virtqueue's state, in one object for `info` commands and snapshots."""
    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool
    indirect: bool
    next_avail: int = 0           # the avail ring slot (free-running 16-bit) the device reads next
    next_used: int = 0            # the used ring slot the device writes next
    signalled_used: int = 0       # next_used when should_notify() last decided
    popped: int = 0
    pushed: int = 0


def split_views(views: list[memoryview], offset: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split a buffer list at byte `offset`: (the first `offset` bytes, the rest). Views are sliced, not copied."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for i, v in enumerate(views):
        n = len(v)
        if offset >= n:
            head.append(v)
            offset -= n
            continue
        if offset:
            head.append(v[:offset])
            tail.append(v[offset:])
        else:
            tail.append(v)
        tail.extend(views[i + 1:])
        break
    return head, tail


def gather(views: list[memoryview], length: int) -> bytes:
    """The first `length` bytes of a buffer list (fewer if the buffers are shorter)."""
    if views and len(views[0]) >= length:
        return bytes(views[0][:length])
    out = bytearray()
    for v in views:
        out += v[:length - len(out)]
        if len(out) >= length:
            break
    return bytes(out)


def scatter(views: list[memoryview], data: bytes | bytearray | memoryview) -> int:
    """Copy `data` into a buffer list from its start; returns the number of bytes copied."""
    data = memoryview(data)
    done = 0
    for v in views:
        if done >= len(data):
            break
        n = min(len(v), len(data) - done)
        v[:n] = data[done:done + n]
        done += n
    return done


class VirtQueue:
    def __init__(self, index: int, size: int, memory, desc_addr: int, avail_addr: int, used_addr: int,
                 event_idx: bool = False, indirect: bool = True, next_avail: int = 0,
                 next_used: int = 0) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtQueueError(f"queue {index}: size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise VirtQueueError(f"queue {index}: misaligned rings (desc {desc_addr:#x}, avail {avail_addr:#x}, "
                                 f"used {used_addr:#x})")
        self.state = VirtQueueState(index, size, desc_addr, avail_addr, used_addr, event_idx, indirect,
                                    next_avail & 0xFFFF, next_used & 0xFFFF, next_used & 0xFFFF)
        self.index = index
        self.size = size
        self.memory = memory
        self.faults_to_device = False       # the device handles chains with `fault` set itself
        self.faulted = 0                    # chains returned for a refused buffer
        self._translated = hasattr(memory, "epoch")     # behind an IOMMU: re-translate the rings after invalidations
        self._map_rings()
        # optional fast path: memory.span(gpa) -> (start, end, view, readonly) of the RAM range holding gpa
        self._span = getattr(memory, "span", None)
        self._views = getattr(memory, "views", None)
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size

    def _map_rings(self) -> None:
        st, memory, size = self.state, self.memory, self.size
        if self._translated:
            self._epoch = memory.epoch
        view = memory.pinned_view if self._translated else memory.view
        try:
            self._desc = view(st.desc_addr, DESC_SIZE * size)
            self._avail = view(st.avail_addr, 6 + 2 * size)
            self._used = view(st.used_addr, 6 + 8 * size, write=True)
        except GuestMemoryError as e:
            raise VirtQueueError(f"queue {self.index}: ring outside guest memory: {e}") from None

    # --- driver -> device ------------------------------------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not popped (checked)."""
        n = (self.avail_idx() - self.state.next_avail) & 0xFFFF
        if n > self.size:
            raise VirtQueueError(f"queue {self.index}: available index {self.avail_idx()} is {n} entries ahead "
                                 f"of the device's {self.state.next_avail}, more than the queue size {self.size}")
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None when the driver has made none available."""
        st = self.state
        if self._translated and self.memory.epoch != self._epoch:
            self._map_rings()
        while self.pending():
            head = _U16.unpack_from(self._avail, 4 + 2 * (st.next_avail % self.size))[0]
            st.next_avail = (st.next_avail + 1) & 0xFFFF
            st.popped += 1
            chain = self._walk(head)
            if chain.fault is None or self.faults_to_device:
                return chain
            self.faulted += 1
            self.push(chain, 0)             # the request fails; the driver gets its buffers back
        return None

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise VirtQueueError(f"queue {self.index}: head descriptor index {head} is not below the size {size}")
        view, span = self.memory.view, self._span
        lo = hi = 0                         # the last RAM range a buffer fell in (from `span`): [lo, hi)
        base: memoryview | None = None
        writable_range = False
        run_start = run_end = run_lo = -1           # the buffer being extended by adjacent descriptors
        run_write = 0
        chain = DescriptorChain(head)
        readable, writable = chain.readable, chain.writable
        desc = self._desc
        fetch = lambda i: _DESC.unpack_from(desc, DESC_SIZE * i)   # noqa: E731
        limit = size
        i, count, rlen, wlen = head, 0, 0, 0
        in_indirect = False
        while True:
            addr, length, flags, nxt = fetch(i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, limit = self._indirect_table(addr, length, flags, in_indirect, count)
                raw = bytes(table)                                     # the table read once, as a whole
                if span is not None:
                    fast = self._linear_chain(head, raw, span)
                    if fast is not None:
                        return fast
                fetch = list(_DESC.iter_unpack(raw)).__getitem__
                in_indirect, i = True, 0
                continue
            count += 1
            if count > limit:
                raise VirtQueueError(f"queue {self.index}: chain from head {head} is longer than "
                                     f"{limit} descriptors (a loop?)")
            if length:
                write = flags & VIRTQ_DESC_F_WRITE
                if not write and writable:
                    raise VirtQueueError(f"queue {self.index}: chain from head {head} has a "
                                         "device-readable buffer after a device-writable one")
                if not (lo <= addr and addr + length <= hi and (writable_range or not write)):
                    found = span(addr) if span is not None else None
                    if found is not None:
                        lo, hi, base, readonly = found
                        writable_range = not readonly
                bufs = writable if write else readable
                if lo <= addr and addr + length <= hi and (writable_range or not write):
                    if addr == run_end and write == run_write and lo == run_lo:
                        # continues the previous buffer in memory: one longer view (fewer iovecs)
                        bufs[-1] = base[run_start - lo:addr - lo + length]
                    else:
                        bufs.append(base[addr - lo:addr - lo + length])   # a slice of the known range
                        run_start, run_lo, run_write = addr, lo, write
                    run_end = addr + length
                else:
                    try:
                        if self._views is not None:
                            bufs.extend(self._views(addr, length, bool(write)))
                        else:
                            bufs.append(view(addr, length, bool(write)))
                    except DmaFault as e:
                        chain.fault = chain.fault or str(e)
                        chain.fault_at_end = not flags & VIRTQ_DESC_F_NEXT
                        length = 0                      # not in the chain's lengths either
                    except GuestMemoryError as e:
                        raise VirtQueueError(f"queue {self.index}: descriptor {i} of chain {head}: {e}") from None
                    run_end = -1
                if write:
                    wlen += length
                else:
                    rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise VirtQueueError(f"queue {self.index}: descriptor {i} of chain {head} links to {nxt}, "
                                     f"beyond the {limit} entries of its table")
            i = nxt
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise VirtQueueError(f"queue {self.index}: chain from head {head} has {rlen + wlen} bytes, over 4 GiB")
        chain.readable_len, chain.writable_len = rlen, wlen
        return chain

    @staticmethod
    def _linear_chain(head: int, raw: bytes, span) -> DescriptorChain | None:
        """The common indirect table (`raw`, a copy), checked with whole-list operations: entries 0..n-1 linked in
        order, readable then writable buffers, all in one RAM range, no other flag bits. None when it is anything
        else (the general walk then checks it descriptor by descriptor and gives the precise error)."""
        table = memoryview(raw)
        addrs = table.cast("Q")[0::2].tolist()      # struct virtq_desc: addr u64, len u32, flags u16, next u16
        lens = table.cast("I")[2::4].tolist()
        flags = table.cast("H")[6::8].tolist()
        nexts = table.cast("H")[7::8].tolist()
        n, last = len(flags), flags[-1]
        linked, linked_w = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
        if not set(flags[:-1]) <= {linked, linked_w} or last not in (0, VIRTQ_DESC_F_WRITE) \
                or nexts[:-1] != list(range(1, n)):
            return None                             # not the whole table linked in order, or other flags
        if linked_w in flags:
            w = flags.index(linked_w)
            if linked in flags[w:] or last != VIRTQ_DESC_F_WRITE:
                return None                         # a readable buffer after a writable one
        else:
            w = n - 1 if last == VIRTQ_DESC_F_WRITE else n
        found = span(min(addrs))
        if found is None:
            return None
        lo, hi, base, readonly = found
        if readonly and w < n:
            return None
        rlen, wlen = sum(lens[:w]), sum(lens[w:])
        if rlen + wlen > MAX_CHAIN_BYTES:
            return None
        readable = [base[a - lo:a - lo + k] for a, k in zip(addrs[:w], lens[:w]) if k]
        writable = [base[a - lo:a - lo + k] for a, k in zip(addrs[w:], lens[w:]) if k]
        if sum(map(len, readable)) != rlen or sum(map(len, writable)) != wlen:
            return None                             # some buffer ran past the range (its slice came out short)
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def _indirect_table(self, addr: int, length: int, flags: int, in_indirect: bool,
                        count: int) -> tuple[memoryview, int]:
        if not self.state.indirect:
            raise VirtQueueError(f"queue {self.index}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if in_indirect:
            raise VirtQueueError(f"queue {self.index}: indirect descriptor inside an indirect table")
        if count:
            raise VirtQueueError(f"queue {self.index}: indirect descriptor that is not the head of its chain")
        if flags & VIRTQ_DESC_F_NEXT:
            raise VirtQueueError(f"queue {self.index}: indirect descriptor with VIRTQ_DESC_F_NEXT")
        if length == 0 or length % DESC_SIZE:
            raise VirtQueueError(f"queue {self.index}: indirect table length {length} is not a positive "
                                 f"multiple of {DESC_SIZE}")
        n = length // DESC_SIZE
        if n > max(self.size, 1024):
            raise VirtQueueError(f"queue {self.index}: indirect table of {n} descriptors is too long")
        try:
            return self.memory.view(addr, length), n
        except GuestMemoryError as e:
            raise VirtQueueError(f"queue {self.index}: indirect table: {e}") from None

    def undo_pop(self) -> None:
        """Give the last popped chain back (e.g. a receive buffer the device could not fill yet)."""
        self.state.next_avail = (self.state.next_avail - 1) & 0xFFFF
        self.state.popped -= 1

    # --- device -> driver ------------------------------------------------------------------------------------
    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver through the used ring, with `written` bytes written into its buffers."""
        self.fill(chain.head, min(max(written, 0), chain.writable_len), 0)
        self.flush(1)

    def fill(self, head: int, written: int, offset: int) -> None:
        """Write a used element `offset` places after the current used index, without publishing it
        (virtio-net's mergeable receive buffers publish several chains at once with `flush`)."""
        slot = (self.state.next_used + offset) % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        dirty = getattr(self.memory, "dirty", None)
        if dirty is not None:                  # a live migration: KVM does not see what pyhv writes
            self._mark_written(head, dirty)

    def flush(self, count: int) -> None:
        """Publish `count` used elements written by `fill`."""
        st = self.state
        st.next_used = (st.next_used + count) & 0xFFFF
        st.pushed += count
        _U16.pack_into(self._used, 2, st.next_used)

    def _mark_written(self, head: int, dirty: set[int]) -> None:
        """Add to `dirty` the guest pages of the chain's device-writable buffers and of the used ring (the chain
        was checked when it was popped; this walk only reads addresses, and gives up quietly on anything odd)."""
        used = self.state.used_addr
        dirty.update(range(used - used % PAGE, used + 6 + 8 * self.size, PAGE))
        table, limit, i = self._desc, self.size, head
        for _ in range(2 * self.size + 2):
            if i >= limit:
                return
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                try:
                    table = bytes(self.memory.view(addr, length))
                except GuestMemoryError:
                    return
                limit, i = len(table) // DESC_SIZE, 0
                continue
            if flags & VIRTQ_DESC_F_WRITE and length:
                dirty.update(range(addr - addr % PAGE, addr + length, PAGE))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            i = nxt

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers pushed since the last call."""
        st = self.state
        old, new = st.signalled_used, st.next_used
        if old == new:
            return False
        st.signalled_used = new
        full_barrier()                      # the used index is visible before we read the driver's wish
        if st.event_idx:
            used_event = _U16.unpack_from(self._avail, self._used_event_off)[0]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def describe(self) -> str:
        """One line for logs and `info` commands: the device's indices and what the driver shows in its rings."""
        st = self.state
        flags = _U16.unpack_from(self._avail, 0)[0]
        used_event = _U16.unpack_from(self._avail, self._used_event_off)[0]
        avail_event = _U16.unpack_from(self._used, self._avail_event_off)[0]
        return (f"queue {self.index}: avail idx {self.avail_idx()} flags {flags:#x} used_event {used_event}; device "
                f"next_avail {st.next_avail} next_used {st.next_used} signalled {st.signalled_used} avail_event "
                f"{avail_event} (popped {st.popped}, pushed {st.pushed})")

    # --- notification suppression for the driver -------------------------------------------------------------
    def disable_notification(self) -> None:
        """Ask the driver not to kick (the device is polling the queue anyway). With event idx: an avail_event half
        the index space behind the device's position. The driver kicks when a batch it posts crosses avail_event;
        just behind would not do, since a device working while a long batch is still being posted (a slow guest
        filling 256 receive buffers) moves next_avail into that batch. No batch (at most a ring, 32768) spans 0x8000."""
        if self.state.event_idx:
            _U16.pack_into(self._used, self._avail_event_off, (self.state.next_avail - 0x8001) & 0xFFFF)
        else:
            _U16.pack_into(self._used, 0, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notification(self, after: int | None = None) -> bool:
        """Ask the driver to kick for the next buffer; True if buffers arrived meanwhile (pop them first).

        `after`: the available index the driver must move past, by default the device's next chain. A device that
        has looked at the chains already there and given them back (too little room for a frame) passes the
        available index it saw: asking for a kick at its own, older position would never be answered, because the
        driver kicks only when its index crosses the one the device asks for."""
        st = self.state
        target = st.next_avail if after is None else after
        if st.event_idx:
            _U16.pack_into(self._used, self._avail_event_off, target)
        else:
            _U16.pack_into(self._used, 0, 0)
        full_barrier()                      # the driver sees our wish before we look at its index once more
        return self.avail_idx() != target
