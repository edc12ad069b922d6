"""A snapshot section for what the service changed on the host for one VM: per-thread clamps and caps, and
per-cgroup values and the originals to put back (backend/host/carry.py), sans-IO.

Theory of operation: the clamp engine's decisions (``device.clamps``) say
what the policy wants; this says what the actuators wrote, and what was there
before they first wrote: without it a successor would take the clamped value
of a cgroup for its original and leave it behind when the VM goes, and write
a thread's cap again.  Thread ids and cgroup paths here are only accepted by
the successor where its own records agree (backend/host/carry.py): the
originals are strings it will write back into cgroup files, so they are held
to the two forms the kernel prints ("max" or a percentage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .snapshot_codec import Obj, SnapshotError

__all__ = ["ThreadCarry", "CgroupCarry", "HostSnapshot", "host_to_json", "host_from_json"]

_UCLAMP_TEXT = re.compile(r"max|\d{1,3}(\.\d{1,2})?")
_MAX_THREADS = 4096
_MAX_CGROUPS = 4096


@dataclass(frozen=True, slots=True)
class ThreadCarry:
    tid: int
    clamp: int | None  # uclamp_min the service wrote (None: none)
    cap: int | None  # uclamp_max the service wrote (None: none)


@dataclass(frozen=True, slots=True)
class CgroupCarry:
    path: str
    original_min: str | None  # cpu.uclamp.min before the service first wrote it
    value: int | None  # what it wrote last
    original_max: str | None  # cpu.uclamp.max before the service's power cap
    max_value: int | None


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    threads: tuple[ThreadCarry, ...]
    cgroups: tuple[CgroupCarry, ...]


def host_to_json(h: HostSnapshot) -> dict[str, Any]:
    return {"threads": [[t.tid, t.clamp, t.cap] for t in h.threads],
            "cgroups": [{"path": c.path, "original_min": c.original_min, "value": c.value,
                         "original_max": c.original_max, "max_value": c.max_value} for c in h.cgroups]}


def _capacity(v: Any, what: str) -> int | None:
    if v is not None and (type(v) is not int or not 0 <= v <= 1024):
        raise SnapshotError("malformed", f"{what}: {v!r} is not a capacity 0..1024")
    return v


def _uclamp_text(o: Obj, key: str) -> str | None:
    v = o.obj[key]
    if v is not None and (not isinstance(v, str) or not _UCLAMP_TEXT.fullmatch(v)):
        raise SnapshotError("malformed", f"{o.what}.{key}: {v!r} is not what a cgroup's uclamp file holds")
    return v


def host_from_json(obj: Any) -> HostSnapshot:
    o = Obj(obj, "device.host", ("threads", "cgroups"))
    threads = []
    for t in o.items("threads", _MAX_THREADS):
        if not isinstance(t, list) or len(t) != 3 or type(t[0]) is not int or not 0 < t[0] < 1 << 31:
            raise SnapshotError("malformed", f"device.host.threads: {t!r}")
        threads.append(ThreadCarry(t[0], _capacity(t[1], "device.host.threads"), _capacity(t[2], "device.host.threads")))
    cgroups = []
    for i, c in enumerate(o.items("cgroups", _MAX_CGROUPS)):
        g = Obj(c, f"device.host.cgroups[{i}]", ("path", "original_min", "value", "original_max", "max_value"))
        path = g.text("path", 4096)
        if not path.startswith("/") or "/../" in path + "/" or "\n" in path:
            raise SnapshotError("malformed", f"{g.what}.path {path[:80]!r} is not an absolute path")
        cgroups.append(CgroupCarry(path, _uclamp_text(g, "original_min"), _capacity(g.obj["value"], g.what),
                                   _uclamp_text(g, "original_max"), _capacity(g.obj["max_value"], g.what)))
    if len({t.tid for t in threads}) != len(threads) or len({c.path for c in cgroups}) != len(cgroups):
        raise SnapshotError("malformed", "device.host: a thread or a cgroup twice")
    return HostSnapshot(tuple(threads), tuple(cgroups))
