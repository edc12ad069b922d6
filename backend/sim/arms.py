"""The four ways a guest's frequency wish can reach the host, on the same trace.

Theory of operation: the guest governor calls :meth:`Arm.on_guest` with each
vCPU's util (0..1024 of the vCPU) and frequency request whenever it
re-evaluates; :meth:`Arm.on_tick` runs on each running vCPU's guest tick.  An
arm answers with clamp changes ``(when, vcpu, uclamp_min)`` that the host
applies at ``when``, and with *steal*: vCPU time spent in exits, which
the guest does not get to run in (and the host CPU is busy for).

- ``baseline``: no channel; the host sees only how busy the vCPU threads are.
- ``device``: this project: the real guest driver model's notification rules
  (``guest.driver.CpufreqDriver`` over an in-memory ring, :mod:`.devicearm`)
  and the real policy engine (``backend.policy.engine.ClampEngine``), each
  decision landing ``latency`` after the kick (the benchmark's figure).
- ``upstream``: Linux's virtual-cpufreq: every frequency change the guest's
  governor makes is an MMIO exit to the VMM, which sets the clamp at once;
  every guest tick of a running vCPU reads the frequency, one more exit.
- ``hypercall``: in-kernel hypercall, the request applied with no latency.

The three channels map a request to a clamp the same way (``perf_to_clamp``
with the engine's headroom) and respect the VM's floor and ceiling, so the
arms differ only in when and how often a request lands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policy.engine import EngineConfig, VcpuPlacement, VmLimits, bound, perf_to_clamp

__all__ = ["ArmSettings", "Arm", "Baseline", "Upstream", "Hypercall", "ARMS",
           "DEVICE_LATENCY_S", "EXIT_COST_S"]

#: kick -> decision p99 on an idle back-end, README "Performance" (53.1 us,
#: bench/bench_latency.py, 2026-11 runs): drain, engine and actuator included.
DEVICE_LATENCY_S = 53.1e-6
#: one MMIO exit to a user-space VMM and back, with the VMM's work: an
#: assumption (a few us on arm64 KVM, more with the VMM's sched_setattr);
#: change it with ``--exit-cost-us``.
EXIT_COST_S = 10e-6

ARMS = ("baseline", "upstream", "device", "hypercall")

Clamp = tuple[float, int, int]  # (when, vcpu, uclamp_min)


@dataclass(frozen=True, slots=True)
class ArmSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: VmLimits = field(default_factory=VmLimits)
    device_latency_s: float = DEVICE_LATENCY_S
    exit_cost_s: float = EXIT_COST_S
    urgent_delta: int = 128
    lazy_deadline_s: float = 0.032
    util_threshold: int = 8


class Arm:
    name = "arm"

    def __init__(self, places: list[VcpuPlacement], settings: ArmSettings) -> None:
        self.places = places
        self.settings = settings
        self.steal = [0.0] * len(places)
        self.exits = 0
        self.requests = 0
        self._out: list[Clamp] = []

    def start(self, now: float) -> None:
        """Before the first step."""

    def on_guest(self, vcpu: int, util: int, perf_khz: int, now: float) -> None:
        """The guest governor re-evaluated ``vcpu``."""

    def on_tick(self, vcpu: int, now: float) -> None:
        """A guest tick on a running ``vcpu``."""

    def advance(self, now: float, until: float) -> list[Clamp]:
        """Clamp changes decided in ``[now, until)``."""
        out, self._out = self._out, []
        return out

    def finish(self) -> None:
        """After the last step."""

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "exits": self.exits}


class Baseline(Arm):
    name = "baseline"


class Hypercall(Arm):
    """The guest's request applied the moment its governor changes its mind."""

    name = "hypercall"
    exit_cost = 0.0
    latency = 0.0
    exits_per_tick = False

    def __init__(self, places: list[VcpuPlacement], settings: ArmSettings) -> None:
        super().__init__(places, settings)
        self._last = [-1] * len(places)

    def on_guest(self, vcpu: int, util: int, perf_khz: int, now: float) -> None:
        if perf_khz == self._last[vcpu]:
            return  # the guest's cpufreq core calls the driver only on a change
        self._last[vcpu] = perf_khz
        self.requests += 1
        p = self.places[vcpu]
        clamp = bound(perf_to_clamp(perf_khz, p.max_khz, p.pcpu_capacity, self.settings.engine.headroom),
                      self.settings.limits, p.pcpu_capacity)
        self._exit(vcpu)
        self._out.append((now + self.latency, vcpu, clamp))

    def on_tick(self, vcpu: int, now: float) -> None:
        if self.exits_per_tick:
            self._exit(vcpu)

    def _exit(self, vcpu: int) -> None:
        if self.exit_cost:
            self.exits += 1
            self.steal[vcpu] += self.exit_cost


class Upstream(Hypercall):
    """virtual-cpufreq: an exit per request, and one per tick per running vCPU to read the frequency."""

    name = "upstream"
    exits_per_tick = True

    def __init__(self, places: list[VcpuPlacement], settings: ArmSettings) -> None:
        super().__init__(places, settings)
        self.exit_cost = settings.exit_cost_s
        self.latency = settings.exit_cost_s
