"""CPU hotplug monitor: a fake uevent monitor, degraded start, and real hotplug of cpu1 as root."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhost_user_cpufreq.backend.host.hotplug import MAX_CONSECUTIVE_FAILURES, CpuHotplugMonitor
from vhost_user_cpufreq.backend.host.sysfs import read_host_model
from vhost_user_cpufreq.backend.host.sysfs_source import SysfsSource

from .helpers import until


@dataclass
class FakeDevice:
    action: str
    sys_name: str = "cpu1"


class FakeMonitor:
    """A pipe stands in for the netlink socket: readable while events are queued."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.queue: deque[FakeDevice | BaseException] = deque()
        self.started = False

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self.r

    def push(self, *items: FakeDevice | BaseException) -> None:
        self.queue.extend(items)
        os.write(self.w, b"x")

    def poll(self, timeout: float | None = None) -> Any:
        assert timeout == 0
        if not self.queue:
            try:
                os.read(self.r, 4096)
            except BlockingIOError:
                pass
            return None
        item = self.queue.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


async def test_events_coalesced_per_wakeup_and_counted() -> None:
    fake = FakeMonitor()
    calls: list[int] = []
    mon = CpuHotplugMonitor(lambda: calls.append(1), loop=asyncio.get_running_loop(), monitor_factory=lambda: fake)
    try:
        assert mon.start() is True and fake.started and mon.available
        fake.push(FakeDevice("offline", "cpu2"), FakeDevice("offline", "cpu3"), FakeDevice("change"))
        await until(lambda: mon.events == 3, what="three events")
        await asyncio.sleep(0.01)
        assert calls == [1] and mon.hotplug_events == 2 and mon.changes == 1
        fake.push(FakeDevice("bind"))  # not a hotplug action: no rebuild
        await until(lambda: mon.events == 4, what="fourth event")
        await asyncio.sleep(0.01)
        assert calls == [1]
        fake.push(FakeDevice("add", "cpu8"))
        await until(lambda: len(calls) == 2, what="second change")
    finally:
        mon.close()
        mon.close()
        fake.close()


async def test_callback_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMonitor()

    def on_change() -> None:
        raise RuntimeError("rebuild bug")

    mon = CpuHotplugMonitor(on_change, loop=asyncio.get_running_loop(), monitor_factory=lambda: fake)
    try:
        mon.start()
        with caplog.at_level(logging.ERROR, logger="vhost_user_cpufreq.hotplug"):
            fake.push(FakeDevice("online"))
            await until(lambda: mon.errors == 1, what="on_change failure")
            # A receive error (e.g. ENOBUFS: events lost) counts as a change too.
            fake.push(OSError(105, "No buffer space available"))
            await until(lambda: mon.errors == 3, what="receive failure")
        assert mon.changes == 2 and mon.available
        assert any("on_change failed" in r.getMessage() for r in caplog.records)
    finally:
        mon.close()
        fake.close()


async def test_persistent_receive_failure_stops_monitor() -> None:
    fake = FakeMonitor()
    mon = CpuHotplugMonitor(lambda: None, loop=asyncio.get_running_loop(), monitor_factory=lambda: fake)
    try:
        mon.start()
        fake.push(*[OSError(5, "EIO")] * MAX_CONSECUTIVE_FAILURES)
        await until(lambda: not mon.available, what="monitor to give up")
        assert mon.unavailable_reason is not None and mon.errors == MAX_CONSECUTIVE_FAILURES
    finally:
        mon.close()
        fake.close()


async def test_unavailable_netlink_degrades(caplog: pytest.LogCaptureFixture) -> None:
    def factory() -> FakeMonitor:
        raise PermissionError(1, "Operation not permitted")

    mon = CpuHotplugMonitor(lambda: None, loop=asyncio.get_running_loop(), monitor_factory=factory)
    with caplog.at_level(logging.WARNING, logger="vhost_user_cpufreq.hotplug"):
        assert mon.start() is False
    assert not mon.available and mon.unavailable_reason is not None
    assert "Operation not permitted" in mon.unavailable_reason
    (record,) = [r for r in caplog.records if r.name == "vhost_user_cpufreq.hotplug"]
    assert "periodic model rebuild" in record.getMessage()
    mon.close()


# -- real hotplug ------------------------------------------------------------------------

CPU1_ONLINE = Path("/sys/devices/system/cpu/cpu1/online")


def _need(ok: bool, reason: str) -> None:
    """Skip, or fail when CI demands root tests (VUC_REQUIRE_ROOT=1)."""
    if ok:
        return
    if os.environ.get("VUC_REQUIRE_ROOT") == "1":
        pytest.fail(f"VUC_REQUIRE_ROOT=1 but {reason}")
    pytest.skip(reason)


@pytest.mark.root
async def test_real_cpu1_hotplug() -> None:
    _need(os.geteuid() == 0, "needs root to offline a CPU")
    _need(CPU1_ONLINE.exists(), f"{CPU1_ONLINE} is missing (one CPU, or cpu1 not hotpluggable)")
    _need(os.access(CPU1_ONLINE, os.W_OK), f"{CPU1_ONLINE} is not writable (read-only /sys?)")
    _need(CPU1_ONLINE.read_text().strip() == "1", "cpu1 is offline already")
    loop = asyncio.get_running_loop()
    source = SysfsSource("/sys")
    changed = asyncio.Event()

    def on_change() -> None:
        source.rebuild()
        changed.set()

    mon = CpuHotplugMonitor(on_change, loop=loop)
    try:
        _need(mon.start(), f"uevent netlink socket unavailable: {mon.unavailable_reason}")
        assert 1 in source.model.online_cpus()
        CPU1_ONLINE.write_text("0")
        await asyncio.wait_for(changed.wait(), 5)
        assert 1 not in read_host_model("/sys").online_cpus()
        assert 1 not in source.model.online_cpus() and source.model.domain_of_cpu(1) is None
        changed.clear()
        CPU1_ONLINE.write_text("1")
        await asyncio.wait_for(changed.wait(), 5)
        assert 1 in source.model.online_cpus()
        assert mon.hotplug_events >= 2 and mon.changes >= 2
    finally:
        # Always give the CPU back, whatever failed above.
        if CPU1_ONLINE.read_text().strip() != "1":
            CPU1_ONLINE.write_text("1")
        mon.close()
        source.close()


def test_need_fails_instead_of_skipping_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VUC_REQUIRE_ROOT", "1")
    with pytest.raises(pytest.fail.Exception, match="VUC_REQUIRE_ROOT=1 but no root"):
        _need(False, "no root")
    monkeypatch.delenv("VUC_REQUIRE_ROOT")
    with pytest.raises(pytest.skip.Exception):
        _need(False, "no root")
    _need(True, "unused")
