"""A fuzzing campaign against the back-end: ``python -m tests.fuzz.campaign --seconds N [--seed S]``.

Runs seeded random stream cases (hostile front-ends) and guest cases
(hostile guests) against one Service for N seconds (see ``harness``), then
prints the cases run, sessions closed by reason, rejections by reason, the
known bugs hit and every failure with the command that replays it::

    python -m tests.fuzz.campaign --replay stream:1234567

``--lane`` serves the fuzzed and guest VMs' request queues on the C kick
lane (it needs the C data plane).  The first line names the data plane the
process loaded, and the summary the shared objects mapped from it, so a run
can be shown to have used, say, the sanitized build (``VUC_SANITIZE``).

Exit status 1 if any case failed (known bugs do not count).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane

from .harness import KNOWN_BUGS, FuzzBed, random_guest_case, random_stream_case


def _case_seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + i) & 0xFFFFFFFF


def mapped_objects(*needles: str) -> list[str]:
    """Paths of the files mapped into this process whose names contain one of ``needles``."""
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if any(n in p.rsplit("/", 1)[-1] for n in needles))


async def campaign(seconds: float, seed: int, guest_share: float, max_cases: int | None = None,
                   replay: str | None = None, verbose: bool = False, lane: bool = False) -> int:
    dp = dataplane()
    print(f"data plane: {dp.detail}" + ("; fuzzed and guest VMs on the kick lane" if lane else ""), flush=True)
    bed = await FuzzBed.create(lane=lane)
    t0 = time.monotonic()
    try:
        if replay is not None:
            kind, _, s = replay.partition(":")
            cs = int(s)
            if kind == "stream":
                res = await bed.run_stream(random_stream_case(random.Random(cs)), seed=cs)
            else:
                res = await bed.run_guest(random_guest_case(random.Random(cs)), seed=cs)
            print(f"{kind} case {cs}: {res.case!r}")
            print(f"closed: {res.close_reason!r}  rejected: {dict(res.rejected)}  known: {res.known}  "
                  f"{res.elapsed * 1000:.1f} ms")
        else:
            pick = random.Random(seed)
            i = 0
            while time.monotonic() - t0 < seconds and (max_cases is None or i < max_cases):
                cs = _case_seed(seed, i)
                if pick.random() < guest_share:
                    res = await bed.run_guest(random_guest_case(random.Random(cs)), seed=cs)
                else:
                    res = await bed.run_stream(random_stream_case(random.Random(cs)), seed=cs)
                if verbose and not res.ok:
                    print(res.describe(), flush=True)
                i += 1
    finally:
        elapsed = time.monotonic() - t0
        summary = bed.summary()
        failures = list(bed.failures)
        await bed.close()
    print_summary(summary, failures, elapsed=elapsed, seed=seed if replay is None else None)
    print("mapped: " + (", ".join(mapped_objects("dataplane-", "_vuc", "libasan", "libubsan")) or "no C data plane"))
    return 1 if failures else 0


def print_summary(summary: dict, failures: list, *, elapsed: float, seed: int | None) -> None:  # type: ignore[type-arg]
    cases = summary["cases"]
    total = cases.get("stream", 0) + cases.get("guest", 0)
    head = f"seed {seed}, " if seed is not None else ""
    print(f"\n== fuzz campaign: {head}{elapsed:.1f} s, {total} cases (stream {cases.get('stream', 0)}, "
          f"guest {cases.get('guest', 0)} of which torn {cases.get('guest (torn)', 0)}, "
          f"on the kick lane {cases.get('guest (kick lane)', 0)}), "
          f"{total / max(elapsed, 1e-9):.0f} cases/s")
    if summary["lane_bindings"]:
        print("request queues put on the kick lane, by VM: "
              + ", ".join(f"{vm} {n}" for vm, n in sorted(summary["lane_bindings"].items())))
    print("sessions closed by reason (fuzzed front-end):")
    for reason, n in summary["sessions_closed"].items():
        print(f"  {n:7d}  {reason}")
    print("rejections by reason (fuzzed front-end and guest):")
    for reason, n in summary["rejected"].items():
        print(f"  {n:7d}  {reason}")
    print("known bugs hit (reported; pinned by strict xfails in tests/test_faults.py, test_fuzz.py, test_flood.py):")
    if not summary["known_bugs"]:
        print("  none")
    for kb, n in sorted(summary["known_bugs"].items()):
        print(f"  {n:7d}  {kb}: {KNOWN_BUGS[kb]}")
    print(f"failures: {len(failures) or 'none'}")
    for res in failures[:20]:
        print("  " + res.describe().replace("\n", "\n  ")[:2000])
        if res.seed is not None:
            print(f"  reproduce: .venv/bin/python -m tests.fuzz.campaign --replay {res.kind}:{res.seed}")
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.campaign", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="master seed (default: from the clock, printed)")
    ap.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    ap.add_argument("--guest-share", type=float, default=0.35, help="fraction of guest-memory cases (default 0.35)")
    ap.add_argument("--replay", metavar="KIND:SEED", help="run one case (stream:N or guest:N) and print it")
    ap.add_argument("-v", "--verbose", action="store_true", help="print failures as they happen")
    ap.add_argument("--lane", action="store_true", help="serve the fuzzed and guest VMs on the C kick lane")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) & 0xFFFFFF
    return asyncio.run(campaign(args.seconds, seed, args.guest_share, args.cases, args.replay, args.verbose,
                                args.lane))


if __name__ == "__main__":
    sys.exit(main())
