"""A CI-sized fuzzing budget: hostile front-ends and hostile guests against one real Service.

Everything runs over real unix sockets with real fds and shared memfd guest
RAM, next to a well-behaved witness VM (see ``tests/fuzz/harness.py`` for
the generators, the mutations and the properties checked after each case).
Seeded random cases give the bulk of the budget; hypothesis adds cases that
shrink to a minimal reproducer.  A line per test reports the cases run, and
the counts also go to ``record_property`` (junit XML).  Failures that match a
reported bug (``KNOWN_BUGS``) are tallied, not failed: ``test_faults.py``
pins each with a strict xfail.  The seeded guest cases run once more with
the guest's ring on the C kick lane (``FuzzBed(lane=True)``);
``test_sanitized_dataplane.py`` runs the campaign that way under ASan and UBSan.

The long campaign: ``.venv/bin/python -m tests.fuzz.campaign --seconds 60``.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from vhost_user_cpufreq.protocol import cpufreq as abi

from .fuzz.harness import (
    BatchSpec,
    Buf,
    FuzzBed,
    GuestCase,
    Round,
    StreamCase,
    guest_case_strategy,
    random_guest_case,
    random_stream_case,
    stream_case_strategy,
)
from .helpers import require_c_dataplane

SEED = 20261124
#: Budgets, sized for about 20 s in all on the 2-core CI machine.
STREAM_CASES = 3000
SHMEM_STREAM_CASES = 600  # the shared-page sequence (SHMEM negotiated), on a bed whose fuzzed VM offers it
GUEST_CASES = 900
LANE_GUEST_CASES = 450
HYPOTHESIS_STREAM = 120
HYPOTHESIS_GUEST = 80


class _Summary:
    """A plugin registered at run time: prints the fuzz lines in pytest's terminal summary."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("fuzz")
            for line in self.lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest) -> list[str]:
    """One summary line per fuzz test, shown at the end of the run (whatever ``-s``)."""
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "vuc-fuzz-summary")
    return plugin.lines


def _summarise(name: str, bed: FuzzBed, report: list[str], record_property: Any) -> None:
    s = bed.summary()
    cases = s["cases"]
    n = cases.get("stream", 0) + cases.get("guest", 0)
    record_property("fuzz_cases", n)
    record_property("fuzz_known_bugs", s["known_bugs"])
    closed = ", ".join(f"{r} {k}" for r, k in list(s["sessions_closed"].items())[:6])
    report.append(f"fuzz {name}: {n} cases {cases}; known bugs hit {s['known_bugs'] or 'none'}; "
                  f"{len(s['rejected'])} rejection reasons seen" + (f"; top closes: {closed}" if closed else ""))


def _assert_clean(bed: FuzzBed) -> None:
    assert not bed.failures, "\n".join(f.describe()[:3000] for f in bed.failures[:5])


async def test_the_unmutated_qemu_sequence_is_served_without_a_rejection(tmp_path: Path) -> None:
    # The base every mutation starts from must itself be valid, or the fuzzing proves little.
    bed = await FuzzBed.create(tmp_path)
    try:
        for mem_slots in (True, False):
            res = await bed.run_stream(StreamCase(mem_slots, ()))
            assert res.ok, res.describe()
            assert res.close_reason == "front-end disconnected" and not res.rejected, (res.close_reason, res.rejected)
    finally:
        await bed.close()


async def test_the_unmutated_shmem_sequence_maps_the_page_without_a_rejection(tmp_path: Path) -> None:
    bed = await FuzzBed.create(tmp_path, shmem=True)
    try:
        res = await bed.run_stream(StreamCase(False, (), shmem=True))
        assert res.ok, res.describe()
        assert res.close_reason == "front-end disconnected" and not res.rejected, (res.close_reason, res.rejected)
        c = bed.slots["fuzz"].counters
        assert c.get("shmem_maps_sent") == 1 and c.get("shmem_fallback") == 0  # the map went out (no ack here)
    finally:
        await bed.close()


async def test_hostile_shmem_front_ends_seeded(tmp_path: Path, report: list[str], record_property: Any) -> None:
    """The shared-page sequence mutated: SHMEM messages out of order, wrong sizes, no channel, and the rest."""
    bed = await FuzzBed.create(tmp_path, shmem=True)
    try:
        for i in range(SHMEM_STREAM_CASES):
            case = random_stream_case(random.Random(SEED + 7919 + i))
            await bed.run_stream(StreamCase(False, case.ops, shmem=True), seed=SEED + 7919 + i)
        c = bed.slots["fuzz"].counters
        shm = {f"{e}:{r}" if r else e: n for (e, r), n in c.snapshot().items() if e.startswith("shmem")}
        report.append(f"  SHMEM counters: {shm}")
        # the campaign reached the map, and front-ends that broke the SHMEM rules were refused
        assert c.get("shmem_maps_sent") > 0, shm
        assert c.get("rejected", "feature-not-negotiated") + c.get("rejected", "unsupported-protocol-features") > 0
    finally:
        await bed.close()
    _summarise("front-end streams with SHMEM (seeded)", bed, report, record_property)
    _assert_clean(bed)


async def test_well_formed_chains_of_every_shape_deliver_exactly_their_records(tmp_path: Path) -> None:
    bed = await FuzzBed.create(tmp_path)
    recs = ((0, 100, 0), (1, 1024, 0), (3, 0, 2802000))
    bufs = tuple(Buf(shape, BatchSpec(0, recs), nseg=nseg, nwrite=nw, zeros=z, param=16)
                 for shape in ("direct", "indirect", "mixed", "ind-zero") for nseg, nw, z in ((1, 0, 0), (3, 2, 1)))
    try:
        for size, base in ((16, 0), (16, 0xFFFA), (1024, 0xFFFF)):
            res = await bed.run_guest(GuestCase(size, base, rounds=(Round(bufs),)))
            assert res.ok and not res.known, res.describe()
            assert not res.rejected, res.rejected
            # Every batch followed the one before: all 8 accepted, 3 records each.
            assert bed.slots["guest"].counters.get("records") >= 24
    finally:
        await bed.close()
    _assert_clean(bed)


async def test_hostile_front_ends_seeded(tmp_path: Path, report: list[str], record_property: Any) -> None:
    bed = await FuzzBed.create(tmp_path)
    try:
        for i in range(STREAM_CASES):
            await bed.run_stream(random_stream_case(random.Random(SEED + i)), seed=SEED + i)
    finally:
        await bed.close()
    _summarise("front-end streams (seeded)", bed, report, record_property)
    _assert_clean(bed)


async def test_hostile_guests_seeded(tmp_path: Path, report: list[str], record_property: Any) -> None:
    bed = await FuzzBed.create(tmp_path)
    try:
        for i in range(GUEST_CASES):
            await bed.run_guest(random_guest_case(random.Random(SEED + i)), seed=SEED + i)
    finally:
        await bed.close()
    _summarise("guest memory (seeded)", bed, report, record_property)
    assert bed.summary()["cases"].get("guest (torn)", 0) > 0
    _assert_clean(bed)


async def test_hostile_guests_seeded_on_the_kick_lane(tmp_path: Path, report: list[str],
                                                      record_property: Any) -> None:
    # The same cases with the guest's ring served by the C lane thread instead of the event loop.
    require_c_dataplane()
    bed = await FuzzBed.create(tmp_path, lane=True)
    try:
        for i in range(LANE_GUEST_CASES):
            await bed.run_guest(random_guest_case(random.Random(SEED + i)), seed=SEED + i)
    finally:
        await bed.close()
    _summarise("guest memory on the kick lane (seeded)", bed, report, record_property)
    cases = bed.summary()["cases"]
    assert cases.get("guest (kick lane)") == cases.get("guest") == LANE_GUEST_CASES, cases
    _assert_clean(bed)


def _run_hypothesis(tmp_path: Path, strategy: Any, examples: int, kind: str) -> FuzzBed:
    loop = asyncio.new_event_loop()
    try:
        bed = loop.run_until_complete(FuzzBed.create(tmp_path))
        try:
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def check(case: Any) -> None:
                run = bed.run_stream if kind == "stream" else bed.run_guest
                res = loop.run_until_complete(run(case))
                assert res.ok, res.describe()

            check()
        finally:
            loop.run_until_complete(bed.close())
    finally:
        loop.close()
    return bed


def test_hostile_front_ends_hypothesis(tmp_path: Path, report: list[str], record_property: Any) -> None:
    bed = _run_hypothesis(tmp_path, stream_case_strategy(), HYPOTHESIS_STREAM, "stream")
    _summarise("front-end streams (hypothesis)", bed, report, record_property)


def test_hostile_guests_hypothesis(tmp_path: Path, report: list[str], record_property: Any) -> None:
    bed = _run_hypothesis(tmp_path, guest_case_strategy(), HYPOTHESIS_GUEST, "guest")
    _summarise("guest memory (hypothesis)", bed, report, record_property)


async def test_a_bad_head_does_not_hold_back_the_buffers_before_it(tmp_path: Path) -> None:
    bed = await FuzzBed.create(tmp_path)
    try:
        res = await bed.run_guest(GuestCase(16, 0, rounds=(Round((Buf(), Buf(), Buf("bad-head"))),)))
    finally:
        await bed.close()
    # The two good chains were consumed and returned by the device; the guest must see them in used.idx.
    assert res.ok and "KB4" not in res.known, res.describe() + f" known={res.known}"


def test_batch_spec_encodes_what_the_abi_decodes() -> None:
    # The generator's notion of a valid batch is the ABI's.
    spec = BatchSpec(5, ((0, 1, 0), (3, 1024, 7)), flags=abi.BATCH_F_RESYNC)
    res = abi.decode_batch(spec.encode(100), num_vcpus=4, perf_request=True)
    assert res.batch.seq == 105 and res.batch.flags == abi.BATCH_F_RESYNC and not res.rejected
    assert [(r.vcpu, r.util, r.perf_khz) for r in res.batch.records] == [(0, 1, 0), (3, 1024, 7)]
