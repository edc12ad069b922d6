"""The vhost-user session rules, sans-IO: a message in, a list of effects out.

Theory of operation: :class:`SessionMachine` holds what the rules need to
know about one front-end connection (owner, negotiated features, each ring's
size, addresses and started/enabled state, the device status) as plain
values.  :meth:`SessionMachine.handle` looks the request up in ``RULES``, the
one table of the rules: a row per request we accept, with the conditions
under which it is allowed, its handler, and the section of QEMU's
``docs/interop/vhost-user.rst`` it comes from.  A request without a row is
refused.  The handler checks the message, updates the state and returns the
effects (``session_effects.py``) the back-end's shell carries out in order;
a broken rule raises :class:`SessionStateError` (or the protocol error the
check names) and changes nothing the shell can see.

The machine never touches an fd.  The two questions only the kernel can
answer (is this fd an eventfd? a socket?) go to an :class:`FdInspector`
passed in with the message, as time is passed into the rate limiters.

Failure: :meth:`SessionMachine.refusal` says how the front-end hears of a
rejection.  A request sent with NEED_REPLY once REPLY_ACK is negotiated, and
whose whole reply is the ack, is answered with a non-zero ack and the session
goes on; any other rejection moves the machine to its error state and the
shell closes the connection.

Ring rules (spec, "Ring states"): rings start stopped and disabled; a ring
starts when it gets its kick fd (SET_VRING_KICK) and stops on GET_VRING_BASE;
SET_VRING_ENABLE enables it, and if VHOST_USER_F_PROTOCOL_FEATURES was not
negotiated SET_FEATURES enables every ring.  A ring runs (has a queue the
device sees) exactly while it is started and enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

from . import vhost_user as vu
from .errors import LocalProtocolError, ProtocolError, SessionStateError
from .shmem import ShmemRules, with_shmem
from .session_effects import (
    CloseFd,
    Effect,
    MapRegion,
    MapRegions,
    RefreshRing,
    Reply,
    ReplyConfig,
    ReplyRingBase,
    ResetDevice,
    SetBackendChannel,
    SetCallFd,
    SetDeviceFeatures,
    SetErrFd,
    SetKickFd,
    SetRingBase,
    StartRing,
    StopRing,
    UnmapRegion,
    WriteConfig,
)
from .virtqueue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, validate_queue_size

__all__ = ["SessionMachine", "DeviceFacts", "FdInspector", "RingState", "Rule", "RULES",
           "OFFERED_PROTOCOL_FEATURES", "EVENTFD"]

F = vu.FrontendRequest
PF = vu.ProtocolFeature
PROTOCOL_FEATURES_BIT = 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
_P = TypeVar("_P")
#: what /proc/self/fd names an eventfd
EVENTFD = "anon_inode:[eventfd]"

#: Protocol features we implement, and only those.
OFFERED_PROTOCOL_FEATURES = (
    1 << PF.MQ
    | 1 << PF.REPLY_ACK
    | 1 << PF.BACKEND_REQ
    | 1 << PF.CONFIG
    | 1 << PF.RESET_DEVICE
    | 1 << PF.CONFIGURE_MEM_SLOTS
    | 1 << PF.STATUS
)


class FdInspector(Protocol):
    """The kernel's answers about an fd a message carried."""

    def fd_target(self, fd: int) -> str:
        """What ``fd`` refers to, as /proc/self/fd names it (``EVENTFD`` for an eventfd; "?" if unknown)."""
        ...

    def is_socket(self, fd: int) -> bool:
        """Whether ``fd`` is a socket (raises OSError if it cannot be asked)."""
        ...


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the rules need to know of the device: fixed for a session's lifetime."""

    features: int  # virtio feature bits offered (without VHOST_USER_F_PROTOCOL_FEATURES)
    num_queues: int
    max_queue_size: int
    config_size: int
    max_mem_slots: int
    shmem_sizes: tuple[int, ...] = ()  # shared memory regions by shmid (protocol/shmem.py)
    shmem_features: int = 0  # virtio features offered only where those regions can be placed

    def __post_init__(self) -> None:
        if self.num_queues < 1 or self.max_queue_size < 1 or self.config_size < 0 or self.max_mem_slots < 1:
            raise ValueError(f"implausible device: {self}")


@dataclass(slots=True)
class RingState:
    """One ring as the rules see it; the live queue, fds and timers belong to the shell."""

    index: int
    num: int = 0
    addr: vu.VringAddr | None = None
    started: bool = False
    enabled: bool = False
    polling: bool = False  # started without a kick fd: the back-end polls it
    running: bool = False  # started, enabled, and its queue handed to the device

    def reset(self) -> None:
        self.num, self.addr = 0, None
        self.started = self.enabled = self.polling = self.running = False


@dataclass(slots=True)
class _Call:
    """One message being handled: the fds it carried that no effect has taken yet."""

    msg: vu.Message
    fds: FdInspector
    untaken: list[int] = field(default_factory=list)

    def take(self) -> int:
        """Ownership of the message's single fd."""
        return self.untaken.pop(0)

    def payload(self, kind: type[_P]) -> _P:
        """The payload as the one type the request's spec (vhost_user/specs.py) decodes it to.

        :raise LocalProtocolError: it is of another type (the codec and a rule disagree: a bug here).
        """
        p = self.msg.payload
        if not isinstance(p, kind):
            raise LocalProtocolError("payload-type", f"{_name(self.msg.request)} carries {type(p).__name__}, "
                                     f"not {kind.__name__}")
        return p


Handler = Callable[["SessionMachine", _Call, list[Effect]], "vu.Payload | ReplyConfig | ReplyRingBase | None"]


@dataclass(frozen=True, slots=True)
class Rule:
    """When a request is allowed, what it does, and where the spec says so."""

    handler: Handler
    spec: str
    needs_owner: bool = True
    needs_protocol_feature: int | None = None  # a ProtocolFeature that must be negotiated
    ring_stopped: bool = False  # the addressed ring must not be started


class SessionMachine:
    """The rules' state for one connection.  Not thread-safe; the shell calls it from one loop."""

    def __init__(self, device: DeviceFacts) -> None:
        self.device = device
        self.shmem = ShmemRules(device.shmem_sizes, device.shmem_features)
        self.offered_protocol_features = (with_shmem(OFFERED_PROTOCOL_FEATURES) if device.shmem_sizes
                                          else OFFERED_PROTOCOL_FEATURES)
        self.acked_features = 0
        self.features_set = False
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.rings = [RingState(i) for i in range(device.num_queues)]
        #: the reason of the rejection that ended the session, if one did
        self.error: str | None = None

    # -- the entry points ---------------------------------------------------------------
    def handle(self, msg: vu.Message, fds: FdInspector) -> list[Effect]:
        """The effects of one request, in order; raises :class:`ProtocolError` when it is refused."""
        if self.error is not None:
            raise SessionStateError("session-failed", f"{_name(msg.request)} after the session failed ({self.error})")
        rule = RULES.get(msg.request)
        if rule is None:
            raise SessionStateError("unsupported-request", f"{_name(msg.request)} is not implemented here")
        self._check(rule, msg)
        call = _Call(msg, fds, list(msg.fds))
        out: list[Effect] = []
        payload = rule.handler(self, call, out)
        out.extend(CloseFd(fd) for fd in call.untaken)
        if isinstance(payload, (ReplyConfig, ReplyRingBase)):
            out.append(payload)
        elif vu.expects_reply(msg.request):
            out.append(Reply(vu.encode_reply(msg.request, payload)))
        elif msg.need_reply and self.has(PF.REPLY_ACK):
            out.append(Reply(vu.encode_reply(msg.request, vu.U64(0))))
        return out

    def refusal(self, msg: vu.Message, exc: ProtocolError) -> Reply | None:
        """The non-zero ack that answers a refused request, or None: the session ends (error state).

        A failure can be acked only where the ack is the whole reply; a request with a reply of its
        own (GET_CONFIG, GET_VRING_BASE...) closes the session (spec, "REPLY_ACK").
        """
        if (isinstance(exc, SessionStateError) and msg.need_reply and self.has(PF.REPLY_ACK)
                and not vu.expects_reply(msg.request, self.protocol_features)):
            return Reply(vu.encode_reply(msg.request, vu.U64(1)))
        self.error = exc.reason
        return None

    def has(self, pf: int) -> bool:
        return bool(self.protocol_features & (1 << pf))

    @property
    def offered_features(self) -> int:
        """The virtio features offered now: the region-backed ones only where regions can be placed."""
        return self.device.features | PROTOCOL_FEATURES_BIT | self.shmem.offered_features(self.protocol_features)

    def ring_of(self, msg: vu.Message) -> RingState:
        p = msg.payload
        index = p.value & vu.VRING_IDX_MASK if isinstance(p, vu.U64) else getattr(p, "index")
        if not 0 <= index < len(self.rings):
            raise SessionStateError("bad-ring-index", f"ring {index}, device has {len(self.rings)}")
        return self.rings[index]

    def _check(self, rule: Rule, msg: vu.Message) -> None:
        if rule.needs_owner and not self.owner:
            raise SessionStateError("no-owner", f"{_name(msg.request)} before SET_OWNER")
        if rule.needs_protocol_feature is not None and not self.has(rule.needs_protocol_feature):
            raise SessionStateError(
                "feature-not-negotiated",
                f"{_name(msg.request)} needs protocol feature {PF(rule.needs_protocol_feature).name}",
            )
        if rule.ring_stopped and self.ring_of(msg).started:
            raise SessionStateError("ring-started", f"{_name(msg.request)} on started ring")

    def _update(self, ring: RingState, out: list[Effect]) -> None:
        """Start, stop or refresh the ring's queue to match started and enabled."""
        if not (ring.started and ring.enabled):
            if ring.running:
                ring.running = False
                out.append(StopRing(ring.index))
                if not any(r.running for r in self.rings):
                    self.shmem.stopped(out)
            return
        if ring.running:
            out.append(RefreshRing(ring.index))  # a new kick fd, or memory changed under it
            return
        if ring.addr is None or ring.num == 0:
            raise SessionStateError("ring-not-configured", f"ring {ring.index} started without size or addresses")
        ring.running = True
        out.append(StartRing(ring.index, ring.num, ring.addr,
                             event_idx=bool(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX)),
                             indirect=bool(self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC))))
        self.shmem.started(self.protocol_features, self.acked_features, out)

    def _stop_running(self, out: list[Effect]) -> None:
        for ring in self.rings:
            if ring.running:
                ring.running = False
                out.append(StopRing(ring.index))

    def _update_started(self, out: list[Effect]) -> None:
        for ring in self.rings:
            if ring.started:
                self._update(ring, out)

    # -- features and ownership ----------------------------------------------------------
    def _get_features(self, c: _Call, out: list[Effect]) -> vu.U64:
        return vu.U64(self.offered_features)

    def _set_features(self, c: _Call, out: list[Effect]) -> None:
        acked = c.payload(vu.U64).value
        if acked & ~self.offered_features:
            raise SessionStateError("unsupported-features",
                                    f"acked {acked:#x} not within offered {self.offered_features:#x}")
        self.acked_features = acked
        self.features_set = True
        out.append(SetDeviceFeatures(acked & ~PROTOCOL_FEATURES_BIT))
        if not acked & PROTOCOL_FEATURES_BIT:
            for ring in self.rings:
                ring.enabled = True
                self._update(ring, out)

    def _get_protocol_features(self, c: _Call, out: list[Effect]) -> vu.U64:
        return vu.U64(self.offered_protocol_features)

    def _set_protocol_features(self, c: _Call, out: list[Effect]) -> None:
        pf = c.payload(vu.U64).value
        if pf & ~self.offered_protocol_features:
            raise SessionStateError("unsupported-protocol-features",
                                    f"{pf:#x} not within {self.offered_protocol_features:#x}")
        if self.features_set and self.shmem.offered_features(pf) != self.shmem.offered_features(self.protocol_features):
            # The offer already made would change under the acked features.
            raise SessionStateError("protocol-features-changed", "SET_PROTOCOL_FEATURES after SET_FEATURES")
        self.protocol_features = pf

    def _set_owner(self, c: _Call, out: list[Effect]) -> None:
        if self.owner:
            raise SessionStateError("owner-already-set", "SET_OWNER sent twice")
        self.owner = True

    def _get_queue_num(self, c: _Call, out: list[Effect]) -> vu.U64:
        return vu.U64(len(self.rings))

    def _get_max_mem_slots(self, c: _Call, out: list[Effect]) -> vu.U64:
        return vu.U64(self.device.max_mem_slots)

    def _set_backend_req_fd(self, c: _Call, out: list[Effect]) -> None:
        if not c.fds.is_socket(c.msg.fds[0]):
            raise SessionStateError("bad-backend-channel", "SET_BACKEND_REQ_FD fd is not a socket")
        if self.shmem.mapped:
            # Our maps went over the old channel; its acks die with it.
            raise SessionStateError("backend-channel-replaced", "SET_BACKEND_REQ_FD with shared memory mapped")
        self.shmem.channel = True
        out.append(SetBackendChannel(c.take()))

    # -- memory --------------------------------------------------------------------------
    def _set_mem_table(self, c: _Call, out: list[Effect]) -> None:
        regions = tuple(c.payload(vu.MemoryTable).regions)
        out.append(MapRegions(regions, tuple(c.msg.fds)))  # lent: closed after mapping
        for ring in self.rings:
            ring.running = False  # MapRegions dropped every queue
        self._update_started(out)

    def _add_mem_reg(self, c: _Call, out: list[Effect]) -> None:
        out.append(MapRegion(c.payload(vu.SingleMemoryRegion).region, c.msg.fds[0]))  # lent
        self._update_started(out)

    def _rem_mem_reg(self, c: _Call, out: list[Effect]) -> None:
        r = c.payload(vu.SingleMemoryRegion).region
        self._stop_running(out)  # rings living in the region lose their memory: stop them first
        out.append(UnmapRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr))
        self._update_started(out)

    # -- rings ---------------------------------------------------------------------------
    def _set_vring_num(self, c: _Call, out: list[Effect]) -> None:
        ring = self.ring_of(c.msg)
        num = c.payload(vu.VringState).num
        validate_queue_size(num)
        if num > self.device.max_queue_size:
            raise SessionStateError("bad-queue-size", f"{num} > {self.device.max_queue_size}")
        ring.num = num

    def _set_vring_addr(self, c: _Call, out: list[Effect]) -> None:
        ring = self.ring_of(c.msg)
        a = c.payload(vu.VringAddr)
        if a.flags:
            raise SessionStateError("unsupported-ring-flags", "dirty logging is not supported")
        # Split virtqueue alignment (virtio 1.x 2.7): the C drain loads indices as aligned
        # words, and a ring it refused would fall back to a slower path.
        for what, addr, align in (("descriptor table", a.desc_user_addr, 16), ("available ring", a.avail_user_addr, 2),
                                  ("used ring", a.used_user_addr, 4)):
            if addr % align:
                raise SessionStateError("misaligned-ring", f"ring {ring.index}: {what} at {addr:#x} is not "
                                        f"{align}-byte aligned")
        ring.addr = a

    def _set_vring_base(self, c: _Call, out: list[Effect]) -> None:
        ring = self.ring_of(c.msg)
        base = c.payload(vu.VringState).num
        if base > 0xFFFF:
            raise SessionStateError("bad-ring-base", f"base {base} > 0xffff")
        out.append(SetRingBase(ring.index, base))

    def _get_vring_base(self, c: _Call, out: list[Effect]) -> ReplyRingBase:
        ring = self.ring_of(c.msg)
        ring.started = False
        out.append(SetKickFd(ring.index, None, ring.polling))
        self._update(ring, out)
        return ReplyRingBase(ring.index)

    def _eventfd(self, c: _Call, what: str) -> int | None:
        """The message's eventfd, taken; None when the NOFD bit says there is none."""
        if c.payload(vu.U64).value & vu.VRING_NOFD_MASK:
            return None
        # Kick, call and err fds must be eventfds: a pipe at EOF, a file or a socket would
        # spin the loop, block it, or make epoll refuse them.
        target = c.fds.fd_target(c.msg.fds[0])
        if target != EVENTFD:
            raise SessionStateError("not-an-eventfd", f"{what} fd is {target}, not an eventfd")
        return c.take()

    def _set_vring_kick(self, c: _Call, out: list[Effect]) -> None:
        ring = self.ring_of(c.msg)
        if ring.addr is None or ring.num == 0:
            # QEMU always sends NUM, BASE and ADDR first (vhost_virtqueue_start).
            raise SessionStateError("ring-not-configured", f"ring {ring.index} kicked before its size and addresses")
        fd = self._eventfd(c, "kick")
        ring.polling = fd is None
        out.append(SetKickFd(ring.index, fd, ring.polling))
        ring.started = True
        self._update(ring, out)

    def _set_vring_call(self, c: _Call, out: list[Effect]) -> None:
        ring = self.ring_of(c.msg)
        out.append(SetCallFd(ring.index, self._eventfd(c, "call")))

    def _set_vring_err(self, c: _Call, out: list[Effect]) -> None:
        ring = self.ring_of(c.msg)
        out.append(SetErrFd(ring.index, self._eventfd(c, "err")))

    def _set_vring_enable(self, c: _Call, out: list[Effect]) -> None:
        if not self.acked_features & PROTOCOL_FEATURES_BIT:
            raise SessionStateError("feature-not-negotiated", "SET_VRING_ENABLE without PROTOCOL_FEATURES")
        ring = self.ring_of(c.msg)
        enable = c.payload(vu.VringState).num
        if enable not in (0, 1):
            raise SessionStateError("bad-enable-value", f"enable={enable}")
        ring.enabled = bool(enable)
        self._update(ring, out)

    # -- config, status, reset -----------------------------------------------------------
    def _config_range(self, c: _Call) -> vu.ConfigSpace:
        cs = c.payload(vu.ConfigSpace)
        if cs.offset + cs.size > self.device.config_size:
            raise SessionStateError("bad-config-range", f"[{cs.offset}, +{cs.size}) past {self.device.config_size}")
        return cs

    def _get_config(self, c: _Call, out: list[Effect]) -> ReplyConfig:
        cs = self._config_range(c)
        return ReplyConfig(cs.offset, cs.size, cs.flags)

    def _set_config(self, c: _Call, out: list[Effect]) -> None:
        cs = self._config_range(c)
        out.append(WriteConfig(cs.offset, cs.payload))

    def _set_status(self, c: _Call, out: list[Effect]) -> None:
        status = c.payload(vu.U64).value
        if status > 0xFF:
            raise SessionStateError("bad-status", f"status {status:#x}")
        self.status = status
        if status == 0:
            out.append(ResetDevice())

    def _get_status(self, c: _Call, out: list[Effect]) -> vu.U64:
        return vu.U64(self.status)

    def _get_shmem_config(self, c: _Call, out: list[Effect]) -> vu.ShmemConfig:
        return self.shmem.config()

    def _reset_device(self, c: _Call, out: list[Effect]) -> None:
        self._stop_running(out)
        self.shmem.stopped(out)
        for ring in self.rings:
            out += [SetKickFd(ring.index, None, False), SetCallFd(ring.index, None), SetErrFd(ring.index, None),
                    SetRingBase(ring.index, 0)]
            ring.reset()
        self.acked_features = 0
        self.features_set = False
        self.status = 0
        out.append(ResetDevice())


def _name(req: int) -> str:
    try:
        return F(req).name
    except ValueError:
        return f"request {req}"


M = SessionMachine
_FMT = "Front-end message types: "
#: The session rules: one row per request we accept; anything else is refused.  A handler
#: missing here fails at import, not when a front-end first sends the request.
RULES: dict[int, Rule] = {
    F.GET_FEATURES: Rule(M._get_features, _FMT + "GET_FEATURES", needs_owner=False),
    F.SET_FEATURES: Rule(M._set_features, _FMT + "SET_FEATURES; Ring states: without PROTOCOL_FEATURES rings are "
                         "enabled"),
    F.GET_PROTOCOL_FEATURES: Rule(M._get_protocol_features, _FMT + "GET_PROTOCOL_FEATURES", needs_owner=False),
    F.SET_PROTOCOL_FEATURES: Rule(M._set_protocol_features, _FMT + "SET_PROTOCOL_FEATURES: a subset of what was "
                                  "offered", needs_owner=False),
    F.SET_OWNER: Rule(M._set_owner, _FMT + "SET_OWNER: once per connection", needs_owner=False),
    F.GET_QUEUE_NUM: Rule(M._get_queue_num, _FMT + "GET_QUEUE_NUM; Multiple queue support", needs_owner=False,
                          needs_protocol_feature=PF.MQ),
    F.GET_MAX_MEM_SLOTS: Rule(M._get_max_mem_slots, _FMT + "GET_MAX_MEM_SLOTS", needs_owner=False,
                              needs_protocol_feature=PF.CONFIGURE_MEM_SLOTS),
    F.SET_BACKEND_REQ_FD: Rule(M._set_backend_req_fd, _FMT + "SET_BACKEND_REQ_FD", needs_owner=False,
                               needs_protocol_feature=PF.BACKEND_REQ),
    F.SET_MEM_TABLE: Rule(M._set_mem_table, _FMT + "SET_MEM_TABLE: replaces every region"),
    F.ADD_MEM_REG: Rule(M._add_mem_reg, _FMT + "ADD_MEM_REG", needs_protocol_feature=PF.CONFIGURE_MEM_SLOTS),
    F.REM_MEM_REG: Rule(M._rem_mem_reg, _FMT + "REM_MEM_REG", needs_protocol_feature=PF.CONFIGURE_MEM_SLOTS),
    F.SET_VRING_NUM: Rule(M._set_vring_num, _FMT + "SET_VRING_NUM", ring_stopped=True),
    F.SET_VRING_ADDR: Rule(M._set_vring_addr, _FMT + "SET_VRING_ADDR", ring_stopped=True),
    F.SET_VRING_BASE: Rule(M._set_vring_base, _FMT + "SET_VRING_BASE", ring_stopped=True),
    F.GET_VRING_BASE: Rule(M._get_vring_base, _FMT + "GET_VRING_BASE: stops the ring, returns the next avail index"),
    F.SET_VRING_KICK: Rule(M._set_vring_kick, _FMT + "SET_VRING_KICK: starts the ring; bit 8 = no fd, poll"),
    F.SET_VRING_CALL: Rule(M._set_vring_call, _FMT + "SET_VRING_CALL"),
    F.SET_VRING_ERR: Rule(M._set_vring_err, _FMT + "SET_VRING_ERR"),
    F.SET_VRING_ENABLE: Rule(M._set_vring_enable, _FMT + "SET_VRING_ENABLE: only with PROTOCOL_FEATURES negotiated"),
    F.GET_CONFIG: Rule(M._get_config, _FMT + "GET_CONFIG", needs_owner=False, needs_protocol_feature=PF.CONFIG),
    F.SET_CONFIG: Rule(M._set_config, _FMT + "SET_CONFIG", needs_protocol_feature=PF.CONFIG),
    F.RESET_DEVICE: Rule(M._reset_device, _FMT + "RESET_DEVICE", needs_protocol_feature=PF.RESET_DEVICE),
    F.SET_STATUS: Rule(M._set_status, _FMT + "SET_STATUS", needs_protocol_feature=PF.STATUS),
    F.GET_STATUS: Rule(M._get_status, _FMT + "GET_STATUS", needs_protocol_feature=PF.STATUS),
    F.GET_SHMEM_CONFIG: Rule(M._get_shmem_config, _FMT + "GET_SHMEM_CONFIG (QEMU 11.1: at realize, after "
                             "SET_VRING_ERR)", needs_protocol_feature=PF.SHMEM),
}
del M
