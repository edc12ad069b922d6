"""What the service changed on host threads, kept on disk so a killed service can undo it.

Before the actuator first changes a thread it records the thread's original
affinity and clamps here (write-ahead: the file is replaced atomically with
``rename``), and it drops the entry once the thread is restored.  A service
killed with SIGKILL leaves the file behind; the next start calls
:func:`recover`, which puts every listed thread that still exists back the way
it was.  A thread is identified by its id *and* its start time
(``/proc/TID/stat`` field 22), so a recycled thread id is never touched.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable

from ..defaults import make_runtime_dir

__all__ = ["ThreadRecord", "CgroupRecord", "StateFile", "thread_start_time", "recover"]

log = logging.getLogger("vhost_user_cpufreq.state")


def thread_start_time(tid: int, proc: str = "/proc") -> int | None:
    """Start time of ``tid`` in clock ticks since boot, or None if it does not exist."""
    try:
        with open(f"{proc}/{tid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])  # field 22 overall


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    tid: int
    start_time: int
    affinity: list[int] | None  # None: never pinned by the service, so never restored
    util_min: int | None
    util_max: int | None
    reset_on_fork: bool = False  # absent in files of earlier versions


@dataclass(frozen=True, slots=True)
class CgroupRecord:
    """A threaded cgroup the service made (see cgroups.py), and the threads it moved in."""

    path: str
    home: str  # where the threads go back
    threads: list[tuple[int, int]]  # (tid, start time)
    enabled_cpu: bool  # the service enabled +cpu in home's subtree_control


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[int, ThreadRecord] = {}
        self.cgroups: dict[str, CgroupRecord] = {}

    def load(self) -> dict[int, ThreadRecord]:
        try:
            with open(self.path) as f:
                raw = json.load(f)
            self.entries = {int(r["tid"]): ThreadRecord(**r) for r in raw.get("threads", [])}
            self.cgroups = {r["path"]: CgroupRecord(r["path"], r["home"], [(int(t), int(s)) for t, s in r["threads"]],
                                                    bool(r["enabled_cpu"])) for r in raw.get("cgroups", [])}
        except FileNotFoundError:
            self.entries, self.cgroups = {}, {}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("state file %s is unreadable (%s); starting without it", self.path, exc)
            self.entries, self.cgroups = {}, {}
        return dict(self.entries)

    def load_cgroups(self) -> list[CgroupRecord]:
        self.load()
        return list(self.cgroups.values())

    def record_cgroup(self, rec: CgroupRecord) -> None:
        self.cgroups[rec.path] = rec
        self._write()

    def forget_cgroup(self, path: str) -> None:
        if self.cgroups.pop(path, None) is not None:
            self._write()

    def record(self, rec: ThreadRecord) -> None:
        self.entries[rec.tid] = rec
        self._write()

    def forget(self, tid: int) -> None:
        if self.entries.pop(tid, None) is not None:
            self._write()

    def _write(self) -> None:
        tmp = f"{self.path}.tmp"
        make_runtime_dir(self.path)
        with open(tmp, "w") as f:
            json.dump({"threads": [asdict(r) for r in self.entries.values()],
                       "cgroups": [asdict(r) for r in self.cgroups.values()]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def recover(state: StateFile, restore: Callable[[ThreadRecord], None]) -> tuple[int, int]:
    """Undo what a previous, killed instance left on threads; returns (restored, gone)."""
    restored = gone = 0
    for rec in list(state.load().values()):
        if thread_start_time(rec.tid) != rec.start_time:
            gone += 1  # exited, or the id now belongs to another thread: leave it alone
        else:
            try:
                restore(rec)
                restored += 1
            except OSError as exc:
                log.warning("could not restore thread %d left by a previous instance: %s", rec.tid, exc)
        state.entries.pop(rec.tid, None)
    state._write()
    if restored or gone:
        log.warning("recovered from an unclean stop: %d threads restored, %d gone", restored, gone)
    return restored, gone
