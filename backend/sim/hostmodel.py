"""The simulated host: pCPUs in frequency domains, OPP tables, capacities and an energy model.

Theory of operation: a host description is one of the JSON files under
``data/hosts/`` (copied from tests/fixtures/hosts, each naming its upstream
source).  A :class:`Domain` is one cpufreq policy: its pCPUs, ascending OPPs
(kHz) and the power of one busy CPU at each OPP.  Power follows the Linux
energy model as drivers/opp/of.c builds it from the device tree:
``P[uW] = dynamic-power-coefficient * mV^2 * MHz / 10^6`` (``_get_power``,
"micro-Watts" variant).  Idle CPUs cost nothing: the energy model has no
idle power, so neither does the simulator.

Hosts without per-OPP voltages (the Xeon: x86 has no DT energy model) get a
stated assumption instead (:data:`X86_ASSUMED`); their energies compare arms
with each other, not with other hosts.

Bad input raises :class:`SimInputError` naming the file, the key and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..cpufreq.power import em_power_uw as _em_power  # the one EM formula, shared with the device

__all__ = ["SimInputError", "Opp", "Domain", "Host", "load_host", "builtin_hosts", "X86_ASSUMED"]

#: x86 assumption: voltage linear in frequency from 0.70 V at the lowest to
#: 1.05 V at the highest P-state, dynamic-power-coefficient 500, 8 CPUs used.
X86_ASSUMED = {"min_mv": 700.0, "max_mv": 1050.0, "dpc": 500, "cpus": 8}

#: ``--host`` names -> files shipped in the package.
BUILTIN = {
    "gs101": "google-gs101-pixel6.json",
    "mt8183": "mediatek-mt8183-chromebook.json",
    "xeon": "intel-xeon-d-2796nt-acpi-cpufreq.json",
}


class SimInputError(ValueError):
    """A host or workload file the simulator cannot use: which file, which key, why."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file, self.key, self.reason = file, key, reason


@dataclass(frozen=True, slots=True)
class Opp:
    khz: int
    power_uw: float  # one CPU busy at this OPP


@dataclass(frozen=True, slots=True)
class Domain:
    index: int
    cpus: tuple[int, ...]
    opps: tuple[Opp, ...]  # ascending frequency
    capacity: int  # of each CPU at the top OPP, 0..1024
    transition_s: float  # frequency switch latency

    @property
    def max_khz(self) -> int:
        return self.opps[-1].khz

    @property
    def min_khz(self) -> int:
        return self.opps[0].khz

    def opp_at_least(self, khz: float) -> Opp:
        """The lowest OPP at or above ``khz`` (CPUFREQ_RELATION_L), the top one if none is."""
        for o in self.opps:
            if o.khz >= khz:
                return o
        return self.opps[-1]

    def power(self, khz: int) -> float:
        for o in self.opps:
            if o.khz == khz:
                return o.power_uw
        raise KeyError(khz)


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    domains: tuple[Domain, ...]
    source: str
    energy_note: str

    @property
    def num_cpus(self) -> int:
        return sum(len(d.cpus) for d in self.domains)

    def domain_of(self, cpu: int) -> Domain:
        for d in self.domains:
            if cpu in d.cpus:
                return d
        raise KeyError(cpu)


def _get(obj: Any, key: str, kind: type | tuple[type, ...], file: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise SimInputError(file, f"{where}{key}", "missing")
    val = obj[key]
    if not isinstance(val, kind) or isinstance(val, bool):
        raise SimInputError(file, f"{where}{key}", f"expected {getattr(kind, '__name__', kind)}, got {type(val).__name__}")
    return val


def parse_host(data: Any, file: str) -> Host:
    """A :class:`Host` from a decoded host description; raises :class:`SimInputError`."""
    name = _get(data, "name", str, file, "")
    cpus = _get(data, "cpus", list, file, "")
    policies = _get(data, "policies", list, file, "")
    if not policies:
        raise SimInputError(file, "policies", "empty: a host needs at least one frequency domain")
    by_cpu = {}
    for i, c in enumerate(cpus):
        by_cpu[_get(c, "cpu", int, file, f"cpus[{i}].")] = c
    has_em = all(isinstance(p, dict) and p.get("opp_microvolt") for p in policies)
    domains: list[Domain] = []
    limit = len(policies) if has_em else min(len(policies), int(X86_ASSUMED["cpus"]))
    for i in range(limit):
        p = policies[i]
        where = f"policies[{i}]."
        related = tuple(_get(p, "related_cpus", list, file, where))
        if not related or not all(isinstance(c, int) and c in by_cpu for c in related):
            raise SimInputError(file, f"{where}related_cpus", "must list CPUs that appear under 'cpus'")
        freqs = p.get("available_frequencies_khz")
        if not isinstance(freqs, list) or not freqs or not all(isinstance(f, int) and f > 0 for f in freqs):
            raise SimInputError(file, f"{where}available_frequencies_khz", "need a non-empty list of positive kHz")
        order = sorted(range(len(freqs)), key=lambda k: freqs[k])
        if has_em:
            volts = _get(p, "opp_microvolt", list, file, where)
            hz = _get(p, "opp_hz", list, file, where)
            if len(volts) != len(freqs) or len(hz) != len(freqs):
                raise SimInputError(file, f"{where}opp_microvolt", f"{len(volts)} voltages for {len(freqs)} OPPs")
            cpu0 = by_cpu[related[0]]
            dpc = _get(cpu0, "dynamic_power_coefficient", int, file, f"cpus[{related[0]}].")
            vmap = {h // 1000: v for h, v in zip(hz, volts)}
            if set(vmap) != set(freqs):
                raise SimInputError(file, f"{where}opp_hz", "does not match available_frequencies_khz")
            opps = tuple(Opp(freqs[k], _em_power(dpc, vmap[freqs[k]] / 1000, freqs[k] / 1000)) for k in order)
            cap = _get(cpu0, "cpu_capacity", int, file, f"cpus[{related[0]}].")
            latency_ns = p.get("dt_clock_latency_ns") or p.get("cpuinfo_transition_latency_ns") or 0
        else:
            lo, hi = min(freqs), max(freqs)
            span = (hi - lo) or 1
            opps = tuple(
                Opp(f, _em_power(X86_ASSUMED["dpc"], X86_ASSUMED["min_mv"]
                                 + (X86_ASSUMED["max_mv"] - X86_ASSUMED["min_mv"]) * (f - lo) / span, f / 1000))
                for f in sorted(freqs))
            cap = 1024
            latency_ns = p.get("cpuinfo_transition_latency_ns") or 0
        if not 0 < cap <= 1024:
            raise SimInputError(file, f"cpus[{related[0]}].cpu_capacity", f"{cap} is not in 1..1024")
        if not isinstance(latency_ns, int) or latency_ns < 0:
            raise SimInputError(file, f"{where}dt_clock_latency_ns", "must be a non-negative integer")
        domains.append(Domain(len(domains), related, opps, cap, latency_ns / 1e9))
    src = data.get("source", {})
    source = f"{src.get('repo', '?')} {src.get('path', '?')} @ {str(src.get('commit', '?'))[:12]}"
    note = ("Linux energy model from the DT: dynamic-power-coefficient x mV^2 x MHz" if has_em else
            f"assumed (no DT energy model on x86): V linear {X86_ASSUMED['min_mv']:.0f}-{X86_ASSUMED['max_mv']:.0f} mV, "
            f"coefficient {X86_ASSUMED['dpc']}, first {X86_ASSUMED['cpus']} CPUs")
    return Host(name, tuple(domains), source, note)


def load_host(name_or_path: str) -> Host:
    """A built-in host by short name (``gs101``, ``mt8183``, ``xeon``) or a host JSON file."""
    if name_or_path in BUILTIN:
        ref = resources.files(__package__).joinpath("data", "hosts", BUILTIN[name_or_path])
        file, text = BUILTIN[name_or_path], ref.read_text()
    else:
        path = Path(name_or_path)
        file = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SimInputError(file, "-", f"cannot read: {exc.strerror} (built-in hosts: {', '.join(BUILTIN)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SimInputError(file, f"line {exc.lineno}", f"not JSON: {exc.msg}") from None
    return parse_host(data, file)


def builtin_hosts() -> tuple[str, ...]:
    return tuple(BUILTIN)
