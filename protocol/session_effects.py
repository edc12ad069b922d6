"""What the vhost-user session rules ask the back-end to do: one frozen value per effect.

:class:`~.session.SessionMachine` turns a message into a list of these; the
back-end's shell carries them out in order (mapping memory, owning eventfds,
starting and stopping rings, replying).  The rules never touch an fd: an
effect that carries one hands it over (``SetKickFd``, ``SetCallFd``,
``SetErrFd``, ``SetBackendChannel``), lends it for the effect's duration
(``MapRegions``, ``MapRegion``) or closes it (``CloseFd``).  Every fd a
message carried ends up in exactly one hand-over or one ``CloseFd``.

Rings: ``StartRing`` means "the ring is started and enabled: make its queue
and give it to the device"; ``StopRing`` means "drop its queue, keeping its
cursor as the ring's base"; ``RefreshRing`` means "the ring keeps running,
but its kick fd or its memory changed under it".
"""

from __future__ import annotations

from dataclasses import dataclass

from .vhost_user import MemoryRegion, VringAddr

__all__ = [
    "Effect", "Reply", "ReplyConfig", "ReplyRingBase", "CloseFd", "SetBackendChannel", "SetDeviceFeatures",
    "WriteConfig", "ResetDevice", "MapRegions", "MapRegion", "UnmapRegion", "SetKickFd", "SetCallFd", "SetErrFd",
    "SetRingBase", "StartRing", "StopRing", "RefreshRing", "MapShmem", "ShmemDropped",
]


def _check_index(index: int) -> None:
    if index < 0:
        raise ValueError(f"ring index {index} < 0")


def _check_fd(fd: int | None) -> None:
    if fd is not None and fd < 0:
        raise ValueError(f"fd {fd} < 0")


@dataclass(frozen=True, slots=True)
class Reply:
    """Send these encoded bytes (and fds) to the front-end."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyConfig:
    """Reply to GET_CONFIG with ``size`` bytes of the device's config space from ``offset`` (bounds checked)."""

    offset: int
    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class ReplyRingBase:
    """Reply to GET_VRING_BASE with ring ``index``'s base: its queue's cursor once the ring has stopped."""

    index: int

    def __post_init__(self) -> None:
        _check_index(self.index)


@dataclass(frozen=True, slots=True)
class CloseFd:
    """An fd the message carried that nothing keeps."""

    fd: int

    def __post_init__(self) -> None:
        _check_fd(self.fd)


@dataclass(frozen=True, slots=True)
class SetBackendChannel:
    """The back-end request channel, a socket (replaces and closes any previous one)."""

    fd: int

    def __post_init__(self) -> None:
        _check_fd(self.fd)


@dataclass(frozen=True, slots=True)
class SetDeviceFeatures:
    """The virtio features the front-end acked, already checked to be a subset of the offer."""

    features: int


@dataclass(frozen=True, slots=True)
class WriteConfig:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResetDevice:
    """Reset the device; rings served off the event loop are taken back first."""


@dataclass(frozen=True, slots=True)
class MapRegions:
    """Replace the whole memory table: map every region (nothing changes if one fails), then drop every
    running ring's queue, then unmap the old table."""

    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.regions) != len(self.fds):
            raise ValueError(f"{len(self.regions)} regions, {len(self.fds)} fds")


@dataclass(frozen=True, slots=True)
class MapRegion:
    """Add one region; rings served off the event loop are taken back first (they hold the old table)."""

    region: MemoryRegion
    fd: int

    def __post_init__(self) -> None:
        _check_fd(self.fd)


@dataclass(frozen=True, slots=True)
class UnmapRegion:
    guest_phys_addr: int
    size: int
    userspace_addr: int


@dataclass(frozen=True, slots=True)
class SetKickFd:
    """Ring ``index`` is kicked through ``fd`` (None: no fd); ``polling``: it is polled instead."""

    index: int
    fd: int | None
    polling: bool

    def __post_init__(self) -> None:
        _check_index(self.index)
        _check_fd(self.fd)


@dataclass(frozen=True, slots=True)
class SetCallFd:
    index: int
    fd: int | None

    def __post_init__(self) -> None:
        _check_index(self.index)
        _check_fd(self.fd)


@dataclass(frozen=True, slots=True)
class SetErrFd:
    index: int
    fd: int | None

    def __post_init__(self) -> None:
        _check_index(self.index)
        _check_fd(self.fd)


@dataclass(frozen=True, slots=True)
class SetRingBase:
    """The next available index ring ``index`` starts from."""

    index: int
    base: int

    def __post_init__(self) -> None:
        _check_index(self.index)
        if not 0 <= self.base <= 0xFFFF:
            raise ValueError(f"base {self.base} outside 0..0xffff")


@dataclass(frozen=True, slots=True)
class StartRing:
    index: int
    num: int
    addr: VringAddr
    event_idx: bool
    indirect: bool

    def __post_init__(self) -> None:
        _check_index(self.index)


@dataclass(frozen=True, slots=True)
class StopRing:
    index: int

    def __post_init__(self) -> None:
        _check_index(self.index)


@dataclass(frozen=True, slots=True)
class RefreshRing:
    index: int

    def __post_init__(self) -> None:
        _check_index(self.index)


@dataclass(frozen=True, slots=True)
class MapShmem:
    """Give shared memory region ``shmid`` its memory (``size`` bytes, filled by the device) and ask the
    front-end to map it (SHMEM_MAP with NEED_REPLY on the back-end channel); in use once acked with 0."""

    shmid: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.shmid <= 0xFF or self.size <= 0:
            raise ValueError(f"region {self.shmid} of {self.size} bytes")


@dataclass(frozen=True, slots=True)
class ShmemDropped:
    """The front-end dropped every region mapping by itself (its device stopped): forget them, send no UNMAP."""


Effect = (Reply | ReplyConfig | ReplyRingBase | CloseFd | SetBackendChannel | SetDeviceFeatures | WriteConfig
          | ResetDevice | MapRegions | MapRegion | UnmapRegion | SetKickFd | SetCallFd | SetErrFd | SetRingBase
          | StartRing | StopRing | RefreshRing | MapShmem | ShmemDropped)
