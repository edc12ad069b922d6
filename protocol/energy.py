"""The energy model in the shared frequency page (SPEC §9.4), sans-IO.

Theory of operation: a guest scheduler that places tasks for energy (Linux
EAS) needs, per frequency domain, the power one CPU draws at each
performance state.  Config space is full (256 bytes, the vhost-user
``GET_CONFIG`` limit) and every guest read of it is a round trip, so the
table lives in the shared frequency page (SPEC §8), after the frequency
entries: the guest reads it as memory, once at probe and again after a
topology change.  Feature bit 2 (:data:`F_ENERGY_MODEL`) says it is there;
it needs bit 1 (the page).

The device writes the section under one sequence count (odd while it
writes), as it writes each frequency entry; the driver reads the count, the
section, the count again, and retries a torn read.  Everything the driver
reads may be hostile (any guest code may write the page, and a device is
not trusted to be sane): :func:`decode_energy_model` bounds every value and
names what is wrong with a reason slug the driver counts.

Units: kHz and microwatts, per CPU, as Linux's ``em_dev_register_perf_domain``
takes them (``microwatts`` true).  Power is bounded by Linux's
``EM_MAX_POWER`` (64 W per CPU).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from .cpufreq import FREQ_PAGE_SIZE, MAX_DOMAINS, Domain
from .errors import RecordError

__all__ = [
    "F_ENERGY_MODEL",
    "EM_OFFSET",
    "EM_MAX_STATES",
    "EM_MAX_POWER_UW",
    "EM_SIZE",
    "PerfState",
    "EmDomain",
    "EnergyModel",
    "em_domain_offset",
    "encode_energy_model",
    "energy_model_stores",
    "decode_energy_model",
    "check_states",
]

#: Device feature bit 2: the page carries an energy model (needs F_FREQ_PAGE, bit 1).
F_ENERGY_MODEL = 2
EM_OFFSET = 256  # byte offset of the section in the page (after the header and 8 frequency entries)
EM_MAX_STATES = 32  # performance states per domain (GS101's largest cluster has 17)
EM_MAX_POWER_UW = 64_000_000  # Linux EM_MAX_POWER: 64 W per CPU
_HEADER = struct.Struct("<IHHII")  # seq, num_domains, reserved, reserved, reserved
_DOMAIN = struct.Struct("<HHI")  # num_states, reserved, reserved
_STATE = struct.Struct("<II")  # khz, power_uw
_DOMAIN_SIZE = _DOMAIN.size + EM_MAX_STATES * _STATE.size  # 264
_DOMAINS_OFFSET = EM_OFFSET + _HEADER.size  # 272
EM_SIZE = _HEADER.size + MAX_DOMAINS * _DOMAIN_SIZE  # 2128 bytes: the section, from EM_OFFSET
assert EM_OFFSET + EM_SIZE <= FREQ_PAGE_SIZE


class PerfState(NamedTuple):
    khz: int
    power_uw: int  # one busy CPU of the domain at khz


def check_states(states: Sequence[PerfState], max_khz: int | None = None) -> tuple[str, str] | None:
    """What is wrong with one domain's table, as (reason, detail); None when it is usable.

    Both sides use it: the device refuses to offer a table that fails (ValueError), the driver
    rejects and counts one it reads (RecordError)."""
    if not 1 <= len(states) <= EM_MAX_STATES:
        return "bad-em-states", f"{len(states)} states, allowed 1..{EM_MAX_STATES}"
    prev = 0
    for khz, power in states:
        if not prev < khz <= 0xFFFFFFFF:
            return "bad-em-frequency", f"{khz} kHz after {prev}: frequencies must rise"
        if not 0 < power <= EM_MAX_POWER_UW:
            return "bad-em-power", f"{power} uW at {khz} kHz, allowed 1..{EM_MAX_POWER_UW}"
        prev = khz
    if max_khz is not None and states[-1].khz != max_khz:
        # Linux derives each state's performance as capacity x khz / top khz: the table's top must
        # be the domain's max_khz, the frequency its capacity is given at (SPEC 9.1).
        return "em-top-mismatch", f"top state {states[-1].khz} kHz, the domain's max_khz is {max_khz}"
    return None


@dataclass(frozen=True, slots=True)
class EmDomain:
    """One domain's performance states, ascending."""

    states: tuple[PerfState, ...]

    def __post_init__(self) -> None:
        bad = check_states(self.states)
        if bad:
            raise ValueError(f"{bad[0]}: {bad[1]}")

    @property
    def max_khz(self) -> int:
        return self.states[-1].khz


@dataclass(frozen=True, slots=True)
class EnergyModel:
    domains: tuple[EmDomain, ...]  # index = config space's domain index

    def __post_init__(self) -> None:
        if not 1 <= len(self.domains) <= MAX_DOMAINS:
            raise ValueError(f"{len(self.domains)} domains; the section holds 1..{MAX_DOMAINS}")

    def check_against(self, domains: Sequence[Domain]) -> tuple[str, str] | None:
        """The first way this model disagrees with config space's domains, or None."""
        if len(domains) != len(self.domains):
            return "bad-em-header", f"{len(self.domains)} domains, config space has {len(domains)}"
        for i, (em, d) in enumerate(zip(self.domains, domains)):
            bad = check_states(em.states, d.max_khz)
            if bad:
                return bad[0], f"domain {i}: {bad[1]}"
        return None


def em_domain_offset(index: int) -> int:
    """Byte offset in the page of domain ``index``'s table."""
    if not 0 <= index < MAX_DOMAINS:
        raise ValueError(f"domain {index} outside 0..{MAX_DOMAINS - 1}")
    return _DOMAINS_OFFSET + index * _DOMAIN_SIZE


def encode_energy_model(model: EnergyModel | None, seq: int = 0) -> bytes:
    """The section (EM_SIZE bytes, to be placed at EM_OFFSET) with count ``seq``; None: no model
    (num_domains 0), what a topology without power figures gets once the feature was offered."""
    buf = bytearray(EM_SIZE)
    doms = model.domains if model is not None else ()
    _HEADER.pack_into(buf, 0, seq & 0xFFFFFFFF, len(doms), 0, 0, 0)
    for i, dom in enumerate(doms):
        off = em_domain_offset(i) - EM_OFFSET
        _DOMAIN.pack_into(buf, off, len(dom.states), 0, 0)
        for j, st in enumerate(dom.states):
            _STATE.pack_into(buf, off + _DOMAIN.size + j * _STATE.size, st.khz, st.power_uw)
    return bytes(buf)


def energy_model_stores(seq: int, model: EnergyModel | None) -> tuple[tuple[int, int], ...]:
    """The aligned 32-bit stores, in order, that replace the section whose count is ``seq`` (even):
    the count to odd, every word of the section, the count to even (as SPEC 8.1 for an entry)."""
    if seq & 1:
        raise ValueError(f"sequence count {seq} is odd: an update is already under way")
    body = encode_energy_model(model)
    words = struct.unpack(f"<{EM_SIZE // 4}I", body)
    return ((EM_OFFSET, (seq + 1) & 0xFFFFFFFF),
            *((EM_OFFSET + 4 * k, w) for k, w in enumerate(words) if k),
            (EM_OFFSET, (seq + 2) & 0xFFFFFFFF))


def decode_energy_model(seq_before: int, section: bytes | memoryview, seq_after: int,
                        domains: Sequence[Domain]) -> EnergyModel | None:
    """The model from one read of the section between two loads of its count.

    None: the read may be torn (retry, bounded).  Raises :class:`RecordError` with a reason for
    a section that is not usable: wrong size, no model (``no-em``: num_domains 0, the device has
    none for this topology), a domain count other than config space's, or a
    table that fails :func:`check_states` against its domain's ``max_khz``.
    """
    if seq_before & 1 or seq_before != seq_after:
        return None
    if len(section) < EM_SIZE:
        raise RecordError("short-em", f"{len(section)} bytes, the section is {EM_SIZE}")
    _, ndom, _, _, _ = _HEADER.unpack_from(section, 0)
    if ndom == 0:
        raise RecordError("no-em", "the device has no energy model for this topology")
    if ndom != len(domains) or not 1 <= ndom <= MAX_DOMAINS:
        raise RecordError("bad-em-header", f"{ndom} domains, config space has {len(domains)}")
    out = []
    for i, d in enumerate(domains):
        off = em_domain_offset(i) - EM_OFFSET
        (n, _, _) = _DOMAIN.unpack_from(section, off)
        if not 1 <= n <= EM_MAX_STATES:  # bounded before anything is read by it
            raise RecordError("bad-em-states", f"domain {i}: {n} states, allowed 1..{EM_MAX_STATES}")
        states = tuple(PerfState(*_STATE.unpack_from(section, off + _DOMAIN.size + j * _STATE.size))
                       for j in range(n))
        bad = check_states(states, d.max_khz)
        if bad:
            raise RecordError(bad[0], f"domain {i}: {bad[1]}")
        out.append(EmDomain(states))
    return EnergyModel(tuple(out))
