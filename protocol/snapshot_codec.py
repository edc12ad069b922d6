"""The strict JSON reading every snapshot section shares (session_snapshot.py and its parts), sans-IO.

Theory of operation: a snapshot comes from a predecessor process or from a
record systemd kept across a crash, so it is read as untrusted input: an
object must have exactly the expected keys, an integer must be an integer
(a bool is not) within its range, and any departure is a
:class:`SnapshotError` with a reason slug, never a guess.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from .errors import RemoteProtocolError

__all__ = ["SnapshotError", "Obj", "U16", "U32", "U64", "I64_MIN", "I64_MAX"]

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

_T = TypeVar("_T")


class SnapshotError(RemoteProtocolError):
    """A snapshot (or the fds sent with it) that cannot be resumed; ``reason`` says why."""


class Obj:
    """A JSON object read with exactly the expected keys."""

    def __init__(self, obj: Any, what: str, keys: tuple[str, ...]) -> None:
        if not isinstance(obj, dict):
            raise SnapshotError("malformed", f"{what} is not an object")
        if set(obj) != set(keys):
            missing, extra = sorted(set(keys) - set(obj)), sorted(set(obj) - set(keys))
            raise SnapshotError("malformed", f"{what}: missing {missing}, unexpected {extra}")
        self.obj: Mapping[str, Any] = obj
        self.what = what

    def num(self, key: str, lo: int = 0, hi: int = U64) -> int:
        v = self.obj[key]
        if type(v) is not int or not lo <= v <= hi:
            raise SnapshotError("malformed", f"{self.what}.{key}: {v!r} is not an integer in [{lo}, {hi}]")
        return v

    def opt(self, key: str, read: Callable[[str], _T]) -> _T | None:
        return None if self.obj[key] is None else read(key)

    def flag(self, key: str) -> bool:
        v = self.obj[key]
        if type(v) is not bool:
            raise SnapshotError("malformed", f"{self.what}.{key}: {v!r} is not a boolean")
        return v

    def items(self, key: str, most: int) -> list[Any]:
        v = self.obj[key]
        if not isinstance(v, list) or len(v) > most:
            raise SnapshotError("malformed", f"{self.what}.{key}: not a list of at most {most}")
        return v

    def text(self, key: str, most: int) -> str:
        v = self.obj[key]
        if not isinstance(v, str) or not 0 < len(v) <= most or not v.isascii() or not v.isprintable():
            raise SnapshotError("malformed", f"{self.what}.{key}: not printable ASCII of 1..{most} characters")
        return v

    def hexbytes(self, key: str, most: int) -> bytes:
        v = self.obj[key]
        try:
            data = bytes.fromhex(v) if isinstance(v, str) and len(v) <= 2 * most else None
        except ValueError:
            data = None
        if data is None:
            raise SnapshotError("malformed", f"{self.what}.{key}: not hex of at most {most} bytes")
        return data
