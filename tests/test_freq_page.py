"""The shared frequency page (protocol/cpufreq.py, SPEC §8): layout, and that the seqcount rule
never lets a reader accept a torn entry whatever the interleaving (a pure model of both sides)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.errors import RecordError

SPEC = Path(abi.__file__).with_name("SPEC.md").read_text()


def test_layout_matches_spec() -> None:
    assert "## 8. Shared frequency page" in SPEC
    assert re.search(r"\|\s*1\s*\|\s*`VIRTIO_CPUFREQ_F_FREQ_PAGE`", SPEC) and abi.F_FREQ_PAGE == 1
    assert "domains[8];   /* offset 16;" in SPEC and abi.page_domain_offset(0) == 16
    assert f"{abi.FREQ_PAGE_MAGIC:#x}" in SPEC
    assert abi.page_domain_offset(7) + 16 <= abi.FREQ_PAGE_SIZE == 4096
    with pytest.raises(ValueError):
        abi.page_domain_offset(abi.MAX_DOMAINS)


def test_scale_values() -> None:
    d = abi.PageDomain.of(abi.Domain(1_000_000, 500_000, 2_000_000, capacity=512))
    assert (d.cur_khz, d.freq_scale, d.perf) == (1_000_000, 512, 256)
    assert abi.freq_scale(3_000_000, 2_000_000) == 1024  # boost above "max" reads as full scale
    assert abi.freq_scale(1, 0) == 1024


def test_page_round_trip_and_header() -> None:
    doms = [abi.PageDomain(1_800_000, 900, 450), abi.PageDomain(2_400_000, 1024, 1024)]
    page = abi.encode_page(doms)
    h = abi.decode_page_header(page)
    assert (h.version, h.num_domains, h.live) == (1, 2, True)
    off = abi.page_domain_offset(1)
    assert abi.decode_page_domain(0, page[off:off + 16], 0) == doms[1]
    with pytest.raises(RecordError) as exc:
        abi.decode_page_header(bytes(4096))
    assert exc.value.reason == "page-not-mapped"
    bad = bytearray(page)
    struct.pack_into("<H", bad, 6, 9)
    with pytest.raises(RecordError, match="9 domains"):
        abi.decode_page_header(bytes(bad))
    with pytest.raises(ValueError):
        abi.encode_page([])


def test_update_stores_order() -> None:
    stores = abi.page_update_stores(2, 6, abi.PageDomain(7, 8, 9))
    off = abi.page_domain_offset(2)
    assert stores == ((off, 7), (off + 4, 7), (off + 8, 8 | 9 << 16), (off, 8))
    with pytest.raises(ValueError, match="odd"):
        abi.page_update_stores(2, 7, abi.PageDomain(7, 8, 9))
    # the count wraps as a 32-bit word
    assert abi.page_update_stores(0, 0xFFFFFFFE, abi.PageDomain(1, 1, 1))[-1] == (16, 0)


# -- the model: word-granular memory, a writer and a reader stepping in any interleaving ---------

class Memory:
    def __init__(self, image: bytes) -> None:
        self.words = dict(enumerate(struct.unpack(f"<{len(image) // 4}I", image)))

    def load(self, off: int) -> int:
        return self.words[off // 4]

    def store(self, off: int, value: int) -> None:
        self.words[off // 4] = value


def reader(mem: Memory, index: int, checked: bool):  # type: ignore[no-untyped-def]
    """Yields after each load; returns the PageDomain it accepts (None: it would retry)."""
    off = abi.page_domain_offset(index)
    s1 = mem.load(off)
    yield
    w1 = mem.load(off + 4)
    yield
    w2 = mem.load(off + 8)
    yield
    s2 = mem.load(off)
    entry = struct.pack("<IIII", s1, w1, w2, 0)
    if not checked:
        return abi.PageDomain(w1, w2 & 0xFFFF, w2 >> 16)
    return abi.decode_page_domain(s1, entry, s2)


def run(values: list[abi.PageDomain], schedule: list[bool], checked: bool = True):  # type: ignore[no-untyped-def]
    """Writer applies ``values`` to domain 0 one update at a time; readers start over and over.
    Returns (accepted read, the domain's complete value when that read began) pairs."""
    first = values[0]
    mem = Memory(abi.encode_page([first]))
    stores = [s for i, v in enumerate(values[1:]) for s in abi.page_update_stores(0, 2 * i, v)]
    complete = first  # the value of the last update whose final store has landed
    pending = list(stores)
    updates = iter(values[1:])
    results = []
    rd, began_with, fresh = reader(mem, 0, checked), complete, True
    for writer_turn in schedule:
        if writer_turn and pending:
            off, val = pending.pop(0)
            mem.store(off, val)
            if off == abi.page_domain_offset(0) and val % 2 == 0:
                complete = next(updates)
            continue
        if fresh:  # this step makes the reader's first load
            began_with, fresh = complete, False
        try:
            next(rd)
        except StopIteration as stop:
            if stop.value is not None:
                results.append((stop.value, began_with))
            rd, fresh = reader(mem, 0, checked), True
    return results


domains = st.builds(abi.PageDomain, st.integers(0, 0xFFFFFFFF), st.integers(0, 1024), st.integers(0, 1024))


@settings(max_examples=400, deadline=None)
@given(st.lists(domains, min_size=2, max_size=6), st.lists(st.booleans(), min_size=1, max_size=80))
def test_seqcount_reader_never_accepts_a_torn_entry(values: list[abi.PageDomain], schedule: list[bool]) -> None:
    for got, at_start in run(values, schedule):
        # Accepted means no store to the entry landed during the read: what it sees is exactly
        # the value that was complete when it began.
        assert got == at_start


def test_model_can_fail_without_the_seqcount() -> None:
    """The same model with a reader that ignores seq finds a torn read: the check above is real."""
    a, b = abi.PageDomain(1, 1, 1), abi.PageDomain(2, 2, 2)

    def torn(schedule: list[bool]) -> bool:
        return any(got not in (a, b) for got, _ in run([a, b], schedule, checked=False))

    assert torn(find(st.lists(st.booleans(), max_size=20), torn))


def test_model_accepts_quiet_reads_and_rejects_straddling_ones() -> None:
    a, b = abi.PageDomain(1, 1, 1), abi.PageDomain(2, 2, 2)
    assert run([a, b], [False] * 4) == [(a, a)]  # no writer: the read is accepted
    assert run([a, b], [True] * 4 + [False] * 4) == [(b, b)]  # after the update: the new value
    assert run([a, b], [False, True, False, False, False]) == []  # count went odd mid-read: retry
