"""Where a VM's vCPUs run: the pinning modes, and the CPU a vCPU's decisions are made for (pure).

Theory of operation
-------------------
Util clamps do not need a pCPU per vCPU: the kernel aggregates the clamps of
the runnable tasks on each CPU, so a clamp works wherever its thread runs.
What the service must know is *which CPU type* a vCPU's request is meant
for, because capacity and top frequency differ between clusters. The modes
(``pinning`` in the configuration):

``auto``
    one pCPU per vCPU, spread over the capacity classes, on pCPUs no other
    VM holds (:func:`~.engine.plan_pinning`). When that does not fit (more
    vCPUs than free pCPUs, as on any overcommitted host), the VM is served
    as ``none`` and the plan's ``note`` says why: serving unpinned beats
    refusing the VM.
explicit list
    one pCPU per vCPU, as given; pCPUs may be shared between vCPUs and VMs.
``keep``
    the service never changes affinity: each vCPU thread keeps what libvirt
    (``<vcpupin>``), the VMM or a CPU manager set, read when the threads are
    found (until then, every online CPU).
``none``
    no affinity at all: every online CPU.

A vCPU that may run on several CPUs is decided for its *home* CPU, the one of
highest capacity it may run on (:func:`home_cpu`): the guest is told that
CPU's capacity and frequency domain, and its clamp is in absolute capacity
units, capped by that CPU's capacity. Where it runs on a smaller CPU the
same clamp saturates it, and a clamp above a CPU's capacity is what makes the
kernel's capacity-aware placement move the task to a CPU that fits it. So the
guest is never promised less than it can get, and its request means the same
wherever the thread lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .engine import plan_pinning

__all__ = ["PINNING_MODES", "PinPlan", "plan_placement", "home_cpu"]

#: The named modes; an explicit plan is a tuple of pCPUs instead.
PINNING_MODES = ("auto", "keep", "none")


@dataclass(frozen=True, slots=True)
class PinPlan:
    """How one VM's vCPUs are placed."""

    mode: str  # the mode in force: "auto", "explicit", "keep" or "none"
    pinned: tuple[int | None, ...]  # the pCPU each vCPU is pinned to; None: the service leaves affinity alone
    allowed: tuple[frozenset[int], ...]  # the CPUs each vCPU may run on
    note: str = ""  # why the mode in force differs from the one configured

    @property
    def pins(self) -> bool:
        return self.mode in ("auto", "explicit")


def home_cpu(allowed: Iterable[int], capacity: Mapping[int, int]) -> int:
    """The CPU of highest capacity in ``allowed`` (lowest id on a tie): what the vCPU is decided for."""
    cpus = sorted(allowed)
    if not cpus:
        raise ValueError("no CPU to run on")
    return max(cpus, key=lambda c: (capacity.get(c, 0), -c))


def plan_placement(
    num_vcpus: int,
    requested: str | Sequence[int],
    capacity_classes: Sequence[Sequence[int]],
    *,
    taken: Iterable[int] = (),
    affinities: Mapping[int, Iterable[int]] | None = None,
) -> PinPlan:
    """Place ``num_vcpus`` vCPUs as ``requested`` (a mode, or one pCPU per vCPU).

    ``capacity_classes`` lists the online pCPUs of each capacity class,
    smallest first; ``taken`` the pCPUs other VMs hold 1:1; ``affinities``
    (``keep`` only) each vCPU's current affinity as its threads have it. An
    explicit list naming an offline or unknown pCPU raises ``ValueError``.
    """
    online = frozenset(c for cls in capacity_classes for c in cls)
    if not isinstance(requested, str):
        explicit = tuple(requested)
        if len(explicit) != num_vcpus:
            raise ValueError(f"lists {len(explicit)} pCPUs for {num_vcpus} vCPUs")
        missing = sorted({c for c in explicit if c not in online})
        if missing:
            raise ValueError(f"names offline or unknown pCPUs {missing} (online: {_ranges(online)})")
        return PinPlan("explicit", explicit, tuple(frozenset({c}) for c in explicit))
    if requested not in PINNING_MODES:
        raise ValueError(f"unknown pinning mode {requested!r}")
    if requested == "auto":
        try:
            pins = plan_pinning(num_vcpus, capacity_classes, taken=taken)
        except ValueError as exc:
            return _unpinned("none", num_vcpus, online, None,
                             note=f"auto pinning does not fit ({exc}): served unpinned, as pinning = \"none\"")
        return PinPlan("auto", pins, tuple(frozenset({c}) for c in pins))
    return _unpinned(requested, num_vcpus, online, affinities if requested == "keep" else None)


def _unpinned(mode: str, n: int, online: frozenset[int], affinities: Mapping[int, Iterable[int]] | None,
              note: str = "") -> PinPlan:
    allowed = []
    for v in range(n):
        # A thread's affinity may name CPUs that went offline since; a set with none online
        # left would strand the decision, so the vCPU is then decided as if it could run anywhere.
        cpus = frozenset(affinities[v]) & online if affinities is not None and v in affinities else online
        allowed.append(cpus or online)
    return PinPlan(mode, (None,) * n, tuple(allowed), note)


def _ranges(cpus: Iterable[int]) -> str:
    """``0-3,6``: the kernel's cpulist format."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)
