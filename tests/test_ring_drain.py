"""The request-queue drain: the pure-Python reference against the C data plane.

The C drain (backend/dataplane/ring_drain.c) must give the same answer as
protocol/requests.py for every ring a guest can write.  The main test builds
rings from pieces a hostile guest would use (valid batches, garbage,
indirect tables, chains that loop or leave guest memory, index jumps, a
cursor anywhere in the 16-bit space) over two guest-memory regions with a
hole between them, runs both drains on identical copies and compares every
entry, record, rejection, the cursor and every byte of memory afterwards.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.dataplane.cdrain import CDrainer, dataplane, python_turn
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.errors import GuestMemoryError
from vhost_user_cpufreq.protocol.requests import NO_HEAD, PYTHON_BUFFER_UNITS, REASONS, drain
from vhost_user_cpufreq.protocol.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceQueue,
)
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

from .helpers import make_service, start_guest, unavailable, until

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")

# Two regions with a hole: [0, 8K) and [REGION2, REGION2 + 4K).
REGION1 = 8192
REGION2 = 0x10000
REGION2_SIZE = 4096
DESC_GPA, AVAIL_GPA, USED_GPA, DATA_GPA = 0, 1024, 2048, 4096


class TwoRegions:
    """Guest memory of two regions, for translation at their edges."""

    def __init__(self, a: bytearray, b: bytearray) -> None:
        self.a, self.b = memoryview(a), memoryview(b)
        self.generation = 0

    def spans(self) -> tuple[tuple[int, memoryview], ...]:
        return ((0, self.a), (REGION2, self.b))

    def view(self, gpa: int, length: int) -> memoryview:
        for base, m in self.spans():
            if base <= gpa < base + m.nbytes and length >= 0 and gpa - base + length <= m.nbytes:
                return m[gpa - base : gpa - base + length]
        raise GuestMemoryError("address-out-of-range", f"[{gpa:#x}, +{length:#x})")


def c_lib():
    dp = dataplane()
    if dp.kind != "c":
        unavailable("VUC_REQUIRE_TOOLS", dp.detail)
    return dp.lib


def make_queue(a: bytearray, b: bytearray, size: int, *, indirect: bool, max_chain: int, max_indirect: int,
               base: int) -> DeviceQueue:
    mem = TwoRegions(a, b)
    q = DeviceQueue(size, mem.view(DESC_GPA, 16 * size), mem.view(AVAIL_GPA, 6 + 2 * size),
                    mem.view(USED_GPA, 6 + 8 * size), mem, indirect=indirect,
                    max_chain_bytes=max_chain, max_indirect=max_indirect)
    q.set_base(base)
    return q


# -- what a hostile guest writes --------------------------------------------------

addresses = st.one_of(
    st.integers(DATA_GPA, REGION1 - 1),
    st.integers(REGION2, REGION2 + REGION2_SIZE - 1),
    st.sampled_from([REGION1 - 16, REGION1, REGION2 - 1, REGION2 + REGION2_SIZE - 16, 2**64 - 8]),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 8, 15, 16, 24, 32, 64, 2064, 4096]),
    st.integers(0, 600),
    st.integers(0, 2**32 - 1),
)


@st.composite
def batch_bytes(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 6))
    recs = [abi.Record(draw(st.integers(0, 9)), draw(st.sampled_from([0, 512, 1024, 1025, 65535])),
                       draw(st.sampled_from([0, 0, 1500000]))) for _ in range(n)]
    data = abi.encode_batch(abi.Batch(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)),
                                      tuple(recs), draw(st.sampled_from([0, 0, 1, 2]))))
    if draw(st.integers(0, 5)) == 0:  # a framing error: cut, extended or a wrong count
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=12))
    return data


@st.composite
def scenario(draw: st.DrawFn) -> dict:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    a, b = bytearray(REGION1), bytearray(REGION2_SIZE)
    # Data: batches (valid or broken), indirect tables and garbage in 256-byte slots.
    slots = [(a, DATA_GPA + 256 * i, DATA_GPA + 256 * i) for i in range(16)] + \
            [(b, 256 * i, REGION2 + 256 * i) for i in range(16)]
    placed: list[tuple[int, int]] = []  # (gpa, length) of each batch written
    tables: list[tuple[int, int]] = []
    for buf, off, gpa in draw(st.lists(st.sampled_from(slots), max_size=10, unique_by=lambda x: x[2])):
        kind = draw(st.integers(0, 5))
        if kind <= 3:
            data = draw(batch_bytes())[:256]
            placed.append((gpa, len(data)))
        elif kind == 4:
            entries = []
            for _ in range(draw(st.integers(1, 4))):
                if placed and draw(st.booleans()):
                    g, n = draw(st.sampled_from(placed))
                else:
                    g, n = draw(addresses), draw(lengths)
                entries.append(DESC.pack(g, n, draw(st.sampled_from([0, 0, 1, 2, 3, 4])), draw(st.integers(0, 4))))
            data = b"".join(entries)
            tables.append((gpa, len(data)))
        else:
            data = draw(st.binary(min_size=1, max_size=48))
        buf[off : off + len(data)] = data
    # The descriptor table: mostly buffers that exist, split or whole, sometimes anything.
    flag_choices = [0, 0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT,
                    VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0xFFFF]
    for i in range(size):
        pick = draw(st.integers(0, 9))
        nxt = draw(st.integers(0, size + 1))
        if pick <= 4 and placed:
            g, n = draw(st.sampled_from(placed))
            cut = draw(st.integers(0, n))
            if cut < n and draw(st.booleans()):  # split in two descriptors
                DESC.pack_into(a, DESC_GPA + 16 * i, g, cut, VIRTQ_DESC_F_NEXT, nxt % size)
                DESC.pack_into(a, DESC_GPA + 16 * (nxt % size), g + cut, n - cut,
                               draw(st.sampled_from([0, 0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE])),
                               draw(st.integers(0, size)))
            else:
                DESC.pack_into(a, DESC_GPA + 16 * i, g, n, 0, nxt)
        elif pick <= 6 and tables:
            g, n = draw(st.sampled_from(tables))
            DESC.pack_into(a, DESC_GPA + 16 * i, g, n, VIRTQ_DESC_F_INDIRECT | draw(st.sampled_from([0, 0, 1, 2])), nxt)
        else:
            DESC.pack_into(a, DESC_GPA + 16 * i, draw(addresses), draw(lengths), draw(st.sampled_from(flag_choices)),
                           nxt)
    base = draw(st.sampled_from([0, 1, 0xFFFE, 0xFFFF])) if draw(st.booleans()) else draw(st.integers(0, 0xFFFF))
    for i in range(size):
        U16.pack_into(a, AVAIL_GPA + 4 + 2 * i, draw(st.integers(0, size - 1)) if draw(st.integers(0, 9)) else
                      draw(st.integers(size, 0xFFFF)))
    pending = draw(st.integers(0, size)) if draw(st.integers(0, 7)) else draw(st.integers(0, 0xFFFF))
    U16.pack_into(a, AVAIL_GPA + 2, (base + pending) & 0xFFFF)
    return dict(
        a=a, b=b, size=size, base=base,
        indirect=draw(st.integers(0, 3)) > 0,
        max_chain=draw(st.sampled_from([16, 64, 2064, 65536, 65536])),
        max_indirect=draw(st.sampled_from([1, 2, 4096, 32768])),
        budget=draw(st.sampled_from([1, 2, 5, 512, 512])),
        num_vcpus=draw(st.integers(1, 10)),
        perf_request=draw(st.booleans()),
    )


@settings(max_examples=int(os.environ.get("VUC_DRAIN_EXAMPLES", "1500")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario())
def test_c_drain_matches_the_reference(s: dict) -> None:
    lib = c_lib()
    ref_a, ref_b = bytearray(s["a"]), bytearray(s["b"])
    c_a, c_b = bytearray(s["a"]), bytearray(s["b"])
    geometry = dict(indirect=s["indirect"], max_chain=s["max_chain"], max_indirect=s["max_indirect"], base=s["base"])
    rq = make_queue(ref_a, ref_b, s["size"], **geometry)
    cq = make_queue(c_a, c_b, s["size"], **geometry)
    cdrain = CDrainer(lib, cq, 512).drain
    kw = dict(num_vcpus=s["num_vcpus"], perf_request=s["perf_request"])
    for _ in range(4):  # until the ring is empty, broken, or four turns went by
        want = drain(rq, s["budget"], **kw)
        got = cdrain(cq, s["budget"], **kw)
        assert got == want
        assert cq.packed_cursor == rq.packed_cursor and cq.in_flight == rq.in_flight == 0
        if not want.more and not want.entries:
            break
    assert c_a == ref_a and c_b == ref_b  # the used ring, and nothing else, was written alike


def test_valid_traffic_through_both_drains_is_identical() -> None:
    """A well-behaved driver's batches (the common case) through the real DriverQueue."""
    lib = c_lib()
    outs = []
    for use_c in (False, True):
        mem = bytearray(REGION1)
        flat = TwoRegions(mem, bytearray(REGION2_SIZE))
        drv = DriverQueue(64, flat.view(DESC_GPA, 1024), flat.view(AVAIL_GPA, 6 + 128),
                          flat.view(USED_GPA, 6 + 512), flat)
        dev = DeviceQueue(64, flat.view(DESC_GPA, 1024), flat.view(AVAIL_GPA, 6 + 128),
                          flat.view(USED_GPA, 6 + 512), flat, max_chain_bytes=65536)
        run = CDrainer(lib, dev, 64).drain if use_c else drain
        got = []
        for seq in range(40):
            data = abi.encode_batch(abi.Batch(seq, seq * 1000, tuple(abi.Record(v, (seq * 37 + v) % 1025)
                                                                      for v in range(1 + seq % 8))))
            gpa = DATA_GPA + 96 * (seq % 40)
            mem[gpa : gpa + len(data)] = data
            drv.add([(gpa, len(data))])
            drv.publish()
            if seq % 3 == 2:
                got.append(run(dev, 64, num_vcpus=8, perf_request=False))
                drv.reclaim()
        outs.append((got, bytes(mem)))
    assert outs[0] == outs[1]
    assert sum(len(d.records) for d in outs[1][0]) == sum(1 + s % 8 for s in range(39))
    assert all(e[1] == 0 for d in outs[1][0] for e in d.entries)


def test_reason_tables_agree() -> None:
    lib = c_lib()
    from vhost_user_cpufreq.backend.dataplane.cdrain import _ffi

    assert [_ffi.string(lib.vuc_reason_name(i)).decode() for i in range(len(REASONS))] == list(REASONS)
    assert lib.vuc_reason_name(len(REASONS)) == _ffi.NULL


def test_budget_is_bounded() -> None:
    lib = c_lib()
    q = make_queue(bytearray(REGION1), bytearray(REGION2_SIZE), 4, indirect=True, max_chain=64,
                   max_indirect=4, base=0)
    d = CDrainer(lib, q, 8)
    with pytest.raises(ValueError):
        d.drain(q, 9, num_vcpus=1, perf_request=False)
    with pytest.raises(ValueError):
        drain(q, 0, num_vcpus=1, perf_request=False)


def test_ring_error_has_no_head() -> None:
    a = bytearray(REGION1)
    q = make_queue(a, bytearray(REGION2_SIZE), 4, indirect=True, max_chain=64, max_indirect=4, base=0)
    U16.pack_into(a, AVAIL_GPA + 2, 9)  # 9 entries on a 4-entry ring
    d = drain(q, 8, num_vcpus=1, perf_request=False)
    assert d.entries == [(NO_HEAD, REASONS.index("avail-index-jump"), 0, 0, 0, 0, 0)] and not d.more
    assert d.returned == 0


def _offer_raw(g, *buffers: bytes) -> None:  # type: ignore[no-untyped-def]
    """Put ``buffers`` on the guest's request ring behind its driver's back, and kick.

    A function, so no view of guest RAM outlives it: the guest's close must be
    able to unmap its RAM.
    """
    ram, q = g.transport.ram, g.driver.queue
    for data in buffers:
        gpa = ram.alloc(len(data), 8)
        ram.memory.view(gpa, len(data))[:] = data
        q.add([(gpa, len(data))])
    q.publish()
    g.transport.notify(0)


async def test_both_data_planes_serve_a_vm_alike(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The device over a real session with either drain: same records, same counted rejections."""
    from vhost_user_cpufreq.backend.dataplane import cdrain
    from vhost_user_cpufreq.protocol.cpufreq import Batch, Record, encode_batch


    c_lib()  # both must exist for the comparison to mean anything
    seen = []
    for kind in ("python", "c"):
        plane = cdrain.DataPlane(kind, kind, cdrain.dataplane().lib if kind == "c" else None)
        monkeypatch.setattr(cdrain, "_selected", plane)
        d = tmp_path / kind
        d.mkdir()
        svc, _, pol, slots = await make_service(d, ("vm", (0, 0, 1, 2)))
        g = await start_guest(str(d / "vm.sock"))
        try:
            assert slots["vm"].device._dataplane.kind == kind
            for i in range(20):
                g.driver.set_util(i % 4, 40 * i)
                g.driver.flush()
            # Two hostile buffers straight onto the ring: a record with util 2000, and a short batch.
            _offer_raw(g, encode_batch(Batch(10**6, 0, (Record(1, 2000), Record(2, 5)))), b"\x01\x02")
            await until(lambda: slots["vm"].counters.get("rejected", "short-batch") == 1, what="rejections")
            c = slots["vm"].counters
            seen.append(([tuple(r) for r in pol.records["vm"]], c.get("records"), c.get("batches"),
                         c.get("rejected", "bad-util"), c.get("rejected", "short-batch")))
        finally:
            await g.close()
            await svc.close()
    assert seen[0] == seen[1]
    records, n, batches, bad_util, short = seen[1]
    assert records[-1] == (2, 5, 0) and n == len(records) == 21 and (bad_util, short) == (1, 1)
    assert batches == 21  # 20 from the driver, 1 hostile with one good record; the short one is not a batch


def test_every_reason_is_explained() -> None:
    from vhost_user_cpufreq.protocol.requests import EXPLAIN

    assert set(EXPLAIN) == set(REASONS) - {"ok"} and all(EXPLAIN.values())


def test_log_budget() -> None:
    from vhost_user_cpufreq.backend.policy.ratelimit import LogBudget

    b = LogBudget(burst=3, period=1.0)
    assert [b.allow(0.1 * i) for i in range(5)] == [True, True, True, False, False]
    assert b.suppressed == 2
    assert b.allow(1.0) and b.suppressed_then == 2  # a new period, and the count of what was held back
    assert b.allow(1.1) and b.suppressed_then == 0


async def test_a_flood_of_bad_buffers_is_counted_in_full_and_logged_within_budget(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging


    svc, _, pol, slots = await make_service(tmp_path, ("vm", (0, 0, 1, 2)))
    g = await start_guest(str(tmp_path / "vm.sock"))
    caplog.set_level(logging.WARNING)
    try:
        _offer_raw(g, *[bytes(8)] * 40)  # 40 short batches in one go
        await until(lambda: slots["vm"].counters.get("rejected", "short-batch") == 40, what="40 rejections")
        lines = [r.getMessage() for r in caplog.records if "short-batch" in r.getMessage()]
        assert 1 <= len(lines) <= 10, lines
        assert "shorter than the 16-byte batch header" in lines[0]
        assert len(g.driver.queue.reclaim()) == 40  # ours, not the driver's: take them back before it flushes
        g.driver.set_util(1, 700)  # the VM is still served
        g.driver.flush()
        await until(lambda: pol.records["vm"] and pol.records["vm"][-1].util == 700, what="a good record")
    finally:
        await g.close()
        await svc.close()


def _dataplane_in_child(tmp_path, **env: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """The data-plane choice of a fresh process with empty cache directories."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("VUC_DATAPLANE", "CC", "VUC_CACHE_DIR", "CACHE_DIRECTORY", "VUC_PREBUILT")}
    e.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-m", "vhost_user_cpufreq.backend.dataplane.cdrain"], env=e,
                          capture_output=True, text=True, timeout=120)


def test_without_a_compiler_the_reference_runs_and_says_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = _dataplane_in_child(tmp_path, CC="/nonexistent/cc", VUC_PREBUILT="0")
    assert r.returncode == 1 and r.stdout.startswith(
        "python pure Python (prebuilt extension skipped: VUC_PREBUILT=0; no run-time build: cannot run the C "
        "compiler"), r
    assert "data plane degraded to the pure-Python reference" in r.stderr
    r = _dataplane_in_child(tmp_path, CC="/nonexistent/cc", VUC_PREBUILT="0", VUC_DATAPLANE="c")
    assert r.returncode != 0 and "VUC_DATAPLANE=c but the C data plane is unavailable" in r.stderr, r


def test_the_c_drain_is_built_into_an_empty_cache_at_run_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c_lib()  # a compiler is here (or the test skips, or fails in CI)
    r = _dataplane_in_child(tmp_path, VUC_PREBUILT="0")
    assert r.returncode == 0 and r.stdout.startswith(
        f"c C, built at run time in {tmp_path}/cache/vhost-user-cpufreq (dataplane-"), r


def test_the_prebuilt_extension_needs_no_compiler(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Where the package was built with its extension (an install, a wheel, an editable install), a
    process with no compiler and empty caches runs the C data plane; VUC_PREBUILT=0 turns it away."""
    from vhost_user_cpufreq.backend.dataplane.library import prebuilt_status

    if os.environ.get("VUC_PREBUILT") == "0" or os.environ.get("VUC_SANITIZE"):
        pytest.skip("this run asks for the run-time build (VUC_PREBUILT=0 or VUC_SANITIZE)")
    if prebuilt_status():
        unavailable("VUC_REQUIRE_TOOLS", f"the package was installed without its extension: {prebuilt_status()}")
    r = _dataplane_in_child(tmp_path, CC="/nonexistent/cc")
    assert r.returncode == 0 and r.stdout.startswith("c C, prebuilt extension ("), r
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_a_stale_prebuilt_extension_is_not_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An extension built from other sources than those beside it (C edited after an editable install)
    is left alone: the run-time build, or the reference, runs what the sources say."""
    from vhost_user_cpufreq.backend.dataplane.library import prebuilt_status

    if os.environ.get("VUC_PREBUILT") == "0" or os.environ.get("VUC_SANITIZE") or prebuilt_status():
        pytest.skip(f"no prebuilt extension in this run: {prebuilt_status() or 'VUC_PREBUILT=0'}")
    code = ("from vhost_user_cpufreq.backend.dataplane import cdefs\n"
            "cdefs.source_hash = lambda: 'edited'\n"
            "from vhost_user_cpufreq.backend.dataplane import library, cdrain\n"
            "print(library.prebuilt_status()); print(cdrain.dataplane().detail)\n")
    e = {k: v for k, v in os.environ.items() if k not in ("VUC_DATAPLANE", "CC", "VUC_CACHE_DIR", "CACHE_DIRECTORY")}
    e.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), TMPDIR=str(tmp_path), CC="/nonexistent/cc")
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    why, detail = r.stdout.splitlines()
    assert why.startswith("prebuilt extension ") and "_vuc" in why and why.endswith(", these are edited)"), r
    assert " is stale (built from sources " in why, why
    assert detail.startswith("pure Python (prebuilt extension ") and "is stale" in detail, detail


def test_misaligned_rings_are_left_to_the_reference() -> None:
    from vhost_user_cpufreq.backend.dataplane.cdrain import DataPlane

    lib = c_lib()
    mem = TwoRegions(bytearray(REGION1), bytearray(REGION2_SIZE))
    q = DeviceQueue(4, mem.view(DESC_GPA, 64), mem.view(AVAIL_GPA + 1, 14), mem.view(USED_GPA, 38), mem)
    assert CDrainer.for_queue(lib, q, 8) is None
    assert DataPlane("c", "C", lib).drainer(q, 8) is python_turn
    aligned = make_queue(bytearray(REGION1), bytearray(REGION2_SIZE), 4, indirect=True, max_chain=64,
                         max_indirect=4, base=0)
    assert isinstance(CDrainer.for_queue(lib, aligned, 8), CDrainer)


# -- pricing a turn (docs/hostile-input.md, flood) ----------------------------------------------


def _big_ring(size: int, batches: list[bytes], *, indirect_entries: int = 0,
              max_indirect: int = 32768) -> tuple[DeviceQueue, bytearray]:
    """A ring of ``size`` in one 1 MiB region holding ``batches`` (each behind an indirect table of
    ``indirect_entries`` zero-length descriptors then the batch, if that is not 0)."""
    mem = bytearray(1 << 20)
    flat = TwoRegions(mem, bytearray(REGION2_SIZE))
    desc, avail, used, data = 0, 16 * size, 16 * size + 8 + 2 * size, 32 * size + 4096
    q = DeviceQueue(size, flat.view(desc, 16 * size), flat.view(avail, 6 + 2 * size), flat.view(used, 6 + 8 * size),
                    flat, indirect=True, max_chain_bytes=65536, max_indirect=max_indirect)
    drv = DriverQueue(size, flat.view(desc, 16 * size), flat.view(avail, 6 + 2 * size),
                      flat.view(used, 6 + 8 * size), flat)
    gpa = data
    for b in batches:
        mem[gpa : gpa + len(b)] = b
        head = drv.add([(gpa, len(b))])
        gpa += (len(b) + 15) // 16 * 16
        if indirect_entries:
            table = gpa
            for i in range(indirect_entries - 1):
                DESC.pack_into(mem, table + 16 * i, 0, 0, VIRTQ_DESC_F_NEXT, i + 1)
            DESC.pack_into(mem, table + 16 * (indirect_entries - 1), gpa - (len(b) + 15) // 16 * 16, len(b), 0, 0)
            DESC.pack_into(mem, desc + 16 * head, table, 16 * indirect_entries, VIRTQ_DESC_F_INDIRECT, 0)
            gpa += 16 * indirect_entries
    drv.publish()
    return q, mem


def _batch(seq: int, n: int) -> bytes:
    return abi.encode_batch(abi.Batch(seq, 0, tuple(abi.Record(i % 8, i % 1025) for i in range(n))))


def test_a_python_turn_prices_each_buffer_so_small_batches_stop_early() -> None:
    ring = [_batch(s, 1) for s in range(256)]
    q, _ = _big_ring(256, ring)
    d = drain(q, 512, num_vcpus=8, perf_request=False, buffer_units=PYTHON_BUFFER_UNITS)
    assert len(d.entries) == 512 // PYTHON_BUFFER_UNITS == 64 and d.spent == 512 and d.more
    assert len(d.records) == 64 and all(e[1] == 0 for e in d.entries)
    q, _ = _big_ring(256, ring)  # the C drain's pricing: a 1-record buffer is one unit
    d = drain(q, 512, num_vcpus=8, perf_request=False)
    assert len(d.entries) == 256 and d.spent == 256 and not d.more
    with pytest.raises(ValueError):
        drain(q, 512, num_vcpus=8, perf_request=False, buffer_units=0)


@pytest.mark.parametrize("units", [1, PYTHON_BUFFER_UNITS])
def test_a_turn_of_max_size_batches_stops_at_the_budget(units: int) -> None:
    q, _ = _big_ring(8, [_batch(s, abi.MAX_RECORDS_PER_BATCH) for s in range(8)])
    d = drain(q, 512, num_vcpus=8, perf_request=False, buffer_units=units)
    assert len(d.entries) == 2 and d.spent == 512 and d.more  # 256 records each: two fill the turn
    assert len(d.records) == 512
    d = drain(q, 300, num_vcpus=8, perf_request=False, buffer_units=units)
    assert len(d.entries) == 2 and d.spent == 512  # the buffer that crosses the budget is completed


def test_the_device_takes_an_indirect_table_no_longer_than_its_turn() -> None:
    from vhost_user_cpufreq.backend.cpufreq.device import DEFAULT_WORK_BUDGET, CpufreqDevice
    from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
    from vhost_user_cpufreq.backend.dataplane.cdrain import DataPlane
    from vhost_user_cpufreq.backend.host.hosts import PIXEL6
    from vhost_user_cpufreq.protocol.requests import DESCRIPTORS_PER_UNIT, PYTHON_MAX_INDIRECT

    c, py = DataPlane("c", "C", object()), DataPlane("python", "Python")

    def dev(plane: DataPlane, budget: int = DEFAULT_WORK_BUDGET) -> CpufreqDevice:
        return CpufreqDevice("vm", (0, 1), StaticSource(PIXEL6), None, work_budget=budget,  # type: ignore[arg-type]
                             data_plane=plane)

    assert dev(c).max_indirect == DESCRIPTORS_PER_UNIT * DEFAULT_WORK_BUDGET == 4096
    assert dev(c, 8).max_indirect == 64
    assert dev(py).max_indirect == PYTHON_MAX_INDIRECT == 1024


def test_a_python_turn_ends_on_time() -> None:
    ring = [_batch(s, 1) for s in range(256)]
    q, _ = _big_ring(256, ring)
    asked = []

    def out_of_time() -> bool:
        asked.append(1)
        return len(asked) == 5

    d = drain(q, 512, num_vcpus=8, perf_request=False, out_of_time=out_of_time)
    assert len(d.entries) == 5 and d.more  # asked after each buffer; the fifth answer ended it
    d = drain(q, 3, num_vcpus=8, perf_request=False, out_of_time=lambda: True)
    assert len(d.entries) == 1 and d.more
    q, _ = _big_ring(256, ring)
    d = python_turn(q, 512, num_vcpus=8, perf_request=False)  # the data plane's: priced, and on a clock
    assert 1 <= len(d.entries) <= 64 and d.more and all(e[1] == 0 for e in d.entries)


@pytest.mark.parametrize("use_c", [False, True])
def test_an_oversize_indirect_table_is_refused_unwalked_on_both_drains(use_c: bool) -> None:
    """4,097 entries: chain-too-long at one unit, before a single entry is read (the entries would
    loop, which a walk would report as descriptor-loop).  4,096 zero-length ones are walked and
    cost the whole turn's 512 units."""
    run = CDrainer(c_lib(), _big_ring(4, [])[0], 512).drain if use_c else drain
    q, mem = _big_ring(4, [_batch(0, 1)], indirect_entries=4097, max_indirect=4096)
    table = DESC.unpack_from(mem, 0)[0]
    for i in range(4097):  # every entry now links back to the first: a walk would find a loop
        DESC.pack_into(mem, table + 16 * i, 0, 0, VIRTQ_DESC_F_NEXT, 0)
    if use_c:
        run = CDrainer(c_lib(), q, 512).drain
    d = run(q, 512, num_vcpus=8, perf_request=False)
    assert d.entries == [(0, REASONS.index("chain-too-long"), 0, 0, 0, 0, 0)] and d.spent == 1
    assert d.descriptors == 0 and d.returned == 1
    q, _ = _big_ring(4, [_batch(0, 1), _batch(1, 1)], indirect_entries=4096, max_indirect=4096)
    if use_c:
        run = CDrainer(c_lib(), q, 512).drain
    d = run(q, 512, num_vcpus=8, perf_request=False)
    assert [e[1] for e in d.entries] == [0] and d.spent == 512 and d.more and d.descriptors == 4097  # and the ring's own


async def test_an_oversize_indirect_table_is_counted_and_logged(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Over a real session: the rejection is counted by reason and logged, and the VM is served."""
    import logging

    svc, _, pol, slots = await make_service(tmp_path, ("vm", (0, 0, 1, 2)))
    g = await start_guest(str(tmp_path / "vm.sock"))
    caplog.set_level(logging.WARNING)
    try:
        ram, q = g.transport.ram, g.driver.queue
        table = ram.alloc(16 * 4097, 16)
        ram.memory.view(table, 16 * 4097)[:] = bytes(16 * 4097)
        head = q.add([(table, 16)])  # rewritten below as an indirect descriptor over the whole table
        ring = g.fe.rings[0]
        ram.memory.view(ring.desc + 16 * head, 16)[:] = DESC.pack(table, 16 * 4097, VIRTQ_DESC_F_INDIRECT, 0)
        q.publish()
        g.transport.notify(0)
        await until(lambda: slots["vm"].counters.get("rejected", "chain-too-long") == 1, what="the rejection")
        assert any("chain-too-long" in r.getMessage() for r in caplog.records)
        assert len(q.reclaim()) == 1
        g.driver.set_util(1, 700)
        g.driver.flush()
        await until(lambda: pol.records["vm"] and pol.records["vm"][-1].util == 700, what="a good record")
    finally:
        await g.close()
        await svc.close()
