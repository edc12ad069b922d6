"""The parts of a VM's device state a successor process takes over that are not the device's own.

Theory of operation: :meth:`CpufreqDevice.snapshot` and ``restore`` carry the
device's state (vhost/handover.py); two things beside it belong to the VM as
well and go with it: the clamp engine's decisions (the policy's: carried so
the successor neither applies again a clamp in place nor forgets one, see
backend/policy/engine.py ClampState), and whether a config that moved while
no process served must be notified (not when only frequencies moved and the
guest reads them from the shared page).
"""

from __future__ import annotations

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.host_snapshot import HostSnapshot
from vhost_user_cpufreq.protocol.session_snapshot import ClampSnapshot, SnapshotError

from ..policy.engine import ClampState

__all__ = ["clamps_of", "restore_clamps", "host_of", "restore_host", "moved_across"]


def clamps_of(policy: object, vm: str) -> tuple[ClampSnapshot, ...] | None:
    """The VM's clamp decisions as the policy holds them (None: a policy without an engine)."""
    get = getattr(policy, "engine_state", None)
    states = get(vm) if get is not None else None
    if states is None:
        return None
    return tuple(ClampSnapshot(s.vcpu, s.wanted, s.applied, s.changed_at, s.record_at, s.pending) for s in states)


def restore_clamps(policy: object, vm: str, clamps: tuple[ClampSnapshot, ...] | None) -> None:
    """Give the policy its predecessor's decisions: the clamps in place stay, neither applied again nor undone.

    :raise SnapshotError: they name vCPUs the VM does not have here (``clamps-mismatch``).
    """
    put = getattr(policy, "restore_engine_state", None)
    if clamps is None or put is None:
        return
    try:
        put(vm, [ClampState(c.vcpu, c.wanted, c.applied, c.changed_at, c.record_at, c.pending) for c in clamps])
    except ValueError as exc:
        raise SnapshotError("clamps-mismatch", str(exc)) from None


def host_of(policy: object, vm: str) -> HostSnapshot | None:
    """What the policy's actuators wrote for the VM (None: a policy without actuators)."""
    get = getattr(policy, "host_state", None)
    return get(vm) if get is not None else None


def restore_host(policy: object, vm: str, host: HostSnapshot | None) -> None:
    put = getattr(policy, "restore_host_state", None)
    if host is not None and put is not None:
        put(vm, host)


def moved_across(carried: bytes, now: abi.DeviceConfig) -> tuple[bool, bool]:
    """(did the config move from ``carried`` to ``now``, did only the frequencies move).

    The carried image is compared byte for byte, never decoded (decoding is the guest's side, with
    reasons of its own): the bytes the frequencies and the generation occupy are found by encoding
    ``now`` with every frequency's bits flipped.
    """
    mine = now.encode()
    if mine == carried:
        return False, False
    flipped = now.with_frequencies([d.cur_khz ^ 0xFFFFFFFF for d in now.domains]).encode()
    if len(carried) != len(mine):
        return True, False
    moving = set(range(4)) | {i for i, (x, y) in enumerate(zip(mine, flipped)) if x != y}
    return True, all(mine[i] == carried[i] for i in range(len(mine)) if i not in moving)
