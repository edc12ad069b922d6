"""Offline tuning: the engine's and the driver's settings swept on one host and workload.

Theory of operation: one setting at a time moves over its values with the
others at their defaults (the device arm only; each run is a full
simulation), then the best value of each is combined and run once more.
"Best" is the most frames (jobs) on time, and among settings within half a
point of that, the most performance per energy: a user sees missed frames
before a battery percent.  The printed rows are the trade-off itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from ..policy.engine import EngineConfig
from .arms import ArmSettings
from .hostmodel import Host
from .run import RunResult, SimOptions, simulate
from .workload import Workload

__all__ = ["GRID", "sweep", "best"]

#: (name, where it lives, values)
GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "hysteresis": ("engine", (0, 16, 32, 64, 128)),
    "min_interval": ("engine", (0.0, 0.002, 0.004, 0.008, 0.016)),
    "headroom": ("engine", (0.6, 0.7, 0.8, 0.9, 1.0)),
    "stale_after": ("engine", (0.1, 0.25, 0.5, 1.0)),
    "urgent_delta": ("driver", (32, 64, 128, 256)),
    "lazy_deadline_s": ("driver", (0.004, 0.008, 0.016, 0.032, 0.064)),
}


def _with(settings: ArmSettings, name: str, value: float) -> ArmSettings:
    e = settings.engine
    if name == "hysteresis":
        return dataclasses.replace(settings, engine=dataclasses.replace(e, hysteresis=int(value)))
    if name in ("min_interval", "headroom", "stale_after"):
        kw: dict[str, Any] = {name: value}
        return dataclasses.replace(settings, engine=dataclasses.replace(e, **kw))
    if name == "urgent_delta":
        return dataclasses.replace(settings, urgent_delta=int(value))
    return dataclasses.replace(settings, lazy_deadline_s=value)


def _score(r: RunResult) -> tuple[float, float]:
    ot = r.frames_on_time
    return (0.0 if math.isnan(ot) else ot * 100, r.perf_per_joule)


def best(rows: list[tuple[str, float, RunResult]]) -> tuple[str, float, RunResult]:
    top = max(_score(r)[0] for _, _, r in rows)
    near = [row for row in rows if _score(row[2])[0] >= top - 0.5]
    return max(near, key=lambda row: _score(row[2])[1])


def sweep(host: Host, workload: Workload, opts: SimOptions = SimOptions(),
          say: Callable[[str], None] = print) -> ArmSettings:
    """Print the trade-off per setting and return the combined best settings."""
    base = ArmSettings(engine=EngineConfig())
    ref = simulate(host, workload, "device", base, opts)
    say(f"defaults: on time {_score(ref)[0]:.1f}%, perf/J {ref.perf_per_joule:.1f}, energy {ref.energy_j:.3f} J, "
        f"clamp changes {ref.clamp_changes}")
    chosen = base
    for name, (_, values) in GRID.items():
        rows = []
        for value in values:
            r = simulate(host, workload, "device", _with(base, name, value), opts)
            rows.append((name, value, r))
        pick = best(rows)
        for _, value, r in rows:
            mark = " <- best" if value == pick[1] else ""
            say(f"  {name:<16} {value:>7g}: on time {_score(r)[0]:5.1f}%  perf/J {r.perf_per_joule:7.1f}  "
                f"energy {r.energy_j:6.3f} J  clamps {r.clamp_changes:5d}{mark}")
        chosen = _with(chosen, name, pick[1])
    final = simulate(host, workload, "device", chosen, opts)
    e, lazy = chosen.engine, chosen.lazy_deadline_s
    say(f"best combined: hysteresis={e.hysteresis} min_interval={e.min_interval:g} headroom={e.headroom:g} "
        f"stale_after={e.stale_after:g} urgent_delta={chosen.urgent_delta} lazy_deadline_s={lazy:g}")
    say(f"  -> on time {_score(final)[0]:.1f}% (defaults {_score(ref)[0]:.1f}%), perf/J {final.perf_per_joule:.1f} "
        f"(defaults {ref.perf_per_joule:.1f})")
    return chosen
