"""Section 6: latency and throughput through a real QEMU, the guest model driving virtio-pci over
qtest.  Skipped, with the reason, where no suitable QEMU is found.

Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import guestlib
from bench_load import aggregate, measure_windows
from harness import Backend, Config, delta, log
from stats import proc_cpu_seconds, summary

from vhost_user_cpufreq.protocol import cpufreq as abi


async def bench_qemu(cfg: Config, tmp: str) -> dict[str, Any]:
    try:
        from tests.qemu.fixture import QemuUnavailable, QemuVm, describe_skip, find_qemu
    except Exception as exc:  # noqa: BLE001 - qemu.qmp missing, etc.
        return {"skipped": f"cannot import tests.qemu.fixture: {exc}"}
    try:
        install = find_qemu()
    except QemuUnavailable as exc:
        return {"skipped": describe_skip(exc)}
    from vhost_user_cpufreq.guest.driver import CpufreqDriver

    out: dict[str, Any] = {"qemu_version": install.version, "prefix": " ".join(install.prefix),
                           "note": "guest model drives virtio-pci through qtest: a kick is a qtest MMIO write "
                                   "QEMU turns into the kick eventfd; the ack is QEMU's INTx report"}
    d = tempfile.mkdtemp(prefix="vuc-bench-", dir=install.tmpdir())
    try:
        out["policy"] = "engine"  # the daemon's path, as the in-process headline figures
        # Busy polling off, as for the in-process latency: every timed request is a kick.
        async with Backend(d, vms=1, vcpus=64, stamps=True, policy="engine", kick_batch_delay=0.0) as be:
            async with QemuVm(install, be.sock(0), smp=1, vq_size=256, workdir=Path(d) / "q") as vm:
                t = await vm.open_transport()
                drv = CpufreqDriver(t, queue_size=256, lazy_records=0)  # every timed request is kicked
                await drv.probe()
                log(f"qemu: latency n={cfg.qemu_lat_n}")
                assert be.stamps is not None
                s0 = await be.stats()
                lat = await guestlib.latency_qemu(drv, t, be.stamps, 0, 64, 8, cfg.qemu_lat_n, cfg.lat_gap_us)
                s1 = await be.stats()
                k2d_n = delta(s0, s1, "k2d_count")
                out["latency"] = {
                    "kick_to_decision": summary(lat.kick_to_decision_ns, "us", 1e-3),
                    "kick_to_ack_rtt": summary(lat.kick_to_ack_ns, "us", 1e-3),
                    "requests_not_armed": lat.not_armed,
                    "requests_not_kicked": lat.not_kicked,
                    "backend_in_loop_processing_mean_us":
                        round(delta(s0, s1, "k2d_sum_s") / k2d_n * 1e6, 2) if k2d_n else None,
                }
                # hand the (now idle) ring to the lean producer
                drv.queue.reclaim()
                irq = {"fut": None}
                orig_irq = t.qt.on_irq

                def on_irq(line: int, raised: bool) -> None:
                    if orig_irq is not None:
                        orig_irq(line, raised)
                    f = irq["fut"]
                    if raised and line in t.intx_lines and f is not None and not f.done():
                        f.set_result(None)

                t.qt.on_irq = on_irq

                async def wait_irq() -> None:
                    irq["fut"] = asyncio.get_running_loop().create_future()
                    try:
                        await asyncio.wait_for(irq["fut"], 0.005)  # type: ignore[arg-type]
                    except asyncio.TimeoutError:
                        pass

                blaster = guestlib.Blaster(drv.queue, t.ram, lambda: t.notify(abi.REQUEST_QUEUE), wait_irq, 64,
                                           first_seq=drv.seq)
                qemu_cpu0 = proc_cpu_seconds(vm.pid)
                t_q0 = time.monotonic()
                for batch in (1, 8, 64):
                    log(f"qemu: throughput batch {batch}")
                    await blaster.drain()
                    blaster.set_batch(batch)
                    await blaster.run(0.2)
                    await blaster.drain()
                    out[f"batch_{batch}"] = aggregate(await measure_windows(be, blaster, cfg.qemu_windows, cfg.qemu_window_s))
                out["qemu_process_cpu_share_during_throughput"] = round(
                    (proc_cpu_seconds(vm.pid) - qemu_cpu0) / (time.monotonic() - t_q0), 3)
                t.qt.on_irq = orig_irq
                del blaster
                await drv.remove()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out
