"""One simulated run: a workload in a VM on a host, through one arm.

Theory of operation: time advances in fixed steps ``dt`` (1 ms, a quarter of
the 4 ms tick).  Each step: releases are placed; each domain's schedutil
looks at its CPUs (a scheduler event: wake-ups and the tick); clamp changes
the arm decided land at their own instants inside the step, each one a new
schedutil look (``sched_setattr`` re-enqueues the thread); each vCPU runs
its queue at the speed of its pCPU's frequency pieces; host and guest PELT
advance (a vCPU thread whose vCPU went idle updates its util_est, as a
task that sleeps does); the guest governor re-evaluates the vCPUs that had a wake-up or a
tick, and the arm hears it.  vCPU i is pinned 1:1 to pCPU i (the engine's
``plan_pinning`` order: little CPUs on low vCPU ids); one VM owns the host.
Energy is each busy pCPU's energy-model power at its OPP.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from vhost_user_cpufreq.protocol import cpufreq as abi

from ..policy.engine import CAPACITY_SCALE, VcpuPlacement
from .arms import ARMS, Arm, ArmSettings, Baseline, Hypercall, Upstream
from .guest import Guest
from .hostmodel import Host
from .pelt import Pelt, UtilEst
from .schedutil import DomainGovernor, effective_util
from .workload import Workload

__all__ = ["RunResult", "SimOptions", "simulate", "TICK_S", "STEP_S"]

TICK_S = 0.004  # CONFIG_HZ=250, Android's and most distributions'
STEP_S = 0.001


@dataclass(frozen=True, slots=True)
class SimOptions:
    dt: float = STEP_S
    tick: float = TICK_S
    duration_s: float | None = None  # None: the workload's
    vcpus: int | None = None  # None: one per host CPU, at most 8
    pcpus: tuple[int, ...] | None = None  # vCPU i pinned on pcpus[i] (None: on pCPU i)
    uclamp_floor: int = 0  # a static uclamp_min on every vCPU thread (property tests)
    uclamp_max: int = CAPACITY_SCALE
    trace_every: int = 5  # keep one frequency sample every N steps


@dataclass
class RunResult:
    arm: str
    host: str
    workload: str
    duration_s: float
    energy_j: float
    chains: dict[str, dict[str, float]]
    clamp_changes: int
    freq_changes: int
    migrations: int
    arm_stats: dict[str, int]
    trace_t: list[float] = field(default_factory=list)
    trace_khz: list[list[int]] = field(default_factory=list)  # per domain
    max_clamp: int = 0

    @property
    def frames_on_time(self) -> float:
        """On-time share of the deadline chains' releases, 0..1 (nan: no deadlines)."""
        rel = sum(c["released"] for c in self.chains.values() if c["deadline"])
        on = sum(c["on_time"] for c in self.chains.values() if c["deadline"])
        return on / rel if rel else math.nan

    @property
    def perf(self) -> float:
        """Work (work-ms) of jobs done on time: what the user got."""
        return sum(c["work_on_time"] for c in self.chains.values())

    @property
    def perf_per_joule(self) -> float:
        return self.perf / self.energy_j if self.energy_j > 0 else 0.0


def placements(host: Host, n: int, pcpus: tuple[int, ...] | None = None
               ) -> tuple[list[VcpuPlacement], abi.DeviceConfig]:
    cpus = list(pcpus) if pcpus else sorted(c for d in host.domains for c in d.cpus)[:n]
    doms = [host.domain_of(c) for c in cpus]
    used = sorted({d.index for d in doms})
    dev_index = {d: i for i, d in enumerate(used)}
    places = [VcpuPlacement(v, cpus[v], d.capacity, d.capacity, d.max_khz, dev_index[d.index])
              for v, d in enumerate(doms)]
    cfg = abi.DeviceConfig(1, tuple(abi.Domain(host.domains[i].min_khz, host.domains[i].min_khz,
                                               host.domains[i].max_khz, host.domains[i].capacity) for i in used),
                           tuple(p.domain for p in places))
    return places, cfg


def make_arm(name: str, places: list[VcpuPlacement], cfg: abi.DeviceConfig, settings: ArmSettings) -> Arm:
    if name == "device":
        from .devicearm import DeviceArm  # the guest driver model comes in only for this arm
        return DeviceArm(places, settings, cfg)
    arm: type[Arm] = {"baseline": Baseline, "upstream": Upstream, "hypercall": Hypercall}[name]
    return arm(places, settings)


def simulate(host: Host, workload: Workload, arm_name: str, settings: ArmSettings = ArmSettings(),
             opts: SimOptions = SimOptions()) -> RunResult:
    if arm_name not in ARMS:
        raise ValueError(f"unknown arm {arm_name!r}: one of {', '.join(ARMS)}")
    dt = opts.dt
    n = len(opts.pcpus) if opts.pcpus else min(opts.vcpus or 8, host.num_cpus, 8)
    places, cfg = placements(host, n, opts.pcpus)
    doms = [host.domain_of(p.pcpu or 0) for p in places]
    govs = {d.index: DomainGovernor(d) for d in host.domains if any(x.index == d.index for x in doms)}
    members = {i: [v for v in range(n) if doms[v].index == i] for i in govs}
    guest = Guest(workload, [p.vcpu_capacity for p in places], dt)
    arm = make_arm(arm_name, places, cfg, settings)
    host_pelt = [Pelt(dt) for _ in range(n)]
    host_est = [UtilEst() for _ in range(n)]  # each vCPU thread's util_est: it sleeps when its vCPU idles
    uclamp = [opts.uclamp_floor] * n
    duration = opts.duration_s or workload.duration_s
    steps = int(round(duration / dt))
    tick_steps = max(1, int(round(opts.tick / dt)))
    energy = 0.0
    clamp_changes = 0
    max_clamp = 0
    pending: list[tuple[float, int, int, int]] = []  # heap of (when, seq, vcpu, value)
    seq = 0
    trace_t: list[float] = []
    trace_khz: list[list[int]] = [[] for _ in govs]
    gov_list = list(govs.values())

    def look(i: int, now: float, runnable: list[bool]) -> None:
        g = govs[i]
        g.update(now, [effective_util(host_pelt[v].util, runnable[v], uclamp[v], opts.uclamp_max,
                                      g.dom.capacity, host_est[v].ewma) for v in members[i]])

    arm.start(0.0)
    for k in range(steps):
        t0 = k * dt
        t1 = t0 + dt
        guest.release_due(t1)
        runnable = [bool(q) or arm.steal[v] > 0 for v, q in enumerate(guest.queues)]
        for i in govs:
            look(i, t0, runnable)
        for when, v, value in arm.advance(t0, t1):
            heapq.heappush(pending, (max(when, t0), seq, v, value))
            seq += 1
        while pending and pending[0][0] < t1:
            when, _, v, value = heapq.heappop(pending)
            value = max(value, opts.uclamp_floor)
            if value != uclamp[v]:
                clamp_changes += 1
                uclamp[v] = value
                max_clamp = max(max_clamp, value)
                look(doms[v].index, when, runnable)
        pieces = {i: g.segments(t0, t1) for i, g in govs.items()}
        scale = [0.0] * n
        for v in range(n):
            d = doms[v]
            speed = [(dur, d.capacity * khz / d.max_khz / CAPACITY_SCALE) for dur, khz in pieces[d.index]]
            steal = arm.steal[v]
            arm.steal[v] = 0.0
            busy, weighted = guest.run(v, t0, speed, steal)
            # Energy: busy time at the mean power of the step's pieces.
            power = sum(dur * d.power(khz) for dur, khz in pieces[d.index]) / dt
            energy += busy * power * 1e-6
            host_pelt[v].step(1.0, weighted / dt * CAPACITY_SCALE)
            if runnable[v] and not guest.queues[v]:
                host_est[v].dequeue(host_pelt[v].util, capacity=d.capacity)
            scale[v] = sum(dur * d.capacity * khz / d.max_khz for dur, khz in pieces[d.index]) / dt
        guest.update_pelt(dt, scale)
        vutil = guest.vcpu_util()
        ticking = [v for v in range(n) if (k - v * tick_steps // n) % tick_steps == 0 and guest.queues[v]]
        for v in sorted(guest.events | set(ticking)):
            p = places[v]
            util = min(CAPACITY_SCALE, int(max(vutil[v], guest.vcpu_boost(v)) * CAPACITY_SCALE / p.vcpu_capacity))
            want = 1.25 * p.max_khz * util / CAPACITY_SCALE
            perf = doms[v].opp_at_least(want).khz
            arm.on_guest(v, util, perf, t1)
        guest.events.clear()
        for v in ticking:
            arm.on_tick(v, t1)
        if k % opts.trace_every == 0:
            trace_t.append(t0)
            for j, g in enumerate(gov_list):
                trace_khz[j].append(g.cur_khz)
    arm.finish()
    chains = {}
    for c in guest.chains:
        lat = sorted(c.latencies)
        has_dl = any(t.chain is c and t.spec.deadline_ms for t in guest.tasks)
        periodic = any(t.chain is c and t.spec.kind == "periodic" for t in guest.tasks)
        chains[c.name] = {
            "released": c.released, "dropped": c.dropped, "completed": c.completed, "on_time": c.on_time,
            "work_on_time": round(c.work_on_time, 3), "deadline": bool(has_dl),
            "frames": bool(has_dl and periodic),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3) if lat else math.nan,
            "p95_ms": round(lat[int(len(lat) * 0.95)] * 1000, 3) if lat else math.nan,
            "finished_s": round(c.finished_at, 4) if c.finished_at is not None else math.nan,
        }
    return RunResult(arm_name, host.name, workload.name, duration, energy, chains, clamp_changes,
                     sum(g.changes for g in gov_list), guest.migrations, arm.stats(), trace_t, trace_khz, max_clamp)
