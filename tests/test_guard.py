"""backend/dataplane/guard.c and guard.py: faults in shared guest memory and eventfds the front-end can stall.

In this process, with the real handler: a guest region whose file was shrunk
reads as zeros and counts a fault instead of ending the process; a fault
outside every guarded range still ends it (a child process shows that); a
mapping that C code points into outlives the session that dropped it; and
eventfd reads and writes return whatever the other side did to the file
description, at any fd number.
"""

from __future__ import annotations

import gc
import mmap
import os
import signal
import subprocess
import sys
import threading

import pytest

from vhost_user_cpufreq.backend.dataplane.guard import Signalled, drain_eventfd, guard, signal_eventfd
from vhost_user_cpufreq.backend.vhost.memory import MemoryMap, map_region

from .helpers import unavailable


@pytest.fixture
def g():  # type: ignore[no-untyped-def]
    loaded = guard()
    if loaded is None:
        unavailable("VUC_REQUIRE_TOOLS", "the guard (backend/dataplane/guard.c) needs a C compiler")
    return loaded


def _ram(pages: int = 4) -> int:
    fd = os.memfd_create("vuc-guard-test")  # without MFD_ALLOW_SEALING: it cannot be sealed against shrinking
    os.ftruncate(fd, pages * 4096)
    return fd


def _mapped(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(name in line for line in f)


def test_a_region_shrunk_under_us_reads_as_zeros_and_counts_a_fault(g) -> None:  # type: ignore[no-untyped-def]
    fd = _ram()
    mem = MemoryMap()
    mem.add(map_region(fd, 0, 4 * 4096, 0x10000, 0))
    view = mem.view(4096, 8)
    view[:] = b"abcdefgh"
    before = g.stats().faults
    assert not mem.faulted()
    os.ftruncate(fd, 0)
    assert bytes(view) == bytes(8)  # the page is gone: a zero page stands in for it
    view[:] = b"written!"  # and takes writes, privately
    assert mem.faulted()
    assert mem.regions[0].faults() >= 1 and g.stats().faults > before
    del view
    mem.clear()
    os.close(fd)


def test_a_fault_elsewhere_still_ends_the_process_as_it_would_without_the_guard(g) -> None:  # type: ignore[no-untyped-def]
    child = """
import mmap, os
from vhost_user_cpufreq.backend.dataplane.guard import guard
assert guard() is not None
fd = os.memfd_create("unguarded")
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096)
os.ftruncate(fd, 0)
print("touching", flush=True)
m[0]
print("survived", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stdout, out.stderr)
    assert "touching" in out.stdout and "survived" not in out.stdout


def test_a_mapping_c_points_into_stays_mapped_until_the_pointer_is_dropped(g) -> None:  # type: ignore[no-untyped-def]
    from vhost_user_cpufreq.backend.dataplane.cdrain import ffi, pointer_to

    fd = _ram()
    mem = MemoryMap()
    mem.add(map_region(fd, 0, 4 * 4096, 0x10000, 0))
    os.close(fd)
    keeper = mem.view(0, 4096)  # what CDrainer keeps beside the raw pointers it hands to C
    ptr = ffi.cast("uint8_t *", pointer_to(keeper, writable=True))
    n = _mapped("vuc-guard-test")
    assert n >= 1
    mem.clear()  # the session is done with its memory...
    ptr[0] = 42  # ...but C still points into it: still mapped, still guarded
    assert _mapped("vuc-guard-test") == n
    del keeper, ptr
    gc.collect()
    assert _mapped("vuc-guard-test") == n - 1


def test_a_full_call_eventfd_made_blocking_is_reported_stalled_not_waited_on(g) -> None:  # type: ignore[no-untyped-def]
    fd = os.eventfd(0)  # blocking, as a front-end may leave the description it shares with us
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
    assert signal_eventfd(fd) == Signalled.STALLED
    assert not os.get_blocking(fd)  # given its O_NONBLOCK back, so the next write sees "full" at once
    assert signal_eventfd(fd) == Signalled.FULL
    assert drain_eventfd(fd) == 0xFFFF_FFFF_FFFF_FFFE
    assert signal_eventfd(fd) == Signalled.SENT and drain_eventfd(fd) == 1
    os.close(fd)


def test_an_empty_kick_eventfd_made_blocking_reads_as_zero_without_waiting() -> None:
    fd = os.eventfd(0)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(drain_eventfd(fd)), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        os.eventfd_write(fd, 1)  # let the stuck reader go before failing
        pytest.fail("drain_eventfd blocked on an empty eventfd")
    assert result == [0]
    os.eventfd_write(fd, 3)
    assert drain_eventfd(fd) == 3 and drain_eventfd(fd) == 0
    assert os.get_blocking(fd)  # reading changed nothing the front-end shares
    os.close(fd)


def test_eventfds_numbered_above_1023_are_signalled_and_drained() -> None:
    """select() takes no fd above 1023; a host with a few hundred VMs has such fds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"the hard open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    try:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        high = os.dup2(fd, 1500)
        os.close(fd)
        assert signal_eventfd(high) == Signalled.SENT
        assert drain_eventfd(high) == 1
        os.close(high)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_every_region_of_a_thousand_sessions_is_guarded(g) -> None:  # type: ignore[no-untyped-def]
    """1,000 VMs, each mapping as many regions as a session may (MAX_REGIONS): every one gets a guard entry.

    The ranges lie in one reserved, never-touched anonymous mapping: no fault can come from them.
    """
    from vhost_user_cpufreq.backend.vhost.memory import MAX_REGIONS

    n = 1000 * MAX_REGIONS
    reserve = mmap.mmap(-1, n * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = g._ffi.from_buffer(reserve)
    base = g._ffi.cast("char *", buf)
    ids = []
    try:
        for i in range(n):
            gid = g._lib.vuc_guard_add(base + i * mmap.PAGESIZE, mmap.PAGESIZE)
            if gid < 0:
                break
            ids.append(gid)
        assert len(ids) == n, f"only {len(ids)} of {n} regions could be guarded"
    finally:
        for gid in ids:
            g._lib.vuc_guard_remove(gid)
        g._ffi.release(buf)
        reserve.close()
