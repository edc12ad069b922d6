"""The driver's notification policy (SPEC 6.4): urgent records kick at once, others wait.

Over a real session (unix socket, eventfds, memfd RAM).  The driver's clock
is injected so deadlines are exact; the back-end's own timers are real.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
from vhost_user_cpufreq.guest.frontend import ModelledGuest, connect_guest

from .helpers import make_service, until


class Clock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


@asynccontextmanager
async def _setup(tmp_path: Path, **kw: object) -> AsyncIterator[tuple[RecordingPolicy, ModelledGuest, Clock]]:
    """A service with one 4-vCPU VM and a guest whose driver runs on an injected clock."""
    svc, _, pol, _ = await make_service(tmp_path, ("vm", (0, 0, 1, 2)))
    clock = Clock()
    g = await connect_guest(str(tmp_path / "vm.sock"), clock_ns=clock, **kw)
    try:
        yield pol, g, clock
    finally:
        await g.close()
        await svc.close()


async def _settle() -> None:
    await asyncio.sleep(0.05)  # longer than the back-end's poll period (4 ms) and rate window (0.1 s)


async def test_a_rise_kicks_at_once_and_a_fall_waits_for_the_deadline(tmp_path: Path) -> None:
    async with _setup(tmp_path) as (pol, g, clock):
        d = g.driver
        d.set_util(0, 600)  # first value for the vCPU: urgent
        d.flush()
        await until(lambda: [r.util for r in pol.records["vm"]] == [600], what="urgent record")
        assert d.stats.kicks == 1 and d.stats.urgent_kicks == 1
        await _settle()

        d.set_util(0, 200)  # a fall: lazy
        d.flush()
        await _settle()
        assert [r.util for r in pol.records["vm"]] == [600], "a lazy record was delivered without a kick"
        assert d.stats.kicks == 1 and d.stats.deferred_kicks == 1

        clock.ns += d.lazy_deadline_ns - 1
        d.flush()  # nothing dirty, deadline not yet reached
        await _settle()
        assert d.stats.kicks == 1
        clock.ns += 1
        d.flush()  # the deadline passed: the held kick goes out
        await until(lambda: [r.util for r in pol.records["vm"]] == [600, 200], what="lazy record")
        assert d.stats.kicks == 2 and d.stats.urgent_kicks == 1


async def test_a_small_rise_is_lazy_and_a_big_one_flushes_what_waited(tmp_path: Path) -> None:
    async with _setup(tmp_path, urgent_delta=128) as (pol, g, clock):
        d = g.driver
        d.set_util(1, 500)
        d.flush()
        await until(lambda: len(pol.records["vm"]) == 1)
        await _settle()
        d.set_util(1, 500 + 127)  # below urgent_delta
        d.flush()
        await _settle()
        assert len(pol.records["vm"]) == 1
        d.set_util(2, 300)  # first value of vCPU 2: urgent, and carries the kick for both
        d.flush()
        await until(lambda: [(r.vcpu, r.util) for r in pol.records["vm"]] == [(1, 500), (1, 627), (2, 300)])
        assert d.stats.kicks == 2


async def test_lazy_records_kick_once_enough_wait(tmp_path: Path) -> None:
    async with _setup(tmp_path, lazy_records=6) as (pol, g, clock):
        d = g.driver
        for v in range(4):
            d.set_util(v, 900)
        d.flush()
        await until(lambda: len(pol.records["vm"]) == 4)
        await _settle()
        kicks = d.stats.kicks
        for step in range(1, 4):  # 4 falls per flush: the kick goes once 6 are waiting
            for v in range(4):
                d.set_util(v, 900 - 50 * step)
            d.flush()
            await _settle()
            if step == 1:
                assert d.stats.kicks == kicks and len(pol.records["vm"]) == 4
        assert d.stats.kicks == kicks + 1
        await until(lambda: len(pol.records["vm"]) >= 12, what="records after the count-triggered kick")


async def test_lazy_records_zero_kicks_whenever_the_device_asks(tmp_path: Path) -> None:
    async with _setup(tmp_path, lazy_records=0) as (pol, g, clock):
        d = g.driver
        for u in (800, 700, 600):  # falls, each kicked
            d.set_util(0, u)
            d.flush()
            await until(lambda: pol.records["vm"] and pol.records["vm"][-1].util == u, what=f"util {u}")
            await _settle()
        assert d.stats.kicks == 3 and d.stats.deferred_kicks == 0


async def test_kick_held_sends_what_waits(tmp_path: Path) -> None:
    async with _setup(tmp_path) as (pol, g, clock):
        d = g.driver
        d.set_util(2, 900)
        d.flush()
        await until(lambda: len(pol.records["vm"]) == 1)
        await _settle()
        d.set_util(2, 850)  # a fall: held
        d.flush()
        await _settle()
        assert len(pol.records["vm"]) == 1
        assert d.kick_held() and not d.kick_held()  # once
        await until(lambda: [r.util for r in pol.records["vm"]] == [900, 850], what="the held record")
