"""What the service keeps in systemd's file descriptor store, and how it names it, sans-IO.

Theory of operation: systemd keeps a duplicate of every fd the service sends
with ``FDSTORE=1`` and an ``FDNAME=``, and hands them all back, named, to the
next process of the service (after a crash, a ``systemctl restart``).  Per VM
the store holds its listening socket (:func:`listener_name`), one memfd whose
contents are the :class:`StoreRecord` of its live session
(:func:`record_name`), and the session's fds, each under
:func:`session_fd_name` (the VM, a generation, the fd's index in the
snapshot's fd list).  The generation moves when the session's set of fds
changes (a new kick fd, a new memory table): the new set is stored before the
record names it and the old set is removed after, so a crash at any moment
leaves the record naming a complete set.

The record: a 20-byte header (magic ``VUCF``, version, a flags byte written on
its own, the generation, the body's CRC-32 and length) and the body, the
session snapshot (session_snapshot.py).  The flags byte is outside the CRC:
the service sets ``BUSY`` before it reads from the front-end's socket and
clears it once every message read was handled and the record rewritten, so a
process killed with bytes of a message taken from the socket but not acted on
leaves ``BUSY`` behind, and that session is not resumed (its state cannot be
known).  ``CLEAN``: written by a process that stopped serving first (SIGTERM),
so the snapshot's ring positions are exact; without it they are taken from the
rings in guest memory.  A record cut by a crash mid-write fails its CRC.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from .session_snapshot import MAX_SNAPSHOT_BYTES, SnapshotError

__all__ = ["STORE_VERSION", "BUSY", "CLEAN", "FLAGS_OFFSET", "StoreRecord", "encode_record", "decode_record",
           "listener_name", "record_name", "session_fd_name", "parse_name", "name_ok"]

STORE_VERSION = 1
BUSY = 1
CLEAN = 2
_HEADER = struct.Struct("<4sHBxIII")  # magic, version, flags, pad, generation, crc32 of the body, body length
_MAGIC = b"VUCF"
FLAGS_OFFSET = 6  # of the flags byte in the record
_PREFIX = "vuc"
# systemd's FDNAME: printable ASCII without ':' and at most 255 characters; ours adds '.'-separated parts.
_VM = re.compile(r"[A-Za-z0-9_@+=,~-]{1,200}")
_NAME = re.compile(r"vuc\.(?P<vm>[A-Za-z0-9_@+=,~-]{1,200})\.(?P<kind>l|r|g(?P<gen>\d{1,10})\.(?P<i>\d{1,5}))")


@dataclass(frozen=True, slots=True)
class StoreRecord:
    generation: int
    flags: int
    snapshot: bytes  # session_snapshot.encode()

    @property
    def busy(self) -> bool:
        return bool(self.flags & BUSY)

    @property
    def clean(self) -> bool:
        return bool(self.flags & CLEAN)


def encode_record(generation: int, snapshot: bytes, *, clean: bool = False) -> bytes:
    return _HEADER.pack(_MAGIC, STORE_VERSION, CLEAN if clean else 0, generation, zlib.crc32(snapshot),
                        len(snapshot)) + snapshot


def decode_record(data: bytes) -> StoreRecord | None:
    """The record in ``data``; None for an empty memfd (the VM had no session).

    :raise SnapshotError: another version, cut, or not ours (named by the reason).
    """
    if not data:
        return None
    if len(data) < _HEADER.size:
        raise SnapshotError("truncated", f"{len(data)} bytes, the header alone is {_HEADER.size}")
    magic, version, flags, generation, crc, length = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotError("bad-magic", f"{magic!r}")
    if version != STORE_VERSION:
        raise SnapshotError("version-mismatch", f"store record version {version}, this process reads {STORE_VERSION}")
    if flags & ~(BUSY | CLEAN):
        raise SnapshotError("bad-header", f"flags {flags:#x}")
    if length > MAX_SNAPSHOT_BYTES or len(data) - _HEADER.size != length:
        raise SnapshotError("truncated", f"{len(data) - _HEADER.size} body bytes, header says {length}")
    body = bytes(data[_HEADER.size:])
    if zlib.crc32(body) != crc:
        raise SnapshotError("torn-record", "the body does not match its checksum (written when the process died)")
    return StoreRecord(generation, flags, body)


def name_ok(vm: str) -> bool:
    """Can ``vm`` be part of an FDNAME?"""
    return _VM.fullmatch(vm) is not None


def listener_name(vm: str) -> str:
    return f"{_PREFIX}.{vm}.l"


def record_name(vm: str) -> str:
    return f"{_PREFIX}.{vm}.r"


def session_fd_name(vm: str, generation: int, index: int) -> str:
    return f"{_PREFIX}.{vm}.g{generation}.{index}"


def parse_name(name: str) -> tuple[str, str, int | None, int | None] | None:
    """(vm, kind "l"/"r"/"g", generation, index) of one of our names; None for any other name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    if m["gen"] is None:
        return m["vm"], m["kind"], None, None
    return m["vm"], "g", int(m["gen"]), int(m["i"])
