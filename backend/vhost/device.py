"""What a device implements to be served by a vhost-user session.

The session (``session.py``) enforces the vhost-user rules, maps memory and
owns rings and eventfds; it knows nothing about cpufreq.  A device is this
small interface, after rust-vmm's ``VhostUserBackend`` trait: the session
calls it only for enabled, started rings, and the kick's queue index is the
only event it sees.

A device may also serve a ring itself, off the event loop: if it has
``offload(index, queue, kick_fd, call_fd, batch_delay)`` and that returns an
:class:`Offload`, the session stops reading the kick fd and calls
``detach()`` before it changes the ring, its memory or its kick fd.
"""

from __future__ import annotations

from typing import Protocol

from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue

__all__ = ["VirtioDevice", "DeviceHost", "Offload"]


class Offload(Protocol):
    """A ring served outside the event loop (the C kick lane)."""

    def set_call(self, fd: int | None) -> None:
        """The ring's call fd changed (the old one is closed after this returns)."""
        ...

    def detach(self) -> None:
        """Give the ring back: cursor and state into its DeviceQueue; the kick fd is not read any more."""
        ...


class DeviceHost(Protocol):
    """What the session offers a device in return."""

    def config_changed(self) -> None:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG)."""
        ...

    def signal_used(self, index: int) -> None:
        """Publish used entries of queue ``index`` and interrupt the guest if it asked."""
        ...

    def refresh_offload(self, index: int) -> None:
        """Ask the device again whether it serves ring ``index`` itself (its policy changed)."""
        ...

    def fail(self, reason: str, detail: str) -> None:
        """The device cannot go on with this front-end (its guest memory vanished): close the session."""
        ...


class VirtioDevice(Protocol):
    num_queues: int
    max_queue_size: int
    config_size: int
    max_chain_bytes: int  # the largest buffer a request may be
    max_indirect: int  # the most descriptors an indirect table may hold

    def features(self) -> int:
        """Virtio feature bits offered (VERSION_1, ring features, device bits)."""
        ...

    def set_features(self, features: int) -> None:
        """The acked subset (already checked against ``features()``)."""
        ...

    def attach(self, host: DeviceHost | None) -> None:
        """Called with the session when a front-end connects, with None when it goes."""
        ...

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space from ``offset`` (already bounds-checked)."""
        ...

    def set_config(self, offset: int, data: bytes) -> None:
        """Raise SessionStateError if the device's config is read-only."""
        ...

    def queue_ready(self, index: int, queue: DeviceQueue | None) -> None:
        """A ring became usable (started and enabled), or stopped (None)."""
        ...

    def handle_queue(self, index: int, queue: DeviceQueue) -> bool:
        """Process available buffers after a kick; must not block.

        True if the work budget ran out with buffers left: the session comes back to the ring
        after other sessions had their turn.
        """
        ...

    def reset(self) -> None:
        """Back to the state after construction (RESET_DEVICE, driver reset)."""
        ...
