"""The ``simulate`` sub-command's options, importable without loading the simulator."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="gs101", help="gs101, mt8183, xeon, or a host JSON file")
    p.add_argument("--workload", default="frames", help="frames, browsing, batch, mixed, or a TOML file")
    p.add_argument("--arms", default="baseline,upstream,device,hypercall", help="comma-separated arms to run")
    p.add_argument("--duration", type=float, default=None, help="simulated seconds (default: the workload's)")
    p.add_argument("--out", default="sim-out", help="directory for <host>-<workload>.png and .json")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--exit-cost-us", type=float, default=10.0, help="upstream arm's cost of one exit (assumed)")
    p.add_argument("--latency-us", type=float, default=53.1,
                   help="device arm's kick -> decision latency (README benchmark, p99)")
    p.add_argument("--ceiling", type=int, default=1024, help="the VM's clamp ceiling, 0..1024")
    p.add_argument("--sweep", action="store_true", help="tune the engine's and driver's settings instead")
