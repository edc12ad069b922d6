"""The back-end process of the benchmark: a real :class:`Service`, one socket per VM.

Started by bench/run.py as ``python bench/backend_proc.py --dir D --vms N ...``.
It prints one JSON line ``{"ready": true, "pid": ...}`` once every VM listens,
then answers commands read from stdin, one per line, with one JSON line each:

* ``stats`` - CPU time (CLOCK_PROCESS_CPUTIME_ID, ns) when asked and when
  answered, RSS, and the sum of the
  per-VM counters (records, kicks, batches, config reads and notifications),
  plus the batch-age histogram when ``--age`` is on;
* ``reset-age`` - forget the batch ages collected so far;
* ``lag-start`` / ``lag-stop`` - probe the event loop's timer lateness (a 10 ms
  sleep, measured) while a load runs;
* ``per-vm`` - records counted per VM, in VM order (which VMs were served);
* ``quit`` - close the service and exit.

``stats`` also carries what went wrong: sessions the back-end closed,
interrupts it could not send, config notifications that failed, and every
log record of level WARNING or above (counted by level, the first few kept),
so that the harness can check "without an error" instead of assuming it.

Policy: :class:`StampPolicy` answers like ``RecordingPolicy`` (schedutil's
frequency for the util) but keeps only the latest decision per vCPU, so
memory stays flat at millions of records; with ``--stamp-fd`` it also writes
``(CLOCK_MONOTONIC ns, count)`` of each decision into a shared memfd slot per
(VM, vCPU), which the guest side reads to time kick -> decision.  With
``--follow-host`` the host frequency follows the decisions (each domain runs
at the lowest OPP >= the highest target of its vCPUs), so config-change
notifications happen as they would on a host whose governor tracks the guest.

``--kick-batch-delay`` sets ``VmConfig.kick_batch_delay`` (the session's
``KickBatcher``: avail_event ahead under sustained load, drained at a deadline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import resource
import struct
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vhost_user_cpufreq.backend.cpufreq import device as cd  # noqa: E402
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource  # noqa: E402
from vhost_user_cpufreq.backend.host.actuators import ThreadActuator  # noqa: E402
from vhost_user_cpufreq.backend.counters import Counters  # noqa: E402
from vhost_user_cpufreq.backend.policy.engine import VcpuPlacement, VmLimits  # noqa: E402
from vhost_user_cpufreq.backend.host.policy import HostPolicy  # noqa: E402
from vhost_user_cpufreq.backend.dataplane.lane import STAMP_BYTES  # noqa: E402
from vhost_user_cpufreq.backend.host.hosts import PIXEL6, PIXEL6_OPPS_KHZ  # noqa: E402
from vhost_user_cpufreq.backend.policy.decision import Decision  # noqa: E402
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig  # noqa: E402
from vhost_user_cpufreq.backend.vhost.session import Session  # noqa: E402
from vhost_user_cpufreq.protocol.cpufreq import DeviceConfig  # noqa: E402

#: decision stamp (ns), decisions so far, and when the kick lane woke for that decision (ns; 0 when
#: decided on the event loop).  The lane writes the same layout (backend/dataplane/lane.py STAMP_BYTES).
SLOT = struct.Struct("<QQQ")
SLOT_SIZE = SLOT.size
assert SLOT_SIZE == STAMP_BYTES
#: slot 0 of the stamp area is the frequency source's: (detection stamp, changes so far)
MIRROR_SLOT = 0


def slot_offset(vm_index: int, vcpu: int, vcpus: int) -> int:
    return SLOT_SIZE * (1 + vm_index * vcpus + vcpu)


def stamp_area_size(vms: int, vcpus: int) -> int:
    n = SLOT_SIZE * (1 + vms * vcpus)
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def vcpu_map(vcpus: int) -> tuple[int, ...]:
    """vCPU -> PIXEL6 domain: half little, a quarter mid, a quarter big (8 -> 0,0,0,0,1,1,2,2)."""
    little = max(1, vcpus // 2)
    mid = max(0, (vcpus - little) // 2)
    return tuple([0] * little + [1] * mid + [2] * (vcpus - little - mid))


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class StampPolicy:
    """RecordingPolicy's answer, latest decision only; optional shared-memory stamps.

    Only the batch form (``on_records``): the device calls that when a policy has it.
    """

    def __init__(self, stamps: mmap.mmap | None, vm_index: dict[str, int], vcpus: int,
                 follow: StaticSource | None = None, vmap: tuple[int, ...] = ()) -> None:
        self.stamps = stamps
        self.vm_index = vm_index
        self.vcpus = vcpus
        self.latest: dict[str, dict[int, Decision]] = {}
        self.count: dict[int, int] = {}
        self.resets = 0
        self.follow = follow
        self.vmap = vmap
        self.split: KickSplit | None = None
        self._want: dict[str, list[int]] = {}
        self.host_changes = 0

    def on_records(self, vm: str, records: list[tuple[int, int, int]], config: DeviceConfig, now: float) -> None:
        """The batch form the device prefers: decide once per vCPU, on its newest record of the drain."""
        newest = {v: u for v, u, _ in records}
        latest = self.latest.get(vm)
        if latest is None:
            latest = self.latest[vm] = {}
        domains, vmap = config.domains, config.vcpu_domain
        for v, u in newest.items():
            dom = domains[vmap[v]]
            want = (5 * dom.max_khz * u) >> 12  # schedutil_khz(), inlined: this runs per vCPU per drain
            d = Decision(vm, v, u, dom.min_khz if want < dom.min_khz else min(want, dom.max_khz), now)
            latest[v] = d
            if self.follow is not None:
                self._follow(vm, v, d.target_khz)
        if self.stamps is not None:
            self.stamp(vm, records)

    def stamp(self, vm: str, records: list[tuple[int, int, int]]) -> None:
        """Decided: write each vCPU's decision time and how many of its records it covers."""
        assert self.stamps is not None
        seen: dict[int, int] = {}
        for v, _, _ in records:
            seen[v] = seen.get(v, 0) + 1
        for v, k in seen.items():
            off = slot_offset(self.vm_index[vm], v, self.vcpus)
            n = self.count.get(off, 0) + k
            self.count[off] = n
            t = mono_ns()
            SLOT.pack_into(self.stamps, off, t, n, 0)  # stamp first, then count (x86: in order)
            if self.split is not None:
                self.split.decided(t)

    def _follow(self, vm: str, vcpu: int, target: int) -> None:
        want = self._want.get(vm)
        if want is None:
            want = self._want[vm] = [0] * len(self.vmap)
        want[vcpu] = target
        assert self.follow is not None
        snap = self.follow.snapshot()
        cur = []
        for hd, opps in enumerate(PIXEL6_OPPS_KHZ):
            need = max([w for v, w in enumerate(want) if self.vmap[v] == hd] or [0])
            cur.append(next((f for f in opps if f >= need), opps[-1]))
        if cur != [d.cur_khz for d in snap.domains]:
            self.host_changes += 1
            self.follow.set_frequencies(cur)

    def on_vm_reset(self, vm: str) -> None:
        self.latest.pop(vm, None)
        self.resets += 1


class EngineStampPolicy(HostPolicy):
    """The daemon's own policy: clamp engine, thread actuator (dry run), one timer per VM.

    Each VM is bound with PIXEL6 placements and this process's thread id for
    every vCPU (dry run: pins and clamps are recorded, not applied), so the
    engine and the actuator do all their work.  With ``lane`` (the daemon's
    default when the C data plane loads) the request queues are served by the
    kick lane, which stamps each decision into the VM's stamp slots itself;
    otherwise the engine runs on the event loop and decisions are stamped as
    StampPolicy stamps them, after the engine decided.
    """

    def __init__(self, stamper: StampPolicy, names: list[str], vmap: tuple[int, ...], lane: bool = True,
                 pinned: bool = True) -> None:
        super().__init__(ThreadActuator(Counters(), dry_run=True), c_engine=None if lane else False)
        self.stamper = stamper
        self.vcpus = len(vmap)
        for name in names:
            used: dict[int, int] = {}
            placements = []
            for v, d in enumerate(vmap):
                dom = PIXEL6.domains[d]
                # pinned: a pCPU of the vCPU's domain, shared round-robin by every VM (800 vCPUs on 8 pCPUs,
                # as explicit lists sharing pCPUs); unpinned (pinning "none"): no pCPU, decided for the
                # biggest CPU as the daemon decides for a vCPU that may run anywhere (vcpu_map_unpinned).
                cpu: int | None = dom.cpus[used.get(d, 0) % len(dom.cpus)] if pinned else None
                used[d] = used.get(d, 0) + 1
                placements.append(VcpuPlacement(v, cpu, dom.capacity, dom.capacity, dom.max_khz, d))
            self.bind(name, placements, VmLimits())
            self.attach_threads(name, {v: threading.get_native_id() for v in range(len(vmap))})

    def on_records(self, vm: str, records: list[tuple[int, int, int]], config: DeviceConfig, now: float) -> None:
        super().on_records(vm, records, config, now)
        if self.stamper.stamps is not None:
            self.stamper.stamp(vm, records)

    def lane_stamps(self, vm: str) -> object:
        if self.stamper.stamps is None:
            return None
        off = slot_offset(self.stamper.vm_index[vm], 0, self.vcpus)
        return memoryview(self.stamper.stamps)[off : off + SLOT_SIZE * self.vcpus]

    def on_vm_reset(self, vm: str) -> None:
        super().on_vm_reset(vm)
        self.stamper.on_vm_reset(vm)


class AgeHistogram:
    """Batch age at decision: now - the batch's guest timestamp (both CLOCK_MONOTONIC)."""

    def __init__(self) -> None:
        self.samples: list[int] = []

    def install(self) -> None:
        orig = cd.CpufreqDevice._account
        hist = self

        def _account(dev: cd.CpufreqDevice, d) -> None:  # type: ignore[no-untyped-def]
            orig(dev, d)
            now = mono_ns()
            for e in d.entries:
                if e[1] == 0 and len(hist.samples) < 2_000_000:
                    hist.samples.append(now - e[6])

        cd.CpufreqDevice._account = _account  # type: ignore[method-assign]


class KickSplit:
    """Splits kick -> decision at the handler's entry: wake-up (kernel + event loop) vs Python work.

    Stamps CLOCK_MONOTONIC when ``Session._on_kick`` starts; the policy adds
    ``decision - entry`` for the first record decided after it.
    """

    def __init__(self) -> None:
        self.entry_ns = 0
        self.handler_to_decision_ns: list[int] = []

    def install(self) -> None:
        orig = Session._on_kick
        split = self

        def _on_kick(session: Session, ring) -> None:  # type: ignore[no-untyped-def]
            split.entry_ns = mono_ns()
            orig(session, ring)

        Session._on_kick = _on_kick  # type: ignore[method-assign]

    def decided(self, t: int) -> None:
        if self.entry_ns:
            if len(self.handler_to_decision_ns) < 1_000_000:
                self.handler_to_decision_ns.append(t - self.entry_ns)
            self.entry_ns = 0


class LogTally(logging.Handler):
    """Counts the back-end's log records of WARNING and above and keeps the first few."""

    KEEP = 10

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1
        if len(self.first) < self.KEEP:
            self.first.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:500])


#: per-VM counters that mean something went wrong, summed over their reasons in ``stats``
ERROR_COUNTERS = ("sessions_closed", "interrupts_dropped", "config_notify_failed")


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tally = LogTally()
    logging.getLogger().addHandler(tally)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    # pinning "none": every vCPU may run anywhere and is decided for (and told) the biggest CPU's domain
    vmap = vcpu_map(args.vcpus) if args.pinning == "pinned" else (len(PIXEL6.domains) - 1,) * args.vcpus
    stamps = None
    if args.stamp_fd is not None:
        stamps = mmap.mmap(args.stamp_fd, stamp_area_size(args.vms, args.vcpus), flags=mmap.MAP_SHARED)
    sampler: asyncio.Task[None] | None = None
    if args.sysfs:
        from vhost_user_cpufreq.backend.host.sysfs_source import SysfsSource

        source = SysfsSource(args.sysfs)
        follow = None
    else:
        source = StaticSource(PIXEL6)  # type: ignore[assignment]
        follow = source if args.follow_host else None
    if stamps is not None:
        mirror_count = [0]

        def on_snapshot(_snap: object) -> None:  # subscribed before any device: stamps detection
            mirror_count[0] += 1
            SLOT.pack_into(stamps, MIRROR_SLOT, mono_ns(), mirror_count[0], 0)

        source.subscribe(on_snapshot)
    age = AgeHistogram() if args.age else None
    if age is not None:
        age.install()
    names = [f"vm{i}" for i in range(args.vms)]
    # kick batching (backend/policy/ratelimit.py:KickBatcher): the service's default unless told
    kick_kw = {} if args.kick_batch_delay is None else {"kick_batch_delay": args.kick_batch_delay}
    stamper = StampPolicy(stamps, {n: i for i, n in enumerate(names)}, args.vcpus, follow, vmap)
    split = None
    if args.split and stamps is not None:
        split = KickSplit()
        split.install()
        stamper.split = split
    policy = (stamper if args.policy == "stamp"
              else EngineStampPolicy(stamper, names, vmap, lane=args.policy == "engine", pinned=args.pinning == "pinned"))
    svc = Service(source, policy, **({} if args.lane_slice_us is None else {"lane_slice_us": args.lane_slice_us}))  # type: ignore[arg-type]
    for n in names:
        await svc.add_vm(VmConfig(n, os.path.join(args.dir, f"{n}.sock"), vmap,
                                  notify_interval=args.notify_interval, shared_page=args.shared_page, **kick_kw))
    if args.sysfs:
        sampler = loop.create_task(source.run(args.period))  # type: ignore[attr-defined]

    done = loop.create_future()
    buf = bytearray()
    lag: list[int] = []

    async def lag_probe() -> None:
        """How late a 10 ms timer fires: the event loop's responsiveness (deadline timers suffer the same)."""
        while True:
            t = mono_ns()
            await asyncio.sleep(0.01)
            lag.append(mono_ns() - t - 10_000_000)
            if len(lag) > 20000:
                del lag[:10000]

    prober: asyncio.Task[None] | None = None

    def stats() -> dict[str, object]:
        # Summing 1,000 VMs' counters costs tens of ms of CPU: a window measured from one snapshot
        # to the next runs from the end of the first (cpu_ns) to the start of the second
        # (cpu_ns_at_request), so that it holds none of that.
        cpu_at_request = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)
        mono_at_request = mono_ns()
        tot: dict[str, float] = {}
        for slot in svc.vms.values():
            c = slot.counters
            for key in ("records", "kicks", "batches", "config_reads", "config_notifications", "config_updates",
                        "sessions", "lost_batches", *ERROR_COUNTERS):
                tot[key] = tot.get(key, 0) + c.total(key)
            rej = c.total("rejected")
            tot["rejected"] = tot.get("rejected", 0) + rej
            h = c.histogram("kick_to_decision_seconds")
            if h is not None:
                tot["k2d_sum_s"] = tot.get("k2d_sum_s", 0.0) + h.sum
                tot["k2d_count"] = tot.get("k2d_count", 0) + h.count
        out: dict[str, object] = {
            "cpu_ns_at_request": cpu_at_request,
            "mono_ns_at_request": mono_at_request,
            "cpu_ns": time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID),
            "mono_ns": mono_ns(),
            "connected": sum(1 for s in svc.vms.values() if s.connection is not None),
            "host_changes": stamper.host_changes,
            **tot,
            "log_records": dict(tally.counts),
            "log_first": list(tally.first),
        }
        if args.sysfs:
            out["samples"] = source.samples  # type: ignore[attr-defined]
        if age is not None:
            out["ages_ns"] = age.samples[-20000:]
        if prober is not None:
            out["loop_lag_ns"] = lag[-5000:]
        if split is not None:
            out["handler_to_decision_ns"] = split.handler_to_decision_ns[-20000:]
        return out

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if not data:
            if not done.done():
                done.set_result(None)
            return
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            cmd = line.decode().strip()
            if cmd == "stats":
                reply: dict[str, object] = stats()
            elif cmd == "reset-age":
                if age is not None:
                    age.samples.clear()
                lag.clear()
                if split is not None:
                    split.handler_to_decision_ns.clear()
                reply = {"ok": True}
            elif cmd in ("lag-start", "lag-stop"):
                # the probe wakes the loop 100 times a second: never on during an idle measurement
                nonlocal prober
                if prober is not None:
                    prober.cancel()
                    prober = None
                lag.clear()
                if cmd == "lag-start":
                    prober = loop.create_task(lag_probe())
                reply = {"ok": True}
            elif cmd == "per-vm":
                reply = {"records": [svc.vms[n].counters.total("records") for n in names]}
            elif cmd == "quit":
                reply = {"ok": True}
                if not done.done():
                    done.set_result(None)
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    await done
    loop.remove_reader(0)
    if prober is not None:
        prober.cancel()
    if sampler is not None:
        source.close()  # type: ignore[attr-defined]
        sampler.cancel()
    await svc.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="directory for the VMs' sockets")
    p.add_argument("--vms", type=int, default=1)
    p.add_argument("--vcpus", type=int, default=8)
    p.add_argument("--pinning", choices=("pinned", "none"), default="pinned",
                   help="engine policies: vCPUs pinned to pCPUs shared by all VMs, or unpinned (pinning none)")
    p.add_argument("--policy", choices=("stamp", "engine", "engine-loop"), default="stamp",
                   help="stamp: schedutil's answer per vCPU, on the event loop; engine: the daemon's clamp engine "
                        "and actuator (dry run) on its default path, the C kick lane when the C data plane loads; "
                        "engine-loop: the same on the event loop")
    p.add_argument("--stamp-fd", type=int, default=None, help="memfd for decision stamps (inherited)")
    p.add_argument("--sysfs", default=None, help="sysfs root: use SysfsSource sampling every --period")
    p.add_argument("--period", type=float, default=0.05)
    p.add_argument("--follow-host", action="store_true", help="host frequency follows the decisions")
    p.add_argument("--notify-interval", type=float, default=0.01)
    p.add_argument("--shared-page", action="store_true", help="offer the shared frequency page (SPEC §8)")
    p.add_argument("--kick-batch-delay", type=float, default=None,
                   help="VmConfig.kick_batch_delay (default: the service's); 0 = a kick per buffer")
    p.add_argument("--lane-slice-us", type=int, default=None,
                   help="Service.lane_slice_us, the kick lane thread's scheduler slice (default: the service's; "
                        "0 = the kernel's default slice)")
    p.add_argument("--age", action="store_true", help="record each batch's age at decision")
    p.add_argument("--split", action="store_true", help="stamp the kick handler's entry too (needs --stamp-fd)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
