"""Process faults and privilege: the real service binary, killed, restarted, run as non-root.

The "QEMU" is this test process: two threads named like QEMU's vCPU threads,
served through the in-process front-end.  The service is a separate process
(``vhost-user-cpufreq serve --config``), so SIGKILL is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import named_vcpu_threads, short_tmpdir, start_guest, until

pytestmark = pytest.mark.root
NOBODY = 65534


@pytest.fixture
def vcpu_threads() -> Iterator[list[int]]:
    with named_vcpu_threads(2) as tids:
        yield tids


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged service can use (pytest's tmp_path is root-only)."""
    with short_tmpdir("vuc-nobody-", mode=0o777) as d:
        yield d


def _config(d: Path, *, extra_vm: bool = False, **service: object) -> Path:
    lines = ["[service]", f'state_file = "{d}/state.json"', f'control_socket = "{d}/control.sock"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in service.items()]
    lines += ["[vm.vm]", f'socket = "{d}/vm.sock"', "vcpus = 2", "pinning = [1, 0]", "socket_mode = 0o666"]
    if extra_vm:
        lines += ["[vm.vm2]", f'socket = "{d}/vm2.sock"', "vcpus = 2", "pinning = [0, 1]", 'clamp = "none"']
    p = d / "config.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _exe() -> str:
    return str(Path(sys.executable).with_name("vhost-user-cpufreq"))


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_service_outlives_its_test() -> Iterator[None]:
    yield
    while _STARTED:
        p = _STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


async def _start(cfg: Path, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*(prefix or []), _exe(), "serve", "--config", str(cfg)], stderr=subprocess.PIPE)
    _STARTED.append(p)
    # Ready when the control socket answers (a killed instance leaves its socket files behind).
    # A generous wait: in the test host (emulated, 2 vCPUs, other guests loading it) the
    # interpreter's start alone has taken over 15 s; how fast it starts is bench/'s business.
    await until(lambda: _answers(cfg.parent / "control.sock") or p.poll() is not None, timeout=60,
                what="service ready")
    assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
    return p


def _answers(control: Path) -> bool:
    from vhost_user_cpufreq.backend.service.daemon import query_status

    try:
        return "vms" in query_status(str(control), timeout=1)
    except (OSError, ValueError):
        return False


def _state(d: Path) -> object:
    try:
        return json.loads((d / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _affinity(tids: list[int]) -> list[set[int]]:
    return [os.sched_getaffinity(t) for t in tids]


async def test_sigkill_under_load_leaves_state_that_the_next_start_restores(tmp_path: Path,
                                                                             vcpu_threads: list[int]) -> None:
    """Two VMs under load; the service is SIGKILLed, restarted, both VMs reconnect; then SIGTERM under load."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to see pinning")
    original = _affinity(vcpu_threads)
    # vm pins and clamps this process's QEMU-named threads; vm2 (clamp "none") only adds load.
    cfg = _config(tmp_path, extra_vm=True)
    svc = await _start(cfg)
    guests = [await start_guest(str(tmp_path / f"{n}.sock"), util_threshold=1) for n in ("vm", "vm2")]
    load = asyncio.get_running_loop().create_task(_load(guests))
    try:
        await until(lambda: _affinity(vcpu_threads) == [{1}, {0}], what="threads pinned by the service")
        state = json.loads((tmp_path / "state.json").read_text())
        assert sorted(r["tid"] for r in state["threads"]) == vcpu_threads
        await until(lambda: all(v["counters"].get("records", 0) > 50 for v in _status(tmp_path)["vms"].values()),
                    what="both VMs under load")
        svc.kill()  # no cleanup at all, in the middle of the load
        svc.wait()
    finally:
        load.cancel()
    for g in guests:
        await g.close()
    assert _affinity(vcpu_threads) == [{1}, {0}]  # stale: the killed service could not undo it
    svc = await _start(cfg)
    await until(lambda: _affinity(vcpu_threads) == original, what="recovery at start")
    # The file is rewritten right after the threads are restored.
    await until(lambda: _state(tmp_path) == {"threads": [], "cgroups": []}, what="state file emptied by recovery")
    assert _status(tmp_path)["counters"].get("recovered_threads") == 2
    # Both VMs reconnect and are served (vm pinned) again; SIGTERM under load then restores everything.
    guests = [await start_guest(str(tmp_path / f"{n}.sock"), util_threshold=1) for n in ("vm", "vm2")]
    load = asyncio.get_running_loop().create_task(_load(guests))
    try:
        await until(lambda: _affinity(vcpu_threads) == [{1}, {0}])
        await until(lambda: all(v["counters"].get("records", 0) > 50 for v in _status(tmp_path)["vms"].values()),
                    what="both VMs served after the restart")
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(timeout=15) == 0
    finally:
        load.cancel()
    assert _affinity(vcpu_threads) == original
    assert json.loads((tmp_path / "state.json").read_text()) == {"threads": [], "cgroups": []}
    for g in guests:
        await g.close()


async def _load(guests: list) -> None:  # type: ignore[type-arg]
    """Every guest keeps sending records (about 2,000 a second each) until cancelled."""
    i = 0
    while True:
        i += 1
        for g in guests:
            g.driver.set_util(i % 2, (i * 37) % 1025)
            g.driver.flush()
        await asyncio.sleep(0.001)


def _status(d: Path) -> dict:  # type: ignore[type-arg]
    from vhost_user_cpufreq.backend.service.daemon import query_status

    return query_status(str(d / "control.sock"))


async def test_runs_as_nobody_with_only_cap_sys_nice(shared_dir: Path, vcpu_threads: list[int]) -> None:
    tmp_path = shared_dir
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop privileges")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to see pinning")
    original = _affinity(vcpu_threads)
    cfg = _config(tmp_path)
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all,+sys_nice", "--ambient-caps=-all,+sys_nice", "--bounding-set=-all,+sys_nice"]
    svc = await _start(cfg, drop)
    try:
        status = Path(f"/proc/{svc.pid}/status").read_text()
        assert f"Uid:\t{NOBODY}" in status
        cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff")).split()[1], 16)
        assert cap_eff == 1 << 23  # CAP_SYS_NICE and nothing else
        g = await start_guest(str(tmp_path / "vm.sock"))
        # Root's threads, pinned by an unprivileged service: CAP_SYS_NICE is exactly what that needs.
        await until(lambda: _affinity(vcpu_threads) == [{1}, {0}], what="pinned by the non-root service")
        await g.close()
        await until(lambda: _affinity(vcpu_threads) == original, what="restored on disconnect")
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=15)


async def test_without_cap_sys_nice_pinning_fails_cleanly_and_is_counted(shared_dir: Path,
                                                                        vcpu_threads: list[int]) -> None:
    tmp_path = shared_dir
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop privileges")
    original = _affinity(vcpu_threads)
    cfg = _config(tmp_path)
    svc = await _start(cfg, ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             "--inh-caps=-all", "--bounding-set=-all"])
    try:
        g = await start_guest(str(tmp_path / "vm.sock"))

        def status() -> dict:  # type: ignore[type-arg]
            from vhost_user_cpufreq.backend.service.daemon import query_status
            return query_status(str(tmp_path / "control.sock"))

        await until(lambda: any(k.startswith("pin_failed") for k in status()["counters"]), what="pin failures")
        assert status()["counters"].get("pin_failed:eperm") == 2
        assert _affinity(vcpu_threads) == original
        g.driver.set_util(1, 500)
        g.driver.flush()
        await until(lambda: status()["vms"]["vm"]["vcpus"][1]["util"] == 500, what="records still served")
        await g.close()
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(timeout=15)
