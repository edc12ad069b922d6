"""Sections 0 and 1: whether ring indices cross processes whole, and how long a request takes
from the guest's kick to the back-end's decision, against the eventfd floors of this machine.

Three A/B runs follow the judged figure: the lane at the service's slice and at the kernel's,
the kick made by the Python guest model and by C, and a vCPU that stays busy after its kick.
Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import floor
import guestlib
import torn_index
from harness import DEFAULT_KICK_BATCH_DELAY, Backend, Config, delta, log, pin_process
from stats import summary

from vhost_user_cpufreq.backend.host import sched


async def bench_atomicity(cfg: Config) -> dict[str, Any]:
    """Ring index access across processes: struct (as protocol/virtqueue.py does) vs memoryview.cast."""
    secs = {"tiny": 0.3, "quick": 1.0}.get(cfg.name, 2.0)
    log(f"atomicity: 16-bit index stores/loads between two processes, {secs}s each")
    import inspect

    from vhost_user_cpufreq.protocol import virtqueue

    out: dict[str, Any] = {"note": torn_index.__doc__.split("\n\n")[1].replace("\n", " "),
                           "protocol_virtqueue_uses": "cast" if '.cast("H")' in inspect.getsource(virtqueue) else "struct"}
    for kind in ("struct", "cast"):
        out[kind] = torn_index.measure(kind, secs)  # forks: called from the loop's thread, no executor
    return out


def _pair_summaries(samples: list[tuple[int, int]]) -> dict[str, Any]:
    return {"rtt": summary([s[0] for s in samples], "us", 1e-3), "oneway": summary([s[1] for s in samples], "us", 1e-3)}

async def bench_latency(cfg: Config, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"gap_us": cfg.lat_gap_us, "floor": {},
                           "note": "requests spaced gap_us apart, each kicked: busy polling off "
                                   "(kick_batch_delay 0), since at this rate the default would poll the ring "
                                   "(device_busy_polled); the kick path is the same code either way"}
    for kind in ("c", "c-cross", "python", "asyncio"):
        log(f"latency: eventfd floor ({kind}, n={cfg.floor_n})")
        samples, why = floor.measure(kind, cfg.floor_n, cfg.lat_gap_us)
        out["floor"][kind] = _pair_summaries(samples) if samples else {"skipped": why}
    # "device" is the daemon's own path (judged): its clamp engine, on the C kick lane when the C data
    # plane loads, placed where the scheduler puts it.  The pinned runs place guest and back-end as the
    # pinned floors are placed (one CPU, or one each), for like-for-like ratios.  The loop variants keep
    # every kick on the event loop, for comparison.
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    variants = [("engine", "device", None), ("engine-loop", "device_engine_loop", None),
                ("stamp", "device_stamp_loop", None)]
    if two_cpus:
        variants[1:1] = [("engine", "device_same_cpu", "same"), ("engine", "device_cross_cpu", "cross")]
    # The default setting at this request rate: the ring is busy, polled on the 4 ms grid, and the guest
    # does not kick; timed from the guest's publication to the decision.
    variants.append(("engine", "device_busy_polled", None))
    for policy, key, placement in variants:
        log(f"latency: device kick -> decision, {policy} policy{f', {placement} CPU' if placement else ''} "
            f"(n={cfg.lat_n})")
        d = os.path.join(tmp, f"lat-{key}")
        os.mkdir(d)
        polled = key == "device_busy_polled"
        async with Backend(d, vms=1, vcpus=8, stamps=True, split=True, policy=policy,
                           kick_batch_delay=None if polled else 0.0) as be:
            # Every request is timed, urgent or not: the driver kicks whenever the device asks.
            g = await guestlib.connect_guest(be.sock(0), lazy_records=0)
            mine = os.sched_getaffinity(0)
            try:
                if placement is not None:
                    await asyncio.sleep(0.1)  # the lane thread exists once the ring is served
                    pin_process(be.pid, 0 if placement == "same" else 1)
                    os.sched_setaffinity(0, {0})  # this thread: the guest
                await be.cmd("reset-age")
                s0 = await be.stats()
                assert be.stamps is not None
                lat = guestlib.latency_inprocess(g, be.stamps, 0, 8, 8, cfg.lat_n, cfg.lat_gap_us,
                                                 poll_period_us=int(DEFAULT_KICK_BATCH_DELAY * 1e6) if polled else 0)
                s1 = await be.stats()
            finally:
                os.sched_setaffinity(0, mine)
                await g.close()
        k2d_n = delta(s0, s1, "k2d_count")
        out[key] = {
            "policy": policy,
            "placement": placement or "scheduler",
            "kick_batch_delay_s": DEFAULT_KICK_BATCH_DELAY if polled else 0.0,
            "kick_to_decision": summary(lat.kick_to_decision_ns, "us", 1e-3),
            "kick_to_ack_rtt": summary(lat.kick_to_ack_ns, "us", 1e-3),
            "notify_to_decision": summary(lat.notify_to_decision_ns, "us", 1e-3),
            "split_handler_entry_to_decision": summary(
                s1.get("handler_to_decision_ns", [])[-len(lat.kick_to_decision_ns):], "us", 1e-3),
            # The kick lane's own stamp of its wake-up splits each kicked request in two.
            "split_kick_to_lane_woke": summary(lat.kick_to_lane_woke_ns, "us", 1e-3),
            "split_lane_woke_to_decision": summary(lat.lane_woke_to_decision_ns, "us", 1e-3),
            "requests_not_armed": lat.not_armed,
            "requests_not_kicked": lat.not_kicked,
            "backend_in_loop_processing_mean_us":
                round(delta(s0, s1, "k2d_sum_s") / k2d_n * 1e6, 2) if k2d_n else None,
            "backend_kicks": delta(s0, s1, "kicks"),
        }
    log(f"latency: the daemon's path, lane slice default vs the kernel's, alternating (n={max(20, cfg.lat_n // 3)} each)")
    out["slice_ab"] = await _slice_ab(cfg, tmp)
    log(f"latency: the daemon's path, kicked by the Python guest model vs in C, alternating "
        f"(n={max(20, cfg.lat_n // 3)} each)")
    out["kick_ab"] = await _kick_ab(cfg, tmp)
    log(f"latency: vCPU busy after its kick, one CPU, lane slice default vs the kernel's")
    out["busy_vcpu"] = await _busy_vcpu(cfg, tmp)
    c = out["floor"].get("c", {})
    if "rtt" in c and c["rtt"]["median"]:
        dev = out["device"]
        out["ratios"] = {
            "rtt_p50_vs_c_rtt_p50": round(dev["kick_to_ack_rtt"]["median"] / c["rtt"]["median"], 2),
            "kick_to_decision_p50_vs_c_oneway_p50": round(dev["kick_to_decision"]["median"] / c["oneway"]["median"], 2),
            "kick_to_decision_p50_vs_c_rtt_p50": round(dev["kick_to_decision"]["median"] / c["rtt"]["median"], 2),
        }
        woke = dev["split_kick_to_lane_woke"]
        if woke["n"] and c["oneway"]["p99"]:
            # The lane's wake-up is what the floor's one-way figure measures: an eventfd write to a
            # blocked reader running.
            out["ratios"]["kick_to_lane_woke_p99_vs_c_oneway_p99"] = round(woke["p99"] / c["oneway"]["p99"], 2)
        py = out["floor"].get("asyncio", {})
        if "rtt" in py:
            out["ratios"]["rtt_p50_vs_asyncio_rtt_p50"] = round(dev["kick_to_ack_rtt"]["median"] / py["rtt"]["median"], 2)
        # Like for like: the device pinned as each C floor is placed.
        for key, fl in (("device_same_cpu", "c"), ("device_cross_cpu", "c-cross")):
            x, f = out.get(key), out["floor"].get(fl, {})
            if x and "rtt" in f and x["kick_to_decision"]["median"]:
                out["ratios"][key] = {
                    "kick_to_decision_p50_vs_c_rtt_p50": round(x["kick_to_decision"]["median"] / f["rtt"]["median"], 2),
                    "rtt_p50_vs_c_rtt_p50": round(x["kick_to_ack_rtt"]["median"] / f["rtt"]["median"], 2),
                    "kick_to_decision_p99_vs_c_oneway_p99": round(x["kick_to_decision"]["p99"] / f["oneway"]["p99"], 2),
                }
    return out


SLICE_ARMS = (("lane_slice_default", None), ("kernel_slice", 0))  # Service.lane_slice_us: the default, or 0
SLICE_ARM_NAMES = {"lane_slice_default": "lane slice default", "kernel_slice": "lane at the kernel's slice"}
BUSY_BEFORE_US = (0, 3000)


async def _slice_arms(stack: contextlib.AsyncExitStack, tmp: str, tag: str) -> list[tuple[str, Backend, guestlib.Guest]]:
    """One back-end per lane slice setting, each with its guest; busy polling off (every request kicks)."""
    arms = []
    for label, lane_slice in SLICE_ARMS:
        d = os.path.join(tmp, f"lat-{tag}-{label}")
        os.mkdir(d)
        be = await stack.enter_async_context(Backend(d, vms=1, vcpus=8, stamps=True, policy="engine",
                                                     kick_batch_delay=0.0, lane_slice_us=lane_slice))
        g = await guestlib.connect_guest(be.sock(0), lazy_records=0)
        stack.push_async_callback(g.close)
        arms.append((label, be, g))
    await asyncio.sleep(0.1)  # the lane threads exist once the rings are served
    return arms


def _thread_slices_us(pid: int) -> list[float]:
    """What the kernel says of each thread's slice: the lane's is the one that differs."""
    return sorted(sched.sched_getattr(int(t)).runtime / 1e3 for t in os.listdir(f"/proc/{pid}/task"))


async def _slice_ab(cfg: Config, tmp: str) -> dict[str, Any]:
    """The daemon's path as judged (scheduler placement, guest blocking for its ack), with the lane at
    the service's slice and at the kernel's: two back-ends served alternately in blocks of 50."""
    n = max(20, cfg.lat_n // 3)
    out: dict[str, Any] = {"n_per_arm": n, "gap_us": cfg.lat_gap_us, "placement": "scheduler", "arms": {}}
    async with contextlib.AsyncExitStack() as stack:
        arms = await _slice_arms(stack, tmp, "slice")
        got: dict[str, list[int]] = {}
        for label, be, _ in arms:
            out["arms"][label] = {"thread_slices_us": _thread_slices_us(be.pid)}
            got[label] = []
        while any(len(v) < n for v in got.values()):
            for label, be, g in arms:
                assert be.stamps is not None
                got[label] += guestlib.latency_inprocess(g, be.stamps, 0, 8, 8, min(50, n), cfg.lat_gap_us,
                                                         warmup=3).kick_to_decision_ns
        for label, v in got.items():
            out["arms"][label]["kick_to_decision"] = summary(v[:n], "us", 1e-3)
    return out


KICK_ARM_NAMES = {"python": "kick by the Python guest model", "c": "kick and wait in C"}
KICK_ARMS = tuple(KICK_ARM_NAMES)


async def _kick_ab(cfg: Config, tmp: str) -> dict[str, Any]:
    """The daemon's path as judged, kicked by the Python guest model and by bench/kick_wait.c, on one
    back-end, alternately in blocks of 50: what the guest model itself adds to the figure."""
    n = max(20, cfg.lat_n // 3)
    out: dict[str, Any] = {"n_per_arm": n, "gap_us": cfg.lat_gap_us, "placement": "scheduler", "arms": {}}
    so = guestlib.CKick.build(tmp)
    if so is None:
        out["skipped"] = "no C compiler (gcc/cc) found"
        return out
    ck = guestlib.CKick(so)
    d = os.path.join(tmp, "lat-kick-ab")
    os.mkdir(d)
    async with Backend(d, vms=1, vcpus=8, stamps=True, policy="engine", kick_batch_delay=0.0) as be:
        g = await guestlib.connect_guest(be.sock(0), lazy_records=0)
        try:
            got = {arm: guestlib.LatencySamples([], [], 0, 0) for arm in KICK_ARMS}
            while any(len(v.kick_to_decision_ns) < n for v in got.values()):
                for arm in KICK_ARMS:
                    assert be.stamps is not None
                    lat = guestlib.latency_inprocess(g, be.stamps, 0, 8, 8, min(50, n), cfg.lat_gap_us, warmup=3,
                                                     c_kick=ck if arm == "c" else None)
                    x = got[arm]
                    x.kick_to_decision_ns += lat.kick_to_decision_ns
                    x.kick_to_lane_woke_ns += lat.kick_to_lane_woke_ns
                    x.lane_woke_to_decision_ns += lat.lane_woke_to_decision_ns
                    x.not_kicked += lat.not_kicked
        finally:
            await g.close()
    for arm, x in got.items():
        out["arms"][arm] = {
            "kick_to_decision": summary(x.kick_to_decision_ns[:n], "us", 1e-3),
            "split_kick_to_lane_woke": summary(x.kick_to_lane_woke_ns[:n], "us", 1e-3),
            "split_lane_woke_to_decision": summary(x.lane_woke_to_decision_ns[:n], "us", 1e-3),
            "requests_not_kicked": x.not_kicked,
        }
    out["c_kick_calls"] = ck.calls  # warm-ups included: the C arm's kicks all went through kick_wait.c
    return out


async def _busy_vcpu(cfg: Config, tmp: str) -> dict[str, Any]:
    """Kick -> decision while the kicking vCPU keeps its CPU busy, with the lane on that CPU.

    Two back-ends, one per lane slice setting, served alternately in blocks so
    both see the same machine.
    """
    n = max(20, cfg.lat_n // 5)
    block = max(10, min(50, n // 4))
    out: dict[str, Any] = {"n_per_arm": n, "gap_us": cfg.lat_gap_us, "placement": "guest and back-ends on CPU 0",
                           "arms": {}}
    async with contextlib.AsyncExitStack() as stack:
        arms = await _slice_arms(stack, tmp, "busy")
        mine = os.sched_getaffinity(0)
        busy = {}
        for label, be, g in arms:
            pin_process(be.pid, 0)
            out["arms"][label] = {"thread_slices_us": _thread_slices_us(be.pid)}
            assert be.stamps is not None
            busy[label] = guestlib.BusyVcpu(g, be.stamps, 0, 8, 8)
        os.sched_setaffinity(0, {0})
        try:
            for before in BUSY_BEFORE_US:
                got: dict[str, list[int]] = {label: [] for label in busy}
                while any(len(v) < n for v in got.values()):
                    for label, b in busy.items():
                        got[label] += b.run(block, cfg.lat_gap_us, before)
                for label, v in got.items():
                    out["arms"][label][f"busy_before_{before}us"] = summary(v[:n], "us", 1e-3)
                    # waits of a slice's length (the kernel's is over 1 ms): the lane did not preempt
                    out["arms"][label][f"busy_before_{before}us_over_1ms"] = sum(1 for x in v[:n] if x > 1_000_000)
        finally:
            os.sched_setaffinity(0, mine)
    return out
