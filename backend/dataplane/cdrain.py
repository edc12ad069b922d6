"""The request-queue drain in C (``ring_drain.c``), and the choice of data plane.

The pure-Python :func:`vhost_user_cpufreq.protocol.requests.drain` is the
reference and the fallback; this module runs the same drain in C when it can
and returns the same :class:`~vhost_user_cpufreq.protocol.requests.Drained`.
The same library holds the kick lane (``lane.py``) and the guard
(``guard.py``); ``library.py`` loads it: the prebuilt extension, else a
run-time build, else none.

Choice: ``VUC_DATAPLANE=c`` demands C (start fails without it), ``python``
forces the reference, ``auto`` (the default) uses C when it loads and says
so once in the log when it does not.  ``VUC_KICK_LANE=0`` keeps the C drain
but serves every kick on the event loop (the lane is on by default).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.requests import ENTRY, MAX_BUDGET, PYTHON_BUFFER_UNITS, Drained
from vhost_user_cpufreq.protocol.requests import drain as reference_drain
from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue

from .library import SOURCES, build_library, ffi, load

__all__ = ["DataPlane", "dataplane", "CDrainer", "build_library", "pointer_to", "SOURCES", "ffi"]

log = logging.getLogger("vhost_user_cpufreq.dataplane")

_RECORD = abi.RECORD_SIZE
_ffi = ffi  # the library's ffi (library.py): the prebuilt extension's, or the run-time build's


@dataclass(frozen=True)
class DataPlane:
    """Which drain runs, and why."""

    kind: str  # "c" or "python"
    detail: str
    lib: Any = None
    lane: bool = False  # request queues may be served by the C kick lane (backend/dataplane/lane.py)

    def drainer(self, queue: DeviceQueue, budget: int) -> Callable[..., Drained]:
        """A ``drain(queue, budget, num_vcpus=, perf_request=)`` bound to ``queue``.

        The Python reference, when it serves, prices a buffer at PYTHON_BUFFER_UNITS: its turn
        on the event loop is then bounded in time as well as in records (docs/hostile-input.md).
        """
        if self.lib is not None:
            d = CDrainer.for_queue(self.lib, queue, budget)
            if d is not None:
                return d.drain
        return python_turn


#: How long a turn of the Python drain may run before it yields to other VMs (the buffer that
#: crosses it is completed): a victim VM waits for at most about this much of a flooder's turn.
PYTHON_TURN_S = 0.0003


def python_turn(queue: DeviceQueue, budget: int, *, num_vcpus: int, perf_request: bool) -> Drained:
    """The Python reference as the data plane: each buffer priced at PYTHON_BUFFER_UNITS, and the
    turn ended after PYTHON_TURN_S, so its time on the event loop is bounded (docs/hostile-input.md)."""
    end = time.perf_counter() + PYTHON_TURN_S
    return reference_drain(queue, budget, num_vcpus=num_vcpus, perf_request=perf_request,
                           buffer_units=PYTHON_BUFFER_UNITS, out_of_time=lambda: time.perf_counter() > end)


_selected: DataPlane | None = None


def dataplane(refresh: bool = False) -> DataPlane:
    """The data plane this process uses (chosen once, from ``VUC_DATAPLANE``)."""
    global _selected
    if _selected is not None and not refresh:
        return _selected
    want = os.environ.get("VUC_DATAPLANE", "auto")
    if want not in ("auto", "c", "python"):
        raise RuntimeError(f"VUC_DATAPLANE={want!r}: expected auto, c or python")
    if want == "python":
        _selected = DataPlane("python", "pure Python (VUC_DATAPLANE=python)")
        return _selected
    try:
        loaded = load()
    except RuntimeError as exc:
        if want == "c":
            raise RuntimeError(f"VUC_DATAPLANE=c but the C data plane is unavailable: {exc}") from None
        _selected = DataPlane("python", f"pure Python ({exc})")
        log.warning("data plane degraded to the pure-Python reference: %s", exc)
        return _selected
    lane = os.environ.get("VUC_KICK_LANE", "1") not in ("0", "off", "no")
    detail = loaded.describe() + ("" if lane else ", kick lane off (VUC_KICK_LANE=0)")
    _selected = DataPlane("c", detail, loaded.lib, lane)
    return _selected


def pointer_to(view: Any, *, writable: bool = False) -> Any:
    """A ``uint8_t *`` to the memory of ``view`` (a memoryview), without a lasting export of it.

    The caller keeps ``view`` alive: its own export keeps the memory mapped
    (an mmap cannot be closed under it).  A cffi buffer kept on the
    memoryview would leave the memoryview itself exported, and CPython 3.11
    crashes in memory_dealloc when the garbage collector clears such a
    memoryview in a reference cycle (as an exception's traceback can make).
    """
    buf = _ffi.from_buffer(view, require_writable=writable)
    try:
        return _ffi.cast("uint8_t *", buf)
    finally:
        _ffi.release(buf)


class _Misaligned(ValueError):
    pass


class CDrainer:
    """One queue's C drain: the ring and region pointers, output arrays, cursor copy-in/out."""

    __slots__ = ("_lib", "_queue", "_q", "_keep", "_regions", "_mem_gen", "_cap",
                 "_entries", "_records", "_rejects", "_scratch", "_res")

    @classmethod
    def for_queue(cls, lib: Any, queue: DeviceQueue, budget: int) -> "CDrainer | None":
        """None when C cannot take this queue: rings not aligned as virtio requires, or a
        guest memory that does not list its regions (the reference copes with both)."""
        if not hasattr(queue.memory, "spans"):
            return None
        try:
            return cls(lib, queue, budget)
        except _Misaligned:
            return None

    def __init__(self, lib: Any, queue: DeviceQueue, budget: int) -> None:
        if not 1 <= budget <= MAX_BUDGET:
            raise ValueError(f"budget {budget} outside 1..{MAX_BUDGET}")
        self._lib = lib
        self._queue = queue
        desc, avail, used = queue.areas()
        ptrs = (pointer_to(desc), pointer_to(avail), pointer_to(used, writable=True))
        # The C code loads ring indices as aligned 16-bit words (virtio 1.x 2.7 requires the alignment).
        if int(_ffi.cast("uintptr_t", ptrs[1])) % 2 or int(_ffi.cast("uintptr_t", ptrs[2])) % 4:
            raise _Misaligned("avail or used ring not aligned as virtio requires")
        q = _ffi.new("vuc_queue *")
        q.desc = ptrs[0]
        q.avail = _ffi.cast("uint16_t *", ptrs[1])
        q.used = ptrs[2]
        q.size = queue.size
        q.indirect = int(queue.indirect)
        q.max_chain_bytes = queue.max_chain_bytes
        q.max_indirect = queue.max_indirect
        self._q = q
        self._keep = (desc, avail, used)  # the views keep the memory mapped while C points into it
        self._regions: Any = None
        self._mem_gen: int | None = None
        self._cap = budget
        self._entries = _ffi.new("uint8_t[]", ENTRY.size * (budget + 1))
        self._records = _ffi.new("uint8_t[]", _RECORD * (budget + abi.MAX_RECORDS_PER_BATCH))
        self._rejects = _ffi.new("uint32_t[]", budget + abi.MAX_RECORDS_PER_BATCH)
        self._scratch = _ffi.new("uint8_t[]", abi.BATCH_HEADER_SIZE + _RECORD * abi.MAX_RECORDS_PER_BATCH)
        self._res = _ffi.new("vuc_result *")

    def _map_regions(self) -> None:
        mem = self._queue.memory
        spans = mem.spans()
        regions = _ffi.new("vuc_region[]", max(1, len(spans)))
        keep = []
        for i, (gpa, view) in enumerate(spans):
            keep.append(view)
            regions[i].gpa = gpa
            regions[i].size = view.nbytes
            regions[i].host = pointer_to(view)
        self._regions = (regions, keep)
        self._q.regions = regions
        self._q.nregions = len(spans)
        self._mem_gen = mem.generation

    def drain(self, queue: DeviceQueue, budget: int, *, num_vcpus: int, perf_request: bool) -> Drained:
        if queue is not self._queue:
            raise ValueError("a CDrainer drains the queue it was made for")
        if not 1 <= budget <= self._cap:
            raise ValueError(f"budget {budget} outside 1..{self._cap}")
        if self._mem_gen != queue.memory.generation:
            self._map_regions()
        res = self._res
        queue.packed_cursor = self._lib.vuc_drain(
            self._q, queue.packed_cursor, budget, num_vcpus, perf_request, self._entries, self._records,
            self._rejects, self._scratch, res)
        n = res.entries
        if not n:
            return Drained(more=bool(res.more))
        return Drained(
            list(ENTRY.iter_unpack(_ffi.buffer(self._entries, ENTRY.size * n))),
            list(abi.RECORD_STRUCT.iter_unpack(_ffi.buffer(self._records, _RECORD * res.records))),
            [(x >> 16, x & 0xFFFF) for x in self._rejects[0 : res.rejects]] if res.rejects else [],
            res.descriptors,
            res.spent,
            bool(res.more),
            res.returned,
        )


if __name__ == "__main__":  # python -m vhost_user_cpufreq.backend.dataplane.cdrain: build and report
    dp = dataplane()
    print(dp.kind, dp.detail)
    sys.exit(0 if dp.kind == "c" else 1)
