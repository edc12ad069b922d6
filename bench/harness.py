"""What every benchmark section stands on: the run configurations, the back-end as a child process,
counter windows between two of its stats snapshots, and what the rest of the machine does meanwhile.

Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend_proc import stamp_area_size
from stats import CLK_TCK, proc_cpu_seconds, proc_rss, proc_run_delay_seconds, steal_jiffies, system_busy

from vhost_user_cpufreq.backend.service.vms import VmConfig

HERE = Path(__file__).resolve().parent

SECTIONS = ("atomicity", "latency", "throughput", "guest_cost", "scale", "mirror", "qemu")


@dataclass(frozen=True)
class Config:
    name: str
    floor_n: int
    lat_n: int
    lat_gap_us: int
    tput_windows: int
    tput_window_s: float
    driver_window_s: float
    trace_s: float
    scale_vms: int
    scale_idle_s: float
    scale_load_s: float
    mirror_periods: tuple[float, ...]
    mirror_n: int
    qemu_lat_n: int
    qemu_windows: int
    qemu_window_s: float
    #: kick batching settings compared in guest_cost and scale: (label, VmConfig.kick_batch_delay or None
    #: for the service's default)
    # kick batching variants of the guest-cost and scale runs; "-loop": every kick on the event loop
    variants: tuple[tuple[str, float | None], ...] = (("per-buffer", 0.0), ("default", None), ("default-loop", None))
    profile_s: float = 3.0
    scale_flush_s: float = 0.01  # each VM flushes all its vCPUs this often in the scale section's load
    settle_s: float = 1.0  # background measurement and quiet time before idle measurements


CONFIGS = {
    # the smoke test's: seconds, not minutes; every section still produces numbers
    "tiny": Config("tiny", floor_n=60, lat_n=60, lat_gap_us=6000, tput_windows=1, tput_window_s=0.3,
                   driver_window_s=0.2, trace_s=0.6, scale_vms=4, scale_idle_s=0.3, scale_load_s=0.4,
                   mirror_periods=(0.005,), mirror_n=4, qemu_lat_n=20, qemu_windows=1, qemu_window_s=0.3,
                   profile_s=1.0, settle_s=0.2, variants=(("per-buffer", 0.0), ("default", None))),
    "quick": Config("quick", floor_n=500, lat_n=500, lat_gap_us=6000, tput_windows=3, tput_window_s=0.5,
                    driver_window_s=0.5, trace_s=3.0, scale_vms=100, scale_idle_s=3.0, scale_load_s=3.0,
                    mirror_periods=(0.001, 0.01, 0.05), mirror_n=20, qemu_lat_n=200, qemu_windows=3,
                    qemu_window_s=0.5, profile_s=3.0),
    "full": Config("full", floor_n=3000, lat_n=3000, lat_gap_us=6000, tput_windows=5, tput_window_s=1.5,
                   driver_window_s=1.5, trace_s=15.0, scale_vms=100, scale_idle_s=10.0, scale_load_s=10.0,
                   mirror_periods=(0.001, 0.01, 0.05), mirror_n=100, qemu_lat_n=1000, qemu_windows=5,
                   qemu_window_s=1.0, profile_s=5.0),
}

TICK_S = 0.004  # guest scheduler tick of the realistic trace
DEFAULT_KICK_BATCH_DELAY = VmConfig.__dataclass_fields__["kick_batch_delay"].default


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# -- the back-end process -----------------------------------------------------------------


class Backend:
    """bench/backend_proc.py as a child process, spoken to over its stdin/stdout."""

    def __init__(self, sock_dir: str, *, vms: int = 1, vcpus: int = 8, stamps: bool = False,
                 sysfs: str | None = None, period: float = 0.05, follow: bool = False,
                 kick_batch_delay: float | None = None, age: bool = False, split: bool = False,
                 policy: str = "stamp", lane_slice_us: int | None = None, stderr_to: str | None = None,
                 shared_page: bool = False, env: dict[str, str] | None = None, pinning: str = "pinned") -> None:
        self.dir = sock_dir
        self.env = None if env is None else {**os.environ, **env}  # e.g. VUC_DATAPLANE=python
        self.stderr_to = stderr_to
        self.vms = vms
        self.vcpus = vcpus
        self.args = ["--dir", sock_dir, "--vms", str(vms), "--vcpus", str(vcpus), "--policy", policy,
                     "--pinning", pinning]
        if kick_batch_delay is not None:
            self.args += ["--kick-batch-delay", str(kick_batch_delay)]
        if lane_slice_us is not None:
            self.args += ["--lane-slice-us", str(lane_slice_us)]
        if sysfs:
            self.args += ["--sysfs", sysfs, "--period", str(period)]
        if follow:
            self.args.append("--follow-host")
        if age:
            self.args.append("--age")
        if split:
            self.args.append("--split")
        if shared_page:
            self.args.append("--shared-page")
        self.stamp_fd: int | None = None
        self.stamps: mmap.mmap | None = None
        if stamps:
            size = stamp_area_size(vms, vcpus)
            self.stamp_fd = os.memfd_create("vuc-bench-stamps", 0)
            os.ftruncate(self.stamp_fd, size)
            self.stamps = mmap.mmap(self.stamp_fd, size, flags=mmap.MAP_SHARED)
            self.args += ["--stamp-fd", str(self.stamp_fd)]
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0

    def sock(self, i: int = 0) -> str:
        return os.path.join(self.dir, f"vm{i}.sock")

    async def __aenter__(self) -> "Backend":
        err = open(self.stderr_to, "wb") if self.stderr_to else None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "backend_proc.py"), *self.args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                pass_fds=(self.stamp_fd,) if self.stamp_fd is not None else (), limit=64 << 20, env=self.env)
        finally:
            if err is not None:
                err.close()
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"back-end exited before it was ready (rc {await self.proc.wait()})")
        self.pid = json.loads(line)["pid"]
        return self

    async def cmd(self, c: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(c.encode() + b"\n")
        await asyncio.wait_for(self.proc.stdin.drain(), 30)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("back-end went away")
        return json.loads(line)

    async def stats(self) -> dict[str, Any]:
        before, waited = proc_cpu_seconds(self.pid), proc_run_delay_seconds(self.pid)
        s = await self.cmd("stats")
        s["proc_cpu_s_at_request"] = before
        s["proc_cpu_s"] = proc_cpu_seconds(self.pid)
        s["run_delay_s_at_request"] = waited
        s["run_delay_s"] = proc_run_delay_seconds(self.pid)
        return s

    def rss(self) -> dict[str, float]:
        return proc_rss(self.pid)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.cmd("quit"), 10)
                await asyncio.wait_for(self.proc.wait(), 10)
            except Exception:  # noqa: BLE001 - make sure it goes away
                self.proc.kill()
                await self.proc.wait()
        if self.stamps is not None:
            self.stamps.close()
        if self.stamp_fd is not None:
            os.close(self.stamp_fd)


def delta(s0: dict[str, Any], s1: dict[str, Any], key: str) -> float:
    return float(s1.get(key, 0)) - float(s0.get(key, 0))


def since(s0: dict[str, Any], s1: dict[str, Any], key: str) -> float:
    """``key`` from the end of snapshot s0 to the start of s1: the snapshots' own cost left out."""
    return float(s1.get(f"{key}_at_request", s1.get(key, 0))) - float(s0.get(key, 0))


def window(s0: dict[str, Any], s1: dict[str, Any]) -> dict[str, float]:
    """Rates and CPU of the back-end between two stats snapshots."""
    wall = since(s0, s1, "mono_ns") / 1e9
    cpu = since(s0, s1, "cpu_ns") / 1e9
    rec = delta(s0, s1, "records")
    kicks = delta(s0, s1, "kicks")
    return {
        "wall_s": round(wall, 4),
        "records": rec,
        "records_per_s": rec / wall if wall else 0.0,
        "cpu_share": cpu / wall if wall else 0.0,
        "cpu_s_per_million_records": cpu / rec * 1e6 if rec else None,  # type: ignore[dict-item]
        "kicks": kicks,
        "kicks_per_record": kicks / rec if rec else None,  # type: ignore[dict-item]
        "batches": delta(s0, s1, "batches"),
        "rejected": delta(s0, s1, "rejected"),  # e.g. avail-index-jump after a torn avail.idx read
        "proc_stat_cpu_share": since(s0, s1, "proc_cpu_s") / wall if wall else 0.0,
        # the back-end's threads runnable but not running, per second: what other processes cost it
        "waiting_for_cpu_share": since(s0, s1, "run_delay_s") / wall if wall else 0.0,
    }


def pin_process(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


def big_little_tree(root: Path) -> None:
    from tests.sysfs_tree import HostSpec, make_sysfs_tree

    make_sysfs_tree(root, HostSpec.big_little([(4, 300000, 1803000, 160), (2, 400000, 2253000, 498),
                                                (2, 500000, 2802000, 1024)], name="pixel6-like"))


def calibrate() -> dict[str, float]:
    """A fixed pure-Python loop, to compare machines and to see a noisy neighbour come and go."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(2000):
            sum(range(100))
        best = min(best, time.perf_counter() - t)
    return {"sum_range_100_us": round(best / 2000 * 1e6, 3)}


def background(seconds: float = 1.0) -> dict[str, Any]:
    """What else runs: system busy fraction and the top CPU users over ``seconds``."""

    def per_pid() -> dict[int, tuple[str, float]]:
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/comm") as f:
                        comm = f.read().strip()
                    out[int(d)] = (comm, proc_cpu_seconds(int(d)))
                except (OSError, ValueError, IndexError):
                    pass
        return out

    b0, t0 = system_busy()
    p0 = per_pid()
    time.sleep(seconds)
    b1, t1 = system_busy()
    p1 = per_pid()
    top = sorted(((p1[p][1] - p0[p][1], p1[p][0], p) for p in p1 if p in p0 and p != os.getpid()), reverse=True)[:5]
    return {
        "system_busy_cores": round((b1 - b0) / (t1 - t0) * (os.cpu_count() or 1), 3) if t1 > t0 else None,
        "top_processes": [{"pid": p, "comm": c, "cpu_share": round(x / seconds, 3)} for x, c, p in top if x > 0],
        "loadavg": [float(x) for x in open("/proc/loadavg").read().split()[:3]],
    }


def env_mark() -> tuple[float, float, float, float, float]:
    busy, _ = system_busy()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.monotonic(), busy / CLK_TCK, time.process_time() + ch.ru_utime + ch.ru_stime,
            calibrate()["sum_range_100_us"], steal_jiffies() / CLK_TCK)


def env_delta(m0: tuple[float, float, float, float, float]) -> dict[str, float]:
    """Who else used the CPUs during a section: system busy time minus ours (this process and
    every child it has waited for: back-ends, floors, QEMU, py-spy)."""
    t1, busy1, ours1, cal1, steal1 = env_mark()
    wall = t1 - m0[0]
    foreign = (busy1 - m0[1]) - (ours1 - m0[2])
    return {"wall_s": round(wall, 2), "foreign_load_cores": round(max(0.0, foreign) / wall, 3) if wall else 0.0,
            "hypervisor_steal_cores": round((steal1 - m0[4]) / wall, 3) if wall else 0.0,
            "calibration_us_start": m0[3], "calibration_us_end": cal1}


async def wait_quiet(max_wait: float, threshold: float = 0.25) -> None:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` cores."""
    end = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy()
        await asyncio.sleep(1.0)
        b1, t1 = system_busy()
        busy = (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1) if t1 > t0 else 0.0
        if busy < threshold or time.monotonic() > end:
            if busy >= threshold:
                log(f"machine still busy ({busy:.2f} cores), going on")
            return
        log(f"machine busy ({busy:.2f} cores used by others), waiting")
