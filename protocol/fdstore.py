"""What the service keeps in systemd's file descriptor store, and how it names it, sans-IO.

Theory of operation: systemd keeps a duplicate of every fd the service sends
with ``FDSTORE=1`` and an ``FDNAME=``, and hands them all back, named, to the
next process of the service (after a crash, a ``systemctl restart``).  Per VM
the store holds its listening socket (:func:`listener_name`), one memfd whose
contents are the :class:`StoreRecord` of its live session
(:func:`record_name`), and each distinct open file of the session under a
name of its own (:func:`object_name`: the VM and a serial number).  systemd
keeps one entry per open file, whatever its name (an fd already stored under
another name is not stored again), and a session may hold one open file
several times (QEMU sends the same guest memory fd for each of its regions),
so the record names the object of each fd of the snapshot's fd list, names
repeating.  A new object is stored before the record names it and an object no
longer named is removed after, so a crash at any moment leaves the record
naming objects the store holds.

The memfd holds a 4 KiB pending area and then the record: a 16-byte header
(magic ``VUCF``, version, a flags byte written on its own, the body's CRC-32
and length) and the body: the count of names, the names, each on its own
line, and the session snapshot (session_snapshot.py).  The flags byte is
outside the CRC.  Before the service takes bytes from the front-end's socket
(it looks at them first, MSG_PEEK) it sets ``REPLAY`` with those bytes in the
pending area when they are whole requests that change nothing (GET_CONFIG,
GET_FEATURES...), and ``BUSY`` otherwise; it clears the flag once they were
handled and the record rewritten.  A process killed in between leaves the
flag: ``REPLAY`` requests are handled again by the next process (their
front-end still waits for the answer), a ``BUSY`` session is not resumed (its
state cannot be known).  ``CLEAN``: written by a process that stopped serving
first (SIGTERM), so the snapshot's ring positions are exact; without it they
are taken from the rings in guest memory.  A record cut by a crash mid-write
fails its length or its CRC.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from .session_snapshot import MAX_SNAPSHOT_BYTES, SnapshotError

__all__ = ["STORE_VERSION", "BUSY", "CLEAN", "REPLAY", "FLAGS_OFFSET", "PENDING_AREA", "encode_pending",
           "decode_pending", "replayable", "StoreRecord", "encode_record", "decode_record",
           "listener_name", "record_name", "object_name", "parse_name", "name_ok"]

STORE_VERSION = 1
BUSY = 1
CLEAN = 2
REPLAY = 4
#: The record memfd: [0, PENDING_AREA) the pending area, the record from PENDING_AREA on.
PENDING_AREA = 4096
_PENDING = struct.Struct("<I")
#: Requests that change nothing: handled again by the next process if one was cut before its reply.
_READ_ONLY = frozenset({1, 15, 17, 24, 36, 40})  # GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
# GET_CONFIG, GET_MAX_MEM_SLOTS, GET_STATUS (numbers as vhost-user defines them)
_MSG_HEADER = struct.Struct("<III")  # request, flags, payload size
_HEADER = struct.Struct("<4sHBxII")  # magic, version, flags, pad, crc32 of the body, body length
_COUNT = struct.Struct("<H")
_MAX_NAMES = 1024
_MAGIC = b"VUCF"
FLAGS_OFFSET = 6  # of the flags byte in the record
_PREFIX = "vuc"
# systemd's FDNAME: printable ASCII without ':' and at most 255 characters.  Ours is "vuc.VM.KIND": a VM
# name may hold dots (KubeVirt's NAMESPACE_NAME, a libvirt domain's), since KIND, the last part, has none.
_VM = re.compile(r"[A-Za-z0-9_@+=,~.-]{1,200}")
_NAME = re.compile(r"vuc\.(?P<vm>[A-Za-z0-9_@+=,~.-]{1,200})\.(?P<kind>l|r|f(?P<serial>\d{1,12}))")


@dataclass(frozen=True, slots=True)
class StoreRecord:
    flags: int
    names: tuple[str, ...]  # the store's name of each fd of the snapshot's fd list, in order
    snapshot: bytes  # session_snapshot.encode()

    @property
    def busy(self) -> bool:
        return bool(self.flags & BUSY)

    @property
    def clean(self) -> bool:
        return bool(self.flags & CLEAN)

    @property
    def replay(self) -> bool:
        return bool(self.flags & REPLAY)


def encode_record(names: list[str] | tuple[str, ...], snapshot: bytes, *, clean: bool = False) -> bytes:
    body = _COUNT.pack(len(names)) + "".join(f"{n}\n" for n in names).encode() + snapshot
    return _HEADER.pack(_MAGIC, STORE_VERSION, CLEAN if clean else 0, zlib.crc32(body), len(body)) + body


def decode_record(data: bytes) -> StoreRecord | None:
    """The record in ``data``; None for an empty memfd (the VM had no session).

    :raise SnapshotError: another version, cut, or not ours (named by the reason).
    """
    if not data:
        return None
    if len(data) < _HEADER.size:
        raise SnapshotError("truncated", f"{len(data)} bytes, the header alone is {_HEADER.size}")
    magic, version, flags, crc, length = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotError("bad-magic", f"{magic!r}")
    if version != STORE_VERSION:
        raise SnapshotError("version-mismatch", f"store record version {version}, this process reads {STORE_VERSION}")
    if flags & ~(BUSY | CLEAN | REPLAY):
        raise SnapshotError("bad-header", f"flags {flags:#x}")
    if length > MAX_SNAPSHOT_BYTES + 300 * _MAX_NAMES or len(data) - _HEADER.size != length:
        raise SnapshotError("truncated", f"{len(data) - _HEADER.size} body bytes, header says {length}")
    body = bytes(data[_HEADER.size:])
    if zlib.crc32(body) != crc:
        raise SnapshotError("torn-record", "the body does not match its checksum (written when the process died)")
    if len(body) < _COUNT.size:
        raise SnapshotError("malformed", "no name count")
    (count,) = _COUNT.unpack_from(body)
    pos, names = _COUNT.size, []
    for _ in range(min(count, _MAX_NAMES + 1)):
        end = body.find(b"\n", pos)
        if end < 0:
            raise SnapshotError("malformed", "names cut short")
        name = body[pos:end].decode("ascii", errors="replace")
        if parse_name(name) is None:
            raise SnapshotError("malformed", f"{name!r} is not one of our names")
        names.append(name)
        pos = end + 1
    if count > _MAX_NAMES:
        raise SnapshotError("malformed", f"{count} names")
    return StoreRecord(flags, tuple(names), body[pos:])


def replayable(data: bytes) -> bool:
    """Are ``data`` whole front-end messages that change nothing, small enough to keep for a replay?"""
    if not data or len(data) > PENDING_AREA - _PENDING.size:
        return False
    pos = 0
    while pos < len(data):
        if len(data) - pos < _MSG_HEADER.size:
            return False
        request, _, size = _MSG_HEADER.unpack_from(data, pos)
        pos += _MSG_HEADER.size + size
        if request not in _READ_ONLY or pos > len(data):
            return False
    return True


def encode_pending(data: bytes) -> bytes:
    return _PENDING.pack(len(data)) + data


def decode_pending(area: bytes) -> bytes:
    """The messages kept in the pending area; SnapshotError if they are not whole read-only messages."""
    if len(area) < _PENDING.size:
        raise SnapshotError("truncated", "no pending area")
    (n,) = _PENDING.unpack_from(area)
    data = bytes(area[_PENDING.size:_PENDING.size + n])
    if len(data) != n or not replayable(data):
        raise SnapshotError("malformed", "the pending area holds no whole read-only messages")
    return data


def name_ok(vm: str) -> bool:
    """Can ``vm`` be part of an FDNAME?"""
    return _VM.fullmatch(vm) is not None


def listener_name(vm: str) -> str:
    return f"{_PREFIX}.{vm}.l"


def record_name(vm: str) -> str:
    return f"{_PREFIX}.{vm}.r"


def object_name(vm: str, serial: int) -> str:
    return f"{_PREFIX}.{vm}.f{serial}"


def parse_name(name: str) -> tuple[str, str, int | None] | None:
    """(vm, kind "l"/"r"/"f", serial) of one of our names; None for any other name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    if m["serial"] is None:
        return m["vm"], m["kind"], None
    return m["vm"], "f", int(m["serial"])
