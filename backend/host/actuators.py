"""Actuators: the only code that changes host threads (affinity, util clamps, cgroup clamps).

Each actuator remembers what a thread (or cgroup) had before it first touched
it and puts exactly that back on :meth:`restore`, so a VM that leaves, or a
service that stops, leaves nothing behind.  Clamps are applied per thread
with ``sched_setattr`` or per cgroup through ``cpu.uclamp.min``, and a VM's
power cap likewise through ``uclamp_max`` / ``cpu.uclamp.max``; when the
kernel cannot clamp (no CONFIG_UCLAMP_TASK) or in dry-run mode, the value
that would have been applied is recorded instead and ``degraded`` says why.
Failures (a thread that exited, a permission denied) are counted and logged,
never raised into the session.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..counters import Counters
from ..policy.engine import clamp_percent
from . import sched
from .cgroups import CGROUP_ROOT, uclamp_cap
from .statefile import StateFile, ThreadRecord, thread_start_time

__all__ = ["ThreadActuator", "CgroupClampActuator", "Original"]

log = logging.getLogger("vhost_user_cpufreq.actuators")


@dataclass(frozen=True, slots=True)
class Original:
    affinity: frozenset[int] | None
    util_min: int | None
    util_max: int | None
    reset_on_fork: bool = False


class ThreadActuator:
    """Pins threads and sets their util clamps."""

    def __init__(self, counters: Counters, *, dry_run: bool = False, uclamp_reason: str | None = "probe",
                 state: StateFile | None = None) -> None:
        self.counters = counters
        self.dry_run = dry_run
        self.state = state
        #: why clamps are not really applied (None: they are)
        self.degraded: str | None = sched.probe_uclamp() if uclamp_reason == "probe" else uclamp_reason
        if dry_run:
            self.degraded = "dry run: nothing is applied"
        self.originals: dict[int, Original] = {}
        self.pinned: dict[int, int] = {}
        self.clamps: dict[int, int] = {}  # applied, or would-be-applied when degraded
        self.caps: dict[int, int] = {}  # uclamp_max applied (or would-be), threads the service capped

    def _remember(self, tid: int, *, affinity: bool) -> None:
        """Record what ``tid`` has before its first change; its affinity only once we are about to pin
        it, so a thread whose affinity someone else owns (``keep``, ``none``) never has it rewritten."""
        orig = self.originals.get(tid)
        if orig is not None and (orig.affinity is not None or not affinity):
            return
        aff = frozenset(os.sched_getaffinity(tid)) if affinity else None
        if orig is not None:
            self.originals[tid] = replace(orig, affinity=aff)
        else:
            umin: int | None
            umax: int | None
            try:
                a = sched.sched_getattr(tid)
                umin, umax, rof = a.util_min, a.util_max, bool(a.flags & sched.SCHED_FLAG_RESET_ON_FORK)
            except OSError:
                umin = umax = None
                rof = False
            orig = self.originals[tid] = Original(aff, umin, umax, rof)
        start = thread_start_time(tid)
        if self.state is not None and start is not None and not self.dry_run:
            # Write-ahead: on disk before the thread is changed, so a SIGKILL can be undone.
            o = self.originals[tid]
            self.state.record(ThreadRecord(tid, start, sorted(o.affinity) if o.affinity is not None else None,
                                           o.util_min, o.util_max, o.reset_on_fork))

    def remember(self, tid: int) -> None:
        """Record ``tid``'s own clamps before anyone else (the kick lane) changes them."""
        self._remember(tid, affinity=False)

    def pin(self, tid: int, pcpu: int) -> bool:
        try:
            self._remember(tid, affinity=True)
            if not self.dry_run:
                os.sched_setaffinity(tid, {pcpu})
        except OSError as exc:
            self.counters.inc("pin_failed", _errname(exc))
            why = (": the thread may not use CPU %d (offline, or outside its cgroup's cpuset, as libvirt's "
                   '<vcpupin> makes one; a VM its manager pins wants pinning = "keep")' % pcpu
                   ) if exc.errno == errno.EINVAL else ""
            log.warning("could not pin thread %d to CPU %d: %s%s", tid, pcpu, exc.strerror, why)
            return False
        self.pinned[tid] = pcpu
        self.counters.inc("pins")
        return True

    def unpin(self, tid: int) -> None:
        """Give a thread we pinned its original affinity back (a plan that stopped pinning it)."""
        orig = self.originals.get(tid)
        if self.pinned.pop(tid, None) is None or orig is None or orig.affinity is None:
            return
        try:
            if not self.dry_run:
                os.sched_setaffinity(tid, orig.affinity)
        except OSError as exc:
            self.counters.inc("restore_failed", _errname(exc))
            log.warning("could not unpin thread %d: %s", tid, exc.strerror)
            return
        self.originals[tid] = replace(orig, affinity=None)
        self.counters.inc("unpinned")

    def clamp(self, tid: int, util_min: int) -> bool:
        try:
            self._remember(tid, affinity=False)
            if self.degraded is None:
                sched.sched_setattr_clamp(tid, util_min)
        except sched.UclampUnsupported as exc:
            self.degraded = f"kernel refused util clamps: {exc.strerror}"
            log.warning("util clamps unavailable, recording instead: %s", exc)
        except OSError as exc:
            self.counters.inc("clamp_failed", _errname(exc))
            log.warning("could not clamp thread %d: %s", tid, exc.strerror)
            return False
        self.clamps[tid] = util_min
        self.counters.inc("clamps_applied" if self.degraded is None else "clamps_recorded")
        return True

    def cap(self, tid: int, util_max: int | None) -> bool:
        """Set ``tid``'s uclamp_max (None: back to its own).  The kernel refuses a uclamp_min above
        uclamp_max (EINVAL), so a thread's uclamp_min above the new cap is lowered to it in the same call."""
        if util_max is None:
            if tid not in self.caps:
                return True
            orig = self.originals.get(tid)
            target = orig.util_max if orig is not None and orig.util_max is not None else 1024
        else:
            target = util_max
        try:
            self._remember(tid, affinity=False)
            if self.degraded is None:
                cur = sched.sched_getattr(tid)
                lower = target if cur.util_min > target else None
                sched.sched_setattr_clamp(tid, lower, target)
                if lower is not None and tid in self.clamps:
                    self.clamps[tid] = lower
        except sched.UclampUnsupported as exc:
            self.degraded = f"kernel refused util clamps: {exc.strerror}"
            log.warning("util clamps unavailable, recording instead: %s", exc)
        except OSError as exc:
            self.counters.inc("cap_failed", _errname(exc))
            log.warning("could not cap thread %d at %d: %s", tid, target, exc.strerror)
            return False
        if util_max is None:
            self.caps.pop(tid, None)
        else:
            self.caps[tid] = util_max
        self.counters.inc("caps_applied" if self.degraded is None else "caps_recorded")
        return True

    def restore(self, tid: int) -> None:
        """Give ``tid`` back what it had before we touched it."""
        orig = self.originals.pop(tid, None)
        self.pinned.pop(tid, None)
        touched_clamp = self.clamps.pop(tid, None) is not None
        touched_clamp |= self.caps.pop(tid, None) is not None
        if orig is None or self.dry_run:
            return
        try:
            if orig.affinity is not None:
                os.sched_setaffinity(tid, orig.affinity)
            if touched_clamp and self.degraded is None and orig.util_min is not None:
                sched.sched_setattr_clamp(tid, orig.util_min, orig.util_max, reset_on_fork=orig.reset_on_fork)
            self.counters.inc("restored")
        except ProcessLookupError:
            pass  # the thread is gone: nothing left to restore
        except OSError as exc:
            self.counters.inc("restore_failed", _errname(exc))
            log.warning("could not restore thread %d: %s", tid, exc.strerror)
        if self.state is not None:
            self.state.forget(tid)

    def restore_record(self, rec: ThreadRecord) -> None:
        """Undo a change a previous, killed instance recorded (see statefile.recover)."""
        if rec.affinity is not None:
            os.sched_setaffinity(rec.tid, set(rec.affinity))
        if self.degraded is None and rec.util_min is not None:
            sched.sched_setattr_clamp(rec.tid, rec.util_min, rec.util_max, reset_on_fork=rec.reset_on_fork)

    def restore_all(self) -> None:
        for tid in list(self.originals):
            self.restore(tid)


class CgroupClampActuator:
    """``cpu.uclamp.min`` of cgroup v2 directories (libvirt's per-vCPU ones, or those of cgroups.py).

    The kernel caps a cgroup's effective ``cpu.uclamp.min`` by its ancestors'
    (:func:`~.cgroups.uclamp_cap`): a clamp above that cap is written, but
    counted (``clamps_capped``) and logged once per cgroup, since it cannot
    take effect until the administrator raises the ancestors'.
    """

    def __init__(self, counters: Counters, *, dry_run: bool = False, root: Path = CGROUP_ROOT) -> None:
        self.counters = counters
        self.dry_run = dry_run
        self.root = root
        self.originals: dict[Path, str] = {}
        self.values: dict[Path, int] = {}
        self.caps: dict[Path, int] = {}  # the ancestors' cap, read when a cgroup is first clamped
        self.max_originals: dict[Path, str] = {}  # cpu.uclamp.max before the service's power cap
        self.max_values: dict[Path, int] = {}  # the power cap written (cpu.uclamp.max)

    def cap(self, cgroup: Path, util_max: int | None) -> bool:
        """Write ``cgroup``'s ``cpu.uclamp.max`` (the VM's power cap); None: back to what it was."""
        f = cgroup / "cpu.uclamp.max"
        if util_max is None:
            if cgroup not in self.max_values:
                return True
            self._restore_max(cgroup)
            return True
        try:
            if cgroup not in self.max_originals:
                self.max_originals[cgroup] = f.read_text().strip()
            if not self.dry_run:
                f.write_text(clamp_percent(util_max) + "\n")
        except OSError as exc:
            self.counters.inc("cap_failed", _errname(exc))
            log.warning("could not write %s: %s", f, exc.strerror)
            return False
        self.max_values[cgroup] = util_max
        self.counters.inc("caps_applied")
        return True

    def _restore_max(self, cgroup: Path) -> None:
        value = self.max_originals.pop(cgroup, None)
        self.max_values.pop(cgroup, None)
        if value is None or self.dry_run:
            return
        try:
            (cgroup / "cpu.uclamp.max").write_text(value + "\n")
        except OSError as exc:
            self.counters.inc("restore_failed", _errname(exc))
            log.warning("could not restore %s/cpu.uclamp.max: %s", cgroup, exc.strerror)

    def clamp(self, cgroup: Path, util_min: int) -> bool:
        f = cgroup / "cpu.uclamp.min"
        try:
            if cgroup not in self.originals:
                self.originals[cgroup] = f.read_text().strip()
                self.caps[cgroup] = uclamp_cap(cgroup, root=self.root)
            if not self.dry_run:
                f.write_text(clamp_percent(util_min) + "\n")
        except OSError as exc:
            self.counters.inc("clamp_failed", _errname(exc))
            log.warning("could not write %s: %s", f, exc.strerror)
            return False
        cap = self.caps[cgroup]
        if util_min > cap:
            self.counters.inc("clamps_capped", "cgroup-ancestor")
            if self.values.get(cgroup, 0) <= cap:  # once per rise above the cap, not per record
                log.warning("%s: clamp %d is capped at %d by an ancestor's cpu.uclamp.min: raise the "
                            "ancestors' values to let cgroup clamps take effect", cgroup, util_min, cap)
        self.values[cgroup] = util_min
        self.counters.inc("clamps_applied")
        return True

    def restore(self, cgroup: Path) -> None:
        self._restore_max(cgroup)
        value = self.originals.pop(cgroup, None)
        self.values.pop(cgroup, None)
        self.caps.pop(cgroup, None)
        if value is None or self.dry_run:
            return
        try:
            (cgroup / "cpu.uclamp.min").write_text(value + "\n")
            self.counters.inc("restored")
        except OSError as exc:
            self.counters.inc("restore_failed", _errname(exc))
            log.warning("could not restore %s: %s", cgroup, exc.strerror)

    def restore_all(self) -> None:
        for cg in list(self.originals) + [c for c in self.max_originals if c not in self.originals]:
            self.restore(cg)


def _errname(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, "error").lower()
