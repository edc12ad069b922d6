"""The host's current frequencies, sampled from sysfs: the service's frequency source.

Theory of operation
-------------------
:class:`SysfsSource` is the :class:`~..cpufreq.hostfreq.FrequencySource` over the model
:func:`~.sysfs.read_host_model` reads: it
keeps one open file descriptor per ``scaling_cur_freq`` of the domains in the
snapshot and :meth:`SysfsSource.sample` re-reads them with ``os.pread`` at
offset 0 (sysfs regenerates the value on each read at offset 0; regular files
in test trees behave the same).  Raw bytes are compared first, so a sample
where nothing moved allocates only the read buffers and calls no listener.
:meth:`SysfsSource.rebuild` re-reads the whole model after CPU hotplug (see
``hotplug.py``) or periodically from :meth:`SysfsSource.run`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable

from ..cpufreq.hostfreq import HostSnapshot, Listener
from .sysfs import parse_uint, read_host_model, warn_once

__all__ = ["SysfsSource"]

log = logging.getLogger("vhost_user_cpufreq.sysfs")  # the model reader's logger: one name for sysfs


class SysfsSource:
    """A :class:`~.cpufreq.hostfreq.FrequencySource` backed by sysfs.

    Listeners are called with every new snapshot, synchronously, from
    :meth:`sample` or :meth:`rebuild`.  After a rebuild the snapshot's domain
    set may differ from the previous one (a policy whose CPUs all went offline
    drops out, indices shift, a CPU may move): listeners that keep domain
    indices must re-derive them, e.g. through ``source.model.domain_of_cpu``,
    rather than assume a fixed length.  A listener that raises is logged and
    does not stop the others or the sampler.
    """

    def __init__(
        self,
        root: str = "/sys",
        *,
        nominal_khz: int | None = None,
        proc_cpuinfo: str = "/proc/cpuinfo",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.root = root
        self._nominal_khz = nominal_khz
        self._proc_cpuinfo = proc_cpuinfo
        self._clock = clock
        self._sleep = sleep
        self._listeners: list[Listener] = []
        self._fds: list[int] = []
        self._raw: list[bytes] = []  # last bytes read per fd
        self._fd_policy: list[int] = []  # index into model.policies per fd
        self._closed = False
        self.samples = 0  # sample() calls
        self.changes = 0  # snapshots published to listeners
        self.rebuilds = 0
        self.read_errors = 0  # scaling_cur_freq reads that failed or did not parse
        self.model = read_host_model(root, nominal_khz=nominal_khz, proc_cpuinfo=proc_cpuinfo)
        self._open_fds()

    # -- FrequencySource -------------------------------------------------------------
    def snapshot(self) -> HostSnapshot:
        return self.model.snapshot()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    # -- sampling --------------------------------------------------------------------
    def sample(self) -> bool:
        """Re-read every domain's scaling_cur_freq; True (and listeners called
        once) if any changed.  A failed or garbled read means the model is
        stale (hotplug, driver unloaded): the whole model is rebuilt."""
        self.samples += 1
        changed: list[tuple[int, int]] | None = None
        for i, fd in enumerate(self._fds):
            try:
                raw = os.pread(fd, 64, 0)
            except OSError:
                return self._stale(i, "read failed")
            if raw == self._raw[i]:
                continue  # the common case: no parsing, no objects kept
            try:
                khz = parse_uint(raw.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return self._stale(i, "garbled")
            self._raw[i] = raw
            pi = self._fd_policy[i]
            if khz != self.model.policies[pi].cur_khz:
                if changed is None:
                    changed = []
                changed.append((pi, khz))
        if changed is None:
            return False
        policies = list(self.model.policies)
        for pi, khz in changed:
            policies[pi] = replace(policies[pi], cur_khz=khz)
        self.model = replace(self.model, policies=tuple(policies))
        self._publish()
        return True

    def _stale(self, i: int, what: str) -> bool:
        self.read_errors += 1
        pid = self.model.policies[self._fd_policy[i]].id
        warn_once(f"stale|{self.root}|{pid}|{what}", f"sysfs: policy{pid} scaling_cur_freq {what}; rebuilding the model")
        return self.rebuild()

    def rebuild(self) -> bool:
        """Re-read the whole model (after CPU hotplug); True and listeners
        notified if the snapshot changed.  Never raises on malformed files; if
        the root vanished the old model is kept."""
        self.rebuilds += 1
        try:
            model = read_host_model(self.root, nominal_khz=self._nominal_khz, proc_cpuinfo=self._proc_cpuinfo)
        except OSError as e:
            warn_once(f"rebuild|{self.root}", f"sysfs: cannot re-read {self.root}: {e}; keeping the old model")
            return False
        old = self.model.snapshot()
        self.model = model
        self._close_fds()
        if not self._closed:
            self._open_fds()
        if model.snapshot() == old:
            return False
        self._publish()
        return True

    async def run(self, period: float, *, rebuild_every: float | None = None) -> None:
        """Sample every ``period`` seconds (and rebuild every ``rebuild_every``
        seconds, for hosts where hotplug events cannot be received) until
        :meth:`close`.  Deadlines are absolute so sampling does not drift; after
        a late wake-up the schedule restarts instead of bursting to catch up."""
        if period <= 0:
            raise ValueError("period must be > 0")
        if rebuild_every is not None and rebuild_every <= 0:
            raise ValueError("rebuild_every must be > 0")
        now = self._clock()
        next_tick = now
        next_rebuild = now + rebuild_every if rebuild_every is not None else None
        while not self._closed:
            if next_rebuild is not None and now >= next_rebuild:
                self.rebuild()
                next_rebuild = now + rebuild_every if rebuild_every is not None else None
            else:
                self.sample()
            next_tick += period
            now = self._clock()
            if next_tick < now:
                next_tick = now + period  # late: restart the grid rather than catch up
            await self._sleep(next_tick - now)
            now = self._clock()

    def close(self) -> None:
        """Close the file descriptors and stop :meth:`run`; idempotent."""
        self._closed = True
        self._close_fds()

    def __enter__(self) -> SysfsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _publish(self) -> None:
        self.changes += 1
        snap = self.model.snapshot()
        for listener in list(self._listeners):
            try:
                listener(snap)
            except Exception:
                log.exception("sysfs: frequency listener %r failed", listener)

    def _open_fds(self) -> None:
        if self.model.degraded is not None:
            return  # nominal frequencies: nothing to sample
        base = Path(self.root) / "devices" / "system" / "cpu" / "cpufreq"
        for pi, p in enumerate(self.model.policies):
            if not p.online_cpus:
                continue  # not in the snapshot; reads would answer EBUSY on Linux
            try:
                fd = os.open(base / f"policy{p.id}" / "scaling_cur_freq", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self.read_errors += 1
                warn_once(f"open|{self.root}|{p.id}", f"sysfs: cannot open policy{p.id} scaling_cur_freq: {e}")
                continue
            self._fds.append(fd)
            # Primed with what the model holds, so the first sample is cheap too.
            self._raw.append(f"{p.cur_khz}\n".encode())
            self._fd_policy.append(pi)

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._raw.clear()
        self._fd_policy.clear()
