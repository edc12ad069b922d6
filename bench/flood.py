"""Flood isolation: a victim VM's delay while another VM on the same service floods.

    .venv/bin/python bench/flood.py [--quick | --tiny] [--paths lane,loop-c,loop-python] [--out-dir DIR]

One back-end (bench/backend_proc.py, the daemon's policy: clamp engine and
thread actuator in dry run) serves two VMs of 8 vCPUs: ``vm0``, the victim,
and ``vm1``, the flooder.  Each runs in a process of its own:

* the victim (this file, ``--victim``) sends one record at a time, a random
  0-20 ms apart (about 100 a second, so its ring counts as busy on the kick
  lane and is polled on the 4 ms grid, SPEC 6.3), and reads the decision's
  CLOCK_MONOTONIC stamp from the back-end's shared stamp area: its delay is
  flush -> decision;
* the flooder is tests/floodlib.py in one of its modes (kick storm, ring kept
  full of 1-record or of 256-record batches, indirect tables of 32,768 or of
  4,096 zero-length descriptors), or absent (``none``).

Pinning, as on a host where the service has a CPU and a busy VM has another:
the back-end (all its threads) and the victim on CPU 0, the flooder on CPU 1.
Trials of every flood kind, ``none`` included, are interleaved round by round
(rotating the order), so what else the machine does hits them alike; the load
average and the CPU other processes used are recorded with each trial.  Each
kind's figures pool its trials; the ratio is its p99 over the same path's p99
with no flood, measured in the same run.

Paths: ``lane`` (the C kick lane, the daemon's default), ``loop-c`` (the event
loop with the C drain, ``VUC_KICK_LANE=0``), ``loop-python`` (the pure-Python
drain, ``VUC_DATAPLANE=python``).  Writes ``<date>-flood.json`` and ``.md``
into ``--out-dir`` (bench/results by default).  ``--tiny`` runs each trial for
well under a second: the smoke test's, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import Backend, log, pin_process, wait_quiet  # noqa: E402
from stats import CLK_TCK, machine_info, proc_cpu_seconds, proc_run_delay_seconds, system_busy  # noqa: E402

from tests.floodlib import MODES  # noqa: E402

PATHS: dict[str, dict[str, str]] = {
    "lane": {},
    "loop-c": {"VUC_KICK_LANE": "0"},
    "loop-python": {"VUC_DATAPLANE": "python"},
}
KINDS = ("none", *MODES)
VCPUS = 8
SERVICE_CPU, FLOOD_CPU = 0, 1
TARGET_RATIO = 1.5  # issue 16: the victim's p99 within 1.5x of its no-flood p99
QUIET_CORES = 0.25  # a trial is "quiet" when every other process together used less CPU than this


@dataclass(frozen=True)
class Config:
    name: str
    trial_s: float  # the victim's measured window per trial
    rounds: int  # trials per flood kind
    lead_s: float = 0.3  # from the flooder's "ready" to the window's start
    wait_quiet_s: float = 20.0  # before each trial, wait up to this long for the rest of the machine to go quiet


CONFIGS = {
    "tiny": Config("tiny", trial_s=0.4, rounds=1, lead_s=0.1, wait_quiet_s=0.0),
    "quick": Config("quick", trial_s=1.5, rounds=2),
    "full": Config("full", trial_s=4.0, rounds=4),
}


# -- the victim (a process of its own) ---------------------------------------------------------


def victim_main(sock: str, stamp_fd: int, vm_index: int, cpu: int | None, gap_s: float) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    asyncio.run(_victim(sock, stamp_fd, vm_index, gap_s))


async def _victim(sock: str, stamp_fd: int, vm_index: int, gap_s: float) -> None:
    import mmap

    import guestlib
    from backend_proc import SLOT, slot_offset, stamp_area_size

    g = await guestlib.connect_guest(sock, util_threshold=1, lazy_records=0)
    stamps = mmap.mmap(stamp_fd, stamp_area_size(2, VCPUS), flags=mmap.MAP_SHARED)
    d = g.driver
    rng = random.Random(11)
    counts = [SLOT.unpack_from(stamps, slot_offset(vm_index, v, VCPUS))[1] for v in range(2)]
    samples: list[tuple[int, int]] = []
    missed = 0
    stdin = select.poll()
    stdin.register(0, select.POLLIN)
    print("ready", flush=True)
    i = 0
    pending: tuple[int, int, int] | None = None  # vCPU, decisions to wait for, flush time

    def settle(p: tuple[int, int, int], limit_s: float) -> bool:
        """The decision stamp of ``p`` once it is there: a 0.5 ms sleep between looks (no spin on
        the CPU the back-end shares), the stamp itself says when the decision was made."""
        nonlocal missed
        v, want, t0 = p
        off = slot_offset(vm_index, v, VCPUS)
        end = time.monotonic() + limit_s
        while SLOT.unpack_from(stamps, off)[1] < want:
            if time.monotonic() > end:
                missed += 1
                counts[v] = SLOT.unpack_from(stamps, off)[1]  # start afresh from what was decided
                return False
            time.sleep(0.0005)
        ts = SLOT.unpack_from(stamps, off)[0]
        samples.append((t0, ts - t0))
        return True

    while not stdin.poll(0):
        time.sleep(rng.uniform(0, 2 * gap_s))
        if pending is not None:
            settle(pending, 5.0)
            pending = None
        v = i % 2
        d.set_util(v, 200 if (i // 2) % 2 else 800)  # always a change: always sent
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if d.flush() == 1:
            counts[v] += 1
            pending = (v, counts[v], t0)
        i += 1
    if pending is not None:
        settle(pending, 1.0)
    json.dump({"samples": samples, "missed": missed, "kicks": d.stats.kicks}, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    stamps.close()
    await g.close()


# -- the run ------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def summary_ms(delays_ns: list[int]) -> dict[str, Any]:
    if not delays_ns:
        return {"n": 0}
    ms = [x / 1e6 for x in delays_ns]
    return {"n": len(ms), "p50": round(pct(ms, 0.50), 3), "p99": round(pct(ms, 0.99), 3),
            "p99.9": round(pct(ms, 0.999), 3), "max": round(max(ms), 3)}


async def _spawn(code: str, *, pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=str(REPO), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, pass_fds=pass_fds, limit=64 << 20)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if line.strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"child not ready: {line!r}")
    return proc


async def run_path(path: str, cfg: Config, kinds: tuple[str, ...], tmp: str) -> dict[str, Any]:
    d = tempfile.mkdtemp(dir=tmp, prefix=f"{path}-")
    trials: list[dict[str, Any]] = []
    async with Backend(d, vms=2, vcpus=VCPUS, stamps=True, policy="engine", env=PATHS[path],
                       stderr_to=os.path.join(tmp, f"{path}-backend.log")) as be:
        pin_process(be.pid, SERVICE_CPU)
        assert be.stamp_fd is not None
        victim = await _spawn(
            f"import sys; sys.path[:0] = [{str(HERE)!r}]; from flood import victim_main; "
            f"victim_main({be.sock(0)!r}, {be.stamp_fd}, 0, {SERVICE_CPU}, 0.01)", pass_fds=(be.stamp_fd,))
        try:
            await asyncio.sleep(0.5)  # the victim's ring settles (on the lane: becomes busy, polled)
            for rnd in range(cfg.rounds):
                k = rnd % len(kinds)
                for kind in kinds[k:] + kinds[:k]:  # a rotated order each round
                    trials.append(await _trial(be, kind, rnd, cfg, victim.pid))
        finally:
            assert victim.stdin is not None and victim.stdout is not None
            victim.stdin.write(b"stop\n")
            await victim.stdin.drain()
            out = await asyncio.wait_for(victim.stdout.readline(), 30)
            await asyncio.wait_for(victim.wait(), 30)
        stats = await be.stats()
    got = json.loads(out)
    samples: list[tuple[int, int]] = got["samples"]
    by_kind: dict[str, list[int]] = {k: [] for k in kinds}
    for t in trials:
        mine = [dl for t0, dl in samples if t["start_ns"] <= t0 < t["end_ns"]]
        t["victim"] = summary_ms(mine)
        by_kind[t["kind"]].extend(mine)
    quiet = {k: [dl for t in trials if t["kind"] == k and t["environment"]["others_cores"] < QUIET_CORES
                 for t0, dl in samples if t["start_ns"] <= t0 < t["end_ns"]] for k in kinds}
    base, qbase = summary_ms(by_kind.get("none", [])), summary_ms(quiet.get("none", []))
    res: dict[str, Any] = {}
    for kind in kinds:
        s = summary_ms(by_kind[kind])
        mine_t = [t for t in trials if t["kind"] == kind]
        s["round_p99s"] = [t["victim"].get("p99") for t in mine_t]
        if base.get("n") and s.get("n"):
            s["p99_ratio"] = round(s["p99"] / base["p99"], 2)
            s["p99_added_ms"] = round(s["p99"] - base["p99"], 3)
        # the same over the trials during which the rest of the machine was quiet
        q = s["quiet"] = summary_ms(quiet[kind])
        if qbase.get("n") and q.get("n"):
            q["p99_ratio"] = round(q["p99"] / qbase["p99"], 2)
        s["flood_buffers_per_s"] = round(sum(t["flood_buffers_sent"] for t in mine_t) / sum(t["wall_s"] for t in mine_t))
        s["loadavg_1m"] = [t["loadavg"][0] for t in mine_t]
        s["backend_cores"] = [t["environment"]["backend_cores"] for t in mine_t]
        s["others_cores"] = [t["environment"]["others_cores"] for t in mine_t]
        s["backend_waiting_share"] = [t["environment"]["backend_waiting_share"] for t in mine_t]
        res[kind] = s
    ratios = [res[k]["p99_ratio"] for k in kinds if k != "none" and "p99_ratio" in res[k]]
    qratios = [res[k]["quiet"]["p99_ratio"] for k in kinds if k != "none" and "p99_ratio" in res[k]["quiet"]]
    return {"env": PATHS[path], "kinds": res, "trials": trials, "victim_missed": got["missed"],
            "victim_kicks": got["kicks"],
            "backend_errors": {k: stats.get(k) for k in ("sessions_closed", "interrupts_dropped")},
            "worst_p99_ratio": max(ratios) if ratios else None,
            "met": bool(ratios) and max(ratios) <= TARGET_RATIO,
            "quiet_worst_p99_ratio": max(qratios) if qratios else None,
            "quiet_kinds": sum(1 for k in kinds if k != "none" and "p99_ratio" in res[k]["quiet"])}


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total


async def _trial(be: Backend, kind: str, rnd: int, cfg: Config, victim_pid: int) -> dict[str, Any]:
    if cfg.wait_quiet_s > 0:
        await wait_quiet(cfg.wait_quiet_s, QUIET_CORES)
    load = loadavg()
    ours = [os.getpid(), be.pid, victim_pid]
    proc = None
    if kind != "none":
        proc = await _spawn(f"from tests.floodlib import flooder_main; flooder_main({be.sock(1)!r}, "
                            f"{cfg.lead_s + cfg.trial_s + 0.1}, {kind!r}, {FLOOD_CPU})")
        pin_process(be.pid, SERVICE_CPU)  # threads started since (the kick lane's) too
        ours.append(proc.pid)
    busy0, cpu0, wait0, be0 = system_busy()[0], _cpu_s(ours), proc_run_delay_seconds(be.pid), _cpu_s([be.pid])
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    start, end = now + int(cfg.lead_s * 1e9), now + int((cfg.lead_s + cfg.trial_s) * 1e9)
    t_wall = time.monotonic()
    await asyncio.sleep(cfg.lead_s + cfg.trial_s)
    span = time.monotonic() - t_wall
    busy1, cpu1, wait1, be1 = system_busy()[0], _cpu_s(ours), proc_run_delay_seconds(be.pid), _cpu_s([be.pid])
    environment = {
        # CPU of every other process on the machine (system busy time less this bench's processes)
        "others_cores": round(max(0.0, (busy1 - busy0) / CLK_TCK - (cpu1 - cpu0)) / span, 3),
        "backend_cores": round((be1 - be0) / span, 3),
        # the back-end's threads runnable but waiting for a CPU, per second
        "backend_waiting_share": round((wait1 - wait0) / span, 3),
    }
    sent = 0
    if proc is not None:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise RuntimeError(f"flooder {kind} failed (rc {proc.returncode}): {out[-500:]!r}")
        sent = int(out.split()[-1])
    wall = time.monotonic() - t_wall  # the flooder's life, about: its buffers per second
    if proc is not None:
        await asyncio.sleep(0.2)  # the back-end closes its session before the next one connects
    log(f"  {kind:13s} round {rnd}: loadavg {load[0]:.2f}")
    return {"kind": kind, "round": rnd, "start_ns": start, "end_ns": end, "loadavg": load, "wall_s": round(wall, 3),
            "flood_buffers_sent": sent,
            "environment": environment}


def _j(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# Flood isolation ({r['config']['name']}), {m['date']}", "",
             f"{m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
             f"back-end and victim on CPU {SERVICE_CPU}, flooder on CPU {FLOOD_CPU}; "
             f"{r['config']['rounds']} trial(s) of {r['config']['trial_s']} s per kind, interleaved; "
             f"load average {r['loadavg_start']} at start, {r['loadavg_end']} at end.", "",
             "Victim delay, flush -> decision (ms); ratio = p99 / the same path's p99 with no flood.", "",
             f"Per trial (a/b/..): the back-end's CPU, the share of time it waited for a CPU, every other "
             f"process's CPU, the 1-minute load average.  Quiet: only the trials during which other "
             f"processes used under {QUIET_CORES} cores (n, p99, ratio to the quiet no-flood p99).", "",
             "| path | flood | n | p50 | p99 | p99.9 | p99 ratio | quiet: n, p99, ratio | flooder buffers/s "
             "| back-end cores | back-end waiting | others' cores | load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, pr in r["paths"].items():
        if "skipped" in pr:
            lines.append(f"| {path} | skipped: {pr['skipped']} |||||||||")
            continue
        for kind, s in pr["kinds"].items():
            if not s.get("n"):
                lines.append(f"| {path} | {kind} | 0 |||||||")
                continue
            ratio = s.get("p99_ratio", "")
            q = s["quiet"]
            qs = f"{q['n']}, {q['p99']}, {q.get('p99_ratio', '-')}" if q.get("n") else "0"
            lines.append(f"| {path} | {kind} | {s['n']} | {s['p50']} | {s['p99']} | {s['p99.9']} | {ratio} | {qs} | "
                         f"{s['flood_buffers_per_s']:,} | {_j(s['backend_cores'])} | {_j(s['backend_waiting_share'])} | "
                         f"{_j(s['others_cores'])} | {_j(s['loadavg_1m'])} |")
    lines += ["", f"Target: every flood's p99 ratio <= {TARGET_RATIO}."]
    for path, pr in r["paths"].items():
        if "skipped" not in pr:
            lines.append(f"* {path}: worst ratio {pr['worst_p99_ratio']} - {'MET' if pr['met'] else 'MISS'}; "
                         f"over quiet trials {pr['quiet_worst_p99_ratio']} ({pr['quiet_kinds']} of "
                         f"{len(pr['kinds']) - 1} floods had a quiet trial)")
    return "\n".join(lines) + "\n"


async def main(args: argparse.Namespace) -> int:
    from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane

    cfg = CONFIGS[args.config]
    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    if "none" not in kinds:
        kinds = ("none", *kinds)
    paths = args.paths.split(",") if args.paths else list(PATHS)
    dp = dataplane()
    r: dict[str, Any] = {"machine": machine_info(), "config": vars(cfg), "dataplane": dp.detail,
                         "loadavg_start": loadavg(), "paths": {}}
    with tempfile.TemporaryDirectory(prefix="vuc-flood-") as tmp:
        for path in paths:
            if path != "loop-python" and dp.kind != "c":
                r["paths"][path] = {"skipped": f"no C data plane: {dp.detail}"}
                continue
            log(f"path {path}")
            r["paths"][path] = await run_path(path, cfg, kinds, tmp)
    r["loadavg_end"] = loadavg()
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = Path(args.json) if args.json else out / f"{stamp}-flood.json"
    mpath = Path(args.md) if args.md else out / f"{stamp}-flood.md"
    jpath.write_text(json.dumps(r, indent=1) + "\n")
    md = markdown(r)
    mpath.write_text(md)
    print(md)
    log(f"wrote {jpath} and {mpath}")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="config", action="store_const", const="quick")
    g.add_argument("--tiny", dest="config", action="store_const", const="tiny")
    p.set_defaults(config="full")
    p.add_argument("--paths", default="", help=f"comma-separated, of {', '.join(PATHS)} (default: all)")
    p.add_argument("--kinds", default="", help=f"comma-separated, of {', '.join(MODES)} (none is always run)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--json", default="", help="write the JSON here instead of --out-dir/<date>-flood.json")
    p.add_argument("--md", default="", help="write the table here instead of --out-dir/<date>-flood.md")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
