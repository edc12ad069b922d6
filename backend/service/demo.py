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
from ..sim.hostmodel import load_host
from ..sim.run import SimOptions, simulate
from ..sim.workload import TaskSpec, Workload
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

    interrupted_at: float | None = None
    try:
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
                _draw(out, tty, now - start, opts, driver, policy, vmap, host_cur,
                      opts.thermal_cap_khz if cap_from <= now < cap_to else None, slot)
            await asyncio.sleep(TICK_MS / 1000)
    except asyncio.CancelledError:
        # Ctrl-C (asyncio.run cancels this task): stop the guest, then report what ran so far.
        interrupted_at = loop.time() - start

    # Send what the driver still holds back (SPEC 6.4), let the last notification land, then compare views.
    driver.kick_held()
    await asyncio.sleep(0.15)
    if driver.config_changed.is_set():
        on_guest_refresh()
    guest_view = [driver.cur_khz(v) for v in range(opts.vcpus)]
    host_view = [host_cur[vmap[v]] for v in range(opts.vcpus)]
    c = slot.counters
    summary = {
        "seconds": opts.duration if interrupted_at is None else round(interrupted_at, 3),
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
    _print_summary(out, summary, interrupted=interrupted_at is not None)
    return summary


_DOMAIN_NAMES = ("little A55", "mid A76", "big X1")
_BAR = 10  # columns of the utilisation bar: full at 1024


def _why(v: int, vmap: tuple[int, ...], wants: dict[int, int], runs_khz: int, cap_khz: int | None) -> str:
    """Why the host runs vCPU v's cluster at other than the policy's pick for v (the demo's last column)."""
    if v not in wants:
        return "no record yet"
    dom = vmap[v]
    opp = _opp_at_or_above(PIXEL6_OPPS_KHZ[dom], wants[v])
    if runs_khz == opp:
        return "" if opp == wants[v] else "next OPP up"
    if cap_khz is not None and dom == 2 and runs_khz == cap_khz < opp:
        return f"thermal cap {cap_khz // 1000} MHz"
    rivals = [u for u in wants if u != v and vmap[u] == dom and wants[u] > wants[v]]
    if runs_khz > opp and rivals:
        return f"cluster shared with vCPU {max(rivals, key=wants.__getitem__)}"
    return "host steps every 100 ms"


def _draw(out: TextIO, tty: bool, t: float, opts: DemoOptions, driver: CpufreqDriver, policy: RecordingPolicy,
          vmap: tuple[int, ...], host_cur: list[int], cap_khz: int | None, slot: VmSlot) -> None:
    lines = [
        f"vhost-user-cpufreq demo  t={t:4.1f}s/{opts.duration:.0f}s  VM 'demo', {opts.vcpus} vCPUs on a Pixel 6 host"
        + (f"  [thermal cap: big cluster at most {cap_khz // 1000} MHz]" if cap_khz is not None else ""),
        "",
        f"{'vCPU':>4}  {'cluster':<10}  {'guest util':<16}  {'policy wants':>12}  {'host runs':>9}  "
        f"{'guest sees':>10}  why host runs differs",
    ]
    wants = {v: dec.target_khz for v, dec in policy.latest.get("demo", {}).items()}
    for v in range(opts.vcpus):
        util = slot.device.vcpus[v].util
        bar = "#" * min(_BAR, util * _BAR // 1024)
        runs = host_cur[vmap[v]]
        want = f"{wants[v] / 1000:.0f} MHz" if v in wants else "-"
        lines.append(
            f"{v:>4}  {_DOMAIN_NAMES[vmap[v]]:<10}  {util:>4} {bar:<{_BAR}}  {want:>12}  {runs / 1000:>5.0f} MHz  "
            f"{driver.cur_khz(v) / 1000:>6.0f} MHz  {_why(v, vmap, wants, runs, cap_khz)}".rstrip()
        )
    s = driver.stats
    lines += [
        "",
        f"guest: {s.records} records in {s.batches} batches, {s.kicks} kicks, "
        f"{s.config_refreshes} config refreshes   back-end: {slot.counters.get('records')} records, "
        f"{slot.counters.total('rejected')} rejected",
        "host runs: the cluster's frequency, set every 100 ms to the highest any of its vCPUs asks,",
        "rounded up to an OPP; guest sees: what the device's config space told the guest",
    ]
    text = "\n".join(lines)
    if tty:
        out.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        out.write(text + "\n\n")
    out.flush()


#: What each summary key means, printed beside it (the keys stay machine-readable: tests parse them).
_SUMMARY_MEANING = {
    "seconds": "how long the guest ran",
    "records_sent": "utilisation records the guest's driver sent",
    "records_received": "records the back-end took from the request queue",
    "batches": "buffers they travelled in",
    "kicks": "notifications the guest sent (the device asks only for rises, SPEC 6.4)",
    "kicks_per_record": "",
    "config_notifications": "config change notifications: one per host frequency change that reached the guest",
    "config_reads": "4-byte config space reads by the guest, each after a notification",
    "rejected": "records or buffers the back-end refused (0 from a well-behaved guest)",
    "guest_matches_host": "1 when the guest's view of every vCPU's frequency equals the host's at the end",
    "median_mirror_lag_ms": "host frequency change -> the guest's refreshed view, median",
}


def _print_summary(out: TextIO, summary: dict[str, float], *, interrupted: bool) -> None:
    head = f"Summary (interrupted after {summary['seconds']:.1f} s)" if interrupted else "Summary"
    print("\n" + head, file=out)
    for key, value in summary.items():
        shown = f"{value:.3f}" if isinstance(value, float) else f"{value}"
        meaning = _SUMMARY_MEANING.get(key, "")
        print(f"  {key:22} {shown:<10} {meaning}".rstrip(), file=out)


def what_the_guest_gained(opts: DemoOptions) -> dict[str, float]:
    """The demo's load through the simulator (backend/sim) on the Pixel 6 model, without and with the device.

    The same seeded bursts per vCPU: each tick's busy share becomes a job of
    that much work at the vCPU's top speed, due by the end of the next tick.
    """
    vmap = _vcpu_domains(opts.vcpus)
    first = {0: 0, 1: 4, 2: 6}
    pcpus = []
    for dom in vmap:
        pcpus.append(first[dom])
        first[dom] += 1
    caps = [d.capacity for d in PIXEL6.domains]
    work = BurstyWorkload(opts.vcpus, seed=opts.seed)
    ticks = int(opts.duration * 1000 / TICK_MS)
    jobs: list[list[tuple[float, float]]] = [[] for _ in range(opts.vcpus)]
    for k in range(ticks):
        for v in range(opts.vcpus):
            b = work.busy(v, TICK_MS)
            if b > 0:
                jobs[v].append((k * TICK_MS, b * TICK_MS * caps[vmap[v]] / 1024))
    tasks = tuple(TaskSpec(f"vcpu{v}", "trace", 1.0, deadline_ms=2 * TICK_MS, vcpus=(v,), releases=tuple(jobs[v]))
                  for v in range(opts.vcpus) if jobs[v])
    wl = Workload("demo", "the demo's bursty load", opts.duration, opts.seed, tasks, "demo")
    host = load_host("gs101")
    res = {arm: simulate(host, wl, arm, opts=SimOptions(pcpus=tuple(pcpus))) for arm in ("baseline", "device")}
    return {f"{arm}_{k}": v for arm, r in res.items()
            for k, v in (("on_time", r.frames_on_time), ("energy_j", r.energy_j), ("perf_per_j", r.perf_per_joule))}


def _print_gain(out: TextIO, g: dict[str, float], opts: DemoOptions) -> None:
    gain = (g["device_perf_per_j"] / g["baseline_perf_per_j"] - 1) * 100 if g["baseline_perf_per_j"] else 0.0
    print(f"\nWhat the guest gained: the same {opts.duration:g} s of this load through the simulator "
          "(a Pixel 6 model; see docs/simulator.md)", file=out)
    print(f"  without the device: {g['baseline_on_time'] * 100:5.1f}% of the guest's bursts done in time, "
          f"{g['baseline_energy_j']:.2f} J", file=out)
    print(f"  with the device:    {g['device_on_time'] * 100:5.1f}% done in time, {g['device_energy_j']:.2f} J; "
          f"work done in time per joule {gain:+.0f}%", file=out)
    print("  the host alone sees only how busy each vCPU thread was; with the device it hears what the guest wants.",
          file=out)
    print("  Four arms and real workloads: vhost-user-cpufreq simulate --host gs101 --workload frames", file=out)


def main(args: argparse.Namespace) -> int:
    opts = DemoOptions(duration=args.duration, vcpus=args.vcpus, seed=args.seed, refresh=args.refresh,
                       plain=args.plain)
    summary = asyncio.run(run_demo(opts))
    if summary["seconds"] < opts.duration:
        return 130  # interrupted (Ctrl-C), as a shell reports SIGINT
    _print_gain(sys.stdout, what_the_guest_gained(opts), opts)
    return 0 if summary["records_received"] == summary["records_sent"] and summary["guest_matches_host"] else 1
