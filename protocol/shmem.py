"""vhost-user shared memory regions (``VHOST_USER_PROTOCOL_F_SHMEM``), sans-IO.

Theory of operation: a device that wants shared memory regions (the cpufreq
device's frequency page) names their sizes and the virtio feature bits that
depend on them.  Per connection, :class:`ShmemRules` decides whether the
regions can be used, answers ``GET_SHMEM_CONFIG``, and says when to map them
and when the front-end has dropped them.  The session machine
(``session.py``) calls it; the shell carries out the effects.

What QEMU 11.1.3 allows (docs/qemu-facts.md section e), and so the rules:

* A back-end that offers SHMEM does not offer CONFIGURE_MEM_SLOTS: with it,
  QEMU crashes when the device restarts after a reset that dropped a mapping.
* The regions are used only with SHMEM, BACKEND_REQ and REPLY_ACK negotiated
  and a back-end channel set up: the map is sent there with NEED_REPLY, and
  only a zero ack puts a region in use.  Otherwise the dependent feature bits
  are not offered and the device keeps to configuration space.
* The map is sent only once the device runs (a ring started and enabled):
  QEMU crashes on a map before that.
* When the rings stop QEMU drops every mapping by itself; an UNMAP then would
  crash it, so the rules only tell the shell to forget them (``ShmemDropped``),
  and map again at the next start.

:class:`AckReader` parses what the front-end sends back on the back-end
channel: acks to our requests, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import vhost_user as vu
from .errors import MessageError
from .session_effects import Effect, MapShmem, ShmemDropped

__all__ = ["ShmemRules", "AckReader", "with_shmem", "SHMEM_NEEDS"]

PF = vu.ProtocolFeature
#: The protocol features a region needs besides SHMEM itself.
SHMEM_NEEDS = (PF.SHMEM, PF.BACKEND_REQ, PF.REPLY_ACK)


def with_shmem(offered: int) -> int:
    """The protocol features to offer when the device has regions (see the module docstring)."""
    return (offered | 1 << PF.SHMEM) & ~(1 << PF.CONFIGURE_MEM_SLOTS)


@dataclass(slots=True)
class ShmemRules:
    """One connection's view of the device's shared memory regions."""

    sizes: tuple[int, ...]  # bytes per region, index = shmid; () when the device has none
    features: int  # virtio feature bits offered only when the regions are usable
    channel: bool = False  # the front-end gave us a back-end channel
    mapped: bool = False  # maps were issued since the device last started

    def __post_init__(self) -> None:
        if len(self.sizes) > vu.MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"{len(self.sizes)} regions; QEMU takes {vu.MEMORY_BASELINE_NREGIONS}")
        total = sum(self.sizes)
        if any(s <= 0 or s % 4096 for s in self.sizes) or (total & (total - 1)):
            # QEMU refuses sizes off the page size, and aborts when they do not add up to a
            # power of two (the BAR): docs/qemu-facts.md section e.
            raise ValueError(f"region sizes {self.sizes} must be page multiples adding up to a power of two")

    def negotiated(self, protocol_features: int) -> bool:
        return bool(self.sizes) and all(protocol_features & (1 << pf) for pf in SHMEM_NEEDS)

    def usable(self, protocol_features: int) -> bool:
        """Whether the regions can be placed on this connection (then ``features`` are offered)."""
        return self.negotiated(protocol_features) and self.channel

    def offered_features(self, protocol_features: int) -> int:
        return self.features if self.usable(protocol_features) else 0

    def config(self) -> vu.ShmemConfig:
        return vu.ShmemConfig(len(self.sizes), self.sizes)

    def started(self, protocol_features: int, acked: int, out: list[Effect]) -> None:
        """The device runs: map the regions once, if the driver took a feature that uses them."""
        if self.mapped or not self.usable(protocol_features) or not acked & self.features:
            return
        self.mapped = True
        out.extend(MapShmem(shmid, size) for shmid, size in enumerate(self.sizes))

    def stopped(self, out: list[Effect]) -> None:
        """No ring runs any more: the front-end has dropped the mappings itself."""
        if self.mapped:
            self.mapped = False
            out.append(ShmemDropped())


@dataclass(slots=True)
class AckReader:
    """Acks from the back-end channel, from a byte stream that may split or glue them.

    The front-end may send only replies to requests we sent with NEED_REPLY; anything else
    (a request, a reply to something not outstanding, a malformed header) raises a
    :class:`~.errors.ProtocolError` and the caller stops using the channel for regions.
    """

    outstanding: list[int] = field(default_factory=list)  # BackendRequest ids awaiting an ack, in order
    _buf: bytearray = field(default_factory=bytearray)

    def expect(self, request: vu.BackendRequest) -> None:
        self.outstanding.append(request)

    def pending_bytes(self) -> bytes:
        """The start of an ack read and not yet whole (carried to a successor process)."""
        return bytes(self._buf)

    def restore_bytes(self, data: bytes) -> None:
        self._buf[:] = data

    def feed(self, data: bytes) -> list[tuple[vu.BackendRequest, int]]:
        """The (request, status) acks completed by ``data``; status 0 is success."""
        self._buf += data
        done: list[tuple[vu.BackendRequest, int]] = []
        while len(self._buf) >= vu.HEADER_SIZE:
            header = vu.decode_header(bytes(self._buf[:vu.HEADER_SIZE]))
            if header.size != 8:
                raise MessageError("bad-ack", f"a {header.size}-byte reply on the back-end channel; an ack is 8")
            end = vu.HEADER_SIZE + header.size
            if len(self._buf) < end:
                break
            if not self.outstanding:
                raise MessageError("unexpected-ack", f"a reply to request {header.request} that nobody awaits")
            request = vu.BackendRequest(self.outstanding[0])
            msg = vu.decode_reply(header, bytes(self._buf[vu.HEADER_SIZE:end]), (), request)
            del self._buf[:end]
            self.outstanding.pop(0)
            assert isinstance(msg.payload, vu.U64)
            done.append((request, msg.payload.value))
        return done
