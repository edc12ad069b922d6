"""vhost-user-cpufreq benchmark: one command, a table on stdout, JSON on request.

    .venv/bin/python bench/run.py [--quick] [--json out.json] [--profile] [--only SECTIONS]

The back-end always runs in its own process (bench/backend_proc.py, a real
``Service``); the guest side (our vhost-user front-end and the guest driver
model, or QEMU driven through qtest) runs in this process.  See bench/README.md
for what each figure means and how the targets are judged.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

# The sections, one module each (bench_*.py), stand on harness.py; report.py judges and prints.
from bench_latency import bench_atomicity, bench_latency  # noqa: E402
from bench_load import bench_guest_cost, bench_scale, bench_throughput  # noqa: E402
from bench_mirror import bench_mirror  # noqa: E402
from bench_qemu import bench_qemu  # noqa: E402
from harness import (  # noqa: E402
    CONFIGS,
    SECTIONS,
    Config,
    background,
    calibrate,
    env_delta,
    env_mark,
    log,
    wait_quiet,
)
from report import dataplane_detail, print_table, targets  # noqa: E402
from stats import machine_info  # noqa: E402


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    cfg = CONFIGS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.scale_vms is not None:
        cfg = dataclasses.replace(cfg, scale_vms=args.scale_vms)
    if args.scale_flush_ms is not None:
        cfg = dataclasses.replace(cfg, scale_flush_s=args.scale_flush_ms / 1e3)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t0 = time.monotonic()
    r: dict[str, Any] = {"machine": machine_info(), "dataplane": dataplane_detail(), "config": {"name": cfg.name, **{
        k: v for k, v in cfg.__dict__.items() if k != "name"}}, "errors": []}
    log(f"measuring background load for {cfg.settle_s} s")
    r["background"] = background(cfg.settle_s)
    r["calibration_start"] = calibrate()
    with tempfile.TemporaryDirectory(prefix="vuc-bench-") as tmp:
        runs = {
            "atomicity": lambda: bench_atomicity(cfg),
            "latency": lambda: bench_latency(cfg, tmp),
            "throughput": lambda: bench_throughput(cfg, tmp, args.profile),
            "guest_cost": lambda: bench_guest_cost(cfg, tmp),
            "scale": lambda: bench_scale(cfg, tmp, args.profile),
            "mirror": lambda: bench_mirror(cfg, tmp),
            "qemu": lambda: bench_qemu(cfg, tmp),
        }
        for name in SECTIONS:
            if name not in only:
                continue
            if name == "qemu" and args.no_qemu:
                r["qemu"] = {"skipped": "--no-qemu"}
                continue
            if args.wait_quiet:
                await wait_quiet(args.wait_quiet)
            env0 = env_mark()
            try:
                # connecting and loading 1,000 VMs takes a while on a small machine
                limit = 300 + (0.5 * cfg.scale_vms if name == "scale" else 0)
                r[name] = await asyncio.wait_for(runs[name](), limit)
            except Exception as exc:  # noqa: BLE001 - report it, keep the other sections
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                r[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
                r["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            if name == "scale" and r[name].get("errors"):
                r["errors"].append(f"scale: {r[name]['errors']} errors (see scale.<variant>.errors)")
            r[name]["environment"] = env_delta(env0)
        if args.profile and args.json:
            # keep the raw stacks next to the JSON
            dest = Path(args.json).with_suffix(".profiles")
            dest.mkdir(exist_ok=True)
            for f in Path(tmp).glob("profile-*.txt"):
                shutil.copy(f, dest / f.name)
    r["calibration_end"] = calibrate()
    r["targets"] = targets(r)
    r["background_after"] = background(cfg.settle_s)
    r["runtime_s"] = round(time.monotonic() - t0, 1)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="vhost-user-cpufreq benchmark")
    p.add_argument("--quick", action="store_true", help="short run (< 2 min), for a smoke check of the figures")
    p.add_argument("--tiny", action="store_true", help="seconds-long run with every section (the test suite's)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--profile", action="store_true", help="py-spy the back-end in extra throughput/scale windows")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--scale-vms", type=int, metavar="N", help="VMs of 8 vCPUs in the scale section (default: "
                   f"{CONFIGS['full'].scale_vms}; --tiny {CONFIGS['tiny'].scale_vms})")
    p.add_argument("--scale-flush-ms", type=float, metavar="MS", help="in the scale section's load each VM flushes "
                   f"its 8 vCPUs every MS ms (default {Config.scale_flush_s * 1e3:g}: 100 records/s per vCPU)")
    p.add_argument("--no-qemu", action="store_true", help="skip the real-QEMU section")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each section wait up to S seconds for other processes to go quiet")
    p.add_argument("--report", metavar="FILE", help="print the table and targets of a JSON written by --json, "
                   "judged by this version's targets, without measuring")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            r = json.load(f)
        r["targets"] = targets(r)
        print_table(r)
        return 0
    r = asyncio.run(amain(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
    print_table(r)
    # a section that failed, or a VM not served cleanly, is an error, not a figure
    if r["errors"]:
        sys.stderr.write("ERRORS:\n" + "".join(f"  {e}\n" for e in r["errors"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
