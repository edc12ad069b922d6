"""Shared test helpers: a service and modelled guests wired over real unix sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, NoReturn

import pytest

from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.policy.engine import EngineConfig, VcpuPlacement, VmLimits
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig, VmSlot
from vhost_user_cpufreq.guest.frontend import ModelledGuest, connect_guest


Guest = ModelledGuest


def unavailable(require_var: str, why: str) -> NoReturn:
    """Something a test needs is missing: fail when CI demands it (``require_var=1``), else skip."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{require_var}=1 but {why}", pytrace=False)
    pytest.skip(why)


def require_c_dataplane() -> None:
    """The C data plane (drain and kick lane) must load: CI demands it (VUC_REQUIRE_TOOLS=1)."""
    from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane

    dp = dataplane()
    if dp.kind != "c" or not dp.lane:
        unavailable("VUC_REQUIRE_TOOLS", f"the C data plane with its kick lane is not in use: {dp.detail}")


def kernel_has_fair_slices() -> bool:
    """Linux 6.12+ (EEVDF) takes sched_attr.sched_runtime as a fair thread's slice; older kernels ignore it."""
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (6, 12)


@contextmanager
def short_tmpdir(prefix: str, mode: int | None = None) -> Iterator[Path]:
    """A directory under /tmp with a short path: sun_path holds 107 bytes, pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if mode is not None:
        d.chmod(mode)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def start_guest(sock: str, **driver_kw: object) -> Guest:
    """A modelled guest whose flush() kicks whenever the device asks.

    Tests send a record and wait for its effect without ticking; the driver's
    deferral of non-urgent kicks (tests/test_driver_notify.py) would hold it.
    """
    driver_kw.setdefault("lazy_records", 0)
    return await connect_guest(sock, **driver_kw)


async def make_service(tmp_path: Path, *vms: tuple[str, tuple[int, ...]], shared_page: bool = False
                       ) -> tuple[Service, StaticSource, RecordingPolicy, dict[str, VmSlot]]:
    source = StaticSource(PIXEL6)
    policy = RecordingPolicy()
    svc = Service(source, policy)
    slots = {}
    for name, vmap in vms:
        slots[name] = await svc.add_vm(VmConfig(name, str(tmp_path / f"{name}.sock"), vmap, notify_interval=0.01,
                                                shared_page=shared_page))
    return svc, source, policy, slots


async def engine_vm(tmp_path: Path, vcpus: int = 4, *, lane: bool, dry_run: bool = True, **kw: Any
                    ) -> tuple[Service, HostPolicy, VmSlot, Counters]:
    """One VM served with the daemon's policy (clamp engine, thread actuator), on the kick lane or the loop."""
    counters = Counters()
    pol = HostPolicy(ThreadActuator(counters, dry_run=dry_run), config=EngineConfig(min_interval=0.0, hysteresis=1),
                     c_engine=None if lane else False)
    vmap = tuple(range(min(vcpus, 3))) + (2,) * max(0, vcpus - 3)
    places = [VcpuPlacement(v, v, PIXEL6.domains[d].capacity, PIXEL6.domains[d].capacity, PIXEL6.domains[d].max_khz, d)
              for v, d in enumerate(vmap)]
    pol.bind("vm", places, VmLimits(), **kw)
    svc = Service(StaticSource(PIXEL6), pol)
    slot = await svc.add_vm(VmConfig("vm", str(tmp_path / "vm.sock"), vmap, notify_interval=0.01))
    return svc, pol, slot, counters


async def until(cond, timeout: float = 5.0, what: Any = "condition") -> None:  # type: ignore[no-untyped-def]
    """Wait (yielding to the loop) until ``cond()`` is true; ``what`` may be a callable saying why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.002)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "vuc-guest-ram" in line)


@contextmanager
def named_vcpu_threads(n: int) -> Iterator[list[int]]:
    """``n`` threads of this process named as QEMU names vCPU threads ("CPU i/KVM").

    The service finds them in /proc/self/task like a real QEMU's, and this
    process is the front-end's SO_PEERCRED pid, so they pass the ownership
    check.  Yields their thread ids, vCPU 0 first.
    """
    stop = threading.Event()
    tids: list[int] = []
    ready = threading.Barrier(n + 1)

    def body() -> None:
        tids.append(threading.get_native_id())
        ready.wait()
        stop.wait()

    threads = [threading.Thread(target=body, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    tids.sort()
    for i, tid in enumerate(tids):
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write(f"CPU {i}/KVM")
    try:
        yield tids
    finally:
        stop.set()
        for t in threads:
            t.join()


def stop_process(p: "subprocess.Popen[bytes]", timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds: a service under test never outlives its test."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_load(drv: Any) -> Callable[[], Awaitable[None]]:
    """``drv`` (a CpufreqDriver) flushes a record about every millisecond, vCPUs 0 and 1 in turn, until
    the returned function is awaited."""
    stop = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            drv.set_util(n % 2, 1 + n % 1000)
            drv.flush()
            await asyncio.sleep(0.001)

    task = asyncio.get_running_loop().create_task(load())

    async def stopped() -> None:
        stop.set()
        await task

    return stopped
