"""One error tree for the whole project.

Every rejection carries a short, bounded ``reason`` slug (used as a metrics
label and in log lines) and a human ``detail``.  The split follows h11: the
peer's fault (a front-end or a guest broke the rules) is a
:class:`RemoteProtocolError`; our own misuse of an API is a
:class:`LocalProtocolError`.

::

    CpufreqError
     +-- ProtocolError                 reason + detail
          +-- RemoteProtocolError      the peer (VMM or guest) is at fault
          |    +-- MessageError        malformed vhost-user message
          |    +-- SessionStateError   well-formed message, wrong time
          |    +-- GuestMemoryError   guest address not mapped / out of range
          |    +-- RingError           malformed virtqueue content
          |    +-- RecordError         malformed cpufreq batch or record
          +-- LocalProtocolError       we misused an API (a bug here)
"""

from __future__ import annotations

__all__ = [
    "CpufreqError",
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "MessageError",
    "SessionStateError",
    "GuestMemoryError",
    "RingError",
    "RecordError",
]


class CpufreqError(Exception):
    """Base of every exception this project raises on purpose."""


class ProtocolError(CpufreqError):
    """A rule was broken.

    :param reason: short slug, a bounded label value (``"short-payload"``).
    :param detail: a sentence for the log line.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason
        super().__init__(f"{reason}: {self.detail}" if detail else reason)


class RemoteProtocolError(ProtocolError):
    """The peer sent something we must reject."""


class LocalProtocolError(ProtocolError):
    """We used an API wrongly; never caused by peer input."""


class MessageError(RemoteProtocolError):
    """A vhost-user message is malformed (header, size, payload or fds)."""


class SessionStateError(RemoteProtocolError):
    """A well-formed message that the session rules forbid right now."""


class GuestMemoryError(RemoteProtocolError):
    """An address or length does not fall inside mapped guest memory."""


class RingError(RemoteProtocolError):
    """A virtqueue holds an invalid descriptor, chain or index.

    ``head`` is the chain's head descriptor index when the error concerns
    one chain (the caller can still return that chain as used), or ``None``
    when the ring as a whole is broken.
    """

    def __init__(self, reason: str, detail: str = "", head: int | None = None) -> None:
        super().__init__(reason, detail)
        self.head = head


class RecordError(RemoteProtocolError):
    """A cpufreq request batch or record is invalid."""
