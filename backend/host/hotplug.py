"""CPU hotplug monitor: kernel uevents for the ``cpu`` subsystem, on the asyncio loop.

Theory of operation
-------------------
The kernel announces CPU hotplug on its uevent netlink socket (actions
``online``/``offline`` when a CPU is switched, ``add``/``remove`` when one
appears or goes).  :class:`CpuHotplugMonitor` opens that socket through
pyudev (``source='kernel'``: the raw kernel events, so no udevd is needed),
filtered to the ``cpu`` subsystem, and registers its fd with
``loop.add_reader``.  When readable, the callback drains every queued event
with ``poll(timeout=0)`` (never blocks) and calls ``on_change()`` once per
drain if any event was a hotplug action: offlining eight CPUs at once costs
one model rebuild, not eight.  The usual ``on_change`` is
``SysfsSource.rebuild``.

The callback never raises into the loop: an exception from pyudev or from
``on_change`` is logged and counted.  A receive error can mean lost events
(ENOBUFS when the socket buffer overflowed), so it triggers ``on_change``
too: a spurious rebuild is cheap, a missed hotplug is not.

Opening the netlink socket can fail (no libudev, no permission in a
container, pyudev missing).  :meth:`CpuHotplugMonitor.start` then logs one
clear warning and returns False; hotplug is then noticed only by a periodic
``SysfsSource.rebuild`` (``SysfsSource.run(period, rebuild_every=...)``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Protocol

__all__ = ["CpuHotplugMonitor", "HOTPLUG_ACTIONS"]

log = logging.getLogger("vhost_user_cpufreq.hotplug")

#: uevent actions on cpu devices that change the CPU model.
HOTPLUG_ACTIONS = frozenset({"online", "offline", "add", "remove"})
#: Events handled per readable callback before yielding back to the loop, so
#: an event storm cannot starve the VMs' sessions (the fd stays readable).
MAX_EVENTS_PER_WAKEUP = 256
#: Wake-ups in a row that failed to receive before giving up: a socket that
#: stays readable but always errors would otherwise spin the loop.
MAX_CONSECUTIVE_FAILURES = 10


class MonitorLike(Protocol):
    """What is used of ``pyudev.Monitor`` (lets tests inject a fake)."""

    def start(self) -> None: ...

    def fileno(self) -> int: ...

    def poll(self, timeout: float | None = None) -> Any: ...


def _pyudev_monitor() -> MonitorLike:
    import pyudev  # imported late: a missing libudev must degrade, not fail import

    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="kernel")
    monitor.filter_by(subsystem="cpu")
    return monitor


class CpuHotplugMonitor:
    def __init__(
        self,
        on_change: Callable[[], None],
        *,
        loop: asyncio.AbstractEventLoop,
        monitor_factory: Callable[[], MonitorLike] = _pyudev_monitor,
    ) -> None:
        self._on_change = on_change
        self._loop = loop
        self._factory = monitor_factory
        self._monitor: MonitorLike | None = None
        self._fd: int | None = None
        self.available = False  # True while events are being received
        self.unavailable_reason: str | None = None
        self.events = 0  # cpu uevents received (any action)
        self.hotplug_events = 0  # of which online/offline/add/remove
        self.changes = 0  # on_change() calls
        self.errors = 0  # receive or on_change failures
        self._failures_in_a_row = 0

    def start(self) -> bool:
        """Open the uevent socket and watch it; False (with one warning) if
        that is impossible, in which case only periodic rebuilds see hotplug."""
        if self._monitor is not None:
            return True
        try:
            monitor = self._factory()
            monitor.start()
            fd = monitor.fileno()
            self._loop.add_reader(fd, self._on_readable)
        except Exception as e:  # ImportError, OSError (EPERM, EPROTONOSUPPORT), ...
            self.unavailable_reason = f"{type(e).__name__}: {e}"
            log.warning(
                "CPU hotplug monitor unavailable (%s): hotplug is noticed only by "
                "the periodic model rebuild (SysfsSource.rebuild)",
                self.unavailable_reason,
            )
            return False
        self._monitor, self._fd = monitor, fd
        self.available = True
        self.unavailable_reason = None
        return True

    def close(self) -> None:
        """Stop watching; idempotent.  The pyudev monitor's socket is closed
        when the monitor is collected (pyudev has no explicit close)."""
        if self._fd is not None:
            try:
                self._loop.remove_reader(self._fd)
            except Exception:  # loop already closed
                pass
        self._monitor = None
        self._fd = None
        self.available = False

    def _on_readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        relevant = False
        for _ in range(MAX_EVENTS_PER_WAKEUP):
            try:
                device = monitor.poll(timeout=0)
            except Exception:
                self.errors += 1
                self._failures_in_a_row += 1
                log.exception("CPU hotplug monitor: receiving an event failed; assuming a change was missed")
                relevant = True
                if self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    self.unavailable_reason = f"{MAX_CONSECUTIVE_FAILURES} receive failures in a row"
                    log.warning("CPU hotplug monitor stopped (%s): hotplug is noticed only by the "
                                "periodic model rebuild", self.unavailable_reason)
                    self.close()
                break
            self._failures_in_a_row = 0
            if device is None:
                break
            self.events += 1
            action = getattr(device, "action", None)
            if action in HOTPLUG_ACTIONS:
                self.hotplug_events += 1
                relevant = True
                log.info("CPU hotplug: %s %s", action, getattr(device, "sys_name", "?"))
        if not relevant:
            return
        self.changes += 1
        try:
            self._on_change()
        except Exception:
            self.errors += 1
            log.exception("CPU hotplug monitor: on_change failed")
