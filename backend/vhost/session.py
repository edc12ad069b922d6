"""One vhost-user session: the back-end side of one front-end connection.

Theory of operation: the transport feeds decoded messages to
:meth:`Session.handle`, which checks them against the session rules (the
``RULES`` table below, one row per request with the section of QEMU's
``docs/interop/vhost-user.rst`` it comes from), applies them, and returns the
reply to send, if any.  The session maps guest memory, owns each ring's
kick/call/err eventfds, turns a started and enabled ring into a
:class:`DeviceQueue` and calls the device for it.  It knows nothing about
cpufreq: the device is a :class:`VirtioDevice`.

Error policy: a malformed message or a rule violation raises out of
``handle`` and the transport closes this session only.  The one exception is
a request sent with NEED_REPLY once REPLY_ACK is negotiated: then the failure
is answered with a non-zero ack, as the spec intends, and the session goes on.
Every rejection is logged and counted with its reason.

Ring rules (spec, "Ring states"): rings start stopped and disabled; a ring
starts when it gets its kick fd (SET_VRING_KICK) and stops on GET_VRING_BASE;
SET_VRING_ENABLE enables it, and if VHOST_USER_F_PROTOCOL_FEATURES was not
negotiated SET_FEATURES enables every ring.  Only started and enabled rings
are processed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Callable

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import (
    GuestMemoryError,
    ProtocolError,
    RingError,
    SessionStateError,
)
from vhost_user_cpufreq.protocol.virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    DeviceQueue,
    ring_sizes,
    validate_queue_size,
)

from ..counters import Counters
from ..dataplane.guard import Signalled, drain_eventfd, signal_eventfd
from ..defaults import KICK_BATCH_DELAY
from ..policy.ratelimit import KickBatcher, NotifyCoalescer
from .device import Offload, VirtioDevice
from .memory import MAX_REGIONS, MemoryMap, map_region

__all__ = ["Session", "Reply", "OFFERED_PROTOCOL_FEATURES", "RULES"]

F = vu.FrontendRequest
PF = vu.ProtocolFeature

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


@dataclass(frozen=True, slots=True)
class Rule:
    needs_owner: bool = True
    needs_protocol_feature: int | None = None  # a ProtocolFeature that must be negotiated
    ring_stopped: bool = False  # the addressed ring must not be started
    spec: str = ""


#: Session rules, one row per request we accept; anything else is refused.
RULES: dict[int, Rule] = {
    F.GET_FEATURES: Rule(needs_owner=False, spec="GET_FEATURES"),
    F.SET_FEATURES: Rule(spec="SET_FEATURES; 'Ring states': without PROTOCOL_FEATURES rings are enabled"),
    F.GET_PROTOCOL_FEATURES: Rule(needs_owner=False, spec="GET_PROTOCOL_FEATURES"),
    F.SET_PROTOCOL_FEATURES: Rule(needs_owner=False, spec="SET_PROTOCOL_FEATURES: a subset of what was offered"),
    F.SET_OWNER: Rule(needs_owner=False, spec="SET_OWNER: once per connection"),
    F.GET_QUEUE_NUM: Rule(needs_owner=False, needs_protocol_feature=PF.MQ, spec="GET_QUEUE_NUM"),
    F.GET_MAX_MEM_SLOTS: Rule(
        needs_owner=False, needs_protocol_feature=PF.CONFIGURE_MEM_SLOTS, spec="GET_MAX_MEM_SLOTS"
    ),
    F.SET_BACKEND_REQ_FD: Rule(needs_owner=False, needs_protocol_feature=PF.BACKEND_REQ, spec="SET_BACKEND_REQ_FD"),
    F.SET_MEM_TABLE: Rule(spec="SET_MEM_TABLE: replaces every region"),
    F.ADD_MEM_REG: Rule(needs_protocol_feature=PF.CONFIGURE_MEM_SLOTS, spec="ADD_MEM_REG"),
    F.REM_MEM_REG: Rule(needs_protocol_feature=PF.CONFIGURE_MEM_SLOTS, spec="REM_MEM_REG"),
    F.SET_VRING_NUM: Rule(ring_stopped=True, spec="SET_VRING_NUM"),
    F.SET_VRING_ADDR: Rule(ring_stopped=True, spec="SET_VRING_ADDR"),
    F.SET_VRING_BASE: Rule(ring_stopped=True, spec="SET_VRING_BASE"),
    F.GET_VRING_BASE: Rule(spec="GET_VRING_BASE: stops the ring, returns the next avail index"),
    F.SET_VRING_KICK: Rule(spec="SET_VRING_KICK: starts the ring; bit 8 = no fd, poll"),
    F.SET_VRING_CALL: Rule(spec="SET_VRING_CALL"),
    F.SET_VRING_ERR: Rule(spec="SET_VRING_ERR"),
    F.SET_VRING_ENABLE: Rule(spec="SET_VRING_ENABLE: only with PROTOCOL_FEATURES negotiated"),
    F.GET_CONFIG: Rule(needs_owner=False, needs_protocol_feature=PF.CONFIG, spec="GET_CONFIG"),
    F.SET_CONFIG: Rule(needs_protocol_feature=PF.CONFIG, spec="SET_CONFIG"),
    F.RESET_DEVICE: Rule(needs_protocol_feature=PF.RESET_DEVICE, spec="RESET_DEVICE"),
    F.SET_STATUS: Rule(needs_protocol_feature=PF.STATUS, spec="SET_STATUS"),
    F.GET_STATUS: Rule(needs_protocol_feature=PF.STATUS, spec="GET_STATUS"),
}

Reply = tuple[bytes, tuple[int, ...]]  # encoded reply, fds to send with it


@dataclass(slots=True)
class Ring:
    index: int
    num: int = 0
    base: int = 0
    addr: "vu.VringAddr | None" = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    polling: bool = False
    queue: DeviceQueue | None = None
    scheduled: bool = False
    batcher: KickBatcher | None = None
    deadline: asyncio.TimerHandle | None = None  # drain without a kick (kick batching)
    offload: Offload | None = None  # served by the device off the loop (the C kick lane)


class Session:
    """The state of one connection; methods are called from the event loop."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        name: str,
        loop: asyncio.AbstractEventLoop,
        counters: Counters,
        log: logging.LoggerAdapter[logging.Logger],
        notify_interval: float = 0.01,
        poll_interval: float = 0.001,
        kick_batch_delay: float = KICK_BATCH_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.name = name
        self.loop = loop
        self.counters = counters
        self.log = log
        self.clock = clock
        self.poll_interval = poll_interval
        self.kick_batch_delay = kick_batch_delay
        self.owner = False
        self.offered_features = device.features() | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
        self.acked_features = 0
        self.features_set = False
        self.protocol_features = 0
        self.memory = MemoryMap()
        self.rings = [Ring(i) for i in range(device.num_queues)]
        self.status = 0
        self.backend_channel: socket.socket | None = None
        self.coalescer = NotifyCoalescer(notify_interval)
        self._notify_timer: asyncio.TimerHandle | None = None
        self.closed = False
        #: set by the transport: closes the connection with a reason (a session cannot close its socket)
        self.on_fatal: Callable[[str], None] | None = None
        self._untaken: list[int] = []
        device.attach(self)

    # -- message dispatch -----------------------------------------------------------
    def handle(self, msg: "vu.Message") -> Reply | None:
        """Apply one request; returns the reply to send, if any.

        Raises :class:`ProtocolError` when the session must close.
        """
        req = msg.request
        # fds the message carried and no handler took: closed whatever happens.
        self._untaken = list(msg.fds)
        try:
            rule = RULES.get(req)
            if rule is None:
                raise SessionStateError("unsupported-request", f"{_name(req)} is not implemented here")
            self._check(rule, msg)
            try:
                payload = getattr(self, "_on_" + F(req).name.lower())(msg)
            except OSError as exc:
                # An fd the front-end passed that the kernel will not use as we need.
                raise SessionStateError("unusable-fd", f"{_name(req)}: {exc.strerror or exc}") from None
            if self.memory.faulted():
                # A handler read rings in guest RAM the front-end shrank under us (guard.py).
                raise GuestMemoryError("guest-memory-gone", f"guest RAM faulted while handling {_name(req)}")
        except ProtocolError as exc:
            self.counters.inc("rejected", exc.reason)
            # A failure can be acked only where the ack is the whole reply; a request
            # with a reply of its own (GET_CONFIG, GET_VRING_BASE...) closes the session.
            if (isinstance(exc, SessionStateError) and msg.need_reply and self._has(PF.REPLY_ACK)
                    and not vu.expects_reply(req, self.protocol_features)):
                self.log.warning("refused %s: %s", _name(req), str(exc))
                return vu.encode_reply(req, vu.U64(1)), ()
            raise
        finally:
            _close_fds(self._untaken)
            self._untaken = []
        if vu.expects_reply(req):
            return vu.encode_reply(req, payload), ()
        if msg.need_reply and self._has(PF.REPLY_ACK):
            return vu.encode_reply(req, vu.U64(0)), ()
        return None

    def _take_fd(self) -> int:
        """Take ownership of the message's (single) fd."""
        return self._untaken.pop(0)

    def _has(self, pf: int) -> bool:
        return bool(self.protocol_features & (1 << pf))

    def _check(self, rule: Rule, msg: "vu.Message") -> None:
        if rule.needs_owner and not self.owner:
            raise SessionStateError("no-owner", f"{_name(msg.request)} before SET_OWNER")
        if rule.needs_protocol_feature is not None and not self._has(rule.needs_protocol_feature):
            raise SessionStateError(
                "feature-not-negotiated",
                f"{_name(msg.request)} needs protocol feature {PF(rule.needs_protocol_feature).name}",
            )
        if rule.ring_stopped and self._ring_of(msg).started:
            raise SessionStateError("ring-started", f"{_name(msg.request)} on started ring")

    def _ring_of(self, msg: "vu.Message") -> Ring:
        p = msg.payload
        if isinstance(p, vu.U64):
            index = p.value & vu.VRING_IDX_MASK
        else:
            index = getattr(p, "index")
        if not 0 <= index < len(self.rings):
            raise SessionStateError("bad-ring-index", f"ring {index}, device has {len(self.rings)}")
        return self.rings[index]

    # -- features and ownership ------------------------------------------------------
    def _on_get_features(self, msg: "vu.Message") -> "vu.U64":
        return vu.U64(self.offered_features)

    def _on_set_features(self, msg: "vu.Message") -> None:
        acked = msg.payload.value
        if acked & ~self.offered_features:
            raise SessionStateError("unsupported-features", f"acked {acked:#x} not within offered {self.offered_features:#x}")
        self.acked_features = acked
        self.features_set = True
        self.device.set_features(acked & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES))
        if not acked & (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES):
            for ring in self.rings:
                ring.enabled = True
                self._update_ring(ring)

    def _on_get_protocol_features(self, msg: "vu.Message") -> "vu.U64":
        return vu.U64(OFFERED_PROTOCOL_FEATURES)

    def _on_set_protocol_features(self, msg: "vu.Message") -> None:
        pf = msg.payload.value
        if pf & ~OFFERED_PROTOCOL_FEATURES:
            raise SessionStateError("unsupported-protocol-features", f"{pf:#x} not within {OFFERED_PROTOCOL_FEATURES:#x}")
        self.protocol_features = pf

    def _on_set_owner(self, msg: "vu.Message") -> None:
        if self.owner:
            raise SessionStateError("owner-already-set", "SET_OWNER sent twice")
        self.owner = True

    def _on_get_queue_num(self, msg: "vu.Message") -> "vu.U64":
        return vu.U64(len(self.rings))

    def _on_get_max_mem_slots(self, msg: "vu.Message") -> "vu.U64":
        return vu.U64(MAX_REGIONS)

    def _on_set_backend_req_fd(self, msg: "vu.Message") -> None:
        if not stat.S_ISSOCK(os.fstat(msg.fds[0]).st_mode):
            raise SessionStateError("bad-backend-channel", "SET_BACKEND_REQ_FD fd is not a socket")
        if self.backend_channel is not None:
            self.backend_channel.close()
        sock = socket.socket(fileno=self._take_fd())
        sock.setblocking(False)
        self.backend_channel = sock

    # -- memory ------------------------------------------------------------------------
    def _on_set_mem_table(self, msg: "vu.Message") -> None:
        new = MemoryMap()
        try:
            for region, fd in zip(msg.payload.regions, msg.fds, strict=True):
                _map_into(new, fd, region)
        except GuestMemoryError:
            new.clear()
            raise
        self._replace_memory(new)

    def _on_add_mem_reg(self, msg: "vu.Message") -> None:
        for ring in self.rings:
            self._unoffload(ring)  # an offloaded ring holds the old region table
        _map_into(self.memory, msg.fds[0], msg.payload.region)
        self._retranslate_rings()

    def _on_rem_mem_reg(self, msg: "vu.Message") -> None:
        r = msg.payload.region
        # Rings living in the region lose their memory: stop them first.
        for ring in self.rings:
            if ring.queue is not None:
                self._drop_queue(ring)
        self.memory.remove(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        self._retranslate_rings()

    def _replace_memory(self, new: MemoryMap) -> None:
        for ring in self.rings:
            self._drop_queue(ring)
        old, self.memory = self.memory, new
        old.clear()
        self._retranslate_rings()

    def _retranslate_rings(self) -> None:
        for ring in self.rings:
            if ring.started:
                self._update_ring(ring)

    # -- rings -------------------------------------------------------------------------
    def _on_set_vring_num(self, msg: "vu.Message") -> None:
        ring = self._ring_of(msg)
        num = msg.payload.num
        validate_queue_size(num)
        if num > self.device.max_queue_size:
            raise SessionStateError("bad-queue-size", f"{num} > {self.device.max_queue_size}")
        ring.num = num

    def _on_set_vring_addr(self, msg: "vu.Message") -> None:
        ring = self._ring_of(msg)
        a = msg.payload
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

    def _on_set_vring_base(self, msg: "vu.Message") -> None:
        ring = self._ring_of(msg)
        if msg.payload.num > 0xFFFF:
            raise SessionStateError("bad-ring-base", f"base {msg.payload.num} > 0xffff")
        ring.base = msg.payload.num

    def _on_get_vring_base(self, msg: "vu.Message") -> "vu.VringState":
        ring = self._ring_of(msg)
        self._unoffload(ring)  # the lane's cursor first: it is the one that moved
        next_avail = ring.queue.last_avail_idx if ring.queue is not None else ring.base
        ring.base = next_avail
        ring.started = False
        self._set_kick(ring, None)
        self._update_ring(ring)
        return vu.VringState(ring.index, next_avail)

    def _on_set_vring_kick(self, msg: "vu.Message") -> None:
        ring = self._ring_of(msg)
        if ring.addr is None or ring.num == 0:
            # QEMU always sends NUM, BASE and ADDR first (vhost_virtqueue_start).
            raise SessionStateError("ring-not-configured", f"ring {ring.index} kicked before its size and addresses")
        nofd = bool(msg.payload.value & vu.VRING_NOFD_MASK)
        if not nofd:
            _require_eventfd(msg.fds[0], "kick")
        self._set_kick(ring, None)
        ring.polling = nofd
        self._set_kick(ring, None if nofd else self._take_fd())
        ring.started = True
        self._update_ring(ring)

    def _on_set_vring_call(self, msg: "vu.Message") -> None:
        ring = self._ring_of(msg)
        nofd = bool(msg.payload.value & vu.VRING_NOFD_MASK)
        if not nofd:
            _require_eventfd(msg.fds[0], "call")
        old = ring.call_fd
        ring.call_fd = None if nofd else self._take_fd()
        if ring.call_fd is not None:
            os.set_blocking(ring.call_fd, False)
        if ring.offload is not None:
            ring.offload.set_call(ring.call_fd)
        _close_fd(old)

    def _on_set_vring_err(self, msg: "vu.Message") -> None:
        ring = self._ring_of(msg)
        nofd = bool(msg.payload.value & vu.VRING_NOFD_MASK)
        if not nofd:
            _require_eventfd(msg.fds[0], "err")
        _close_fd(ring.err_fd)
        ring.err_fd = None if nofd else self._take_fd()

    def _on_set_vring_enable(self, msg: "vu.Message") -> None:
        if not self.acked_features & (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES):
            raise SessionStateError("feature-not-negotiated", "SET_VRING_ENABLE without PROTOCOL_FEATURES")
        ring = self._ring_of(msg)
        if msg.payload.num not in (0, 1):
            raise SessionStateError("bad-enable-value", f"enable={msg.payload.num}")
        ring.enabled = bool(msg.payload.num)
        self._update_ring(ring)

    def _set_kick(self, ring: Ring, fd: int | None) -> None:
        self._unoffload(ring)
        if ring.kick_fd is not None:
            self.loop.remove_reader(ring.kick_fd)
            _close_fd(ring.kick_fd)
        ring.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, self._on_kick, ring)

    def _update_ring(self, ring: Ring) -> None:
        """Create or drop the ring's DeviceQueue to match started/enabled."""
        if not (ring.started and ring.enabled):
            self._drop_queue(ring)
            return
        if ring.queue is not None:
            self._offload(ring)  # a new kick fd, or memory changed under an offloaded ring
            return
        if ring.addr is None or ring.num == 0:
            raise SessionStateError("ring-not-configured", f"ring {ring.index} started without size or addresses")
        desc_len, avail_len, used_len = ring_sizes(ring.num)
        a = ring.addr
        try:
            desc = self.memory.view_va(a.desc_user_addr, desc_len)
            avail = self.memory.view_va(a.avail_user_addr, avail_len)
            used = self.memory.view_va(a.used_user_addr, used_len)
        except GuestMemoryError as exc:
            raise RingError("ring-address-out-of-range", f"ring {ring.index}: {exc.detail}") from None
        ring.queue = DeviceQueue(
            ring.num, desc, avail, used, self.memory,
            event_idx=bool(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX)),
            indirect=bool(self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC)),
            max_chain_bytes=self.device.max_chain_bytes,
            max_indirect=self.device.max_indirect,
        )
        ring.queue.set_base(ring.base)
        self.device.queue_ready(ring.index, ring.queue)
        self.log.debug("ring %d ready: size %d base %d", ring.index, ring.num, ring.base)
        # Buffers made available before the ring started are not signalled again
        # (an offloaded ring is drained once by the lane on attach).
        if not self._offload(ring):
            self._schedule(ring)

    def _offload(self, ring: Ring) -> bool:
        """Let the device serve the ring off the loop if it can; True if it does."""
        if ring.offload is not None:
            return True
        make = getattr(self.device, "offload", None)
        if make is None or ring.queue is None or ring.kick_fd is None or ring.queue.broken:
            return False
        off = make(ring.index, ring.queue, ring.kick_fd, ring.call_fd, self.kick_batch_delay)
        if off is None:
            return False
        self.loop.remove_reader(ring.kick_fd)
        if ring.deadline is not None:
            ring.deadline.cancel()
            ring.deadline = None
        ring.batcher = None
        ring.offload = off
        return True

    def _unoffload(self, ring: Ring) -> None:
        if ring.offload is None:
            return
        off, ring.offload = ring.offload, None
        off.detach()
        if ring.kick_fd is not None:
            self.loop.add_reader(ring.kick_fd, self._on_kick, ring)
        if ring.queue is not None:
            self._schedule(ring)  # kicks that came during the hand-over are not lost

    def fail(self, reason: str, detail: str) -> None:
        if self.closed:
            return
        self.log.error("closing session: %s: %s", reason, detail)
        if self.on_fatal is not None:
            self.loop.call_soon(self.on_fatal, reason)  # not from inside the device's callback

    def refresh_offload(self, index: int) -> None:
        ring = self.rings[index]
        self._unoffload(ring)
        self._offload(ring)

    def _drop_queue(self, ring: Ring) -> None:
        self._unoffload(ring)
        if ring.deadline is not None:
            ring.deadline.cancel()
            ring.deadline = None
        ring.batcher = None
        if ring.queue is not None:
            ring.base = ring.queue.last_avail_idx
            ring.queue = None
            self.device.queue_ready(ring.index, None)

    def _on_kick(self, ring: Ring) -> None:
        if ring.kick_fd is None:
            return
        # Never a blocking read: the front-end shares the fd's flags and may drain it first.
        if not drain_eventfd(ring.kick_fd):
            return
        self.counters.inc("kicks")
        if ring.scheduled:
            return  # its turn is already queued: a kick must not buy a ring a second one
        t0 = time.perf_counter()
        self._process(ring)
        # From the guest's kick being read to every record of it decided on.
        self.counters.observe("kick_to_decision_seconds", time.perf_counter() - t0)

    def _schedule(self, ring: Ring) -> None:
        if not ring.scheduled:
            ring.scheduled = True
            self.loop.call_soon(self._scheduled_process, ring)

    def _scheduled_process(self, ring: Ring) -> None:
        ring.scheduled = False
        if not self.closed:
            self._process(ring)

    def _process(self, ring: Ring) -> None:
        q = ring.queue
        if q is None or q.broken or ring.offload is not None:
            return
        self._serve(ring, q)
        if self.memory.faulted():
            # What the drain read may be zero pages (guard.py): the ring is left alone.
            q.abandon()
            self.fail("guest-memory-gone", "guest RAM was shrunk or left unbacked under the request queue; "
                      "the ring is left alone")

    def _serve(self, ring: Ring, q: DeviceQueue) -> None:
        q.disable_notifications()
        before = q.last_avail_idx
        more = self.device.handle_queue(ring.index, q)
        if more:
            self._schedule(ring)  # work budget spent: come back after other sessions had their turn
            return
        ahead, due = 1, None
        if q.event_idx and self.kick_batch_delay > 0:
            now = self.clock()
            if ring.batcher is None:
                # On the event loop a poll costs about what a kick's wake-up does (a timer and a
                # drain in Python), so a ring is polled only once each poll finds a buffer on
                # average; the kick lane polls an idle ring for a load of its index, and so from
                # KickBatcher's lower default rates on.
                ring.batcher = KickBatcher(self.kick_batch_delay, max_ahead=max(1, ring.num // 2),
                                           enter_rate=1.0 / self.kick_batch_delay,
                                           leave_rate=0.4 / self.kick_batch_delay)
            ahead = ring.batcher.drained(now, (q.last_avail_idx - before) & 0xFFFF)
            due = ring.batcher.next_poll(now)
        if due is not None:
            # A busy ring: drained on the shared poll grid, kicked only by a burst of `ahead` buffers.
            pending = q.set_avail_event((q.last_avail_idx + ahead - 1) & 0xFFFF)
            if ring.deadline is None:
                ring.deadline = self.loop.call_at(self.loop.time() + (due - now), self._deadline, ring)
        else:
            if ring.deadline is not None:
                ring.deadline.cancel()
                ring.deadline = None
            pending = q.enable_notifications()
        if pending:
            self._schedule(ring)  # buffers arrived while notifications were off
        elif ring.polling:
            self.loop.call_later(self.poll_interval, self._scheduled_process, ring)

    def _deadline(self, ring: Ring) -> None:
        ring.deadline = None
        if not self.closed:
            self.counters.inc("polls")
            self._process(ring)

    # -- DeviceHost --------------------------------------------------------------------
    def signal_used(self, index: int) -> None:
        ring = self.rings[index]
        q = ring.queue
        if q is None:
            return
        q.publish()
        if q.should_notify() and ring.call_fd is not None:
            # The front-end shares this file description: it may have cleared O_NONBLOCK
            # and filled the counter (guard.py).
            try:
                sent = signal_eventfd(ring.call_fd)
            except OSError as exc:
                self.counters.inc("interrupts_dropped", type(exc).__name__)
                self.log.warning("call eventfd of ring %d: %s", index, exc.strerror or exc)
                return
            if sent == Signalled.FULL:
                self.counters.inc("interrupts_dropped", "call-fd-full")
            elif sent == Signalled.STALLED:
                self.counters.inc("interrupts_dropped", "call-fd-stalled")
                q.abandon()
                self.fail("call-fd-stalled", f"the call eventfd of ring {index} was made blocking and kept full")

    def config_changed(self) -> None:
        now = self.clock()
        if self.coalescer.change(now):
            self._send_config_change()
        elif self._notify_timer is None:
            due = self.coalescer.deadline()
            assert due is not None
            self._notify_timer = self.loop.call_later(max(0.0, due - now), self._notify_timer_fired)

    def _notify_timer_fired(self) -> None:
        self._notify_timer = None
        if not self.closed and self.coalescer.fire(self.clock()):
            self._send_config_change()

    def _send_config_change(self) -> None:
        if self.backend_channel is None or not self._has(PF.BACKEND_REQ):
            self.counters.inc("config_notify_skipped", "no-backend-channel")
            return
        try:
            # MSG_DONTWAIT: O_NONBLOCK lives in the file description the front-end shares.
            self.backend_channel.send(vu.encode_message(vu.BackendRequest.CONFIG_CHANGE_MSG), socket.MSG_DONTWAIT)
        except OSError as exc:
            self.counters.inc("config_notify_failed", type(exc).__name__)
            self.log.warning("could not send CONFIG_CHANGE_MSG: %s", exc)
            return
        self.counters.inc("config_notifications")

    # -- config, status, reset ---------------------------------------------------------
    def _on_get_config(self, msg: "vu.Message") -> "vu.ConfigSpace":
        c = msg.payload
        if c.offset + c.size > self.device.config_size:
            raise SessionStateError("bad-config-range", f"[{c.offset}, +{c.size}) past {self.device.config_size}")
        return vu.ConfigSpace(c.offset, c.size, c.flags, self.device.get_config(c.offset, c.size))

    def _on_set_config(self, msg: "vu.Message") -> None:
        c = msg.payload
        if c.offset + c.size > self.device.config_size:
            raise SessionStateError("bad-config-range", f"[{c.offset}, +{c.size}) past {self.device.config_size}")
        self.device.set_config(c.offset, c.payload)

    def _on_set_status(self, msg: "vu.Message") -> None:
        status = msg.payload.value
        if status > 0xFF:
            raise SessionStateError("bad-status", f"status {status:#x}")
        self.status = status
        if status == 0:
            for ring in self.rings:
                self._unoffload(ring)  # the device's state is about to go: take the rings back first
            self.device.reset()

    def _on_get_status(self, msg: "vu.Message") -> "vu.U64":
        return vu.U64(self.status)

    def _on_reset_device(self, msg: "vu.Message") -> None:
        for ring in self.rings:
            self._drop_queue(ring)
            self._set_kick(ring, None)
            _close_fd(ring.call_fd)
            _close_fd(ring.err_fd)
        self.rings = [Ring(i) for i in range(self.device.num_queues)]
        self.acked_features = 0
        self.features_set = False
        self.status = 0
        self.device.reset()

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Release every fd and mapping; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self._notify_timer is not None:
            self._notify_timer.cancel()
        for ring in self.rings:
            self._drop_queue(ring)
            self._set_kick(ring, None)
            _close_fd(ring.call_fd)
            _close_fd(ring.err_fd)
            ring.call_fd = ring.err_fd = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.device.attach(None)
        self.memory.clear()


def _require_eventfd(fd: int, what: str) -> None:
    """Kick, call and err fds must be eventfds: a pipe at EOF, a file or a socket would
    spin the loop, block it, or make epoll refuse them."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "?"
    if target != "anon_inode:[eventfd]":
        raise SessionStateError("not-an-eventfd", f"{what} fd is {target}, not an eventfd")


def _map_into(memory: MemoryMap, fd: int, r: "vu.MemoryRegion") -> None:
    """Map one region into ``memory``; on any rejection nothing stays mapped."""
    region = map_region(fd, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    try:
        memory.add(region)
    except GuestMemoryError:
        region.close()
        raise


def _name(req: int) -> str:
    try:
        return F(req).name
    except ValueError:
        return f"request {req}"


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        _close_fd(fd)
