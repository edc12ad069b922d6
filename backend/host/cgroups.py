"""Threaded cgroups the service makes for a VM's vCPU threads.

A VM configured with ``clamp = "cgroup"`` and a template that starts with
``{qemu}/`` (for example ``"{qemu}/vuc-domain{domain}"``) gets cgroups the
service makes and removes itself: when its front-end connects, one directory
per vCPU, per frequency domain or per VM is made under the QEMU process's own
cgroup, turned threaded, and the vCPU threads are moved in; the clamps are
then written to those directories' ``cpu.uclamp.min``.  When the front-end
goes, the threads are moved back to the QEMU process's cgroup and the
directories removed.  Each move is written ahead to the state file, so a
service killed with SIGKILL is undone by the next one (:func:`recover_cgroups`).

Kernel facts this follows (cgroup-v2.rst, and tried on the test host, Linux 7.3):

- a thread moves only inside its process's threaded subtree, so the
  directories are children of the process's cgroup, with ``cgroup.type``
  "threaded" and ``+cpu`` in the parent's ``cgroup.subtree_control``;
- a cgroup's effective ``cpu.uclamp.min`` is capped by every ancestor's.  A
  fresh cgroup's is 0, so under systemd's slices a cgroup clamp does nothing
  until the administrator raises the ancestors' values.  :func:`uclamp_cap`
  reads that cap, and a clamp above it is counted and logged, never silent.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..counters import Counters
from ..policy.engine import CAPACITY_SCALE
from .statefile import CgroupRecord, StateFile, thread_start_time

__all__ = ["ThreadedCgroups", "cgroup_of", "uclamp_cap", "recover_cgroups", "adopt_cgroups", "CGROUP_ROOT"]

log = logging.getLogger("vhost_user_cpufreq.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_of(pid: int, *, root: Path = CGROUP_ROOT, proc: str = "/proc") -> Path:
    """The cgroup v2 directory of process ``pid`` (its "0::" line)."""
    with open(f"{proc}/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return root / line[3:].strip().lstrip("/")
    raise OSError(errno.ENOENT, f"process {pid} is in no cgroup v2 hierarchy")


def parse_uclamp(text: str) -> int:
    """``cpu.uclamp.min``/``max`` text ("max" or a percentage) in capacity units (0..1024)."""
    text = text.strip()
    if text == "max":
        return CAPACITY_SCALE
    return round(float(text) * CAPACITY_SCALE / 100)


def uclamp_cap(path: Path, *, root: Path = CGROUP_ROOT) -> int:
    """The highest ``cpu.uclamp.min`` that can take effect in ``path``: the smallest of its ancestors'.

    The root cgroup has no ``cpu.uclamp.min`` and caps nothing.
    """
    cap = CAPACITY_SCALE
    p = path.parent
    while p != root and root in p.parents:
        try:
            cap = min(cap, parse_uclamp((p / "cpu.uclamp.min").read_text()))
        except FileNotFoundError:
            cap = 0  # no cpu controller there: nothing below can be clamped
        p = p.parent
    return cap


@dataclass
class _Made:
    home: Path  # the QEMU process's cgroup: where the threads go back
    threads: dict[int, int] = field(default_factory=dict)  # tid -> start time


class ThreadedCgroups:
    """Makes threaded cgroups under a process's cgroup, moves threads in, and undoes both."""

    def __init__(self, counters: Counters, *, state: StateFile | None = None, dry_run: bool = False) -> None:
        self.counters = counters
        self.state = state
        self.dry_run = dry_run
        self.made: dict[Path, _Made] = {}
        #: homes where the service enabled the cpu controller (disabled again when its last directory goes)
        self.enabled_cpu: set[Path] = set()

    def enter(self, path: Path, home: Path, tids: list[int]) -> bool:
        """Make ``path`` (a child of ``home``) a threaded cgroup and move ``tids`` into it."""
        if path.parent != home:
            self.counters.inc("cgroup_failed", "not-a-child")
            log.warning("%s is not a direct child of the process's cgroup %s: not made", path, home)
            return False
        if self.dry_run:
            self.made.setdefault(path, _Made(home)).threads.update({t: 0 for t in tids})
            return True
        made = self.made.setdefault(path, _Made(home))
        try:
            needs_cpu = "cpu" not in (home / "cgroup.subtree_control").read_text().split()
            if "cpu" not in (home / "cgroup.controllers").read_text().split():
                raise OSError(errno.EOPNOTSUPP, f"the cpu controller is not enabled for {home}")
            threads = {t: s for t in tids if (s := thread_start_time(t)) is not None}
            made.threads.update(threads)
            # Write-ahead: on disk before anything changes, so a SIGKILL can be undone.
            self._record(path, made, needs_cpu or home in self.enabled_cpu)
            if not path.is_dir():
                path.mkdir()
            if (path / "cgroup.type").read_text().strip() != "threaded":
                (path / "cgroup.type").write_text("threaded\n")
            if needs_cpu:
                # Only now: a domain cgroup with processes takes +cpu once its child is threaded.
                (home / "cgroup.subtree_control").write_text("+cpu\n")
                self.enabled_cpu.add(home)
            for tid in threads:
                (path / "cgroup.threads").write_text(f"{tid}\n")
        except OSError as exc:
            self.counters.inc("cgroup_failed", errno.errorcode.get(exc.errno or 0, "error").lower())
            log.warning("could not move threads %s into the threaded cgroup %s: %s", tids, path,
                        exc.strerror or exc)
            self.leave(path)
            return False
        self.counters.inc("cgroup_threads_moved", n=len(threads))
        return True

    def leave(self, path: Path) -> None:
        """Move every thread back to its process's cgroup and remove ``path``."""
        made = self.made.pop(path, None)
        if made is None or self.dry_run:
            return
        _undo(path, made.home, made.threads, disable_cpu=made.home in self.enabled_cpu and not any(
            m.home == made.home for m in self.made.values()))
        if not any(m.home == made.home for m in self.made.values()):
            self.enabled_cpu.discard(made.home)
        if self.state is not None:
            self.state.forget_cgroup(str(path))
        self.counters.inc("cgroups_removed")

    def leave_all(self) -> None:
        for path in list(self.made):
            self.leave(path)

    def _record(self, path: Path, made: _Made, enabled_cpu: bool) -> None:
        if self.state is not None:
            self.state.record_cgroup(CgroupRecord(str(path), str(made.home), sorted(made.threads.items()),
                                                  enabled_cpu))


def _undo(path: Path, home: Path, threads: dict[int, int], *, disable_cpu: bool) -> None:
    for tid, start in threads.items():
        if thread_start_time(tid) != start:
            continue  # gone, or the id is another thread's now
        try:
            (home / "cgroup.threads").write_text(f"{tid}\n")
        except OSError as exc:
            log.warning("could not move thread %d back to %s: %s", tid, home, exc.strerror)
    try:
        if path.is_dir():
            path.rmdir()
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)
        return
    if disable_cpu and not any(p.is_dir() for p in home.iterdir()):
        try:
            (home / "cgroup.subtree_control").write_text("-cpu\n")
        except OSError as exc:
            log.warning("could not disable the cpu controller below %s again: %s", home, exc.strerror)


def recover_cgroups(state: StateFile) -> int:
    """Undo the threaded cgroups a killed instance left; returns how many were removed."""
    records = state.load_cgroups()
    for rec in records:
        _undo(Path(rec.path), Path(rec.home), dict((t, s) for t, s in rec.threads), disable_cpu=rec.enabled_cpu)
        state.forget_cgroup(rec.path)
    if records:
        log.warning("recovered from an unclean stop: %d threaded cgroups removed, their threads moved back",
                    len(records))
    return len(records)



def adopt_cgroups(state: StateFile, threaded: ThreadedCgroups) -> int:
    """A predecessor's threaded cgroups (it handed its VMs over): ours now, removed when their VM goes.

    Without this the successor would take them for cgroups someone else made, and leave them (and the
    ``+cpu`` it enabled) behind.  A record whose directory is gone is forgotten.
    """
    n = 0
    for rec in state.load_cgroups():
        path, home = Path(rec.path), Path(rec.home)
        if not path.is_dir() and not threaded.dry_run:
            state.forget_cgroup(rec.path)
            continue
        threaded.made[path] = _Made(home, dict(rec.threads))
        if rec.enabled_cpu:
            threaded.enabled_cpu.add(home)
        n += 1
    return n
