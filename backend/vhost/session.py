"""One vhost-user session: the shell that carries out the session rules' effects.

Theory of operation: the rules live in :mod:`vhost_user_cpufreq.protocol.session`,
sans-IO: :meth:`Session.handle` feeds each decoded message to the
:class:`SessionMachine` and carries out the effects it returns, in order:
it maps guest memory, owns each ring's kick/call/err eventfds, turns a
started and enabled ring into a :class:`DeviceQueue` and hands it to the
device, and builds the reply.  It knows nothing about cpufreq: the device is
a :class:`VirtioDevice`.  What happens between messages (kicks, kick
batching and polling, used-buffer interrupts, coalesced config-change
notifications) is this shell's own, on the event loop.

Error policy: a malformed message, a rule violation, or an effect the kernel
refuses raises out of ``handle`` and the transport closes this session only.
The machine decides the one exception (``SessionMachine.refusal``): a request
sent with NEED_REPLY once REPLY_ACK is negotiated is answered with a non-zero
ack, and the session goes on.  Every rejection is logged and counted with
its reason.  Every fd a message carried is handed over or closed, whatever
happens.
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

from vhost_user_cpufreq.protocol import session_effects as fx
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import GuestMemoryError, ProtocolError, RingError, SessionStateError
from vhost_user_cpufreq.protocol.session import OFFERED_PROTOCOL_FEATURES, RULES, DeviceFacts, RingState, SessionMachine
from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue, ring_sizes

from ..counters import Counters
from ..dataplane.guard import Signalled, drain_eventfd, signal_eventfd
from ..defaults import KICK_BATCH_DELAY
from ..policy.ratelimit import KickBatcher, NotifyCoalescer
from .device import Offload, VirtioDevice
from .memory import MAX_REGIONS, MemoryMap, map_region
from .shmem import SharedRegions

__all__ = ["Session", "Reply", "OFFERED_PROTOCOL_FEATURES", "RULES"]

F = vu.FrontendRequest
PF = vu.ProtocolFeature

Reply = tuple[bytes, tuple[int, ...]]  # encoded reply, fds to send with it


class _KernelFds:
    """The machine's FdInspector: asks /proc and fstat."""

    def fd_target(self, fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return "?"

    def is_socket(self, fd: int) -> bool:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)


_KERNEL_FDS = _KernelFds()


@dataclass(slots=True)
class Ring:
    """One ring's live side; its rules' side is ``state`` (the machine's)."""

    state: RingState
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    polling: bool = False
    queue: DeviceQueue | None = None
    scheduled: bool = False
    batcher: KickBatcher | None = None
    deadline: asyncio.TimerHandle | None = None  # drain without a kick (kick batching)
    offload: Offload | None = None  # served by the device off the loop (the C kick lane)

    @property
    def index(self) -> int:
        return self.state.index

    @property
    def num(self) -> int:
        return self.state.num

    @property
    def started(self) -> bool:
        return self.state.started

    @property
    def enabled(self) -> bool:
        return self.state.enabled


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
        self.machine = SessionMachine(DeviceFacts(
            features=device.features(), num_queues=device.num_queues, max_queue_size=device.max_queue_size,
            config_size=device.config_size, max_mem_slots=MAX_REGIONS,
            shmem_sizes=getattr(device, "shmem_sizes", ()), shmem_features=getattr(device, "shmem_features", 0)))
        self.memory = MemoryMap()
        self.rings = [Ring(r) for r in self.machine.rings]
        self.backend_channel: socket.socket | None = None
        self.shmem = SharedRegions(device, name=name, counters=counters, log=log,
                                   add_reader=lambda fd, cb: loop.add_reader(fd, cb), remove_reader=loop.remove_reader)
        self.coalescer = NotifyCoalescer(notify_interval)
        self._notify_timer: asyncio.TimerHandle | None = None
        self._notify_owed = False  # a change came while no ring ran: notified when one starts
        self.closed = False
        #: stopped at a quiescent point for a handover (vhost/handover.py): no ring is served
        self.frozen = False
        #: set by the transport: closes the connection with a reason (a session cannot close its socket)
        self.on_fatal: Callable[[str], None] | None = None
        self._untaken: list[int] = []
        device.attach(self)

    # -- the rules' state, read-only ------------------------------------------------------
    @property
    def owner(self) -> bool:
        return self.machine.owner

    @property
    def acked_features(self) -> int:
        return self.machine.acked_features

    @property
    def protocol_features(self) -> int:
        return self.machine.protocol_features

    @property
    def status(self) -> int:
        return self.machine.status

    # -- messages in, effects out -------------------------------------------------------
    def handle(self, msg: "vu.Message") -> Reply | None:
        """Apply one request; returns the reply to send, if any.

        Raises :class:`ProtocolError` when the session must close.
        """
        req = msg.request
        # fds the message carried and no effect took: closed whatever happens.
        self._untaken = list(msg.fds)
        try:
            try:
                reply = self._perform(self.machine.handle(msg, _KERNEL_FDS))
            except OSError as exc:
                # An fd the front-end passed that the kernel will not use as we need.
                raise SessionStateError("unusable-fd", f"{_name(req)}: {exc.strerror or exc}") from None
            if self.memory.faulted():
                # An effect read rings in guest RAM the front-end shrank under us (guard.py).
                raise GuestMemoryError("guest-memory-gone", f"guest RAM faulted while handling {_name(req)}")
        except ProtocolError as exc:
            self.counters.inc("rejected", exc.reason)
            nack = self.machine.refusal(msg, exc)
            if nack is not None:
                self.log.warning("refused %s: %s", _name(req), str(exc))
                return nack.data, nack.fds
            raise
        finally:
            _close_fds(self._untaken)
            self._untaken = []
        return reply

    def _take(self, fd: int | None) -> int | None:
        """Ownership of one of the message's fds passes to this shell."""
        if fd is not None:
            self._untaken.remove(fd)
        return fd

    def _perform(self, effects: list[fx.Effect]) -> Reply | None:
        reply: Reply | None = None
        for e in effects:
            match e:
                case fx.Reply(data, fds):
                    reply = (data, fds)
                case fx.ReplyConfig(offset, size, flags):
                    reply = vu.encode_reply(F.GET_CONFIG, vu.ConfigSpace(
                        offset, size, flags, self.device.get_config(offset, size))), ()
                case fx.ReplyRingBase(index):
                    reply = vu.encode_reply(F.GET_VRING_BASE, vu.VringState(index, self.rings[index].base)), ()
                case fx.CloseFd(fd):
                    self._untaken.remove(fd)
                    _close_fd(fd)
                case fx.SetBackendChannel(fd):
                    if self.backend_channel is not None:
                        self.shmem.channel_replaced()
                        self.backend_channel.close()
                    sock = socket.socket(fileno=self._take(fd))
                    sock.setblocking(False)
                    self.backend_channel = sock
                case fx.SetDeviceFeatures(features):
                    self.device.set_features(features)
                case fx.WriteConfig(offset, data):
                    self.device.set_config(offset, data)
                case fx.ResetDevice():
                    for ring in self.rings:
                        self._unoffload(ring)  # the device's state is about to go: take the rings back first
                    self.device.reset()
                case fx.MapRegions(regions, fds):
                    new = MemoryMap()
                    try:
                        for region, fd in zip(regions, fds, strict=True):
                            _map_into(new, fd, region)
                    except GuestMemoryError:
                        new.clear()
                        raise
                    for ring in self.rings:
                        self._drop_queue(ring)
                    old, self.memory = self.memory, new
                    old.clear()
                case fx.MapRegion(region, fd):
                    for ring in self.rings:
                        self._unoffload(ring)  # an offloaded ring holds the old region table
                    _map_into(self.memory, fd, region)
                case fx.UnmapRegion(gpa, size, uva):
                    self.memory.remove(gpa, size, uva)
                case fx.SetKickFd(index, fd, polling):
                    ring = self.rings[index]
                    self._set_kick(ring, None)
                    ring.polling = polling
                    self._set_kick(ring, self._take(fd))
                case fx.SetCallFd(index, fd):
                    ring = self.rings[index]
                    old_call, ring.call_fd = ring.call_fd, self._take(fd)
                    if ring.call_fd is not None:
                        os.set_blocking(ring.call_fd, False)
                    if ring.offload is not None:
                        ring.offload.set_call(ring.call_fd)
                    _close_fd(old_call)
                case fx.SetErrFd(index, fd):
                    ring = self.rings[index]
                    _close_fd(ring.err_fd)
                    ring.err_fd = self._take(fd)
                case fx.SetRingBase(index, base):
                    self.rings[index].base = base
                case fx.StartRing():
                    self._start_ring(e)
                case fx.StopRing(index):
                    self._drop_queue(self.rings[index])
                case fx.RefreshRing(index):
                    self._offload(self.rings[index])
                case fx.MapShmem(shmid, size):
                    self.shmem.map(self.backend_channel, shmid, size)
                case fx.ShmemDropped():
                    self.shmem.dropped()
                case _:
                    raise AssertionError(f"no shell for effect {e!r}")
        return reply

    def _set_kick(self, ring: Ring, fd: int | None) -> None:
        self._unoffload(ring)
        if ring.kick_fd is not None:
            self.loop.remove_reader(ring.kick_fd)
            _close_fd(ring.kick_fd)
        ring.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, self._on_kick, ring)

    def _start_ring(self, e: fx.StartRing, cursor: tuple[int, int | None] | None = None) -> None:
        """Make the ring's DeviceQueue over guest memory and hand it to the device.

        ``cursor``: (used index, used index last signalled) of a ring resumed after a handover.
        """
        ring = self.rings[e.index]
        desc_len, avail_len, used_len = ring_sizes(e.num)
        a = e.addr
        try:
            desc = self.memory.view_va(a.desc_user_addr, desc_len)
            avail = self.memory.view_va(a.avail_user_addr, avail_len)
            used = self.memory.view_va(a.used_user_addr, used_len)
        except GuestMemoryError as exc:
            raise RingError("ring-address-out-of-range", f"ring {ring.index}: {exc.detail}") from None
        ring.queue = DeviceQueue(
            e.num, desc, avail, used, self.memory, event_idx=e.event_idx, indirect=e.indirect,
            max_chain_bytes=self.device.max_chain_bytes,
            max_indirect=self.device.max_indirect,
        )
        ring.queue.set_base(ring.base)
        if cursor is not None:
            ring.queue.hand_back(ring.base | ring.base << 16 | cursor[0] << 32, cursor[1])
        self.device.queue_ready(ring.index, ring.queue)
        self.log.debug("ring %d ready: size %d base %d", ring.index, e.num, ring.base)
        # Buffers made available before the ring started are not signalled again
        # (an offloaded ring is drained once by the lane on attach), so what the kick
        # counter holds now is spent: QEMU hands the same eventfd to a restarted ring,
        # and the signals of its last start must not count as a kick (SPEC 6.5).
        self._discard_kicks(ring)
        if not self._offload(ring):
            self._schedule(ring)
        if self._notify_owed:
            self._notify_owed = False
            self._send_config_change()

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
        # The lane never reads the counter (edge-triggered): its kicks were served and
        # counted there, and the drain scheduled below covers any that came since.
        self._discard_kicks(ring)
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
            self._discard_kicks(ring)  # GET_VRING_BASE: the kicks of this start are spent

    def _discard_kicks(self, ring: Ring) -> None:
        """Read the kick counter down without counting a kick (a drain of the ring covers them)."""
        if ring.kick_fd is not None:
            drain_eventfd(ring.kick_fd)  # never blocks, whatever flags the front-end set on the fd

    def _on_kick(self, ring: Ring) -> None:
        if ring.kick_fd is None:
            return
        # Never a blocking read: the front-end shares the fd's flags and may drain it first.
        if not drain_eventfd(ring.kick_fd):
            return
        if ring.queue is None:
            return  # a stopped ring: nothing to serve, and its start drains the ring anyway
        self.counters.inc("kicks")
        if ring.scheduled:
            return  # its turn is already queued: a kick must not buy a ring a second one
        t0 = time.perf_counter()
        self._process(ring)
        # From the guest's kick being read to every record of it decided on.
        self.counters.observe("kick_to_decision_seconds", time.perf_counter() - t0)

    def _schedule(self, ring: Ring, *, behind_io: bool = False) -> None:
        if not ring.scheduled:
            ring.scheduled = True
            if behind_io:
                # A timer due now, not call_soon: asyncio runs the callbacks of the I/O it polls
                # next before the timers that came due, so every kick that arrived during this
                # turn (any VM's) is served before this ring's next turn, and backlogged rings
                # take turns in the order they yielded.  call_soon would put this turn first.
                self.loop.call_at(self.loop.time(), self._scheduled_process, ring)
            else:
                self.loop.call_soon(self._scheduled_process, ring)

    def _scheduled_process(self, ring: Ring) -> None:
        ring.scheduled = False
        if not self.closed:
            self._process(ring)

    def _process(self, ring: Ring) -> None:
        q = ring.queue
        if q is None or q.broken or ring.offload is not None or self.frozen:
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
            self._schedule(ring, behind_io=True)  # budget spent: back after every VM that is ready
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
        if not self.closed and not self.frozen and self.coalescer.fire(self.clock()):
            self._send_config_change()

    def _send_config_change(self) -> None:
        if self.backend_channel is None or not self.machine.has(PF.BACKEND_REQ):
            self.counters.inc("config_notify_skipped", "no-backend-channel")
            return
        if not any(r.queue is not None for r in self.rings):
            # QEMU 11.1.3 crashes on a CONFIG_CHANGE_MSG while its device is stopped (before the
            # driver's DRIVER_OK, after a reset: docs/qemu-facts.md section e).  The driver reads the
            # config at probe; what changes after that is notified once a ring runs.
            self._notify_owed = True
            self.counters.inc("config_notify_skipped", "device-stopped")
            return
        try:
            # MSG_DONTWAIT: O_NONBLOCK lives in the file description the front-end shares.
            self.backend_channel.send(vu.encode_message(vu.BackendRequest.CONFIG_CHANGE_MSG), socket.MSG_DONTWAIT)
        except OSError as exc:
            self.counters.inc("config_notify_failed", type(exc).__name__)
            self.log.warning("could not send CONFIG_CHANGE_MSG: %s", exc)
            return
        self.counters.inc("config_notifications")

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
        self.shmem.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.device.attach(None)
        self.memory.clear()


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
