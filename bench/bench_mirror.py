"""Section 5: how long a host frequency change (a write to a fake sysfs) takes to reach the guest
as a config-change notification, split at the back-end's detection.

Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

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
    return out
