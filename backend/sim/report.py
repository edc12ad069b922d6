"""The simulator's outputs: the table as text and JSON, and the plot as PNG.

The table has one row per arm: frames (or jobs) on time, the deadline
chains' p95 latency, a batch's completion time, energy, performance per
energy (work-ms done on time per joule), and how often the host clamp and
the frequency changed.  The plot shows each arm's frequency per domain over
the first seconds, and bars of on-time share and performance per energy
relative to the baseline.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from .png import Canvas
from .run import RunResult

__all__ = ["table", "to_json", "plot"]

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
_ARM_COLORS = {"baseline": (127, 127, 127), "upstream": (255, 127, 14), "device": (31, 119, 180),
               "hypercall": (44, 160, 44)}


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _col(x: float, spec: str, width: int, suffix: str = "") -> str:
    return (_fmt(x, spec) + ("" if isinstance(x, float) and math.isnan(x) else suffix)).rjust(width)


def _row(r: RunResult) -> dict[str, Any]:
    dl = [c for c in r.chains.values() if c["deadline"]]
    batch = [c["finished_s"] for c in r.chains.values() if not math.isnan(c["finished_s"])]
    return {
        "arm": r.arm,
        "on_time_pct": r.frames_on_time * 100,
        # Frames: the periodic deadline chains (not page loads or network jobs).
        "fps_on_time": (sum(c["on_time"] for c in dl if c["frames"]) / r.duration_s
                        if any(c["frames"] for c in dl) else math.nan),
        "p95_ms": max((c["p95_ms"] for c in dl), default=math.nan),
        "batch_done_s": max(batch) if batch else math.nan,
        "energy_j": r.energy_j,
        "perf_per_j": r.perf_per_joule,
        "clamp_changes": r.clamp_changes,
        "freq_changes": r.freq_changes,
        **{f"arm_{k}": v for k, v in r.arm_stats.items()},
    }


def table(results: Sequence[RunResult]) -> str:
    base = next((r for r in results if r.arm == "baseline"), None)
    head = f"{'arm':<10} {'on time':>8} {'fps ok':>7} {'p95 ms':>7} {'batch s':>8} {'energy J':>9} " \
           f"{'perf/J':>8} {'vs base':>8} {'clamps':>7} {'f chg':>6}  channel"
    lines = [head, "-" * len(head)]
    for r in results:
        row = _row(r)
        rel = (r.perf_per_joule / base.perf_per_joule - 1) * 100 if base and base.perf_per_joule else math.nan
        chan = ", ".join(f"{k} {v}" for k, v in r.arm_stats.items() if v)
        lines.append(" ".join([
            f"{r.arm:<10}", _col(row["on_time_pct"], ".1f", 8, "%"), _col(row["fps_on_time"], ".1f", 7),
            _col(row["p95_ms"], ".1f", 7), _col(row["batch_done_s"], ".2f", 8), _col(row["energy_j"], ".3f", 9),
            _col(row["perf_per_j"], ".1f", 8), _col(rel, "+.0f", 8, "%"), f"{r.clamp_changes:7d}",
            f"{r.freq_changes:6d}", f" {chan}"]).rstrip())
    return "\n".join(lines)


def to_json(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x
    return json.dumps({"meta": meta, "rows": [clean({**_row(r), "chains": r.chains}) for r in results]}, indent=1)


def plot(results: Sequence[RunResult], domain_names: Sequence[str], title: str, seconds: float = 2.0) -> bytes:
    """Frequency per domain over the first ``seconds`` (a panel per arm) and the table's bars."""
    W, panel_h, pad = 1000, 120, 60
    bars_h = 220
    H = 50 + len(results) * (panel_h + 30) + bars_h + 40
    cv = Canvas(W, H)
    cv.text(pad, 12, title, scale=3)
    x0, x1 = pad, W - 20
    y = 50
    max_khz = max((max(tr) for r in results for tr in r.trace_khz if tr), default=1)
    for r in results:
        cv.text(x0, y, f"{r.arm}: frequency (axis top {max_khz // 1000} MHz) over {seconds:g} s", _ARM_COLORS.get(r.arm, (0, 0, 0)))
        top, bot = y + 16, y + 16 + panel_h
        cv.rect(x0, top, x1, bot, (245, 245, 245))
        n = sum(1 for t in r.trace_t if t < seconds)
        for j, tr in enumerate(r.trace_khz):
            c = _COLORS[j % len(_COLORS)]
            prev: tuple[int, int] | None = None
            for i in range(n):
                px = x0 + int((x1 - x0) * r.trace_t[i] / seconds)
                py = bot - 1 - int((panel_h - 2) * tr[i] / max_khz)
                if prev:
                    cv.line(prev[0], prev[1], px, prev[1], c)
                    cv.line(px, prev[1], px, py, c)
                prev = (px, py)
        y = bot + 14
    lx = x0
    for j, name in enumerate(domain_names):
        cv.rect(lx, y + 2, lx + 10, y + 10, _COLORS[j % len(_COLORS)])
        lx = cv.text(lx + 14, y, name) + 16
    y += 24
    # Bars: on-time share and perf per energy relative to the best arm.
    groups = (("on time %", [r.frames_on_time * 100 if not math.isnan(r.frames_on_time) else 0 for r in results], 100.0),
              ("perf per energy", [r.perf_per_joule for r in results], max([r.perf_per_joule for r in results] + [1e-9])))
    gw = (x1 - x0) // len(groups)
    for g, (label, vals, top_val) in enumerate(groups):
        gx = x0 + g * gw
        cv.text(gx, y, label)
        base_y = y + bars_h - 40
        bw = (gw - 40) // max(1, len(results))
        for i, (r, v) in enumerate(zip(results, vals)):
            h = int((bars_h - 80) * (v / top_val if top_val else 0))
            bx = gx + i * bw
            cv.rect(bx + 4, base_y - h, bx + bw - 4, base_y, _ARM_COLORS.get(r.arm, (0, 0, 0)))
            cv.text(bx + 4, base_y - h - 14, f"{v:.0f}" if v >= 10 else f"{v:.1f}")
            cv.text(bx + 4, base_y + 6, r.arm[:9])
    return cv.png()
