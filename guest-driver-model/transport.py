"""What the guest driver model needs from the device's transport.

Two implementations exist: ``frontend.InProcessTransport`` (our own vhost-user
front-end, fast) and ``qtest.QtestTransport`` (virtio-pci through a real
QEMU).  The driver model is written once against this interface.
"""

from __future__ import annotations

import abc
from typing import Callable

from vhost_user_cpufreq.protocol.memory import GuestMemory
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

__all__ = ["GuestRam", "DriverTransport"]


class GuestRam(abc.ABC):
    """Guest memory the driver allocates its rings and buffers from."""

    memory: GuestMemory

    @abc.abstractmethod
    def alloc(self, size: int, align: int = 16) -> int:
        """Guest-physical address of ``size`` fresh bytes."""


class DriverTransport(abc.ABC):
    ram: GuestRam
    #: guest reads of device config space (each one a round trip to the back-end)
    config_reads: int
    #: notifications (kicks) sent to the device
    notifications: int

    @abc.abstractmethod
    async def device_features(self) -> int: ...

    @abc.abstractmethod
    async def set_driver_features(self, features: int) -> None: ...

    @abc.abstractmethod
    async def read_config(self, offset: int, size: int) -> bytes: ...

    @abc.abstractmethod
    async def setup_queue(self, index: int, size: int, *, event_idx: bool) -> DriverQueue:
        """Allocate, register and enable queue ``index``; DRIVER_OK follows."""

    @abc.abstractmethod
    def notify(self, index: int) -> None:
        """Kick the device for queue ``index``."""

    @abc.abstractmethod
    def set_config_callback(self, cb: Callable[[], None] | None) -> None:
        """Call ``cb`` when the device signals a configuration change."""

    @abc.abstractmethod
    async def reset(self) -> None: ...

    # -- virtio shared memory regions (optional: a transport without them has none) ----------
    def shm_length(self, shmid: int) -> int | None:
        """The length of shared memory region ``shmid``, or None when the device has no such region."""
        return None

    async def shm_read32(self, shmid: int, offset: int) -> int:
        """One aligned 32-bit load from region ``shmid`` (plain memory for a guest: no exit)."""
        raise NotImplementedError("this transport has no shared memory regions")
