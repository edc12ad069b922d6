"""Guest floods and fairness: one VM floods, a victim VM on the same service must still be heard.

The flooding guest (tests/floodlib.py) runs in its own process (as a real guest
would, on the other core of this 2-core machine): it keeps its 256-entry ring full of
max-size batches (256 records each) and kicks after every refill, as fast as
it can.  The service, with the real HostPolicy (dry-run actuator, a ceiling
of 300 on the flooder), and the victim guest run in the test process; the
victim sends one record at a time and the policy wrapper timestamps its
arrival.  The bounds are functional bounds against starvation, not
performance targets; the figures measured on this machine are in comments.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.policy.engine import VcpuPlacement, VmLimits
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.policy.decision import Decision
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig, VmSlot
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import virtqueue as vq
from vhost_user_cpufreq.protocol.cpufreq import Domain, Record
from vhost_user_cpufreq.protocol.memory import FlatMemory

from .helpers import Guest, start_guest

ROOT = Path(__file__).resolve().parent.parent
FLOOD_VMAP = (0, 0, 1, 1, 2, 2, 2, 2)  # 8 vCPUs over the three PIXEL6 clusters
VICTIM_VMAP = (2, 2)
CEILING = 300


# -- the service side -----------------------------------------------------------------------------------


class RecordingActuator(ThreadActuator):
    """The dry-run actuator, remembering the highest clamp ever handed to each thread."""

    def __init__(self, counters: Counters) -> None:
        super().__init__(counters, dry_run=True)
        self.highest: dict[int, int] = {}

    def clamp(self, tid: int, util_min: int) -> bool:
        self.highest[tid] = max(self.highest.get(tid, 0), util_min)
        return super().clamp(tid, util_min)


class TimingPolicy:
    """Wraps the real policy; timestamps each victim record as the policy receives it."""

    def __init__(self, inner: HostPolicy) -> None:
        self.inner = inner
        self.records: dict[str, int] = {}
        self.sent = 0
        self._cond = threading.Condition()
        self._arrived: dict[int, float] = {}  # victim util -> time.monotonic() at receipt

    def expect(self, util: int) -> None:
        with self._cond:
            self._arrived.pop(util, None)

    def wait(self, util: int, timeout: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: util in self._arrived, timeout)
            return self._arrived.get(util)

    def on_record(self, vm: str, record: Record, domain: Domain, now: float) -> Decision:
        if vm == "victim":
            with self._cond:
                self._arrived[record.util] = time.monotonic()
                self._cond.notify_all()
        self.records[vm] = self.records.get(vm, 0) + 1
        return self.inner.on_record(vm, record, domain, now)

    def on_vm_reset(self, vm: str) -> None:
        self.inner.on_vm_reset(vm)


def _placements(vmap: tuple[int, ...], first_pcpu: int) -> list[VcpuPlacement]:
    out = []
    for v, hd in enumerate(vmap):
        dom = PIXEL6.domains[hd]
        out.append(VcpuPlacement(v, first_pcpu + v, dom.capacity, dom.capacity, dom.max_khz))
    return out


class _IdleThreads:
    """Real threads of this process standing in for vCPU threads (the actuator only dry-runs them)."""

    def __init__(self, n: int) -> None:
        self._stop = threading.Event()
        self._ready = threading.Barrier(n + 1)
        self.tids: list[int] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for th in self._threads:
            th.start()
        self._ready.wait()
        self.tids = [th.native_id for th in self._threads]  # type: ignore[misc]

    def _run(self) -> None:
        self._ready.wait()
        self._stop.wait()

    def close(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join()


@dataclass
class Rig:
    svc: Service
    policy: TimingPolicy
    host: HostPolicy
    actuator: RecordingActuator
    counters: Counters
    slots: dict[str, VmSlot]
    tmp: Path
    threads: _IdleThreads
    victim: Guest | None = None
    procs: list[Any] = field(default_factory=list)

    def path(self, vm: str) -> str:
        return str(self.tmp / f"{vm}.sock")

    async def start_flooder(self, seconds: float, mode: str = "full-ring") -> Any:
        code = f"from tests.floodlib import flooder_main; flooder_main({self.path('flood')!r}, {seconds}, {mode!r})"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.strip() == b"ready", line
        return proc

    async def finish_flooder(self, proc: Any) -> tuple[int, int]:
        """(batches sent, torn used.idx reads seen) of a flooder that ran to its end."""
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out
        words = out.split()
        return int(words[-1]), int(words[-3])

    async def victim_delays(self, samples: int = 1_000_000, *, start: float = 0.0, until: float | None = None,
                            gap: float = 0.01) -> tuple[list[float], list[int]]:
        """The victim sends one record at a time, from the monotonic time ``start`` on, ``samples``
        of them or until ``until``; (the delay from its flush to the policy receiving each, RSS
        samples in kB over that time).

        The victim guest runs in a thread of its own, on its own clock: were it a task of this
        event loop, a loop starved by the flood would delay its flushes too and hide the very
        delay measured here.
        """
        assert self.victim is not None
        return await asyncio.to_thread(self._victim_thread, samples, start, until, gap)

    def _victim_thread(self, samples: int, start: float, until: float | None,
                       gap: float) -> tuple[list[float], list[int]]:
        assert self.victim is not None
        d = self.victim.driver
        rng = random.Random(11)
        time.sleep(max(0.0, start - time.monotonic()))
        out: list[float] = []
        rss = [_rss_kb()]
        while len(out) < samples and (until is None or time.monotonic() < until):
            util = 1 + (self.policy.sent + len(out)) % 1000
            self.policy.expect(util)
            d.set_util(len(out) % 2, util)
            t0 = time.monotonic()
            d.flush()
            arrived = self.policy.wait(util, 10.0)
            assert arrived is not None, "a victim record never reached the policy"
            out.append(arrived - t0)
            rss.append(_rss_kb())
            time.sleep(gap * 2 * rng.random())
        self.policy.sent += len(out)
        return out, rss


async def open_rig(tmp: Path) -> Rig:
    counters = Counters()
    actuator = RecordingActuator(counters)
    host = HostPolicy(actuator)
    policy = TimingPolicy(host)
    svc = Service(StaticSource(PIXEL6), policy)
    slots = {vm: await svc.add_vm(VmConfig(vm, str(tmp / f"{vm}.sock"), vmap))
             for vm, vmap in (("flood", FLOOD_VMAP), ("victim", VICTIM_VMAP))}
    host.bind("flood", _placements(FLOOD_VMAP, 0), VmLimits(ceiling=CEILING))
    host.bind("victim", _placements(VICTIM_VMAP, len(FLOOD_VMAP)), VmLimits())
    threads = _IdleThreads(len(FLOOD_VMAP) + len(VICTIM_VMAP))
    host.attach_threads("flood", dict(enumerate(threads.tids[: len(FLOOD_VMAP)])))
    host.attach_threads("victim", dict(enumerate(threads.tids[len(FLOOD_VMAP):])))
    r = Rig(svc, policy, host, actuator, counters, slots, tmp, threads)
    r.victim = await start_guest(r.path("victim"), util_threshold=1)
    return r


async def close_rig(r: Rig) -> None:
    for p in r.procs:
        if p.returncode is None:
            p.kill()
            await p.wait()
    if r.victim is not None:
        await r.victim.close()
    r.host.close()
    await r.svc.close()
    r.threads.close()


@pytest.fixture
async def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = await open_rig(tmp_path)
    try:
        yield r
    finally:
        await close_rig(r)


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class FloodResult:
    delays: list[float]
    sent: int
    torn: int
    rss_growth_kb: int
    flood_records: int

    def describe(self) -> str:
        return (f"victim delay p50 {_pct(self.delays, 0.5) * 1e3:.1f} ms, p99 {_pct(self.delays, 0.99) * 1e3:.1f} ms, "
                f"max {max(self.delays) * 1e3:.1f} ms over {len(self.delays)} records; flooder sent {self.sent} "
                f"batches ({self.flood_records} records reached the policy), RSS {self.rss_growth_kb:+d} kB")


async def flood(rig: Rig, mode: str, *, seconds: float) -> FloodResult:
    """Run a flooder for ``seconds``; the victim sends records from 0.3 s in until just before the end."""
    proc = await rig.start_flooder(seconds, mode)
    t_ready = time.monotonic()
    n0 = rig.policy.records.get("flood", 0)
    delays, rss = await rig.victim_delays(start=t_ready + 0.3, until=t_ready + seconds - 0.1)
    n1 = rig.policy.records.get("flood", 0)
    sent, torn = await rig.finish_flooder(proc)
    result = FloodResult(delays, sent, torn, max(rss) - rss[0], n1 - n0)
    print(f"flood {mode}: {result.describe()}")  # the figures docs/hostile-input.md quotes (pytest -s)
    return result


def _flood_clamps(rig: Rig) -> dict[int, int]:
    return {tid: rig.actuator.highest.get(tid, 0) for tid in rig.threads.tids[: len(FLOOD_VMAP)]}


# Bound on the victim's p99 delay from flush to the policy while another VM floods.  A
# functional bound against starvation, not a performance target.  Measured on this 2-core
# machine (Python 3.11, HostPolicy with a dry-run actuator; the victim flushes from its own
# thread every ~10 ms, so its ring is busy and polled every 4 ms, SPEC 6.3):
#   kick storm (kicks, no buffers):              p99 4.0 ms
#   full ring of 1-record batches:               p99 6.7 ms
#   full ring of 256-record batches:             p99 22.6 ms (0.4-1.1 s before the work budget counted
#   32767 zero-length indirect descriptors each: p99 5.5 ms  records, 2.0-2.5 s before it counted
#                                                descriptors; docs/hostile-input.md)
VICTIM_P99_BOUND = 0.050


async def test_a_kick_storm_does_not_starve_the_victim(rig: Rig) -> None:
    r = await flood(rig, "kick-storm", seconds=2.0)
    assert len(r.delays) > 20, r.describe()
    assert _pct(r.delays, 0.99) < VICTIM_P99_BOUND, r.describe()
    assert rig.slots["flood"].counters.get("kicks") > 0 and rig.slots["flood"].counters.get("batches") == 0
    assert r.rss_growth_kb < 4096, r.describe()


async def test_a_full_ring_of_small_batches_does_not_starve_the_victim(rig: Rig) -> None:
    r = await flood(rig, "small", seconds=2.5)
    assert r.flood_records > 10_000, r.describe()  # it really flooded
    assert len(r.delays) > 20, r.describe()
    assert _pct(r.delays, 0.99) < VICTIM_P99_BOUND, r.describe()
    assert r.rss_growth_kb < 4096, r.describe()
    assert all(v <= CEILING for v in _flood_clamps(rig).values())


async def test_a_flood_of_max_size_batches_stays_under_its_ceiling_and_in_bounded_memory(rig: Rig) -> None:
    r = await flood(rig, "full-ring", seconds=3.0)
    assert r.flood_records > 100 * abi.MAX_RECORDS_PER_BATCH, r.describe()
    # Half the records ask for the top frequency: without the ceiling the clamps would reach
    # each cluster's capacity (160/498/1024); with it nothing above 300 was ever applied.
    highest = _flood_clamps(rig)
    assert max(highest.values()) == CEILING, highest
    assert all(v <= CEILING for v in highest.values()), highest
    assert all(v is None or v <= CEILING for v in rig.host.vms["flood"].engine.vcpus.values())
    # The work budget bounds what one loop turn holds: memory stays flat under a sustained flood.
    assert r.rss_growth_kb < 4096, r.describe()
    assert r.delays  # and every victim record got through in the end (each is waited for)


async def test_a_flood_of_max_size_batches_does_not_starve_the_victim(rig: Rig) -> None:
    r = await flood(rig, "full-ring", seconds=3.0)
    assert r.delays and _pct(r.delays, 0.99) < VICTIM_P99_BOUND, r.describe()


async def test_chains_of_zero_length_indirect_descriptors_do_not_starve_the_victim(rig: Rig) -> None:
    r = await flood(rig, "indirect-zero", seconds=3.0)
    assert r.delays and _pct(r.delays, 0.99) < VICTIM_P99_BOUND, r.describe()
    # 32,768 entries: more than a turn pays for, so each is refused before its walk.
    assert rig.slots["flood"].counters.get("rejected", "chain-too-long") > 1000 and r.flood_records == 0


async def test_chains_of_the_longest_indirect_table_taken_do_not_starve_the_victim(rig: Rig) -> None:
    r = await flood(rig, "indirect-max", seconds=3.0)
    assert r.delays and _pct(r.delays, 0.99) < VICTIM_P99_BOUND, r.describe()
    refused = rig.slots["flood"].counters.get("rejected", "chain-too-long")
    if rig.slots["flood"].device.max_indirect >= 4096:  # the C drain walks it
        assert r.flood_records > 100 and refused == 0, r.describe()
    else:  # the Python drain takes 1,024 at most
        assert r.flood_records == 0 and refused > 100, r.describe()


def _torn_reads(writer: Any, offset: int, seconds: float) -> tuple[int, int]:
    """Run ``writer(page, stop_time)`` here while a child process (a guest vCPU) reads the 16-bit
    field at ``offset`` of the shared page with single loads; (reads, torn values seen).  The
    writer alternates the field between 0x00ff and 0x0100: anything else was half-written."""
    import ctypes
    import mmap

    page = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    ctypes.c_uint16.from_buffer(page, offset).value = 0x00FF
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guest vCPU
        try:
            os.close(r)
            field_ = ctypes.c_uint16.from_buffer(page, offset)
            reads = torn = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(1000):
                    if field_.value not in (0x00FF, 0x0100):
                        torn += 1
                reads += 1000
            os.write(w, f"{reads} {torn}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        writer(page, time.monotonic() + seconds)
    finally:
        out = os.read(r, 100)
        os.close(r)
        os.waitpid(pid, 0)
    reads, torn = map(int, out.split())
    return reads, torn


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a torn store is seen only by a reader running in parallel")
def test_the_device_stores_a_ring_index_in_one_write() -> None:
    size = 1
    d, a, u = vq.ring_sizes(size)
    avail_event = 4 + 8 * size  # in the used ring, which starts at offset 0 of the shared page

    def device(page: Any, end: float) -> None:
        q = vq.DeviceQueue(size, memoryview(bytearray(d)), memoryview(bytearray(a)), memoryview(page)[:u],
                           FlatMemory(bytearray(0)), event_idx=True)
        while time.monotonic() < end:
            for _ in range(1000):
                q.set_avail_event(0x00FF)
                q.set_avail_event(0x0100)
        del q

    reads, torn = _torn_reads(device, avail_event, 1.0)
    assert reads > 100_000
    assert torn == 0, f"{torn} of {reads} guest reads saw a half-written avail_event"


async def test_a_ring_whose_budget_ran_out_is_served_after_every_kick_that_came_during_its_turn(tmp_path: Path) -> None:
    """Round-robin on the event loop: a backlogged ring's next turn waits behind the VMs that kicked
    meanwhile (asyncio serves polled I/O before due timers; call_soon would have put it first)."""
    from vhost_user_cpufreq.protocol.cpufreq import Batch, encode_batch

    from .helpers import make_service, until

    svc, _, pol, slots = await make_service(tmp_path, ("flood", (0, 0, 1, 2)), ("victim", (0, 0, 1, 2)))
    flooder = await start_guest(str(tmp_path / "flood.sock"))
    victim = await start_guest(str(tmp_path / "victim.sock"))
    order: list[str] = []
    try:
        for i, g in enumerate((flooder, victim)):  # both rings started and served once
            g.driver.set_util(0, 10 + i)
            g.driver.flush()
        await until(lambda: len(pol.records.get("flood", ())) == len(pol.records.get("victim", ())) == 1,
                    what="a record from each")
        for name in ("flood", "victim"):
            dev = slots[name].device
            assert dev._lane_slot is None  # the event loop serves both (no C engine in this policy)
            inner = dev.handle_queue

            def handle(index: int, queue: Any, _inner: Any = inner, _name: str = name) -> bool:
                order.append(_name)
                more = _inner(index, queue)
                if _name == "flood" and order.count("flood") == 1:
                    victim.driver.set_util(1, 700)  # the victim kicks during the flooder's first turn
                    victim.driver.flush()
                return more

            dev.handle_queue = handle  # type: ignore[method-assign]
        full = encode_batch(Batch(1, 0, tuple(Record(i % 4, i % 1000) for i in range(abi.MAX_RECORDS_PER_BATCH))))
        ram, q = flooder.transport.ram, flooder.driver.queue
        for _ in range(6):  # three turns' worth: two 256-record batches fill a turn's 512 units
            gpa = ram.alloc(len(full), 8)
            ram.memory.view(gpa, len(full))[:] = full
            q.add([(gpa, len(full))])
        q.publish()
        flooder.transport.notify(0)
        await until(lambda: order.count("flood") >= 3 and "victim" in order, what="three flood turns and the victim")
        assert order[:3] == ["flood", "victim", "flood"], order
        assert pol.records["victim"][-1].util == 700
    finally:
        await victim.close()
        await flooder.close()
        await svc.close()
