"""Section 5: how long a host frequency change (a write to a fake sysfs) takes to reach the guest
as a config-change notification, split at the back-end's detection; and, with the shared
frequency page (SPEC §8), how long until the guest's page shows it, and what a change costs the
back-end on either path.

Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

from vhost_user_cpufreq.backend.cpufreq.device import CpufreqDevice
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
from vhost_user_cpufreq.protocol import cpufreq as abi

import guestlib
from backend_proc import MIRROR_SLOT, SLOT
from harness import Backend, Config, big_little_tree, delta, log, window
from stats import mono_ns, summary


def _cur_freq_writer(root: Path, policy: int):  # type: ignore[no-untyped-def]
    """Write scaling_cur_freq in place, one pwrite, values of one length.

    tests/sysfs_tree.py:set_cur_freq truncates then writes, so a sample can
    read an empty file between the two (a real sysfs read never sees that) and
    the source drops the policy as garbled.
    """
    path = root / "devices" / "system" / "cpu" / "cpufreq" / f"policy{policy}" / "scaling_cur_freq"
    fd = os.open(path, os.O_WRONLY)

    def write(khz: int) -> None:
        os.pwrite(fd, f"{khz}\n".encode(), 0)

    write.close = lambda: os.close(fd)  # type: ignore[attr-defined]
    return write


async def bench_mirror(cfg: Config, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"notify_interval_ms": 10.0,
                           "note": "changes spaced >= 25 ms (more than the 10 ms notification coalescing interval) "
                                   "plus a random phase, so no notification is coalesced"}
    for period in cfg.mirror_periods:
        log(f"mirror: sampling period {period * 1e3:g} ms, n={cfg.mirror_n}")
        root = Path(tmp) / f"mirror-sysfs-{period}"
        big_little_tree(root)
        d = os.path.join(tmp, f"mirror-{period}")
        os.mkdir(d)
        write_khz = _cur_freq_writer(root, 0)
        write_khz(1159000)  # same length as the values below, before the source reads it
        async with Backend(d, vms=1, vcpus=8, sysfs=str(root), period=period, stamps=True) as be:
            g = await guestlib.connect_guest(be.sock(0))
            loop = asyncio.get_running_loop()
            got: list[asyncio.Future[int]] = []
            orig = g.fe.on_config_change

            def hook() -> None:
                t = mono_ns()
                for f in got:
                    if not f.done():
                        f.set_result(t)
                if orig is not None:
                    orig()

            g.fe.on_config_change = hook
            sampling, path, total = [], [], []
            missed = 0
            assert be.stamps is not None
            s0 = await be.stats()
            try:
                for i in range(cfg.mirror_n):
                    await asyncio.sleep(0.025 + random.random() * max(period, 0.005))
                    fut: asyncio.Future[int] = loop.create_future()
                    got[:] = [fut]
                    _, c0, _ = SLOT.unpack_from(be.stamps, MIRROR_SLOT)
                    write_khz(1374000 if i % 2 == 0 else 1159000)
                    t_write = mono_ns()
                    try:
                        t_recv = await asyncio.wait_for(fut, 2.0 + 2 * period)
                    except asyncio.TimeoutError:
                        missed += 1
                        continue
                    t_det, c1, _ = SLOT.unpack_from(be.stamps, MIRROR_SLOT)
                    if c1 == c0:
                        missed += 1
                        continue
                    sampling.append(max(0, t_det - t_write))
                    path.append(t_recv - t_det)
                    total.append(t_recv - t_write)
                s1 = await be.stats()
            finally:
                g.fe.on_config_change = orig
                await g.close()
                write_khz.close()  # type: ignore[attr-defined]
        w = window(s0, s1)
        out[f"period_{period * 1e3:g}ms"] = {
            "period_ms": period * 1e3,
            "sampling_delay": summary(sampling, "us", 1e-3),
            "notification_path": summary(path, "us", 1e-3),
            "total_write_to_guest": summary(total, "us", 1e-3),
            "missed": missed,
            "backend_cpu_share_while_sampling": round(w["cpu_share"], 4),
            "samples_per_s": round(delta(s0, s1, "samples") / w["wall_s"], 1) if w["wall_s"] else None,
        }
    period = min(cfg.mirror_periods)
    log(f"mirror: the shared frequency page, sampling period {period * 1e3:g} ms, n={cfg.mirror_n}")
    out["page"] = await bench_page(cfg, tmp, period)
    out["change_cost"] = bench_change_cost()
    return out


async def bench_page(cfg: Config, tmp: str, period: float) -> dict[str, Any]:
    """Host change (sysfs write) -> the new value readable in the guest's shared page, at ``period``.

    The guest side spins on the page (plain loads, as a guest would) right after each write; the
    back-end's detection stamp splits the delay into sampling and the page write.
    """
    root = Path(tmp) / f"page-sysfs-{period}"
    big_little_tree(root)
    d = os.path.join(tmp, f"page-{period}")
    os.mkdir(d)
    write_khz = _cur_freq_writer(root, 0)
    write_khz(1159000)
    sampling, path, total = [], [], []
    missed = 0
    async with Backend(d, vms=1, vcpus=8, sysfs=str(root), period=period, stamps=True, shared_page=True) as be:
        g = await guestlib.connect_guest(be.sock(0))
        try:
            drv = g.driver
            deadline = time.monotonic() + 5
            while await drv.page_frequencies() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the shared frequency page never appeared")
                await asyncio.sleep(0.005)
            assert be.stamps is not None
            notes0 = g.fe.config_change_msgs
            s0 = await be.stats()
            for i in range(cfg.mirror_n):
                await asyncio.sleep(0.025 + random.random() * max(period, 0.005))
                want = 1374000 if i % 2 == 0 else 1159000
                _, c0, _ = SLOT.unpack_from(be.stamps, MIRROR_SLOT)
                write_khz(want)
                t_write = mono_ns()
                t_seen = None
                while mono_ns() - t_write < (2.0 + 2 * period) * 1e9:  # spin: the back-end is another process
                    page = await drv.page_frequencies()
                    if page is not None and any(x.cur_khz == want for x in page):
                        t_seen = mono_ns()
                        break
                t_det, c1, _ = SLOT.unpack_from(be.stamps, MIRROR_SLOT)
                if t_seen is None or c1 == c0:
                    missed += 1
                    continue
                sampling.append(max(0, t_det - t_write))
                path.append(max(0, t_seen - t_det))
                total.append(t_seen - t_write)
            s1 = await be.stats()
            notes = g.fe.config_change_msgs - notes0
        finally:
            await g.close()
            write_khz.close()  # type: ignore[attr-defined]
    w = window(s0, s1)
    return {
        "sampling_period_ms": period * 1e3,
        "sampling_delay": summary(sampling, "us", 1e-3),
        "detection_to_page": summary(path, "us", 1e-3),
        "total_write_to_guest_page": summary(total, "us", 1e-3),
        "missed": missed,
        "config_notifications_during": notes,
        "backend_cpu_share_while_sampling": round(w["cpu_share"], 4),
    }


def bench_change_cost(n: int = 20000, reps: int = 5) -> dict[str, Any]:
    """The back-end's CPU per host frequency change, in this process: the device's mirror with the
    page in use (the stores under the seqcount) against the config path (new config image and the
    session's notification call, here a no-op; the guest's 65 GET_CONFIGs per refresh come on top)."""

    class _Host:
        def config_changed(self) -> None:
            pass

        def signal_used(self, index: int) -> None:
            pass

    def run(page: bool) -> list[float]:
        source = StaticSource(PIXEL6)
        dev = CpufreqDevice("bench", (0, 0, 1, 2), source, RecordingPolicy(), shared_page=page)
        dev.attach(_Host())  # type: ignore[arg-type]
        buf = bytearray(abi.FREQ_PAGE_SIZE)
        if page:
            dev.set_features(1 << abi.F_FREQ_PAGE)
            dev.shmem_attach(0, memoryview(buf))
            dev.shmem_in_use(0, True)
        a, b = [d.cur_khz for d in PIXEL6.domains], [d.min_khz for d in PIXEL6.domains]
        out = []
        for _ in range(reps):
            t0 = time.process_time()
            for i in range(n):
                source.set_frequencies(a if i & 1 else b)  # every domain changes
            out.append((time.process_time() - t0) / n * 1e6)
        if page:
            dev.shmem_detach(0)
        dev.close()
        return sorted(out)

    page, config = run(True), run(False)
    return {"changes_per_rep": n, "reps": reps, "domains_changed_per_change": len(PIXEL6.domains),
            "page_cpu_us_per_change": {"median": round(page[reps // 2], 2), "max": round(page[-1], 2)},
            "config_cpu_us_per_change": {"median": round(config[reps // 2], 2), "max": round(config[-1], 2)}}
