"""A vhost-user session as a value, to carry it to another process (handover), sans-IO.

Theory of operation: :class:`SessionSnapshot` holds everything a new service
process needs to go on serving one front-end connection as if nothing had
happened: the rules' state (:class:`~.session.SessionMachine`: owner,
features, protocol features, status, each ring's size, addresses and
started/enabled state), each ring's position in its queue (next avail index,
used index, the used index last signalled), the memory table, and the
device's state a restart would otherwise lose (:class:`DeviceSnapshot`: the
negotiated device features, the config space the guest last read, sequence
tracking and each vCPU's last request), and the shared frequency page's
regions and writer state (shmem_snapshot.py).

File descriptors cannot live in bytes: every fd the session holds (the
connection, the back-end channel, kick/call/err eventfds, guest memory) is an
*index* into an ordered fd list sent beside the snapshot (SCM_RIGHTS).
:func:`decode` checks that the indices cover that list exactly, once each.

Encoding: a 12-byte header (magic ``VUCS``, version, body length) and a JSON
body.  JSON because the state is small (under 4 KiB for 32 regions), nested
and easy to read in a log line when a handover is refused; a hand-laid struct
would need its own variable-length layout and a second decoder to review.
The decoder is strict: exact key sets, integers in range (bool is not an
int), no NaN, no duplicate keys, a body of exactly the announced length.  Any
departure is a :class:`SnapshotError` with a reason slug, never a guess.

:func:`machine_state` and :func:`restore_machine` are the hooks on
:class:`SessionMachine`; they live here so session.py needs no change.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from . import vhost_user as vu
from .errors import RemoteProtocolError
from .host_snapshot import HostSnapshot, host_from_json, host_to_json
from .shmem_snapshot import (
    PageSnapshot,
    ShmemSnapshot,
    page_from_json,
    page_resumed,
    page_to_json,
    shmem_from_json,
    shmem_to_json,
)
from .snapshot_codec import I64_MAX, I64_MIN, U16, U32, U64, Obj, SnapshotError
from .session import PROTOCOL_FEATURES_BIT, DeviceFacts, RingState, SessionMachine
from .virtqueue import validate_queue_size

__all__ = ["SNAPSHOT_VERSION", "MAX_SNAPSHOT_BYTES", "SnapshotError", "RingSnapshot", "RegionSnapshot",
           "SeqSnapshot", "DeviceSnapshot", "SessionSnapshot", "encode", "decode", "machine_state",
           "restore_machine", "at_used", "at_page", "PageSnapshot", "ShmemSnapshot", "PeerSnapshot", "ClampSnapshot"]

#: 2: the shared frequency page (``shmem``, ``device.page``), the identity of a shared socket's peer (``peer``),
#: the clamp engine's state (``device.clamps``) and what the actuators wrote (``device.host``).  Version 1 (a predecessor without them)
#: is still read: its sessions had no page in use (they were refused), so the new parts are absent.
SNAPSHOT_VERSION = 2
_READS = (1, 2)
#: A session's snapshot is well under 8 KiB; anything larger is not one of ours.
MAX_SNAPSHOT_BYTES = 1 << 16
_HEADER = struct.Struct("<4sHHI")  # magic, version, reserved (0), body length
_MAGIC = b"VUCS"
_U16, _U32, _U64, _I64_MIN, _I64_MAX = U16, U32, U64, I64_MIN, I64_MAX
_MAX_RINGS = 64
_MAX_REGIONS = 512
_MAX_VCPUS = 4096


@dataclass(frozen=True, slots=True)
class RingSnapshot:
    index: int
    num: int
    addr: vu.VringAddr | None
    started: bool
    enabled: bool
    polling: bool
    running: bool
    last_avail: int  # the next avail entry to consume (the base when no queue runs)
    used_idx: int  # the next used entry to write; all published at a quiescent point
    signalled: int | None  # event-idx state: the used index the driver was last asked about
    kick_fd: int | None  # indices into the fd list
    call_fd: int | None
    err_fd: int | None


@dataclass(frozen=True, slots=True)
class RegionSnapshot:
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


@dataclass(frozen=True, slots=True)
class SeqSnapshot:
    last: int | None
    min_offset_ns: int | None
    lost: int
    stale: int
    last_age_ns: int


@dataclass(frozen=True, slots=True)
class ClampSnapshot:
    """One vCPU's clamp decision state (backend/policy/engine.py ClampState): what is applied, what is
    wanted, and the times the rate limit and the stale timer go on from (CLOCK_MONOTONIC, host-wide)."""

    vcpu: int
    wanted: int
    applied: int | None  # None: never clamped
    changed_at: float | None  # None: never changed
    record_at: float | None  # None: no request standing
    pending: bool


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    acked_features: int
    config: bytes  # the config space as the guest last could read it (generation included)
    seq: SeqSnapshot
    vcpus: tuple[tuple[int, int, float | None], ...]  # (util, perf_khz, CLOCK_MONOTONIC of the record)
    page: PageSnapshot | None = None  # the shared frequency page's writer, when the device has the page
    clamps: tuple[ClampSnapshot, ...] | None = None  # the VM's clamp engine, when the policy has one
    host: HostSnapshot | None = None  # what the actuators wrote for the VM, and the originals


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    """Who a session of the shared socket was identified as (service/identify.py): checked again by the
    process that resumes it, from the connection itself, before it serves the session."""

    pid: int
    start_time: int  # of the process, in clock ticks since boot (/proc/PID/stat): tells a reused pid
    name: str
    vcpus: int
    cgroup: str


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    vm: str
    connection_fd: int
    backend_channel_fd: int | None
    owner: bool
    acked_features: int
    features_set: bool
    protocol_features: int
    status: int
    rings: tuple[RingSnapshot, ...]
    regions: tuple[RegionSnapshot, ...]
    device: DeviceSnapshot
    shmem: ShmemSnapshot | None = None  # None: no region was ever asked for (or a version 1 snapshot)
    peer: PeerSnapshot | None = None  # a session of the shared socket: its front-end's identity

    def fd_refs(self) -> list[int]:
        """Every fd index the snapshot names, in the order it names them."""
        refs = [self.connection_fd]
        if self.backend_channel_fd is not None:
            refs.append(self.backend_channel_fd)
        for r in self.rings:
            refs += [fd for fd in (r.kick_fd, r.call_fd, r.err_fd) if fd is not None]
        refs += [g.fd for g in self.regions]
        if self.shmem is not None:
            refs += [p.fd for p in self.shmem.pages]
        return refs


# -- the machine's hooks -----------------------------------------------------------------
def machine_state(m: SessionMachine) -> tuple[bool, int, bool, int, int, tuple[RingState, ...]]:
    """(owner, acked features, features set, protocol features, status, ring states) of ``m``."""
    if m.error is not None:
        raise SnapshotError("session-failed", f"the session already failed ({m.error})")
    return m.owner, m.acked_features, m.features_set, m.protocol_features, m.status, tuple(m.rings)


def restore_machine(device: DeviceFacts, snap: SessionSnapshot) -> SessionMachine:
    """A machine in the state ``snap`` records, checked against what this process's device offers.

    :raise SnapshotError: the snapshot names features, rings or sizes this device does not have.
    """
    m = SessionMachine(device)
    if snap.protocol_features & ~m.offered_protocol_features:
        raise SnapshotError("protocol-features-not-offered", f"{snap.protocol_features:#x}")
    sh = snap.shmem
    if sh is not None:
        if any(p.shmid >= len(device.shmem_sizes) or p.size != device.shmem_sizes[p.shmid] for p in sh.pages):
            raise SnapshotError("shmem-mismatch", f"regions {[(p.shmid, p.size) for p in sh.pages]}, this device "
                                f"has {device.shmem_sizes}")
        if sh.channel and snap.backend_channel_fd is None:
            raise SnapshotError("inconsistent-shmem", "regions placed on a back-end channel the snapshot lacks")
        m.shmem.channel, m.shmem.mapped = sh.channel, sh.mapped
    else:
        # Version 1, or no region asked for: the channel is what tells the rules regions are possible.
        m.shmem.channel = snap.backend_channel_fd is not None
    m.protocol_features = snap.protocol_features  # what is offered depends on it (the page's feature)
    if snap.acked_features & ~m.offered_features:
        raise SnapshotError("features-not-offered", f"acked {snap.acked_features:#x}, offered {m.offered_features:#x}")
    if len(snap.rings) != len(m.rings):
        raise SnapshotError("ring-count", f"{len(snap.rings)} rings, device has {len(m.rings)}")
    m.owner, m.acked_features, m.features_set = snap.owner, snap.acked_features, snap.features_set
    m.protocol_features, m.status = snap.protocol_features, snap.status
    for ring, r in zip(m.rings, snap.rings):
        if r.num > device.max_queue_size:
            raise SnapshotError("bad-queue-size", f"ring {r.index}: {r.num} > {device.max_queue_size}")
        if r.running and not (r.started and r.enabled and r.addr is not None and r.num):
            raise SnapshotError("inconsistent-ring", f"ring {r.index} runs without being started, enabled, "
                                "sized and addressed")
        if r.started and not r.polling and r.kick_fd is None:
            raise SnapshotError("missing-fd", f"ring {r.index} is started on a kick fd the snapshot lacks")
        ring.num, ring.addr, ring.started, ring.enabled = r.num, r.addr, r.started, r.enabled
        ring.polling, ring.running = r.polling, r.running
    if not snap.acked_features & PROTOCOL_FEATURES_BIT and snap.features_set and not all(
            r.enabled for r in snap.rings):
        raise SnapshotError("inconsistent-ring", "rings disabled without PROTOCOL_FEATURES")
    return m


def at_page(snap: SessionSnapshot, counts: Sequence[int]) -> SessionSnapshot:
    """``snap`` with the page's writer going on from the counts read in the page (``counts``).

    For a snapshot written while the service ran (the fd store's, after a crash): the counts it
    recorded may be behind the page's, and what the page shows is unknown (every entry is rewritten).
    """
    if snap.device.page is None:
        return snap
    return replace(snap, device=replace(snap.device, page=page_resumed(counts)))


def at_used(snap: SessionSnapshot, used: Mapping[int, int]) -> SessionSnapshot:
    """``snap`` with each running ring resumed at its used index as found in guest memory (``used``).

    For a snapshot written while the rings ran (the fd store's, after a crash): every buffer up to
    the used index was completed, the ones after it are served again.  The sequence tracking
    starts afresh on the next batch: what the snapshot recorded is older than the ring.
    """
    rings = []
    for r in snap.rings:
        if r.running:
            if r.index not in used:
                raise SnapshotError("inconsistent-ring", f"ring {r.index} runs, its used index was not read")
            u = used[r.index] & _U16
            r = replace(r, last_avail=u, used_idx=u, signalled=None)
        rings.append(r)
    seq = replace(snap.device.seq, last=None)
    # The clamp decisions recorded may be older than the ones applied since: the engine starts afresh (its
    # first decision is applied whatever it is), as the sequence tracking does; of what the actuators wrote
    # only the originals are still true.
    host = snap.device.host
    if host is not None:
        host = HostSnapshot((), tuple(replace(c, value=None, max_value=None) for c in host.cgroups))
    return replace(snap, rings=tuple(rings), device=replace(snap.device, seq=seq, clamps=None, host=host))


# -- encoding ------------------------------------------------------------------------------
def encode(snap: SessionSnapshot) -> bytes:
    body = json.dumps(_to_json(snap), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(body) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("too-large", f"{len(body)} bytes")
    return _HEADER.pack(_MAGIC, SNAPSHOT_VERSION, 0, len(body)) + body


def decode(data: bytes, nfds: int) -> SessionSnapshot:
    """The snapshot in ``data``, whose fd indices must name each of ``nfds`` fds exactly once.

    :raise SnapshotError: truncated, another version, malformed, or fds missing or unnamed.
    """
    if len(data) < _HEADER.size:
        raise SnapshotError("truncated", f"{len(data)} bytes, the header alone is {_HEADER.size}")
    magic, version, reserved, length = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotError("bad-magic", f"{magic!r}")
    if version not in _READS:
        raise SnapshotError("version-mismatch", f"snapshot version {version}, this process reads {_READS}")
    if reserved:
        raise SnapshotError("bad-header", f"reserved field {reserved:#x}")
    if length > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("too-large", f"{length} bytes")
    if len(data) - _HEADER.size < length:
        raise SnapshotError("truncated", f"{len(data) - _HEADER.size} of {length} body bytes")
    if len(data) - _HEADER.size > length:
        raise SnapshotError("trailing-bytes", f"{len(data) - _HEADER.size - length} bytes after the body")
    try:
        obj = json.loads(data[_HEADER.size:].decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SnapshotError("malformed", f"not JSON: {exc}") from None
    snap = _from_json(obj, version)
    _check_fds(snap, nfds)
    return snap


def _check_fds(snap: SessionSnapshot, nfds: int) -> None:
    refs = snap.fd_refs()
    seen: set[int] = set()
    for i in refs:
        if i >= nfds:
            raise SnapshotError("missing-fd", f"fd #{i} named, {nfds} sent")
        if i in seen:
            raise SnapshotError("fd-named-twice", f"fd #{i}")
        seen.add(i)
    if len(seen) != nfds:
        raise SnapshotError("unnamed-fd", f"{nfds - len(seen)} of {nfds} fds are named by nothing")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise SnapshotError("malformed", "duplicate key")
    return out


def _no_constant(name: str) -> Any:
    raise SnapshotError("malformed", f"{name} is not a number here")


_SESSION_KEYS = ("vm", "connection_fd", "backend_channel_fd", "owner", "acked_features", "features_set",
                 "protocol_features", "status", "rings", "regions", "device")
_RING_KEYS = ("index", "num", "addr", "started", "enabled", "polling", "running", "last_avail", "used_idx",
              "signalled", "kick_fd", "call_fd", "err_fd")
_ADDR_KEYS = ("flags", "desc", "used", "avail", "log")
_REGION_KEYS = ("gpa", "size", "uva", "mmap_offset", "fd")
_DEVICE_KEYS = ("acked_features", "config", "seq", "vcpus")
#: what each version added, to the session's and the device's keys
_V2_SESSION_KEYS = ("shmem", "peer")
_V2_DEVICE_KEYS = ("page", "clamps", "host")
_SEQ_KEYS = ("last", "min_offset_ns", "lost", "stale", "last_age_ns")


def _to_json(s: SessionSnapshot) -> dict[str, Any]:
    d = s.device
    return {
        "vm": s.vm, "connection_fd": s.connection_fd, "backend_channel_fd": s.backend_channel_fd,
        "owner": s.owner, "acked_features": s.acked_features, "features_set": s.features_set,
        "protocol_features": s.protocol_features, "status": s.status,
        "rings": [{
            "index": r.index, "num": r.num,
            "addr": None if r.addr is None else {"flags": r.addr.flags, "desc": r.addr.desc_user_addr,
                                                 "used": r.addr.used_user_addr, "avail": r.addr.avail_user_addr,
                                                 "log": r.addr.log_guest_addr},
            "started": r.started, "enabled": r.enabled, "polling": r.polling, "running": r.running,
            "last_avail": r.last_avail, "used_idx": r.used_idx, "signalled": r.signalled,
            "kick_fd": r.kick_fd, "call_fd": r.call_fd, "err_fd": r.err_fd} for r in s.rings],
        "regions": [{"gpa": g.guest_phys_addr, "size": g.size, "uva": g.userspace_addr,
                     "mmap_offset": g.mmap_offset, "fd": g.fd} for g in s.regions],
        "device": {"acked_features": d.acked_features, "config": d.config.hex(),
                   "seq": {"last": d.seq.last, "min_offset_ns": d.seq.min_offset_ns, "lost": d.seq.lost,
                           "stale": d.seq.stale, "last_age_ns": d.seq.last_age_ns},
                   "vcpus": [[u, p, t] for u, p, t in d.vcpus],
                   "page": None if d.page is None else page_to_json(d.page),
                   "clamps": None if d.clamps is None else [[c.vcpu, c.wanted, c.applied, c.changed_at, c.record_at,
                                                              c.pending] for c in d.clamps],
                   "host": None if d.host is None else host_to_json(d.host)},
        "shmem": None if s.shmem is None else shmem_to_json(s.shmem),
        "peer": None if s.peer is None else {"pid": s.peer.pid, "start_time": s.peer.start_time,
                                             "name": s.peer.name, "vcpus": s.peer.vcpus, "cgroup": s.peer.cgroup},
    }


def _from_json(obj: Any, version: int) -> SessionSnapshot:
    o = Obj(obj, "session", _SESSION_KEYS + (_V2_SESSION_KEYS if version >= 2 else ()))
    vm = o.obj["vm"]
    if not isinstance(vm, str) or not 0 < len(vm) <= 256:
        raise SnapshotError("malformed", "session.vm is not a name")
    rings = tuple(_ring(r, i) for i, r in enumerate(o.items("rings", _MAX_RINGS)))
    regions = tuple(_region(r) for r in o.items("regions", _MAX_REGIONS))
    return SessionSnapshot(
        vm=vm, connection_fd=o.num("connection_fd", hi=_U16),
        backend_channel_fd=o.opt("backend_channel_fd", lambda k: o.num(k, hi=_U16)),
        owner=o.flag("owner"), acked_features=o.num("acked_features"), features_set=o.flag("features_set"),
        protocol_features=o.num("protocol_features"), status=o.num("status", hi=0xFF),
        rings=rings, regions=regions, device=_device(o.obj["device"], version),
        shmem=o.opt("shmem", lambda k: shmem_from_json(o.obj[k])) if version >= 2 else None,
        peer=o.opt("peer", lambda k: _peer(o.obj[k], vm)) if version >= 2 else None)


def _peer(obj: Any, vm: str) -> PeerSnapshot:
    o = Obj(obj, "peer", ("pid", "start_time", "name", "vcpus", "cgroup"))
    cgroup = o.obj["cgroup"]
    if not isinstance(cgroup, str) or len(cgroup) > 4096:
        raise SnapshotError("malformed", "peer.cgroup is not a path")
    p = PeerSnapshot(o.num("pid", lo=1, hi=(1 << 31) - 1), o.num("start_time"), o.text("name", 64),
                     o.num("vcpus", lo=1, hi=_MAX_VCPUS), cgroup)
    if p.name != vm:
        raise SnapshotError("malformed", f"peer.name {p.name!r} is not the session's VM {vm!r}")
    return p


def _ring(obj: Any, i: int) -> RingSnapshot:
    o = Obj(obj, f"rings[{i}]", _RING_KEYS)
    index = o.num("index", hi=_MAX_RINGS)
    if index != i:
        raise SnapshotError("malformed", f"rings[{i}] has index {index}")
    num = o.num("num", hi=1 << 15)
    if num:
        try:
            validate_queue_size(num)
        except RemoteProtocolError as exc:
            raise SnapshotError("bad-queue-size", f"rings[{i}]: {exc.detail}") from None
    addr = None
    if o.obj["addr"] is not None:
        a = Obj(o.obj["addr"], f"rings[{i}].addr", _ADDR_KEYS)
        addr = vu.VringAddr(index, a.num("flags", hi=_U32), a.num("desc"), a.num("used"), a.num("avail"),
                            a.num("log"))

    def fd(k: str) -> int:
        return o.num(k, hi=_U16)

    return RingSnapshot(index, num, addr, o.flag("started"), o.flag("enabled"), o.flag("polling"), o.flag("running"),
                        o.num("last_avail", hi=_U16), o.num("used_idx", hi=_U16),
                        o.opt("signalled", lambda k: o.num(k, hi=_U16)),
                        o.opt("kick_fd", fd), o.opt("call_fd", fd), o.opt("err_fd", fd))


def _region(obj: Any) -> RegionSnapshot:
    o = Obj(obj, "region", _REGION_KEYS)
    r = RegionSnapshot(o.num("gpa"), o.num("size", lo=1), o.num("uva"), o.num("mmap_offset"), o.num("fd", hi=_U16))
    if r.guest_phys_addr + r.size > 1 << 64 or r.userspace_addr + r.size > 1 << 64:
        raise SnapshotError("malformed", "region wraps past 2**64")
    return r


def _device(obj: Any, version: int) -> DeviceSnapshot:
    o = Obj(obj, "device", _DEVICE_KEYS + (_V2_DEVICE_KEYS if version >= 2 else ()))
    cfg = o.obj["config"]
    try:
        config = bytes.fromhex(cfg) if isinstance(cfg, str) and len(cfg) <= 2 * 256 else None
    except ValueError:
        config = None
    if config is None:
        raise SnapshotError("malformed", "device.config is not hex of at most 256 bytes")
    s = Obj(o.obj["seq"], "device.seq", _SEQ_KEYS)

    def i64(k: str) -> int:
        return s.num(k, lo=_I64_MIN, hi=_I64_MAX)

    seq = SeqSnapshot(s.opt("last", lambda k: s.num(k, hi=_U32)), s.opt("min_offset_ns", i64),
                      s.num("lost", hi=_I64_MAX), s.num("stale", hi=_I64_MAX), i64("last_age_ns"))
    vcpus = []
    for v in o.items("vcpus", _MAX_VCPUS):
        if (not isinstance(v, list) or len(v) != 3 or type(v[0]) is not int or type(v[1]) is not int
                or not 0 <= v[0] <= _U16 or not 0 <= v[1] <= _U32):
            raise SnapshotError("malformed", f"device.vcpus: {v!r}")
        t = v[2]
        if t is not None and (type(t) not in (int, float) or not math.isfinite(t)):
            raise SnapshotError("malformed", f"device.vcpus: time {t!r}")
        vcpus.append((v[0], v[1], None if t is None else float(t)))
    page = o.opt("page", lambda k: page_from_json(o.obj[k])) if version >= 2 else None
    clamps = o.opt("clamps", lambda k: _clamps(o.items(k, _MAX_VCPUS))) if version >= 2 else None
    host = o.opt("host", lambda k: host_from_json(o.obj[k])) if version >= 2 else None
    return DeviceSnapshot(o.num("acked_features"), config, seq, tuple(vcpus), page, clamps, host)


def _clamps(items: list[Any]) -> tuple[ClampSnapshot, ...]:
    out: list[ClampSnapshot] = []

    def time(t: Any) -> float | None:
        if t is not None and (type(t) not in (int, float) or not math.isfinite(t)):
            raise SnapshotError("malformed", f"device.clamps: time {t!r}")
        return None if t is None else float(t)

    for c in items:
        if (not isinstance(c, list) or len(c) != 6 or type(c[0]) is not int or not 0 <= c[0] <= _U16
                or type(c[1]) is not int or not 0 <= c[1] <= 1024
                or (c[2] is not None and (type(c[2]) is not int or not 0 <= c[2] <= 1024))
                or type(c[5]) is not bool):
            raise SnapshotError("malformed", f"device.clamps: {c!r}")
        out.append(ClampSnapshot(c[0], c[1], c[2], time(c[3]), time(c[4]), c[5]))
    if len({c.vcpu for c in out}) != len(out):
        raise SnapshotError("malformed", "device.clamps: a vCPU twice")
    return tuple(out)
