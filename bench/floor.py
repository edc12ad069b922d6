"""The floor: an eventfd round trip between two processes, measured in the same run.

Three responders, one pinger pattern (the "guest": sleep ``gap``, stamp, write
eventfd A, block reading eventfd B, stamp):

* ``c``       - bench/eventfd_rtt.c, compiled with gcc into a temporary directory;
* ``c-cross``  - the same with the two processes pinned to different CPUs, so each
  wake-up is of an idle CPU (unpinned, the scheduler mostly runs both on one);
* ``python``  - two Python processes, blocking ``os.eventfd_read``/``eventfd_write``;
* ``asyncio`` - a Python pinger and an asyncio responder (``loop.add_reader`` on A),
  the shape of the back-end's kick handler without any virtqueue work.

Each sample gives the round trip and the one-way time (responder's wake-up
stamp minus the pinger's stamp before its write), CLOCK_MONOTONIC in both
processes.  Run as a script (``python floor.py python|asyncio N GAP_US WARMUP``)
it prints "rtt_ns oneway_ns" lines like the C program; the benchmark always
runs it in a fresh process so forking never happens in a process with threads.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STOP = 1_000_000
_U64 = struct.Struct("<Q")


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _responder_blocking(a: int, b: int, stamp: mmap.mmap) -> None:
    while True:
        v = os.eventfd_read(a)
        _U64.pack_into(stamp, 0, _now())
        if v >= STOP:
            os._exit(0)
        os.eventfd_write(b, 1)


def _responder_asyncio(a: int, b: int, stamp: mmap.mmap) -> None:
    os.set_blocking(a, False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            try:
                v = os.eventfd_read(a)
            except BlockingIOError:
                return
            _U64.pack_into(stamp, 0, _now())
            if v >= STOP:
                done.set_result(None)
                return
            os.eventfd_write(b, 1)

        loop.add_reader(a, readable)
        await done

    asyncio.run(main())
    os._exit(0)


def run_python(kind: str, n: int, gap_us: int, warmup: int) -> list[tuple[int, int]]:
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_CLOEXEC)
    stamp = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    pid = os.fork()
    if pid == 0:
        try:
            (_responder_blocking if kind == "python" else _responder_asyncio)(a, b, stamp)
        finally:
            os._exit(1)
    out = []
    gap = gap_us / 1e6
    # give the responder time to start (asyncio import and loop setup)
    time.sleep(0.2)
    for i in range(n + warmup):
        if gap:
            time.sleep(gap)
        t0 = _now()
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        t1 = _now()
        if i >= warmup:
            out.append((t1 - t0, _U64.unpack_from(stamp, 0)[0] - t0))
    os.eventfd_write(a, STOP)
    os.waitpid(pid, 0)
    return out


def build_c(tmpdir: str) -> str | None:
    """Compile eventfd_rtt.c; returns the binary path, or None if no compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    exe = os.path.join(tmpdir, "eventfd_rtt")
    r = subprocess.run([cc, "-O2", "-o", exe, str(HERE / "eventfd_rtt.c")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return None
    return exe


def _parse(text: str) -> list[tuple[int, int]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), int(parts[1])))
    return out


def measure(kind: str, n: int, gap_us: int, warmup: int = 50) -> tuple[list[tuple[int, int]], str | None]:
    """Samples (rtt_ns, oneway_ns) for ``kind`` in a fresh process; (samples, reason-if-skipped)."""
    if kind in ("c", "c-cross"):
        if kind == "c-cross" and len(os.sched_getaffinity(0)) < 2:
            return [], "fewer than 2 CPUs to pin to"
        with tempfile.TemporaryDirectory(prefix="vuc-bench-") as tmp:
            exe = build_c(tmp)
            if exe is None:
                return [], "no C compiler (gcc/cc) found"
            r = subprocess.run([exe, str(n), str(gap_us), str(warmup), "1" if kind == "c-cross" else "0"],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                return [], f"eventfd_rtt exited {r.returncode}: {r.stderr.strip()[:200]}"
            return _parse(r.stdout), None
    r = subprocess.run([sys.executable, str(Path(__file__)), kind, str(n), str(gap_us), str(warmup)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return [], f"floor.py {kind} exited {r.returncode}: {r.stderr.strip()[-300:]}"
    return _parse(r.stdout), None


if __name__ == "__main__":
    kind, n, gap, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if kind not in ("python", "asyncio"):
        sys.exit(f"unknown kind {kind!r}")
    samples = run_python(kind, n, gap, warm)
    sys.stdout.write("".join(f"{r} {o}\n" for r, o in samples))
