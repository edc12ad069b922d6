"""Guest workloads, read from TOML files: tasks with bursts, periods, deadlines and migrations.

Theory of operation: a workload is a list of tasks.  Work is in *work-ms*:
milliseconds of running on a CPU of capacity 1024 at its top frequency, so a
task needs ``work_ms * 1024 / (capacity * f / f_max)`` ms on a slower CPU.
Task kinds:

- ``periodic``: a job every ``period_ms``, ``work_ms`` +- ``jitter`` (a
  fraction, seeded);
- ``poisson``: jobs at exponential gaps of mean ``mean_gap_ms`` (bursty
  browsing: page loads, scrolls);
- ``batch``: back-to-back jobs of ``work_ms`` until ``total_ms`` of work is
  done (its completion time is reported);
- ``after = "name"`` makes a stage of a pipeline: a job released when the
  named task's job completes, whose ``deadline_ms`` counts from the head's
  release (a frame's UI then render thread).

``uclamp_min`` is the guest's own clamp on the task (Android boosts its
top-app threads so): the guest governor honours it while the task is
runnable; the host never sees it except through a channel.
``vcpus`` lists the vCPUs a task may run on (``"all"`` by default);
``migrate_every = N`` moves the task to another allowed vCPU every N jobs
(the case where a thread lands on a vCPU whose host util is cold).
Errors name the file, the key and the reason (:class:`SimInputError`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .hostmodel import SimInputError

__all__ = ["TaskSpec", "Workload", "load_workload", "builtin_workloads", "parse_workload"]

KINDS = ("periodic", "poisson", "batch", "stage")
BUILTIN = ("frames", "browsing", "batch", "mixed")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    kind: str
    work_ms: float
    period_ms: float = 0.0
    mean_gap_ms: float = 0.0
    jitter: float = 0.0
    deadline_ms: float = 0.0  # 0: no deadline
    total_ms: float = 0.0
    after: str = ""
    vcpus: tuple[int, ...] | None = None  # None: all
    migrate_every: int = 0
    offset_ms: float = 0.0
    releases: tuple[tuple[float, float], ...] = ()  # kind "trace" (built in code): (release ms, work-ms)
    uclamp_min: int = 0  # the guest's own boost for this task (Android's top-app), seen by the guest governor


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    duration_s: float
    seed: int
    tasks: tuple[TaskSpec, ...]
    file: str

    def check_vcpus(self, num_vcpus: int) -> None:
        for i, t in enumerate(self.tasks):
            if t.vcpus is not None and any(v >= num_vcpus for v in t.vcpus):
                raise SimInputError(self.file, f"task[{i}].vcpus", f"lists a vCPU beyond the VM's {num_vcpus}")


_NUM = (int, float)


def _num(d: dict[str, Any], key: str, file: str, where: str, default: float | None = None, *,
         lo: float = 0.0, positive: bool = False) -> float:
    if key not in d:
        if default is None:
            raise SimInputError(file, where + key, "missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, _NUM):
        raise SimInputError(file, where + key, f"expected a number, got {type(v).__name__}")
    if v < lo or (positive and v <= 0) or v != v:
        raise SimInputError(file, where + key, f"{v} out of range (must be {'>' if positive else '>='} {lo})")
    return float(v)


def _task(d: Any, i: int, file: str) -> TaskSpec:
    where = f"task[{i}]."
    if not isinstance(d, dict):
        raise SimInputError(file, f"task[{i}]", "expected a table")
    known = set(TaskSpec.__dataclass_fields__) - {"releases"}
    extra = sorted(set(d) - known)
    if extra:
        raise SimInputError(file, where + extra[0], "unknown key")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise SimInputError(file, where + "name", "missing or not a string")
    after = d.get("after", "")
    if not isinstance(after, str):
        raise SimInputError(file, where + "after", "expected a task name")
    kind = d.get("kind", "stage" if after else "periodic")
    if kind not in KINDS or (kind == "stage") != bool(after):
        raise SimInputError(file, where + "kind", f"{kind!r}: one of periodic, poisson, batch (or 'after' for a stage)")
    vc = d.get("vcpus", "all")
    vcpus: tuple[int, ...] | None
    if vc == "all":
        vcpus = None
    elif isinstance(vc, list) and vc and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vc):
        vcpus = tuple(vc)
    else:
        raise SimInputError(file, where + "vcpus", "expected \"all\" or a non-empty list of vCPU numbers")
    me = d.get("migrate_every", 0)
    if isinstance(me, bool) or not isinstance(me, int) or me < 0:
        raise SimInputError(file, where + "migrate_every", "expected a job count >= 0")
    spec = TaskSpec(
        name=name, kind=kind, after=after, vcpus=vcpus, migrate_every=me,
        work_ms=_num(d, "work_ms", file, where, positive=True),
        period_ms=_num(d, "period_ms", file, where, None if kind == "periodic" else 0.0,
                       positive=kind == "periodic"),
        mean_gap_ms=_num(d, "mean_gap_ms", file, where, None if kind == "poisson" else 0.0,
                         positive=kind == "poisson"),
        total_ms=_num(d, "total_ms", file, where, None if kind == "batch" else 0.0, positive=kind == "batch"),
        jitter=_num(d, "jitter", file, where, 0.0),
        deadline_ms=_num(d, "deadline_ms", file, where, 0.0),
        offset_ms=_num(d, "offset_ms", file, where, 0.0),
        uclamp_min=int(_num(d, "uclamp_min", file, where, 0.0)),
    )
    if spec.uclamp_min > 1024:
        raise SimInputError(file, where + "uclamp_min", f"{spec.uclamp_min} is above 1024")
    if spec.jitter >= 1:
        raise SimInputError(file, where + "jitter", f"{spec.jitter} must be below 1 (a fraction of work_ms)")
    return spec


def parse_workload(data: dict[str, Any], file: str) -> Workload:
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise SimInputError(file, "name", "missing or not a string")
    tasks_raw = data.get("task")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise SimInputError(file, "task", "need at least one [[task]] table")
    tasks = tuple(_task(t, i, file) for i, t in enumerate(tasks_raw))
    names = [t.name for t in tasks]
    for i, t in enumerate(tasks):
        if names.count(t.name) > 1:
            raise SimInputError(file, f"task[{i}].name", f"{t.name!r} used twice")
        if t.after and t.after not in names[:i]:
            raise SimInputError(file, f"task[{i}].after", f"{t.after!r} is not a task defined before this one")
    seed = data.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SimInputError(file, "seed", "expected an integer")
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise SimInputError(file, "description", "expected a string")
    dur = _num(data, "duration_s", file, "", 10.0, positive=True)
    if dur > 600:
        raise SimInputError(file, "duration_s", f"{dur} s is more than the 600 s the simulator allows")
    return Workload(name, desc, dur, seed, tasks, file)


def load_workload(name_or_path: str) -> Workload:
    """A built-in workload by name (frames, browsing, batch, mixed) or a TOML file."""
    if name_or_path in BUILTIN:
        file = f"{name_or_path}.toml"
        text = resources.files(__package__).joinpath("data", "workloads", file).read_text()
    else:
        file = name_or_path
        try:
            text = Path(name_or_path).read_text()
        except OSError as exc:
            raise SimInputError(file, "-", f"cannot read: {exc.strerror} (built-in workloads: {', '.join(BUILTIN)})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SimInputError(file, "-", f"not TOML: {exc}") from None
    return parse_workload(data, file)


def builtin_workloads() -> tuple[str, ...]:
    return BUILTIN
