"""``vhost-user-cpufreq simulate``: the table on stdout, the plot as PNG, the table as JSON.

Kept out of ``service/cli.py`` so that the serving CLI only grows by a
sub-parser (:mod:`.args`, no imports) and a lazy import: serving never loads
the simulator.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..policy.engine import EngineConfig, VmLimits
from .arms import ARMS, ArmSettings
from .hostmodel import SimInputError, load_host
from .report import plot, table, to_json
from .run import STEP_S, TICK_S, RunResult, SimOptions, simulate
from .sweep import sweep
from .workload import load_workload

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    try:
        host = load_host(args.host)
        wl = load_workload(args.workload)
        settings = ArmSettings(engine=EngineConfig(), limits=VmLimits(0, args.ceiling),
                               device_latency_s=args.latency_us / 1e6, exit_cost_s=args.exit_cost_us / 1e6)
        opts = SimOptions(duration_s=args.duration)
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [a for a in arms if a not in ARMS]
        if bad:
            print(f"simulate: unknown arm {bad[0]!r}: one of {', '.join(ARMS)}", file=sys.stderr)
            return 2
        if args.sweep:
            sweep(host, wl, opts)
            return 0
        results: list[RunResult] = [simulate(host, wl, a, settings, opts) for a in arms]
    except (SimInputError, ValueError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    dur = opts.duration_s or wl.duration_s
    print(f"{host.name}, workload {wl.name} ({wl.description}), {dur:g} s simulated, step {STEP_S * 1e3:g} ms, "
          f"guest tick {TICK_S * 1e3:g} ms")
    print(f"device latency {settings.device_latency_s * 1e6:.1f} us (README kick -> decision p99); "
          f"upstream exit {settings.exit_cost_s * 1e6:.1f} us (assumed); energy: {host.energy_note}")
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.host if '/' not in args.host else host.name}-{wl.name}"
    meta = {"host": host.name, "host_source": host.source, "workload": wl.name, "duration_s": dur,
            "settings": {"engine": dataclasses.asdict(settings.engine), "device_latency_s": settings.device_latency_s,
                         "exit_cost_s": settings.exit_cost_s}}
    (out / f"{stem}.json").write_text(to_json(results, meta))
    written = [str(out / f"{stem}.json")]
    if not args.no_plot:
        names = [f"{d.cpus[0]}-{d.cpus[-1]} ({d.max_khz // 1000} MHz)" for d in host.domains][:len(results[0].trace_khz)]
        (out / f"{stem}.png").write_bytes(plot(results, names, f"{host.name} / {wl.name}"))
        written.append(str(out / f"{stem}.png"))
    print("wrote " + ", ".join(written))
    return 0
