"""Snapshot sections for the shared frequency page (SPEC §8): the session's regions and the writer's state.

Theory of operation: a session with the page in use holds a sealed memfd
that QEMU maps into BAR 4 (vhost-user SHMEM_MAP).  The guest keeps reading
that very memory after a handover or a crash, so the successor must map the
same memfd and go on writing it where the predecessor stopped: no new map is
sent (QEMU's mapping is of the same file), and each domain's sequence count
goes on from its last value, never back (a reader that saw the old count
would otherwise accept a torn entry whose count came round to it again).

:class:`ShmemSnapshot` is the transport's part (protocol/shmem.py's rules and
the shell's pages, map acks still awaited and bytes of an ack already read);
:class:`PageSnapshot` is the device's part: each domain's count and the
values last written.  A writer state that is not exact (the fd store's
record, written while the service ran) has its counts taken from the page
itself and its values unknown (:func:`at_page_counts`): every entry is then
rewritten through one more odd/even round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from . import cpufreq as abi
from . import vhost_user as vu
from .snapshot_codec import U16, U32, Obj, SnapshotError

__all__ = ["ShmemPageRef", "ShmemSnapshot", "PageSnapshot", "shmem_to_json", "shmem_from_json",
           "page_to_json", "page_from_json", "page_resumed"]

_MAX_REGION = 1 << 30
_ACK_BYTES = vu.HEADER_SIZE + 8  # one whole ack: a partial one is shorter
_SLUG = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class ShmemPageRef:
    shmid: int
    size: int
    fd: int  # index into the fd list: the region's sealed memfd (the front-end maps the same file)
    in_use: bool  # the front-end acked its map and has not dropped it since


@dataclass(frozen=True, slots=True)
class ShmemSnapshot:
    channel: bool  # the rules' state (protocol/shmem.py ShmemRules)
    mapped: bool
    pages: tuple[ShmemPageRef, ...]
    pending: tuple[int, ...]  # shmids whose map's ack is not read yet, in the order sent
    ack_buf: bytes  # the start of an ack already read from the back-end channel
    broken: str | None  # why the channel is no longer used for regions (a reason slug)


@dataclass(frozen=True, slots=True)
class PageSnapshot:
    seq: tuple[int, ...]  # each domain's sequence count (even), abi.MAX_DOMAINS of them
    values: tuple[tuple[int, int, int] | None, ...]  # (cur_khz, freq_scale, perf) last written; None: unknown


def shmem_to_json(s: ShmemSnapshot) -> dict[str, Any]:
    return {"channel": s.channel, "mapped": s.mapped,
            "pages": [{"shmid": p.shmid, "size": p.size, "fd": p.fd, "in_use": p.in_use} for p in s.pages],
            "pending": list(s.pending), "ack_buf": s.ack_buf.hex(), "broken": s.broken}


_SHMEM_KEYS = ("channel", "mapped", "pages", "pending", "ack_buf", "broken")
_PAGE_REF_KEYS = ("shmid", "size", "fd", "in_use")


def shmem_from_json(obj: Any) -> ShmemSnapshot:
    o = Obj(obj, "shmem", _SHMEM_KEYS)
    pages: list[ShmemPageRef] = []
    for i, p in enumerate(o.items("pages", vu.MEMORY_BASELINE_NREGIONS)):
        r = Obj(p, f"shmem.pages[{i}]", _PAGE_REF_KEYS)
        ref = ShmemPageRef(r.num("shmid", hi=vu.MEMORY_BASELINE_NREGIONS - 1), r.num("size", lo=4096, hi=_MAX_REGION),
                           r.num("fd", hi=U16), r.flag("in_use"))
        if ref.size % 4096:
            raise SnapshotError("malformed", f"shmem.pages[{i}].size {ref.size} is not a page multiple")
        if pages and ref.shmid <= pages[-1].shmid:
            raise SnapshotError("malformed", "shmem.pages are not in increasing shmid order")
        pages.append(ref)
    shmids = {p.shmid for p in pages}
    pending = []
    for v in o.items("pending", 2 * vu.MEMORY_BASELINE_NREGIONS):
        if type(v) is not int or v not in shmids:
            raise SnapshotError("malformed", f"shmem.pending: {v!r} is not a region of the snapshot")
        pending.append(v)
    broken = o.opt("broken", lambda k: o.text(k, 64))
    if broken is not None and not _SLUG.fullmatch(broken):
        raise SnapshotError("malformed", f"shmem.broken {broken!r} is not a reason slug")
    s = ShmemSnapshot(o.flag("channel"), o.flag("mapped"), tuple(pages), tuple(pending),
                      o.hexbytes("ack_buf", _ACK_BYTES - 1), broken)
    if s.mapped and not s.channel:
        raise SnapshotError("inconsistent-shmem", "regions mapped without a back-end channel")
    if any(p.in_use for p in s.pages) and not s.mapped:
        raise SnapshotError("inconsistent-shmem", "a region in use that was never mapped")
    if (s.pending or s.ack_buf) and s.broken is not None:
        raise SnapshotError("inconsistent-shmem", "acks awaited on a channel no longer used")
    return s


def page_to_json(p: PageSnapshot) -> dict[str, Any]:
    return {"seq": list(p.seq), "values": [None if v is None else list(v) for v in p.values]}


def page_from_json(obj: Any) -> PageSnapshot:
    o = Obj(obj, "device.page", ("seq", "values"))
    seq = o.items("seq", abi.MAX_DOMAINS)
    if len(seq) != abi.MAX_DOMAINS or any(type(s) is not int or not 0 <= s <= U32 or s & 1 for s in seq):
        raise SnapshotError("malformed", f"device.page.seq: {abi.MAX_DOMAINS} even 32-bit counts expected")
    values: list[tuple[int, int, int] | None] = []
    for v in o.items("values", abi.MAX_DOMAINS):
        if v is None:
            values.append(None)
            continue
        if (not isinstance(v, list) or len(v) != 3 or any(type(x) is not int for x in v)
                or not 0 <= v[0] <= U32 or not 0 <= v[1] <= abi.UTIL_SCALE or not 0 <= v[2] <= abi.UTIL_SCALE):
            raise SnapshotError("malformed", f"device.page.values: {v!r}")
        values.append((v[0], v[1], v[2]))
    if len(values) != abi.MAX_DOMAINS:
        raise SnapshotError("malformed", f"device.page.values: {abi.MAX_DOMAINS} entries expected")
    return PageSnapshot(tuple(seq), tuple(values))


def page_resumed(counts: Sequence[int]) -> PageSnapshot:
    """The writer's state from the counts read in the page itself (after a crash): each goes on from
    the next even count (an odd one was cut mid-update), every value unknown (all rewritten)."""
    if len(counts) != abi.MAX_DOMAINS:
        raise SnapshotError("malformed", f"{len(counts)} page counts, {abi.MAX_DOMAINS} expected")
    return PageSnapshot(tuple((c + 1) & ~1 & U32 for c in counts), (None,) * abi.MAX_DOMAINS)
