"""Guards around what a front-end shares with us: guest RAM and eventfds (``guard.c``).

Theory of operation: a front-end can make shared guest RAM fault (shrink the
file, or leave a sparse file on a full tmpfs) and can make a shared eventfd
block (clear ``O_NONBLOCK`` on the file description it shares with us and
fill the counter).  Either would stop the one process that serves every VM.

* Every guest region is registered with :meth:`Guard.watch` when it is
  mapped.  A fault inside it is patched over with a zero page by the C
  handler and counted on that region; :meth:`MemoryMap.faulted` (``memory.py``)
  reads the count, and the session that owns the region is closed with
  ``guest-memory-gone``.  This covers every thread and every reader: the kick
  lane, the C drain and Python code reading memoryviews.
* :func:`signal_eventfd` and :func:`drain_eventfd` never block, whatever the
  other side did to the file description.

Without the C library (no prebuilt extension, and no C compiler to build it at run
time) there is no handler: a front-end that shrinks guest RAM
then ends the service (SIGBUS), and a write to a call eventfd relies on a
poll and ``O_NONBLOCK`` that the front-end can race.  ``check`` says so, and
``docs/hostile-input.md`` lists what a hostile VMM can then still do.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["Guard", "GuardStats", "Watched", "guard", "signal_eventfd", "drain_eventfd", "Signalled"]

log = logging.getLogger("vhost_user_cpufreq.guard")


@dataclass(frozen=True, slots=True)
class GuardStats:
    faults: int  # guest memory faults patched over, process-wide
    stray_sigbus: int  # SIGBUS sent by another process, ignored
    fatal: int  # faults in guest memory that could not be patched


class Guard:
    """The loaded guard: a SIGBUS handler for guest memory, eventfd access that cannot block."""

    def __init__(self, lib: Any, ffi: Any) -> None:
        self._lib = lib
        self._ffi = ffi
        self.timer_signal = lib.vuc_guard_install()
        self._stats = ffi.new("uint64_t[3]")

    def watch(self, mm: mmap.mmap) -> "Watched":
        """Guard the whole mapping ``mm`` until :meth:`Watched.release` or until ``mm`` is freed.

        Raises OSError(ENOSPC) when every guard entry is taken.
        """
        buf = self._ffi.from_buffer(mm)
        try:
            start, length = self._ffi.cast("void *", buf), len(mm)
            gid = self._lib.vuc_guard_add(start, length)
        finally:
            self._ffi.release(buf)
        if gid < 0:
            raise OSError(errno.ENOSPC, "every guest-memory guard entry is in use")
        # Released by whoever unmaps: MappedRegion.close() when mm.close() succeeds, or the
        # mmap object's deallocation when exported views kept close() from unmapping.
        return Watched(int(gid), weakref.finalize(mm, self._lib.vuc_guard_remove, gid))

    def faults(self, gid: int) -> int:
        return int(self._lib.vuc_guard_faults(gid))

    def signal(self, fd: int) -> int:
        """guard.c's ``vuc_eventfd_signal``: 1 written, 0 full, -errno (-EINTR: stalled)."""
        return int(self._lib.vuc_eventfd_signal(fd))

    def epoch(self) -> int:
        """Faults patched over so far in any region: a cheap test that nothing happened."""
        return int(self._lib.vuc_guard_epoch())

    def stats(self) -> GuardStats:
        s = self._stats
        self._lib.vuc_guard_stats(s, s + 1, s + 2)
        return GuardStats(int(s[0]), int(s[1]), int(s[2]))


@dataclass(frozen=True, slots=True)
class Watched:
    gid: int
    release: weakref.finalize  # idempotent: the range is released once


_guard: Guard | None = None
_tried = False


def guard() -> Guard | None:
    """The process's guard, loaded once; None where the C library cannot be built."""
    global _guard, _tried
    if not _tried:
        _tried = True
        from .library import ffi, load  # the guard lives in the data plane's library

        try:
            _guard = Guard(load().lib, ffi)
        except RuntimeError as exc:
            log.warning("guest memory is unguarded (a front-end that shrinks it ends the service): %s", exc)
    return _guard


class Signalled:
    """Outcomes of :func:`signal_eventfd`."""

    SENT = 1
    FULL = 0  # the counter is at its maximum: the reader has a wake-up pending already
    STALLED = -1  # the file description was made blocking and kept full: a hostile peer


def signal_eventfd(fd: int) -> int:
    """Add one to a shared eventfd without blocking; a :class:`Signalled` value.

    Raises OSError for any other failure of the write.
    """
    g = guard()
    if g is not None:
        rc = g.signal(fd)
        if rc >= 0:
            return rc
        if rc == -errno.EINTR:
            return Signalled.STALLED
        raise OSError(-rc, os.strerror(-rc))
    # No C: poll, then write on a description made non-blocking.  A peer that clears
    # O_NONBLOCK again between the two and keeps the counter full can still stall us.
    p = select.poll()
    p.register(fd, select.POLLOUT)
    if not p.poll(0):
        return Signalled.FULL
    os.set_blocking(fd, False)
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return Signalled.FULL
    return Signalled.SENT


_buf = bytearray(8)  # only the event loop's thread reads kicks (the lane never does)


def drain_eventfd(fd: int) -> int:
    """Read an eventfd's counter down to zero without blocking; returns what it held."""
    try:
        os.preadv(fd, [_buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        # Before Linux 5.12 eventfds take no RWF_NOWAIT: poll, then read non-blocking.
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(0):
            return 0
        os.set_blocking(fd, False)
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0
    return int.from_bytes(_buf, "little")
