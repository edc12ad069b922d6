"""Draining the cpufreq request queue: ring, descriptor chains and batches in one pass.

Theory of operation
-------------------
:func:`drain` pops available chains from a :class:`~.virtqueue.DeviceQueue`
until the ring is empty or a work budget is spent, decodes each buffer as a
request batch (:func:`~.cpufreq.decode_batch`) and returns every buffer to the
used ring with length 0.  It does not publish ``used.idx`` and knows nothing
of sequence numbers or policy: those are the caller's.  The answer is a
:class:`Drained`: plain tuples and integers, one *entry* per buffer (or one
for an error that concerns the whole ring), the valid records in order, and
the records rejected inside otherwise valid batches.

This is the reference implementation.  The back-end also has the same drain
in C (``backend/dataplane/ring_drain.c``), which must give the same :class:`Drained`
for every ring; the tests compare the two on generated rings.  Everything
is expressed in small integers so both can produce it: rejection reasons
are indices into :data:`REASONS`.

The work budget counts a buffer as the records it carries (at least
``buffer_units``, 1 by default as in C), or its descriptors divided by
:data:`DESCRIPTORS_PER_UNIT` if that is more, so a turn is bounded however a
guest shapes its buffers.  The buffer that crosses the budget is still
completed.  Popping, walking and returning a buffer costs this reference far
more than one record does, so a caller that runs it as the data plane (no C)
prices each buffer at :data:`PYTHON_BUFFER_UNITS` (a turn of 1-record batches
then takes about as long as one of 256-record batches), may end a turn on time
as well (``out_of_time``), and takes indirect tables of at most
:data:`PYTHON_MAX_INDIRECT` entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from . import cpufreq as abi
from .errors import RecordError, RingError
from .virtqueue import DeviceQueue

__all__ = [
    "REASONS",
    "REASON_CODES",
    "EXPLAIN",
    "NO_HEAD",
    "DESCRIPTORS_PER_UNIT",
    "PYTHON_BUFFER_UNITS",
    "PYTHON_MAX_INDIRECT",
    "MAX_BUDGET",
    "ENTRY",
    "Drained",
    "drain",
]

#: Every reason a buffer, a ring or a record can be refused for; C uses the same indices.
REASONS: tuple[str, ...] = (
    "ok",
    "avail-index-jump",
    "bad-head",
    "address-out-of-range",
    "descriptor-loop",
    "indirect-not-negotiated",
    "indirect-with-next",
    "bad-indirect-length",
    "chain-too-long",
    "readable-after-writable",
    "next-out-of-range",
    "nested-indirect",
    "short-batch",
    "bad-batch-flags",
    "bad-record-count",
    "bad-batch-size",
    "bad-vcpu",
    "bad-util",
    "perf-not-negotiated",
)
REASON_CODES = {name: i for i, name in enumerate(REASONS)}

#: What each reason means, for log lines an operator can act on.
EXPLAIN: dict[str, str] = {
    "avail-index-jump": "avail.idx moved by more than the queue size; the ring stays stopped until reset",
    "bad-head": "an avail entry names a descriptor beyond the queue size",
    "address-out-of-range": "a descriptor or indirect table points outside guest memory",
    "descriptor-loop": "a chain is longer than its table: its next links loop",
    "indirect-not-negotiated": "an indirect descriptor, but INDIRECT_DESC was not negotiated",
    "indirect-with-next": "an indirect descriptor that also has NEXT",
    "bad-indirect-length": "an indirect table whose length is 0 or not a multiple of 16",
    "chain-too-long": "a chain longer than the device takes (bytes or indirect entries)",
    "readable-after-writable": "a device-readable descriptor after a writable one",
    "next-out-of-range": "a next link beyond the table",
    "nested-indirect": "an indirect table entry that is itself indirect",
    "short-batch": "a buffer shorter than the 16-byte batch header",
    "bad-batch-flags": "unknown batch flag bits",
    "bad-record-count": "num_records outside 1..max_batch",
    "bad-batch-size": "the buffer's length does not match num_records",
    "bad-vcpu": "a record for a vCPU the VM does not have",
    "bad-util": "a util above 1024",
    "perf-not-negotiated": "a frequency request without F_PERF_REQUEST",
}

#: ``head`` of an entry that concerns the ring, not one buffer (nothing to return).
NO_HEAD = 0xFFFFFFFF
#: Walking this many descriptors costs about as much as applying one record.
DESCRIPTORS_PER_UNIT = 8
#: What one buffer costs this reference when it is the data plane, in records' worth of work:
#: a pop, a walk, a decode of the header and a push, each in Python.
PYTHON_BUFFER_UNITS = 8
#: The longest table this reference walks when it is the data plane: a chain no longer than the
#: largest queue (the spec's bound on a driver), about 0.2 ms of Python on the development machine.
PYTHON_MAX_INDIRECT = 1024
#: Entries are numbered in 16 bits in record rejections.
MAX_BUDGET = 0xFFFF - abi.MAX_RECORDS_PER_BATCH

#: One entry as C lays it out: head, status, valid records, seq, flags, records in the batch, timestamp.
ENTRY = struct.Struct("<IHHIHHQ")


@dataclass(slots=True)
class Drained:
    """What one drain found.

    ``entries`` holds ``(head, status, nvalid, seq, flags, ntotal, timestamp_ns)``
    per buffer: ``status`` 0 is a decoded batch whose ``nvalid`` records come
    next in ``records``; any other status is a reason code (and the other
    fields are 0).  ``rejects`` holds ``(entry index, reason code)`` per
    record refused inside a decoded batch.  ``more`` is True when the budget
    ran out before the ring did.
    """

    entries: list[tuple[int, int, int, int, int, int, int]] = field(default_factory=list)
    records: list[tuple[int, int, int]] = field(default_factory=list)
    rejects: list[tuple[int, int]] = field(default_factory=list)
    descriptors: int = 0
    spent: int = 0
    more: bool = True
    returned: int = 0  # buffers put on the used ring (every entry but a ring-level error)


def drain(queue: DeviceQueue, budget: int, *, num_vcpus: int, perf_request: bool,
          buffer_units: int = 1, out_of_time: Callable[[], bool] | None = None) -> Drained:
    """Pop, decode and return buffers until the ring is empty or ``budget`` is spent.

    ``buffer_units`` is the least a buffer costs (1: the C drain's pricing).  ``out_of_time``,
    asked after each buffer, ends the turn early (``more`` stays True) when it says so.
    """
    if not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"budget {budget} outside 1..{MAX_BUDGET}")
    if buffer_units < 1:
        raise ValueError(f"buffer_units {buffer_units} below 1")
    out = Drained()
    codes = REASON_CODES
    while out.spent < budget:
        try:
            chain = queue.pop()
        except RingError as exc:
            code = codes[exc.reason]
            if exc.head is None:
                out.entries.append((NO_HEAD, code, 0, 0, 0, 0, 0))
                out.more = False
                break
            out.entries.append((exc.head, code, 0, 0, 0, 0, 0))
            queue.push(exc.head, 0)
            out.returned += 1
            out.spent += buffer_units
            continue
        if chain is None:
            out.more = False
            break
        cost = _decode(chain.read_all(), chain.head, out, num_vcpus, perf_request)
        out.descriptors += chain.descriptors
        out.spent += max(buffer_units, cost, chain.descriptors // DESCRIPTORS_PER_UNIT)
        queue.push(chain.head, 0)
        out.returned += 1
        if out_of_time is not None and out.spent < budget and out_of_time():
            break
    return out


def _decode(data: bytes, head: int, out: Drained, num_vcpus: int, perf_request: bool) -> int:
    index = len(out.entries)
    try:
        res = abi.decode_batch(data, num_vcpus=num_vcpus, perf_request=perf_request)
    except RecordError as exc:
        out.entries.append((head, REASON_CODES[exc.reason], 0, 0, 0, 0, 0))
        return 1
    b = res.batch
    out.entries.append((head, 0, len(b.records), b.seq, b.flags, len(b.records) + len(res.rejected), b.timestamp_ns))
    out.records.extend(b.records)
    out.rejects.extend((index, REASON_CODES[reason]) for _, reason in res.rejected)
    return len(b.records) + len(res.rejected)
