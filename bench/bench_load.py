"""Sections 2 to 4, the back-end under load: records per second through one ring, what a guest
pays on a realistic trace (kicks, config reads, exits), and many VMs served at once.

Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import guestlib
from harness import DEFAULT_KICK_BATCH_DELAY, TICK_S, Backend, Config, big_little_tree, delta, log, window
from profiling import profile_during
from stats import summary

from vhost_user_cpufreq.backend.policy.decision import schedutil_khz
from vhost_user_cpufreq.guest.workload import BurstyWorkload, PeltTracker
from vhost_user_cpufreq.protocol import cpufreq as abi


# -- 2. throughput -------------------------------------------------------------------------


async def measure_windows(be: Backend, blaster: guestlib.Blaster, n: int, secs: float) -> list[dict[str, float]]:
    res = []
    for _ in range(n):
        s0 = await be.stats()
        g0 = time.process_time()
        await blaster.run(secs)
        await blaster.drain()
        s1 = await be.stats()
        w = window(s0, s1)
        w["guest_cpu_share"] = (time.process_time() - g0) / w["wall_s"] if w["wall_s"] else 0.0
        res.append(w)
    return res


def aggregate(ws: list[dict[str, float]]) -> dict[str, Any]:
    keys = ("records_per_s", "cpu_share", "cpu_s_per_million_records", "kicks_per_record", "guest_cpu_share")
    out: dict[str, Any] = {k: summary([w[k] for w in ws if w.get(k) is not None], "") for k in keys}
    cpm = out["cpu_s_per_million_records"]["median"]
    out["capacity_records_per_s_per_core"] = round(1e6 / cpm) if cpm else None
    out["windows"] = ws
    return out


async def _driver_model_rate(g: guestlib.Guest, be: Backend, batch: int, secs: float) -> dict[str, Any]:
    """Records/s when the guest driver model itself produces (set_util + flush per batch)."""
    d = g.driver
    call_fd = g.fe.rings[abi.REQUEST_QUEUE].call
    wait = guestlib.eventfd_waiter(call_fd, 0.2)
    s0 = await be.stats()
    g0 = time.process_time()
    r0 = d.stats.records
    end = time.monotonic() + secs
    phase = 0
    error = None
    try:
        while time.monotonic() < end:
            phase ^= 1
            for v in range(batch):
                d.set_util(v, 100 + 600 * phase + v)
            full = d.stats.queue_full
            d.flush()
            stall = time.monotonic() + 2.0
            while d.stats.queue_full != full or d._dirty:  # noqa: SLF001 - ring full: sleep on the interrupt
                if time.monotonic() > stall:
                    raise TimeoutError("the device stopped using buffers (ring broken?)")
                full = d.stats.queue_full
                if not d.queue.set_interrupt_suppression(False):
                    await wait()
                d.queue.set_interrupt_suppression(True)
                d.flush()
    except Exception as exc:  # noqa: BLE001 - RingError from a torn used.idx read, or a stall
        error = f"{type(exc).__name__}: {exc}"
        log(f"driver model, batch {batch}: {error}")
    await asyncio.sleep(0.05)
    s1 = await be.stats()
    w = window(s0, s1)
    gcpu = time.process_time() - g0
    sent = d.stats.records - r0
    return {"batch": batch, "error": error, "backend_rejected": w["rejected"],
            "records_per_s": round(w["records_per_s"]), "backend_cpu_share": round(w["cpu_share"], 3),
            "guest_cpu_us_per_record": round(gcpu / sent * 1e6, 2) if sent else None,
            "guest_records_per_cpu_s": round(sent / gcpu) if gcpu else None}


async def bench_throughput(cfg: Config, tmp: str, profile: bool) -> dict[str, Any]:
    d = os.path.join(tmp, "tput")
    os.mkdir(d)
    out: dict[str, Any] = {"note": "lean in-order producer keeps a 256-entry ring full; EVENT_IDX on"}
    # The daemon's own path (clamp engine, dry run; the C kick lane when the C data plane loads).
    out["policy"] = "engine"
    async with Backend(d, vms=2, vcpus=64, policy="engine") as be:
        g = await guestlib.connect_guest(be.sock(0), ram_size=8 << 20, queue_size=256)
        g2 = await guestlib.connect_guest(be.sock(1), ram_size=8 << 20, queue_size=256)
        try:
            ring = g.fe.rings[abi.REQUEST_QUEUE]
            blaster = guestlib.Blaster(g.driver.queue, g.transport.ram, lambda: os.eventfd_write(ring.kick, 1),
                                       guestlib.eventfd_waiter(ring.call), 64, first_seq=g.driver.seq)
            for batch in (1, 8, 64):
                log(f"throughput: batch {batch} ({cfg.tput_windows} x {cfg.tput_window_s}s)")
                await blaster.drain()
                blaster.set_batch(batch)
                await blaster.run(min(0.3, cfg.tput_window_s))  # warm-up
                await blaster.drain()
                ws = await measure_windows(be, blaster, cfg.tput_windows, cfg.tput_window_s)
                res = aggregate(ws)
                if profile:
                    res["profile"] = await profile_during(be.pid, blaster.run(cfg.profile_s), cfg.profile_s, tmp,
                                                           f"tput-b{batch}")
                    await blaster.drain()
                out[f"batch_{batch}"] = res
            out["driver_model"] = []
            for batch in (1, 8, 64):
                log(f"throughput: driver model produces, batch {batch}")
                x = await _driver_model_rate(g2, be, batch, cfg.driver_window_s)
                out["driver_model"].append(x)
                if x["error"]:
                    break  # the ring of this guest is unusable now
            out["rss_mib"] = be.rss()
        finally:
            del blaster
            await g.close()
            await g2.close()
    # The same producer with every kick served on the event loop (the path without the kick lane).
    d = os.path.join(tmp, "tput-loop")
    os.mkdir(d)
    async with Backend(d, vms=1, vcpus=64, policy="engine-loop") as be:
        g = await guestlib.connect_guest(be.sock(0), ram_size=8 << 20, queue_size=256)
        try:
            ring = g.fe.rings[abi.REQUEST_QUEUE]
            blaster = guestlib.Blaster(g.driver.queue, g.transport.ram, lambda: os.eventfd_write(ring.kick, 1),
                                       guestlib.eventfd_waiter(ring.call), 64, first_seq=g.driver.seq)
            for batch in (1, 64):
                log(f"throughput: batch {batch}, clamp engine on the event loop")
                await blaster.drain()
                blaster.set_batch(batch)
                await blaster.run(min(0.3, cfg.tput_window_s))
                await blaster.drain()
                out[f"loop_batch_{batch}"] = aggregate(await measure_windows(be, blaster, cfg.tput_windows, cfg.tput_window_s))
        finally:
            del blaster
            await g.close()
    return out


# -- 3. guest cost on a realistic trace ----------------------------------------------------------


async def _trace(g: guestlib.Guest, seconds: float, vcpus: int) -> dict[str, Any]:
    d, t, fe = g.driver, g.transport, g.fe
    wl = BurstyWorkload(vcpus, seed=7)
    pelt = [PeltTracker() for _ in range(vcpus)]
    loop = asyncio.get_running_loop()
    k0, r0, b0, c0, f0, n0, tr0 = d.stats.kicks, d.stats.records, d.stats.batches, t.config_reads, \
        d.stats.config_refreshes, fe.config_change_msgs, d.stats.torn_reads
    u0, h0 = d.stats.urgent_kicks, d.stats.deferred_kicks
    last_khz = [-1] * vcpus
    khz_changes = 0
    cur_reads = 0
    ticks = 0
    ring_error = None
    start = loop.time()
    nxt = start
    g0 = time.process_time()
    while True:
        now = loop.time()
        if now - start >= seconds:
            break
        assert d.config is not None
        for v in range(vcpus):
            util = pelt[v].step(wl.busy(v, TICK_S * 1e3), TICK_S * 1e3)
            d.set_util(v, util)
            khz = schedutil_khz(util, d.config.domain_of(v))
            if khz != last_khz[v]:
                khz_changes += 1
                last_khz[v] = khz
            if not d.freq_page:
                d.cur_khz(v)  # what the guest reads each tick for frequency invariance: cached, no exit
                cur_reads += 1
        if d.freq_page:
            await d.page_frequencies()  # every domain from the shared page: memory loads, no exit
            cur_reads += vcpus
        try:
            d.flush()
        except Exception as exc:  # noqa: BLE001 - e.g. RingError from a torn used.idx read
            ring_error = f"{type(exc).__name__}: {exc}"
            log(f"trace stopped: {ring_error}")
            break
        ticks += 1
        nxt += TICK_S
        await asyncio.sleep(max(0.0, nxt - loop.time()))
    wall = loop.time() - start
    gcpu = time.process_time() - g0
    await asyncio.sleep(0.1)  # let the last refresh finish
    kicks = d.stats.kicks - k0
    records = d.stats.records - r0
    reads = t.config_reads - c0
    refreshes = d.stats.config_refreshes - f0
    torn = d.stats.torn_reads - tr0
    attempts = refreshes + torn  # each attempt (a torn one is retried) reads gen, body, gen
    notes = fe.config_change_msgs - n0
    # one refresh = read(gen) + read(body) + read(gen); through virtio-pci every 4 bytes is an exit
    pci_per_refresh = 1 + (abi.CONFIG_SIZE - 4) // 4 + 1
    ours = (kicks + reads) / wall
    theirs_records = (records + vcpus * ticks) / wall
    theirs_khz = (khz_changes + vcpus * ticks) / wall
    return {
        "ring_error": ring_error,
        "seconds": round(wall, 2),
        "ticks": ticks,
        "ticks_per_s": round(ticks / wall, 1),
        "vcpus": vcpus,
        "records": records,
        "records_per_s": round(records / wall, 1),
        "batches": d.stats.batches - b0,
        "kicks": kicks,
        "kicks_per_s": round(kicks / wall, 1),
        "kicks_per_record": round(kicks / records, 4) if records else None,
        "records_per_kick": round(records / kicks, 2) if kicks else None,
        "urgent_kicks": d.stats.urgent_kicks - u0,  # kicked at once for a rise in demand (SPEC 6.4)
        "kicks_held_back": d.stats.deferred_kicks - h0,  # flushes whose kick waited for more records or 32 ms
        "config_change_notifications": notes,
        "config_refreshes": refreshes,
        "config_reads": reads,
        "config_reads_per_s": round(reads / wall, 1),
        "config_torn_reads": torn,
        "config_reads_not_caused_by_a_notification": reads - 3 * attempts,
        "config_reads_per_tick": round(reads / ticks, 4) if ticks else None,
        "config_accesses_per_s_if_virtio_pci": round(attempts * pci_per_refresh / wall, 1),
        "ours_exits_per_s": round(ours, 1),
        "ours_exits_per_s_if_virtio_pci_config": round((kicks + attempts * pci_per_refresh) / wall, 1),
        "ours_exits_per_s_if_refresh_read_only_gen_and_cur_khz":
            round((kicks + attempts * (2 + len(d.config.domains) if d.config else 0)) / wall, 1),
        "virtual_cpufreq_exits_per_s": round(theirs_records, 1),
        "virtual_cpufreq_exits_per_s_every_khz_change": round(theirs_khz, 1),
        "virtual_cpufreq_breakdown_per_s": {"requests": round(records / wall, 1),
                                            "requests_every_khz_change": round(khz_changes / wall, 1),
                                            "cur_freq_reads": round(vcpus * ticks / wall, 1)},
        "exit_ratio_ours_vs_virtual_cpufreq": round(ours / theirs_records, 4) if theirs_records else None,
        "exit_ratio_ours_virtio_pci_vs_virtual_cpufreq":
            round((kicks + attempts * pci_per_refresh) / wall / theirs_records, 4) if theirs_records else None,
        "guest_model_cpu_us_per_tick": round(gcpu / ticks * 1e6, 1) if ticks else None,
        "freq_page": d.freq_page,
        "page_reads": d.stats.page_reads,
        "page_fallbacks": d.stats.page_fallbacks,
    }


async def _page_in_use(g: guestlib.Guest, timeout: float = 5.0) -> None:
    """Wait until the back-end's map has landed (the page reads LIVE)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while await g.driver.page_frequencies() is None:
        if loop.time() > end:
            raise RuntimeError("the shared frequency page never appeared")
        await asyncio.sleep(0.005)
    g.driver.stats.page_fallbacks = 0


async def bench_guest_cost(cfg: Config, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"tick_ms": TICK_S * 1e3, "workload": "BurstyWorkload(8, seed=7) + PeltTracker per vCPU",
                           "host": "PIXEL6; each host domain follows the guest's highest schedutil target (OPP ceil)"}
    # The shared frequency page (SPEC §8) on the default kick batching: the same trace, in the same run.
    runs = [(v, kbd, False) for v, kbd in cfg.variants] + [("default-page", None, True)]
    for variant, kbd, page in runs:
        if variant.endswith("-loop"):
            continue  # this trace's policy (the bench's, following the host) runs on the event loop anyway
        log(f"guest cost: {cfg.trace_s}s trace, 8 vCPUs, 4 ms tick (kick batching {variant})")
        d = os.path.join(tmp, f"trace-{variant}")
        os.mkdir(d)
        async with Backend(d, vms=1, vcpus=8, follow=True, age=True, kick_batch_delay=kbd, shared_page=page) as be:
            g = await guestlib.connect_guest(be.sock(0))
            if page:
                await _page_in_use(g)
            try:
                await be.cmd("reset-age")
                s0 = await be.stats()
                res = await _trace(g, cfg.trace_s, 8)
                s1 = await be.stats()
            finally:
                await g.close()
        res["backend"] = window(s0, s1)
        res["backend"]["config_notifications"] = delta(s0, s1, "config_notifications")
        res["backend"]["host_frequency_changes"] = delta(s0, s1, "host_changes")
        res["request_age_at_decision"] = summary(s1.get("ages_ns", []), "us", 1e-3)
        res["kick_batch_delay_s"] = DEFAULT_KICK_BATCH_DELAY if kbd is None else kbd
        out[variant] = res
    return out


async def _load(guests: list[guestlib.Guest], seconds: float, vcpus: int, flush_s: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    n = len(guests)
    start = loop.time()
    due = [start + flush_s * i / n for i in range(n)]
    phase = [0] * n
    flushes = records = late = 0
    end = start + seconds
    while True:
        now = loop.time()
        if now >= end:
            break
        for i in range(n):
            if due[i] <= now:
                drv = guests[i].driver
                if i in _dead:
                    continue
                phase[i] ^= 1
                base = 200 + 500 * phase[i]
                for v in range(vcpus):
                    drv.set_util(v, base + 3 * v)
                try:
                    records += drv.flush()
                except Exception as exc:  # noqa: BLE001 - RingError from a torn used.idx read
                    _dead[i] = f"{type(exc).__name__}: {exc}"
                    log(f"guest {i} stopped: {_dead[i]}")
                    continue
                flushes += 1
                due[i] += flush_s
                if due[i] < now - flush_s:
                    late += 1
                    due[i] = now
        await asyncio.sleep(0.001)
    return {"flushes": flushes, "records_sent": records, "late_resets": late, "seconds": loop.time() - start,
            "guests_stopped_by_ring_errors": len(_dead), "ring_errors": sorted(set(_dead.values()))[:3]}


_dead: dict[int, str] = {}  # guests of the current scale run whose ring failed

#: what the back-end's stderr holds when something went wrong outside logging (a thread's or a
#: callback's exception is printed, not logged)
_STDERR_ERRORS = ("Traceback (most recent call last)", "Exception ignored", "Fatal Python error")


def _scale_errors(s1: dict[str, Any], unserved: list[int], stderr_path: str, vms: int) -> dict[str, Any]:
    """Everything that says a VM was not served cleanly; ``count`` is 0 only when nothing did."""
    text = Path(stderr_path).read_text(errors="replace") if os.path.exists(stderr_path) else ""
    e: dict[str, Any] = {
        "vms_not_connected": vms - int(s1.get("connected", 0)),
        "vms_not_served_during_load": len(unserved),
        "guests_stopped_by_ring_errors": len(_dead),
        "sessions_closed": int(s1.get("sessions_closed", 0)),
        "sessions_beyond_one_per_vm": max(0, int(s1.get("sessions", 0)) - vms),
        "records_rejected": int(s1.get("rejected", 0)),
        "batches_lost": int(s1.get("lost_batches", 0)),
        "interrupts_dropped": int(s1.get("interrupts_dropped", 0)),
        "config_notify_failed": int(s1.get("config_notify_failed", 0)),
        "backend_log_warnings_or_worse": sum(s1.get("log_records", {}).values()),
        "backend_stderr_tracebacks": sum(text.count(m) for m in _STDERR_ERRORS),
    }
    e["count"] = sum(e.values())
    if e["count"]:
        e["first_log_records"] = s1.get("log_first", [])
        e["first_unserved_vms"] = unserved[:10]
        e["first_ring_errors"] = sorted(set(_dead.values()))[:3]
        e["stderr_tail"] = text[-2000:]
    return e


async def bench_scale(cfg: Config, tmp: str, profile: bool) -> dict[str, Any]:
    rate_per_vcpu = 1 / cfg.scale_flush_s
    out: dict[str, Any] = {"vms": cfg.scale_vms, "vcpus_per_vm": 8, "frequency_source": "SysfsSource over a fake "
                           "sysfs tree, sampled every 50 ms (the daemon's default)",
                           "load": f"each VM flushes all 8 vCPUs every {cfg.scale_flush_s * 1e3:g} ms "
                                   f"({rate_per_vcpu:g} records/s per vCPU), VMs staggered"}
    root = Path(tmp) / "scale-sysfs"
    big_little_tree(root)
    errors = 0
    # Every VM's vCPUs pinned to pCPUs all VMs share (800 vCPUs on 8), then the default once more with
    # no pinning at all (pinning "none", as on an overcommitted host the service cannot pin).
    for variant, kbd in [*cfg.variants, ("default-unpinned", None)]:
        d = os.path.join(tmp, f"scale-{variant}")
        os.mkdir(d)
        res: dict[str, Any] = {"kick_batch_delay_s": DEFAULT_KICK_BATCH_DELAY if kbd is None else kbd}
        policy = "engine-loop" if variant.endswith("-loop") else "engine"
        res["policy"] = policy
        res["pinning"] = pinning = "none" if variant.endswith("-unpinned") else "pinned"
        stderr_path = os.path.join(d, "backend.stderr")
        async with Backend(d, vms=cfg.scale_vms, vcpus=8, sysfs=str(root), period=0.05, kick_batch_delay=kbd,
                           age=True, policy=policy, stderr_to=stderr_path, pinning=pinning) as be:
            log(f"scale ({variant}): connecting {cfg.scale_vms} guests")
            rss_empty = be.rss()
            t0 = time.monotonic()
            guests: list[guestlib.Guest] = []
            _dead.clear()
            try:
                for i in range(cfg.scale_vms):
                    guests.append(await guestlib.connect_guest(be.sock(i), ram_size=1 << 20))
                res["connect_s"] = round(time.monotonic() - t0, 2)
                if variant in ("default", "default-loop", "default-unpinned"):  # per-buffer idles as default does
                    await asyncio.sleep(cfg.settle_s)
                    log(f"scale ({variant}): idle {cfg.scale_idle_s}s")
                    s0 = await be.stats()
                    await asyncio.sleep(cfg.scale_idle_s)
                    s1 = await be.stats()
                    w = window(s0, s1)
                    res["idle"] = {"cpu_share": round(w["cpu_share"], 5),
                                   "proc_stat_cpu_share": round(w["proc_stat_cpu_share"], 4),
                                   "waiting_for_cpu_share": round(w["waiting_for_cpu_share"], 4),
                                   "seconds": w["wall_s"], "connected": s1.get("connected"),
                                   "rss_mib": be.rss(), "rss_mib_before_guests": rss_empty}
                log(f"scale ({variant}): load {cfg.scale_load_s}s")
                await _load(guests, min(1.0, cfg.scale_load_s / 2), 8, cfg.scale_flush_s)  # warm-up
                await be.cmd("reset-age")
                await be.cmd("lag-start")
                per_vm0 = (await be.cmd("per-vm"))["records"]
                s0 = await be.stats()
                g0 = time.process_time()
                lo = await _load(guests, cfg.scale_load_s, 8, cfg.scale_flush_s)
                gcpu = time.process_time() - g0
                await asyncio.sleep(0.05)
                s1 = await be.stats()
                per_vm1 = (await be.cmd("per-vm"))["records"]
                await be.cmd("lag-stop")
                w = window(s0, s1)
                target = cfg.scale_vms * 8 * rate_per_vcpu
                res["load"] = {**w, "target_records_per_s": target,
                               # the guest side (one Python process) could not keep up: the rate is its own
                               "generator_limited": w["records_per_s"] < 0.95 * target,
                               "guest_side": {**lo, "cpu_share": round(gcpu / lo["seconds"], 3)},
                               "request_age_at_decision": summary(s1.get("ages_ns", []), "us", 1e-3),
                               "event_loop_timer_lateness": summary(s1.get("loop_lag_ns", []), "us", 1e-3),
                               "rss_mib": be.rss(), "connected": s1.get("connected")}
                if profile and variant == "default":
                    prof = profile_during(be.pid, _load(guests, cfg.profile_s, 8, cfg.scale_flush_s),
                                           cfg.profile_s, tmp, "scale-load")
                    res["load"]["profile"] = await prof
                s_end = await be.stats()
                unserved = [i for i, (a, b) in enumerate(zip(per_vm0, per_vm1)) if b <= a]
            finally:
                for g in guests:
                    await g.close()
        res["errors"] = _scale_errors(s_end, unserved, stderr_path, cfg.scale_vms)
        errors += res["errors"]["count"]
        if res["errors"]["count"]:
            log(f"scale ({variant}): {res['errors']['count']} errors: "
                f"{ {k: v for k, v in res['errors'].items() if v and k != 'stderr_tail'} }")
        out[variant] = res
    out["errors"] = errors
    return out
