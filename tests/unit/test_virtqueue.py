"""The split virtqueue against crafted rings: normal and indirect chains, event idx, 16-bit wrap-around, and
hostile rings that must raise VirtQueueError (never anything else, never a hang)."""
from __future__ import annotations

import pytest

from pyhv.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                               VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY, VirtQueue, VirtQueueError, gather,
                               scatter, split_views)
from virtq_driver import FakeMemory, RingDriver


@pytest.fixture
def mem():
    return FakeMemory()


def test_direct_chain_views_are_zero_copy(mem):
    d = RingDriver(mem)
    q = d.queue()
    head = d.add([(b"hello ", False), (b"world", False), (8, True), (4, True)])
    d.publish(head)
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello ", b"world"]
    assert chain.readable_len == 11 and chain.writable_len == 12
    assert chain.read_all() == b"hello world"
    scatter(chain.writable, b"ABCDEFGHIJKL")
    assert q.pop() is None
    q.push(chain, 12)
    assert d.take_used() == [(head, 12)]
    # the writes went straight into guest memory
    addr = d.heap - 16 - 16
    assert mem.read(addr, 8) == b"ABCDEFGH"


def test_push_clamps_written_to_the_writable_length(mem):
    d = RingDriver(mem)
    q = d.queue()
    d.publish(d.add([(b"x", False), (4, True)]))
    q.push(q.pop(), 1000)
    assert d.take_used()[0][1] == 4


def test_indirect_chain(mem):
    d = RingDriver(mem)
    q = d.queue()
    head = d.add_indirect([(b"abc", False), (b"def", False), (3, True)])
    d.publish(head)
    chain = q.pop()
    assert chain.head == head
    assert chain.read_all() == b"abcdef" and chain.writable_len == 3


def test_many_chains_and_wrap_around_of_16_bit_indices(mem):
    d = RingDriver(mem, size=8, start_idx=0xFFFA)
    q = d.queue()
    seen = []
    for round_ in range(5):
        heads = [d.add([(bytes([round_, k]), False), (1, True)]) for k in range(3)]
        d.publish(*heads)
        for k in range(3):
            chain = q.pop()
            assert chain.read_all() == bytes([round_, k])
            q.push(chain, 1)
            seen.append(chain.head)
        assert q.pop() is None
        assert [h for h, _ in d.take_used()] == heads
    assert q.state.next_avail == (0xFFFA + 15) & 0xFFFF == q.state.next_used


def test_zero_length_descriptor_gives_no_buffer_and_is_not_dereferenced(mem):
    d = RingDriver(mem)
    q = d.queue()
    d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, 0xDEAD_BEEF_0000, 0, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)   # wild address, length 0
    d.write_desc(2, 0x10010, 4, VIRTQ_DESC_F_WRITE)
    d.publish(0)
    chain = q.pop()
    assert chain.readable_len == 4 and chain.writable_len == 4 and len(chain.writable) == 1


def test_no_interrupt_flag_without_event_idx(mem):
    d = RingDriver(mem)
    q = d.queue()
    d.publish(d.add([(1, True)]))
    q.push(q.pop(), 1)
    assert q.should_notify()
    assert not q.should_notify()          # nothing new pushed
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    d.publish(d.add([(1, True)]))
    q.push(q.pop(), 1)
    assert not q.should_notify()


def test_event_idx_used_event(mem):
    d = RingDriver(mem)
    q = d.queue(event_idx=True)
    d.set_used_event(1)                   # interrupt me when used idx passes 1 (i.e. after the 2nd buffer)
    d.publish(*[d.add([(1, True)]) for _ in range(3)])
    q.push(q.pop(), 1)
    assert not q.should_notify()          # used idx 1: event 1 not crossed yet
    q.push(q.pop(), 1)
    assert q.should_notify()              # used idx 2 crossed event 1
    q.push(q.pop(), 1)
    assert not q.should_notify()          # event 1 already passed
    d.set_used_event(3)                   # the driver wants an interrupt once used idx passes 3
    d.publish(d.add([(1, True)]))
    q.push(q.pop(), 1)
    assert q.should_notify()


def test_driver_notification_suppression(mem):
    d = RingDriver(mem)
    q = d.queue()
    q.disable_notification()
    assert d.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notification() is False
    assert not d.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    d.publish(d.add([(1, True)]))
    assert q.enable_notification() is True    # work arrived: the device must pop again

    d2 = RingDriver(FakeMemory())
    q2 = d2.queue(event_idx=True)
    d2.publish(d2.add([(1, True)]), d2.add([(1, True)]))
    q2.pop()
    q2.pop()
    assert q2.enable_notification() is False
    assert d2.avail_event() == 2               # kick me when you add entry 2


def test_split_gather_scatter():
    a, b = memoryview(bytearray(b"abcd")), memoryview(bytearray(b"efgh"))
    head, tail = split_views([a, b], 6)
    assert [bytes(v) for v in head] == [b"abcd", b"ef"] and [bytes(v) for v in tail] == [b"gh"]
    head, tail = split_views([a, b], 4)
    assert [bytes(v) for v in head] == [b"abcd"] and [bytes(v) for v in tail] == [b"efgh"]
    assert split_views([a, b], 99)[1] == []
    assert gather([a, b], 5) == b"abcde" and gather([a], 9) == b"abcd"
    assert scatter([a, b], b"123456") == 6 and bytes(b) == b"56gh"


# --- hostile rings -------------------------------------------------------------------------------------------
def _pop_fails(d: RingDriver, q: VirtQueue, head: int, match: str) -> None:
    d.publish(head)
    with pytest.raises(VirtQueueError, match=match):
        q.pop()


def test_descriptor_loop(mem):
    d = RingDriver(mem)
    q = d.queue()
    d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, 0x10000, 4, VIRTQ_DESC_F_NEXT, 0)
    _pop_fails(d, q, 0, "longer than 16")


def test_self_loop_of_zero_length_descriptors(mem):
    d = RingDriver(mem)
    q = d.queue()
    d.write_desc(3, 0, 0, VIRTQ_DESC_F_NEXT, 3)
    _pop_fails(d, q, 3, "loop")


def test_head_index_out_of_range(mem):
    d = RingDriver(mem)
    _pop_fails(d, d.queue(), 16, "head descriptor index 16")


def test_next_index_out_of_range(mem):
    d = RingDriver(mem)
    d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 99)
    _pop_fails(d, d.queue(), 0, "links to 99")


@pytest.mark.parametrize("addr,length", [(1 << 20, 1), ((1 << 20) - 4, 8), (0xFFFF_FFFF_FFFF_FFF0, 0x20),
                                         (0x10000, 0xFFFF_FFFF)])
def test_buffer_outside_memory(mem, addr, length):
    d = RingDriver(mem)
    d.write_desc(0, addr, length, VIRTQ_DESC_F_WRITE)
    _pop_fails(d, d.queue(), 0, "outside")


def test_readable_after_writable(mem):
    d = RingDriver(mem)
    head = d.add([(4, True), (b"late", False)])
    _pop_fails(d, d.queue(), head, "readable buffer after a device-writable")


def test_nested_indirect(mem):
    d = RingDriver(mem)
    inner, _ = d.alloc(16)
    d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_WRITE, table=inner)
    outer, _ = d.alloc(16)
    d.write_desc(0, inner, 16, VIRTQ_DESC_F_INDIRECT, table=outer)
    d.write_desc(0, outer, 16, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d, d.queue(), 0, "inside an indirect")


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_table_length(mem, length):
    d = RingDriver(mem)
    table, _ = d.alloc(32)
    d.write_desc(0, table, length, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d, d.queue(), 0, "multiple of 16")


def test_indirect_table_too_long(mem):
    d = RingDriver(mem, size=16)
    d.write_desc(0, 0x20000, 16 * 1025, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d, d.queue(), 0, "too long")


def test_indirect_table_outside_memory(mem):
    d = RingDriver(mem)
    d.write_desc(0, (1 << 20) - 16, 32, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d, d.queue(), 0, "indirect table")


def test_indirect_without_the_feature(mem):
    d = RingDriver(mem)
    head = d.add_indirect([(4, True)])
    _pop_fails(d, d.queue(indirect=False), head, "without VIRTIO_F_INDIRECT_DESC")


def test_indirect_with_next_or_not_at_head(mem):
    d = RingDriver(mem)
    table, _ = d.alloc(16)
    d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_WRITE, table=table)
    d.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    _pop_fails(d, d.queue(), 0, "VIRTQ_DESC_F_NEXT")
    d2 = RingDriver(FakeMemory())
    d2.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1)
    d2.write_desc(1, table, 16, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d2, d2.queue(), 0, "not the head")


def test_loop_inside_indirect_table(mem):
    d = RingDriver(mem)
    table, _ = d.alloc(48)
    for k in range(3):
        d.write_desc(k, 0x10000, 4, VIRTQ_DESC_F_NEXT, (k + 1) % 3, table=table)
    d.write_desc(0, table, 48, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d, d.queue(), 0, "longer than 3")


def test_indirect_next_beyond_table(mem):
    d = RingDriver(mem)
    table, _ = d.alloc(32)
    d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 5, table=table)
    d.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    _pop_fails(d, d.queue(), 0, "beyond the 2 entries")


def test_avail_index_too_far_ahead(mem):
    d = RingDriver(mem)
    q = d.queue()
    d.avail_idx = 17
    d.publish()
    with pytest.raises(VirtQueueError, match="more than the queue size"):
        q.pop()


def test_chain_over_4_gib():
    mem = FakeMemory()
    d = RingDriver(mem)

    class Huge(FakeMemory):        # memory that pretends to hold any buffer, to test the byte total alone
        def view(self, gpa, length, write=False):
            return memoryview(bytearray(1))
    q = VirtQueue(0, 16, Huge(), d.desc, d.avail, d.used)
    q._desc, q._avail, q._used = mem.view(d.desc, 256), mem.view(d.avail, 38), mem.view(d.used, 134)
    d.write_desc(0, 0, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, 0, 2, 0)
    _pop_fails(d, q, 0, "over 4 GiB")


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=12), "power of 2"), (dict(size=0), "power of 2"), (dict(size=65536), "power of 2"),
    (dict(desc_addr=0x1008), "misaligned"), (dict(used_addr=0x3002), "misaligned"),
    (dict(used_addr=(1 << 20) - 8), "outside guest memory"), (dict(desc_addr=1 << 40), "outside guest memory"),
])
def test_bad_ring_setup(mem, kwargs, match):
    args = dict(size=16, desc_addr=0x1000, avail_addr=0x2000, used_addr=0x3000) | kwargs
    with pytest.raises(VirtQueueError, match=match):
        VirtQueue(0, args["size"], mem, args["desc_addr"], args["avail_addr"], args["used_addr"])


def test_adjacent_buffers_become_one_view(mem):
    d = RingDriver(mem)
    q = d.queue()
    mem.write(0x20000, b"abcdefgh")
    d.write_desc(0, 0x20000, 4, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, 0x20004, 4, VIRTQ_DESC_F_NEXT, 2)             # right after the first: merged
    d.write_desc(2, 0x30000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3)
    d.write_desc(3, 0x30008, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 4)   # merged too
    d.write_desc(4, 0x30020, 1, VIRTQ_DESC_F_WRITE)               # a gap: a buffer of its own
    d.publish(0)
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"abcdefgh"]
    assert [len(v) for v in chain.writable] == [16, 1]
    assert chain.readable_len == 8 and chain.writable_len == 17


def test_write_into_read_only_memory_is_refused():
    class RomMemory(FakeMemory):          # RAM whose first 64 KiB are read-only (like a shadowed ROM)
        def span(self, gpa):
            if gpa < 0x10000:
                return 0, 0x10000, memoryview(self.buf)[:0x10000], True
            return super().span(gpa)

        def view(self, gpa, length, write=False):
            if write and gpa < 0x10000:
                from pyhv.memory.guest import GuestMemoryError
                raise GuestMemoryError("write to read-only memory")
            return super().view(gpa, length, write)
    mem = RomMemory()
    d = RingDriver(mem, desc=0x11000, avail=0x12000, used=0x13000, heap=0x20000)
    q = d.queue()
    d.write_desc(0, 0x8000, 4, 0, 0)                               # reading ROM is fine
    d.publish(0)
    assert q.pop().readable_len == 4
    d.write_desc(1, 0x8000, 4, VIRTQ_DESC_F_WRITE, 0)
    _pop_fails(d, q, 1, "read-only")


def _linear_table(d: RingDriver, entries) -> int:
    """An indirect table laid out as Linux does (entry i links to i + 1); entries are (addr, len, flags)."""
    table, _ = d.alloc(16 * len(entries))
    for k, (addr, length, flags) in enumerate(entries):
        d.write_desc(k, addr, length, flags, k + 1, table=table)
    d.write_desc(0, table, 16 * len(entries), VIRTQ_DESC_F_INDIRECT)
    return 0


def test_indirect_chain_ends_at_the_first_entry_without_next(mem):
    d = RingDriver(mem)
    q = d.queue()
    head = _linear_table(d, [(0x20000, 4, VIRTQ_DESC_F_NEXT), (0x20010, 4, 0),          # the chain ends here
                             (0x20020, 4, VIRTQ_DESC_F_WRITE)])                        # not part of it
    d.publish(head)
    chain = q.pop()
    assert chain.readable_len == 8 and chain.writable_len == 0


@pytest.mark.parametrize("entries,match", [
    ([(0x20000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT), (0x20010, 4, 0)], "readable buffer after"),
    ([(0x20000, 4, VIRTQ_DESC_F_NEXT), ((1 << 20) - 2, 4, VIRTQ_DESC_F_WRITE)], "outside"),
    ([(0x20000, 4, VIRTQ_DESC_F_NEXT), (0x20010, 16, VIRTQ_DESC_F_INDIRECT)], "inside an indirect"),
    ([(0x20000, 4, VIRTQ_DESC_F_NEXT)] * 3, "beyond the 3 entries"),
])
def test_hostile_linear_indirect_tables(mem, entries, match):
    d = RingDriver(mem)
    _pop_fails(d, d.queue(), _linear_table(d, entries), match)


def need_event(event: int, new: int, old: int) -> bool:
    """The driver's kick rule with VIRTIO_F_EVENT_IDX (virtio 1.2, 2.7.10; Linux's vring_need_event)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def test_disabled_notifications_hold_even_when_the_device_works_during_a_long_batch(mem):
    """Sidecore keeps notifications off: a guest posting a whole ring while the device pops from its start (a
    slow guest filling receive buffers) must not be asked to kick at the end of that batch; nor at any later
    batch, across the 16-bit wrap."""
    d = RingDriver(mem, size=256)
    q = d.queue(event_idx=True)
    old = 0
    for batch in range(300):                       # 300 * 200 buffers: the indices wrap almost once
        q.disable_notification()
        heads = [d.add([(1, True)]) for _ in range(200)]
        for i, head in enumerate(heads):
            d.publish(head)
            if i < 30:                             # the device consumes some while the batch is still posted
                chain = q.pop()
                q.push(chain, 0)
                q.disable_notification()
        new = (old + 200) & 0xFFFF
        assert not need_event(d.avail_event(), new, old), (batch, d.avail_event(), old, new)
        while (chain := q.pop()) is not None:
            q.push(chain, 0)
        d.take_used()
        old = new


def test_during_a_migration_push_marks_the_pages_the_device_wrote(mem):
    """KVM's dirty log does not see pyhv's own writes into guest memory: the queue reports them."""
    d = RingDriver(mem)
    q = d.queue()
    big = d.heap + 16                                                 # after the 7-byte request (16 in the heap)
    direct = d.add([(b"request", False), (0x2000, True)])           # a writable buffer over three pages
    small = d.heap + 32 + 16                                          # after the 2-entry table and the "r"
    indirect = d.add_indirect([(b"r", False), (5, True)])
    d.publish(direct, indirect)
    first, second = q.pop(), q.pop()
    pages = lambda a, n: set(range(a - a % 4096, a + n, 4096))        # noqa: E731
    used = pages(d.used, 6 + 8 * d.size)
    mem.dirty = set()
    q.push(first, 0x2000)
    assert mem.dirty == used | pages(big, 0x2000) and len(pages(big, 0x2000)) == 3
    mem.dirty = set()
    q.push(second, 5)
    assert mem.dirty == used | pages(small, 5)                       # found through the indirect table
    mem.dirty = None
    q.push(first, 0)                                                  # no migration: nothing kept
