"""The C data plane (``ring_drain.c``, ``kick_lane.c``) and the guards of what the front-end
shares (``guard.c``), built on first use and loaded through cffi.

The pure-Python :func:`vhost_user_cpufreq.protocol.requests.drain` is the
reference and the fallback; this module runs the same drain in C when it can
and returns the same :class:`~vhost_user_cpufreq.protocol.requests.Drained`.

The same library holds the kick lane (``backend/dataplane/lane.py``).

Build: the C files are compiled with the system's C compiler into a shared
library (no Python headers needed: cffi's ABI mode loads it), named after a
hash of its source, in the first writable cache directory of
``$VUC_CACHE_DIR``, ``$CACHE_DIRECTORY`` (systemd's ``CacheDirectory=``),
``$XDG_CACHE_HOME/vhost-user-cpufreq`` or ``~/.cache/vhost-user-cpufreq``.
A library already there is reused, so a service whose file system is read
only can run one built at install time (``vhost-user-cpufreq check`` builds
it).  Choice: ``VUC_DATAPLANE=c`` demands C (start fails without it),
``python`` forces the reference, ``auto`` (the default) uses C when it loads
and says so once in the log when it does not.  ``VUC_KICK_LANE=0`` keeps the
C drain but serves every kick on the event loop (the lane is on by default).

Sanitizers (tests only): ``VUC_SANITIZE=address,undefined`` builds the
library with ``-fsanitize=address,undefined -fno-sanitize-recover=all`` (plus
``-g -O1 -fno-omit-frame-pointer``) under its own name (``dataplane-san-...``),
so it never replaces the normal build.  Loading it into an unsanitized Python
needs the runtime preloaded first; ``tests/test_sanitized_dataplane.py`` shows
the environment it takes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cffi
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.requests import ENTRY, MAX_BUDGET, PYTHON_BUFFER_UNITS, REASONS, Drained
from vhost_user_cpufreq.protocol.requests import drain as reference_drain
from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue

__all__ = ["DataPlane", "dataplane", "CDrainer", "build_library", "pointer_to", "SOURCES", "ffi"]

log = logging.getLogger("vhost_user_cpufreq.dataplane")

_HERE = Path(__file__).parent
SOURCES = (_HERE / "ring_drain.c", _HERE / "kick_lane.c", _HERE / "guard.c")
_HEADERS = (_HERE / "vuc.h",)
_CFLAGS = ("-O2", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror")
_LIBS = ("-lm", "-lrt")
_SANITIZE_FLAGS = ("-g", "-O1", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all")
_RECORD = abi.RECORD_SIZE

_ffi = cffi.FFI()
_ffi.cdef(
    """
    typedef struct { uint64_t gpa; uint64_t size; uint8_t *host; } vuc_region;
    typedef struct {
        uint8_t *desc; uint16_t *avail; uint8_t *used;
        uint32_t size, indirect, max_chain_bytes, max_indirect, num_vcpus, perf_request;
        const vuc_region *regions; uint32_t nregions;
        uint32_t last_avail, avail_shadow, used_idx, broken;
    } vuc_queue;
    typedef struct { uint32_t entries, records, rejects, descriptors, spent, more, returned; } vuc_result;
    const char *vuc_reason_name(int code);
    int vuc_abi_sizes(void);
    uint64_t vuc_drain(vuc_queue *q, uint64_t cursor, uint32_t budget, uint32_t num_vcpus,
                       uint32_t perf_request, void *entries, uint8_t *records,
                       uint32_t *rejects, uint8_t *scratch, vuc_result *res);

    /* kick_lane.c */
    typedef struct { int32_t vcpu; int32_t value; int32_t reason; } vuc_change;
    typedef struct { int32_t vcpu, pcpu_cap, vcpu_cap, pad; int64_t max_khz; } vuc_placement;
    typedef struct vuc_engine vuc_engine;
    vuc_engine *vuc_engine_new(void);
    void vuc_engine_free(vuc_engine *e);
    int vuc_engine_configure(vuc_engine *e, uint32_t n, const vuc_placement *p, int32_t floor, int32_t ceiling,
                             int32_t hysteresis, double min_interval, double stale_after, double headroom);
    void vuc_engine_set_thread(vuc_engine *e, int32_t vcpu, int32_t tid);
    void vuc_engine_set_actuation(vuc_engine *e, int32_t actuate);
    uint32_t vuc_engine_record(vuc_engine *e, int32_t vcpu, int32_t util, int64_t perf, double now,
                               vuc_change *out);
    uint32_t vuc_engine_tick(vuc_engine *e, double now, vuc_change *out);
    int vuc_engine_next_deadline(vuc_engine *e, double *due);
    uint32_t vuc_engine_release_all(vuc_engine *e, vuc_change *out);
    void vuc_engine_applied(vuc_engine *e, int32_t *out);

    typedef struct { uint16_t kind, reason; uint32_t head, seq, mask; uint16_t nbad, ntotal; int32_t err; } vuc_event;
    typedef struct { uint32_t util, perf_khz; double updated; uint64_t mark; uint32_t fresh, pad; } vuc_vstate;
    typedef struct {
        vuc_queue *q;
        uint8_t *entries, *records, *scratch;
        uint32_t *rejects;
        vuc_engine *engine;
        uint64_t *stamps;
        vuc_vstate *vs;
        int32_t kick_fd, call_fd;
        uint32_t budget, num_vcpus, perf_request, event_idx, max_ahead;
        double batch_delay;
        double bounds[13];
        uint64_t cursor;
        int32_t signalled;
        int32_t seq_has, off_has;
        uint32_t seq_last;
        int64_t min_off, last_age;
        uint64_t seq_lost, seq_stale;
        uint64_t kicks, accepted, batches, drains, interrupts, interrupts_dropped, polls;
        uint64_t rejected[19];
        uint64_t clamps_applied, clamps_recorded, clamp_failed, memory_faults;
        uint64_t clamp_errno[64];
        uint64_t k2d[14];
        double k2d_sum;
        vuc_event ev[64];
        uint32_t ev_head, ev_tail;
        uint64_t ev_dropped;
        double win_start, deadline;
        double engine_due;
        uint32_t win_buffers, busy;
        int32_t again, uclamp_refused, id;
    } vuc_slot;
    typedef struct vuc_lane vuc_lane;
    vuc_lane *vuc_lane_new(int notice_fd, uint64_t slice_ns);
    void vuc_lane_sched(const vuc_lane *l, int32_t *tid, uint64_t *slice_ns, int32_t *err);
    void vuc_lane_free(vuc_lane *l);
    int vuc_lane_attach(vuc_lane *l, vuc_slot *s);
    void vuc_lane_detach(vuc_lane *l, vuc_slot *s);
    void vuc_lane_set_call(vuc_lane *l, vuc_slot *s, int fd);
    uint32_t vuc_lane_events(vuc_lane *l, vuc_slot *s, vuc_event *out, uint32_t max);
    void vuc_lane_snapshot(vuc_lane *l, const vuc_slot *s, vuc_slot *out);
    int vuc_lane_abi(void);
    int vuc_busy_rule(vuc_slot *s, double now, uint32_t buffers, double *next_poll);

    /* guard.c */
    int vuc_guard_install(void);
    int32_t vuc_guard_add(const void *start, uint64_t len);
    void vuc_guard_remove(int32_t id);
    uint64_t vuc_guard_faults(int32_t id);
    uint64_t vuc_guard_faults_in(const void *start, uint64_t len);
    void vuc_guard_stats(uint64_t *epoch, uint64_t *stray, uint64_t *fatal);
    uint64_t vuc_guard_epoch(void);
    int vuc_eventfd_signal(int fd);
    int64_t vuc_eventfd_drain(int fd);
    """
)
ffi = _ffi


def _cache_dirs() -> list[Path]:
    out = []
    for var in ("VUC_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            out.append(Path(os.environ[var].split(":")[0]))
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    out.append(Path(xdg) / "vhost-user-cpufreq")
    out.append(Path(tempfile.gettempdir()) / f"vhost-user-cpufreq-{os.getuid()}")
    return out


def _cflags() -> tuple[str, ...]:
    """The compiler flags, with ``VUC_SANITIZE``'s sanitizers after the defaults (the later -O wins)."""
    san = os.environ.get("VUC_SANITIZE", "").strip()
    if not san:
        return _CFLAGS
    return (*_CFLAGS, f"-fsanitize={san}", *_SANITIZE_FLAGS)


def _library_name() -> str:
    h = hashlib.sha256()
    for f in (*SOURCES, *_HEADERS):
        h.update(f.read_bytes())
    h.update(" ".join(_cflags()).encode() + platform.machine().encode())
    tag = "san-" if os.environ.get("VUC_SANITIZE", "").strip() else ""
    return f"dataplane-{tag}{h.hexdigest()[:16]}.so"


def build_library(compiler: str | None = None) -> Path:
    """The library for the current source: found in a cache directory or compiled into one.

    Raises RuntimeError naming what is missing.
    """
    name = _library_name()
    dirs = _cache_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) to build the C data plane")
    errors = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
            os.close(fd)
        except OSError as exc:
            errors.append(f"{d}: {exc.strerror}")
            continue
        try:
            try:
                res = subprocess.run([cc, *_cflags(), "-I", str(_HERE), "-o", tmp, *map(str, SOURCES), *_LIBS],
                                     capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"cannot run the C compiler {cc}: {exc}") from None
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed building the C data plane: {res.stderr.strip()[:2000]}")
            os.replace(tmp, d / name)  # atomic: concurrent builders each install a whole file
            return d / name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable cache directory for the C data plane: " + "; ".join(errors))


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
        path = build_library()
        lib = _ffi.dlopen(str(path))
        _check_abi(lib)
    except (RuntimeError, OSError) as exc:
        if want == "c":
            raise RuntimeError(f"VUC_DATAPLANE=c but the C data plane is unavailable: {exc}") from None
        _selected = DataPlane("python", f"pure Python: {exc}")
        log.warning("data plane degraded to the pure-Python reference: %s", exc)
        return _selected
    lane = os.environ.get("VUC_KICK_LANE", "1") not in ("0", "off", "no")
    _selected = DataPlane("c", f"C ({path})" + ("" if lane else ", kick lane off (VUC_KICK_LANE=0)"), lib, lane)
    return _selected


def _check_abi(lib: Any) -> None:
    want = ENTRY.size << 16 | _ffi.sizeof("vuc_queue") << 8 | _ffi.sizeof("vuc_region")
    if lib.vuc_abi_sizes() != want:
        raise RuntimeError(f"C data plane layout {lib.vuc_abi_sizes():#x} does not match {want:#x}")
    want = _ffi.sizeof("vuc_slot") << 16 | _ffi.sizeof("vuc_event") << 8 | _ffi.sizeof("vuc_change")
    if lib.vuc_lane_abi() != want:
        raise RuntimeError(f"C kick lane layout {lib.vuc_lane_abi():#x} does not match {want:#x}")
    for code, name in enumerate(REASONS):
        got = lib.vuc_reason_name(code)
        if got == _ffi.NULL or _ffi.string(got).decode() != name:
            raise RuntimeError(f"C data plane reason {code} is not {name!r}")


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
