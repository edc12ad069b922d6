"""The cpufreq device ABI: config space layout and request batches (see SPEC.md).

Pure codec: bytes in, frozen dataclasses out, and back.  Layout constants are
the single source of truth for the backend, the guest model and the spec's
tables (a test checks the spec against them).

Theory of operation: the driver writes *batches* of per-vCPU records into
device-readable buffers on the request queue.  Each batch has a sequence
number (loss, duplication and staleness are detected from it) and a guest
timestamp (record age is measured from it).  The device mirrors host
frequency per frequency *domain* in its config space; a vCPU-to-domain map
encoded as runs keeps the space under the 256-byte vhost-user limit however
many vCPUs the VM has.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

from .errors import RecordError

__all__ = [
    "DEFAULT_DEVICE_ID",
    "NUM_QUEUES",
    "REQUEST_QUEUE",
    "F_PERF_REQUEST",
    "CONFIG_SIZE",
    "MAX_DOMAINS",
    "MAX_RUNS",
    "MAX_RECORDS_PER_BATCH",
    "RECORD_STRUCT",
    "UTIL_SCALE",
    "CFG_F_NOMINAL",
    "BATCH_F_RESYNC",
    "Domain",
    "DeviceConfig",
    "Record",
    "Batch",
    "BatchDecodeResult",
    "encode_batch",
    "decode_batch",
    "seq_delta",
    "runs_from_map",
    "map_from_runs",
    "F_FREQ_PAGE",
    "FREQ_PAGE_SHMID",
    "FREQ_PAGE_SIZE",
    "FREQ_PAGE_MAGIC",
    "PAGE_F_LIVE",
    "PageHeader",
    "PageDomain",
    "freq_scale",
    "encode_page",
    "decode_page_header",
    "page_domain_offset",
    "page_update_stores",
    "page_flag_stores",
    "page_count_stores",
    "FREQ_PAGE_VERSION",
    "decode_page_domain",
]

#: Reserved by OASIS for a device nobody implements; configurable everywhere (PCI id 0x1040 + id).
#: QEMU aborts on ids its name table lacks (virtio_id_to_name), so a truly unassigned id cannot be used.
DEFAULT_DEVICE_ID = 38
NUM_QUEUES = 1
REQUEST_QUEUE = 0

#: Device feature bit 0: records may carry a frequency request in kHz.
F_PERF_REQUEST = 0
#: Device feature bit 1: the device keeps the shared frequency page (SPEC §8) current.
F_FREQ_PAGE = 1

UTIL_SCALE = 1024  # util is 0..1024 of the vCPU's capacity, like Linux's SCHED_CAPACITY_SCALE

# -- config space ----------------------------------------------------------------
CONFIG_SIZE = 256
MAX_DOMAINS = 8
MAX_RUNS = 56
CFG_F_NOMINAL = 1 << 0  # frequencies are nominal: the host exposes no cpufreq
_CFG_HEADER = struct.Struct("<IHHIHH")  # generation, num_domains, num_vcpus, flags, num_runs, max_batch
_DOMAIN = struct.Struct("<IIIHH")  # cur_khz, min_khz, max_khz, capacity, reserved
_RUN = struct.Struct("<BB")  # domain, count
_DOMAINS_OFFSET = _CFG_HEADER.size  # 16
_RUNS_OFFSET = _DOMAINS_OFFSET + MAX_DOMAINS * _DOMAIN.size  # 144
assert _RUNS_OFFSET + MAX_RUNS * _RUN.size == CONFIG_SIZE

# -- request batches ---------------------------------------------------------------
_BATCH_HEADER = struct.Struct("<IHHQ")  # seq, num_records, flags, timestamp_ns
_RECORD = struct.Struct("<HHI")  # vcpu, util, perf_khz
RECORD_STRUCT = _RECORD  # for code that unpacks many records at once
BATCH_HEADER_SIZE = _BATCH_HEADER.size  # 16
RECORD_SIZE = _RECORD.size  # 8
MAX_RECORDS_PER_BATCH = 256
BATCH_F_RESYNC = 1 << 0  # first batch after driver init: restart sequence tracking
_BATCH_FLAGS_KNOWN = BATCH_F_RESYNC


@dataclass(frozen=True, slots=True)
class Domain:
    """One guest-visible frequency domain (one or more host cpufreq policies)."""

    cur_khz: int
    min_khz: int
    max_khz: int
    capacity: int = UTIL_SCALE  # relative to the host's biggest CPU, 1..1024

    def __post_init__(self) -> None:
        for name in ("cur_khz", "min_khz", "max_khz"):
            v = getattr(self, name)
            if not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"{name}={v} does not fit in 32 bits")
        if not 0 <= self.capacity <= UTIL_SCALE:
            raise ValueError(f"capacity={self.capacity} outside 0..{UTIL_SCALE}")


def runs_from_map(vcpu_domain: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Run-length encode a vCPU -> domain map as (domain, count) pairs."""
    runs: list[tuple[int, int]] = []
    for dom in vcpu_domain:
        if runs and runs[-1][0] == dom and runs[-1][1] < 255:
            runs[-1] = (dom, runs[-1][1] + 1)
        else:
            runs.append((dom, 1))
    return tuple(runs)


def map_from_runs(runs: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    out: list[int] = []
    for dom, count in runs:
        out.extend([dom] * count)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """The device configuration space (256 bytes, little-endian)."""

    generation: int
    domains: tuple[Domain, ...]
    vcpu_domain: tuple[int, ...]  # domain index of each vCPU, vCPU 0 first
    flags: int = 0
    max_batch: int = MAX_RECORDS_PER_BATCH
    runs: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.domains) <= MAX_DOMAINS:
            raise ValueError(f"{len(self.domains)} domains; the layout holds 1..{MAX_DOMAINS}")
        if not 1 <= len(self.vcpu_domain) <= 0xFFFF:
            raise ValueError("a VM has 1..65535 vCPUs")
        if any(not 0 <= d < len(self.domains) for d in self.vcpu_domain):
            raise ValueError("vCPU mapped to a domain that does not exist")
        runs = runs_from_map(self.vcpu_domain)
        if len(runs) > MAX_RUNS:
            raise ValueError(
                f"vCPU map needs {len(runs)} runs, the layout holds {MAX_RUNS}: "
                "pin vCPUs of one domain to consecutive vCPU ids"
            )
        object.__setattr__(self, "runs", runs)

    @property
    def num_vcpus(self) -> int:
        return len(self.vcpu_domain)

    def domain_of(self, vcpu: int) -> Domain:
        return self.domains[self.vcpu_domain[vcpu]]

    def encode(self) -> bytes:
        buf = bytearray(CONFIG_SIZE)
        _CFG_HEADER.pack_into(
            buf, 0, self.generation & 0xFFFFFFFF, len(self.domains), self.num_vcpus,
            self.flags, len(self.runs), self.max_batch,
        )
        for i, d in enumerate(self.domains):
            _DOMAIN.pack_into(buf, _DOMAINS_OFFSET + i * _DOMAIN.size,
                              d.cur_khz, d.min_khz, d.max_khz, d.capacity, 0)
        for i, (dom, count) in enumerate(self.runs):
            _RUN.pack_into(buf, _RUNS_OFFSET + i * _RUN.size, dom, count)
        return bytes(buf)

    @classmethod
    def decode(cls, data: bytes) -> "DeviceConfig":
        """Parse a full config image; raises RecordError if it is inconsistent."""
        if len(data) < CONFIG_SIZE:
            raise RecordError("short-config", f"{len(data)} bytes, need {CONFIG_SIZE}")
        gen, ndom, nvcpu, flags, nruns, max_batch = _CFG_HEADER.unpack_from(data, 0)
        if not 1 <= ndom <= MAX_DOMAINS or nruns > MAX_RUNS:
            raise RecordError("bad-config", f"num_domains={ndom} num_runs={nruns}")
        domains = tuple(
            Domain(*_DOMAIN.unpack_from(data, _DOMAINS_OFFSET + i * _DOMAIN.size)[:4])
            for i in range(ndom)
        )
        runs = [_RUN.unpack_from(data, _RUNS_OFFSET + i * _RUN.size) for i in range(nruns)]
        vmap = map_from_runs(runs)
        if len(vmap) != nvcpu:
            raise RecordError("bad-config", f"runs cover {len(vmap)} vCPUs, header says {nvcpu}")
        try:
            return cls(gen, domains, vmap, flags, max_batch)
        except ValueError as exc:
            raise RecordError("bad-config", str(exc)) from None

    def with_frequencies(self, cur_khz: Sequence[int], flags: int | None = None) -> "DeviceConfig":
        """A copy with new current frequencies and the generation bumped."""
        doms = tuple(
            Domain(c, d.min_khz, d.max_khz, d.capacity) for c, d in zip(cur_khz, self.domains, strict=True)
        )
        return DeviceConfig(self.generation + 1, doms, self.vcpu_domain,
                            self.flags if flags is None else flags, self.max_batch)


# -- batches -------------------------------------------------------------------------


class Record(NamedTuple):
    """One vCPU's request.  A named tuple, not a dataclass: one is built per record on the
    hot path, and a tuple is several times cheaper to make."""

    vcpu: int
    util: int  # 0..1024 of the vCPU's capacity
    perf_khz: int = 0  # 0: no frequency request (needs F_PERF_REQUEST otherwise)


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    timestamp_ns: int
    records: tuple[Record, ...]
    flags: int = 0


@dataclass(frozen=True, slots=True)
class BatchDecodeResult:
    """A decoded batch: the records that passed, and why the others did not."""

    batch: Batch
    rejected: tuple[tuple[int, str], ...]  # (record index, reason slug)


def encode_batch(batch: Batch) -> bytes:
    n = len(batch.records)
    buf = bytearray(BATCH_HEADER_SIZE + n * RECORD_SIZE)
    _BATCH_HEADER.pack_into(buf, 0, batch.seq & 0xFFFFFFFF, n, batch.flags, batch.timestamp_ns)
    off = BATCH_HEADER_SIZE
    for r in batch.records:
        _RECORD.pack_into(buf, off, r.vcpu, r.util, r.perf_khz)
        off += RECORD_SIZE
    return bytes(buf)


def decode_batch(
    data: bytes | memoryview,
    *,
    num_vcpus: int,
    max_records: int = MAX_RECORDS_PER_BATCH,
    perf_request: bool = False,
) -> BatchDecodeResult:
    """Decode and validate one request buffer.

    A batch whose framing is wrong raises :class:`RecordError` (the whole
    buffer is dropped); a record whose values are wrong is left out and
    reported in ``rejected`` while the rest of the batch still counts.
    """
    size = len(data)
    if size < BATCH_HEADER_SIZE:
        raise RecordError("short-batch", f"{size} bytes, the header alone is {BATCH_HEADER_SIZE}")
    seq, n, flags, ts = _BATCH_HEADER.unpack_from(data, 0)
    if flags & ~_BATCH_FLAGS_KNOWN:
        raise RecordError("bad-batch-flags", f"flags {flags:#x}")
    if not 1 <= n <= max_records:
        raise RecordError("bad-record-count", f"{n} records, allowed 1..{max_records}")
    if size != BATCH_HEADER_SIZE + n * RECORD_SIZE:
        raise RecordError(
            "bad-batch-size", f"{size} bytes for {n} records (need {BATCH_HEADER_SIZE + n * RECORD_SIZE})"
        )
    records: list[Record] = []
    rejected: list[tuple[int, str]] = []
    for i, (vcpu, util, perf) in enumerate(_iter_records(data, n)):
        if vcpu >= num_vcpus:
            rejected.append((i, "bad-vcpu"))
        elif util > UTIL_SCALE:
            rejected.append((i, "bad-util"))
        elif perf and not perf_request:
            rejected.append((i, "perf-not-negotiated"))
        else:
            records.append(Record(vcpu, util, perf))
    return BatchDecodeResult(Batch(seq, ts, tuple(records), flags), tuple(rejected))


def _iter_records(data: bytes | memoryview, n: int) -> Iterator[tuple[int, int, int]]:
    return _RECORD.iter_unpack(data[BATCH_HEADER_SIZE : BATCH_HEADER_SIZE + n * RECORD_SIZE])


def seq_delta(seq: int, last: int) -> int:
    """Signed distance from ``last`` to ``seq`` in 32-bit serial arithmetic (RFC 1982)."""
    d = (seq - last) & 0xFFFFFFFF
    return d - (1 << 32) if d & 0x80000000 else d


# -- the shared frequency page (SPEC §8) -------------------------------------------------
# One 4 KiB virtio shared memory region the device writes and the driver only reads.  Every
# field is an aligned little-endian 32-bit word, so each load and store is single-copy atomic;
# a domain's words are guarded by its own sequence count (odd while the device writes them).

FREQ_PAGE_SHMID = 0
FREQ_PAGE_SIZE = 4096  # QEMU wants a multiple of the host page size (docs/qemu-facts.md §e)
FREQ_PAGE_MAGIC = 0x50464356  # "VCFP" read as a little-endian word
FREQ_PAGE_VERSION = 1
PAGE_F_LIVE = 1 << 0  # the device is attached and keeps the page current
_PAGE_HEADER = struct.Struct("<IHHII")  # magic, version, num_domains, flags, reserved
_PAGE_DOMAIN = struct.Struct("<IIHHI")  # seq, cur_khz, freq_scale, perf, reserved
_PAGE_DOMAINS_OFFSET = _PAGE_HEADER.size  # 16
PAGE_FLAGS_OFFSET = 8
assert _PAGE_DOMAINS_OFFSET + MAX_DOMAINS * _PAGE_DOMAIN.size <= FREQ_PAGE_SIZE


@dataclass(frozen=True, slots=True)
class PageHeader:
    version: int
    num_domains: int
    flags: int

    @property
    def live(self) -> bool:
        return bool(self.flags & PAGE_F_LIVE)


@dataclass(frozen=True, slots=True)
class PageDomain:
    """What the driver reads per domain: the frequency and the two per-tick scale factors."""

    cur_khz: int
    freq_scale: int  # cur_khz / max_khz in 1/1024 (Linux's arch_freq_scale)
    perf: int  # freq_scale * capacity / 1024: the capacity available now, 0..1024

    @classmethod
    def of(cls, d: Domain) -> "PageDomain":
        fs = freq_scale(d.cur_khz, d.max_khz)
        return cls(d.cur_khz, fs, fs * d.capacity // UTIL_SCALE)


def freq_scale(cur_khz: int, max_khz: int) -> int:
    """``cur/max`` in 1/1024, clamped to 0..1024 (a host above its own max reads as 1024)."""
    if max_khz <= 0:
        return UTIL_SCALE
    return min(UTIL_SCALE, cur_khz * UTIL_SCALE // max_khz)


def page_domain_offset(index: int) -> int:
    if not 0 <= index < MAX_DOMAINS:
        raise ValueError(f"domain {index} outside 0..{MAX_DOMAINS - 1}")
    return _PAGE_DOMAINS_OFFSET + index * _PAGE_DOMAIN.size


def encode_page(domains: Sequence[PageDomain], flags: int = PAGE_F_LIVE) -> bytes:
    """The whole page as the device first writes it (every sequence count 0)."""
    if not 1 <= len(domains) <= MAX_DOMAINS:
        raise ValueError(f"{len(domains)} domains; the page holds 1..{MAX_DOMAINS}")
    buf = bytearray(FREQ_PAGE_SIZE)
    _PAGE_HEADER.pack_into(buf, 0, FREQ_PAGE_MAGIC, FREQ_PAGE_VERSION, len(domains), flags, 0)
    for i, d in enumerate(domains):
        _PAGE_DOMAIN.pack_into(buf, page_domain_offset(i), 0, d.cur_khz, d.freq_scale, d.perf, 0)
    return bytes(buf)


def page_update_stores(index: int, seq: int, d: PageDomain) -> tuple[tuple[int, int], ...]:
    """The 32-bit stores, in order, that move domain ``index`` (whose count is now ``seq``, even)
    to ``d``: the count to odd, the value words, the count to even.  The writer must make each
    store visible in this order (x86-64 does; elsewhere a release store is needed)."""
    if seq & 1:
        raise ValueError(f"sequence count {seq} is odd: an update is already under way")
    off = page_domain_offset(index)
    return ((off, (seq + 1) & 0xFFFFFFFF), (off + 4, d.cur_khz), (off + 8, d.freq_scale | d.perf << 16),
            (off, (seq + 2) & 0xFFFFFFFF))


def page_flag_stores(flags: int) -> tuple[tuple[int, int], ...]:
    return ((PAGE_FLAGS_OFFSET, flags & 0xFFFFFFFF),)


def page_count_stores(num_domains: int) -> tuple[tuple[int, int], ...]:
    """The store that publishes a new domain count (after the new entries are written)."""
    if not 1 <= num_domains <= MAX_DOMAINS:
        raise ValueError(f"{num_domains} domains")
    return ((4, FREQ_PAGE_VERSION | num_domains << 16),)


def decode_page_header(data: bytes | memoryview) -> PageHeader:
    """The page's header; raises RecordError when it is not (yet) a frequency page."""
    if len(data) < _PAGE_HEADER.size:
        raise RecordError("short-page", f"{len(data)} bytes")
    magic, version, ndom, flags, _ = _PAGE_HEADER.unpack_from(data, 0)
    if magic == 0:
        raise RecordError("page-not-mapped", "magic 0: the device has not placed the page yet")
    if magic != FREQ_PAGE_MAGIC:
        raise RecordError("bad-page-magic", f"magic {magic:#x}")
    if version != FREQ_PAGE_VERSION or not 1 <= ndom <= MAX_DOMAINS:
        raise RecordError("bad-page-header", f"version {version}, {ndom} domains")
    return PageHeader(version, ndom, flags)


def decode_page_domain(seq_before: int, entry: bytes | memoryview, seq_after: int) -> PageDomain | None:
    """One domain from a read of its 16-byte entry between two loads of its count.

    None means the read may be torn (an update was under way or happened in between): retry.
    """
    if seq_before & 1 or seq_before != seq_after:
        return None
    _, cur, fs, perf, _ = _PAGE_DOMAIN.unpack_from(entry, 0)
    return PageDomain(cur, fs, perf)
