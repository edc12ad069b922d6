"""``vhost-user-cpufreq demo``: the whole path on one machine, no QEMU, no root.

One process runs the service (listening on a real unix socket) and a modelled
guest: a Python vhost-user front-end with memfd guest RAM and a cpufreq
driver model whose vCPUs run a bursty workload.  A small host model plays the
host governor: every 100 ms each domain's frequency follows what the policy
decided for the vCPUs in it (the OPP at or above schedutil's pick), except
while a thermal cap holds the big cluster down in the middle of the run.  The
guest learns every change from CONFIG_CHANGE_MSG, never by polling.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import TextIO

from vhost_user_cpufreq.guest.driver import CpufreqDriver
from vhost_user_cpufreq.guest.frontend import connect_guest
from vhost_user_cpufreq.guest.workload import BurstyWorkload, PeltTracker

from ..cpufreq.hostfreq import StaticSource
from ..host.hosts import PIXEL6, PIXEL6_OPPS_KHZ
from ..policy.decision import RecordingPolicy
from .vms import Service, VmConfig, VmSlot

__all__ = ["DemoOptions", "run_demo"]

TICK_MS = 4.0


@dataclass
class DemoOptions:
    duration: float = 8.0
    vcpus: int = 4
    seed: int = 1
    refresh: float = 0.5
    thermal_cap_khz: int = 1426000
    plain: bool = False  # no screen redraw, one block per refresh


def _vcpu_domains(n: int) -> tuple[int, ...]:
    # Spread vCPUs over the little, mid and big clusters, little first (consecutive ids per domain).
    pcpus = [0, 4, 6, 1, 5, 7, 2, 3][:n]
    return tuple(sorted(0 if p < 4 else 1 if p < 6 else 2 for p in pcpus))


def _opp_at_or_above(opps: tuple[int, ...], khz: int) -> int:
    i = bisect.bisect_left(opps, khz)
    return opps[min(i, len(opps) - 1)]


async def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> dict[str, float]:
    if not 1 <= opts.vcpus <= 8:
        raise SystemExit("--vcpus must be 1..8 (the embedded host has 8 CPUs)")
    source = StaticSource(PIXEL6)
    policy = RecordingPolicy()
    service = Service(source, policy)
    tmp = tempfile.mkdtemp(prefix="vuc-demo-")
    sock_path = os.path.join(tmp, "demo.sock")
    vmap = _vcpu_domains(opts.vcpus)
    slot = await service.add_vm(VmConfig("demo", sock_path, vmap, notify_interval=0.05))

    guest = await connect_guest(sock_path)
    fe, transport, driver = guest.fe, guest.transport, guest.driver

    work = BurstyWorkload(opts.vcpus, seed=opts.seed)
    pelt = [PeltTracker() for _ in range(opts.vcpus)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    cap_from, cap_to = start + opts.duration * 0.4, start + opts.duration * 0.7
    # Draw between host steps, once the latest change has had time to reach the guest.
    next_host, next_draw = start, start + 0.08
    tty = out.isatty() and not opts.plain
    lag_samples: list[float] = []
    changed_at: float | None = None
    host_cur = [d.cur_khz for d in PIXEL6.domains]

    def on_guest_refresh() -> None:
        nonlocal changed_at
        if changed_at is not None:
            lag_samples.append(loop.time() - changed_at)
            changed_at = None

    while (now := loop.time()) < start + opts.duration:
        for v in range(opts.vcpus):
            driver.set_util(v, pelt[v].step(work.busy(v, TICK_MS), TICK_MS))
        driver.flush()
        if now >= next_host:
            next_host += 0.1
            want = [d.min_khz for d in PIXEL6.domains]
            for v, dec in policy.latest.get("demo", {}).items():
                dom = vmap[v]
                want[dom] = max(want[dom], _opp_at_or_above(PIXEL6_OPPS_KHZ[dom], dec.target_khz))
            if cap_from <= now < cap_to:
                want[2] = min(want[2], opts.thermal_cap_khz)
            if want != host_cur:
                host_cur = want
                source.set_frequencies(want)
                changed_at = loop.time()
        if driver.config_changed.is_set():
            driver.config_changed.clear()
            on_guest_refresh()
        if now >= next_draw:
            next_draw += opts.refresh
            _draw(out, tty, now - start, opts, driver, policy, vmap, host_cur, cap_from <= now < cap_to, slot)
        await asyncio.sleep(TICK_MS / 1000)

    # Send what the driver still holds back (SPEC 6.4), let the last notification land, then compare views.
    driver.kick_held()
    await asyncio.sleep(0.15)
    if driver.config_changed.is_set():
        on_guest_refresh()
    guest_view = [driver.cur_khz(v) for v in range(opts.vcpus)]
    host_view = [host_cur[vmap[v]] for v in range(opts.vcpus)]
    c = slot.counters
    summary = {
        "seconds": opts.duration,
        "records_sent": driver.stats.records,
        "records_received": c.get("records"),
        "batches": driver.stats.batches,
        "kicks": driver.stats.kicks,
        "kicks_per_record": driver.stats.kicks / max(1, driver.stats.records),
        "config_notifications": fe.config_change_msgs,
        "config_reads": transport.config_reads,
        "rejected": c.total("rejected"),
        "guest_matches_host": float(guest_view == host_view),
        "median_mirror_lag_ms": 1000 * sorted(lag_samples)[len(lag_samples) // 2] if lag_samples else float("nan"),
    }
    await guest.close()
    await asyncio.sleep(0.05)
    await service.close()
    os.rmdir(tmp)
    print("\nSummary", file=out)
    for key, value in summary.items():
        print(f"  {key:22} {value:.3f}" if isinstance(value, float) else f"  {key:22} {value}", file=out)
    return summary


def _draw(out: TextIO, tty: bool, t: float, opts: DemoOptions, driver: CpufreqDriver, policy: RecordingPolicy,
          vmap: tuple[int, ...], host_cur: list[int], capped: bool, slot: VmSlot) -> None:
    names = ("little A55", "mid A76", "big X1")
    lines = [
        f"vhost-user-cpufreq demo  t={t:4.1f}s/{opts.duration:.0f}s  VM 'demo', {opts.vcpus} vCPUs on a Pixel 6 host"
        + ("  [thermal cap on big cluster]" if capped else ""),
        "",
        f"{'vCPU':>4}  {'domain':<10} {'guest util':>10}  {'policy wants':>12}  {'host runs':>10}  {'guest sees':>10}",
    ]
    latest = policy.latest.get("demo", {})
    for v in range(opts.vcpus):
        dec = latest.get(v)
        util = slot.device.vcpus[v].util
        bar = "#" * (util * 10 // 1024)
        lines.append(
            f"{v:>4}  {names[vmap[v]]:<10} {util:>5} {bar:<5} "
            f"{(dec.target_khz / 1000 if dec else 0):>9.0f} MHz {host_cur[vmap[v]] / 1000:>6.0f} MHz "
            f"{driver.cur_khz(v) / 1000:>6.0f} MHz"
        )
    s = driver.stats
    lines += [
        "",
        f"guest: {s.records} records in {s.batches} batches, {s.kicks} kicks, "
        f"{s.config_refreshes} config refreshes   backend: {slot.counters.get('records')} records, "
        f"{slot.counters.total('rejected')} rejected",
    ]
    text = "\n".join(lines)
    if tty:
        out.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        out.write(text + "\n\n")
    out.flush()


def main(args: argparse.Namespace) -> int:
    opts = DemoOptions(duration=args.duration, vcpus=args.vcpus, seed=args.seed, refresh=args.refresh,
                       plain=args.plain)
    summary = asyncio.run(run_demo(opts))
    return 0 if summary["records_received"] == summary["records_sent"] and summary["guest_matches_host"] else 1
