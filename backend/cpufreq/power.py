"""Power per performance state: Linux's energy model formula, and the table a guest is given.

Theory of operation: where a host description has per-OPP voltages and the
CPUs' ``dynamic-power-coefficient`` (a device tree), Linux builds its CPU
energy model as drivers/opp/of.c does, ``P[uW] = C * mV^2 * MHz / 10^6``
(:func:`em_power_uw`; the simulator uses this same function).  A host domain
then carries one ``(kHz, uW)`` pair per OPP (``HostDomain.energy``), and
:func:`guest_energy` turns it into the table of SPEC §9.4 for the domain the
guest sees, whose top may be below the host's (``hostfreq.advertised``).
"""

from __future__ import annotations

from typing import Sequence

from vhost_user_cpufreq.protocol.energy import EmDomain, PerfState, check_states

__all__ = ["em_power_uw", "opp_energy", "guest_energy"]


def em_power_uw(dpc: float, mv: float, mhz: float) -> float:
    """One busy CPU's power in microwatts at ``mhz`` and ``mv`` (Linux's EM from the DT)."""
    return dpc * mv * mv * mhz / 1e6


def opp_energy(opps_khz: Sequence[int], microvolts: Sequence[int], dpc: int) -> tuple[tuple[int, int], ...]:
    """``(kHz, uW)`` per OPP, ascending, from a DT's OPP table and coefficient."""
    if len(opps_khz) != len(microvolts):
        raise ValueError(f"{len(microvolts)} voltages for {len(opps_khz)} OPPs")
    return tuple(sorted((khz, round(em_power_uw(dpc, uv / 1000, khz / 1000)))
                        for khz, uv in zip(opps_khz, microvolts)))


def guest_energy(energy: Sequence[tuple[int, int]], top_khz: int) -> EmDomain | None:
    """The table a guest domain whose top is ``top_khz`` gets; None when the host has none or it is unusable.

    OPPs above the guest's top are left out; when the top is not an OPP (a VM with slower vCPUs), a
    state at the top is added with the power of the lowest OPP at or above it, the one the host
    runs to give that speed (SPEC 9.4: the table's top is the domain's ``max_khz``)."""
    if not energy:
        return None
    states = [PerfState(k, p) for k, p in energy if k <= top_khz]
    if not states or states[-1].khz != top_khz:
        above = [PerfState(top_khz, p) for k, p in energy if k >= top_khz]
        if not above:
            return None  # the host's OPPs never reach the top the guest is told of
        states.append(above[0])
    if check_states(states, top_khz):
        return None
    return EmDomain(tuple(states))
