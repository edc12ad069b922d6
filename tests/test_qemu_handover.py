"""Live handover under a real QEMU 11.1: the VM never notices that the service process changed.

A real ``vhost-user-cpufreq serve`` (old) serves a QEMU whose guest (the
driver model over qtest) sends records without pause; ``serve --take-over``
starts a second process (new) that takes the VM over in the middle of it.
QEMU aborts a VM whose back-end connection closes (docs/qemu-facts.md), so
QEMU still running and answering QMP afterwards is the first proof; then the
guest's next records are decided by the new process, a config read through
QEMU (GET_CONFIG on the same vhost-user connection) is answered by it, every
buffer comes back, and the batches lost at the switch are counted by the
sequence tracking carried over.  The vCPU threads the old process pinned (and
clamped, where the kernel has util clamps) are read back with
``sched_getaffinity``/``sched_getattr`` before and after the switch: untouched;
the new process restores them when the VM goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from vhost_user_cpufreq.backend.host.sched import sched_getattr
from vhost_user_cpufreq.guest.driver import CpufreqDriver

from .helpers import require_c_dataplane, start_load, stop_process, until
from .qemu.fixture import QemuInstall, QemuVm
from .service_proc import answers as _answers, read_log as _log, serve as _serve, service_exe as _exe, status as _status

pytestmark = pytest.mark.qemu

PATHS = {"lane": {}, "python-drain": {"VUC_DATAPLANE": "python"}}












def _threads_state(tids: dict[int, int]) -> dict[int, tuple[set[int], Any]]:
    return {v: (os.sched_getaffinity(t), sched_getattr(t)) for v, t in tids.items()}


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_real_qemu_under_load_is_handed_over_without_noticing(qemu_install: QemuInstall, path: str) -> None:
    if path != "python-drain":
        require_c_dataplane()
    ncpu = len(os.sched_getaffinity(0))
    pins = [0, 1 % ncpu]
    d = Path(tempfile.mkdtemp(prefix="vuc-qh-", dir=qemu_install.tmpdir()))
    (d / "config.toml").write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", f"pinning = {pins}", 'clamp = "thread"',
    ]) + "\n")
    env = PATHS[path]
    old = _serve(d, env, log="old.log")
    new: subprocess.Popen[bytes] | None = None
    vm = QemuVm(qemu_install, d / "vm0.sock", smp=2, workdir=d / "q")
    original = os.sched_getaffinity(0)  # QEMU's threads inherit it
    try:
        await until(lambda: _answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
        assert old.poll() is None, _log(d, "old.log")
        await vm.start()
        t = await vm.open_transport()
        drv = CpufreqDriver(t, util_threshold=1, lazy_records=0)
        await drv.probe()
        # The old process found QEMU's vCPU threads and pinned them.
        await until(lambda: all(c["thread"] for c in _status(d)["vms"]["vm0"]["vcpus"]), timeout=10,
                    what=lambda: f"vCPU threads found\n{_log(d, 'old.log')}")
        tids = {c["vcpu"]: c["thread"] for c in _status(d)["vms"]["vm0"]["vcpus"]}
        await until(lambda: all(os.sched_getaffinity(tids[v]) == {pins[v]} for v in tids), timeout=10,
                    what="vCPU threads pinned")
        stop_load = start_load(drv)
        await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("records", 0) > 50, timeout=15,
                    what=lambda: f"records served by the old process\n{_log(d, 'old.log')}")
        st = _status(d)["vms"]["vm0"]
        assert all(c["uclamp_min"] is not None for c in st["vcpus"]), st["vcpus"]  # decided: a clamp each
        threads_before = _threads_state(tids)
        state_before = json.loads((d / "state.json").read_text())["threads"]
        assert sorted(r["tid"] for r in state_before) == sorted(tids.values())

        new = _serve(d, env, "--take-over", str(d / "control.sock"), log="new.log")
        await until(lambda: old.poll() is not None, timeout=20, what=lambda: "old exit\n" + _log(d, "old.log"))
        assert old.returncode == 0, _log(d, "old.log")
        # Between the two processes nothing touched the threads: still pinned, attributes as they were.
        assert _threads_state(tids) == threads_before
        await until(lambda: _answers(d, new.pid) or new.poll() is not None, timeout=20,
                    what=lambda: "new ready\n" + _log(d, "new.log"))
        assert new.poll() is None, _log(d, "new.log")
        st = _status(d)
        assert st["counters"].get("handovers_taken") == 1 and st["counters"].get("adopted_threads") == 2, st
        assert st["vms"]["vm0"]["counters"].get("sessions_resumed") == 1, (st["vms"]["vm0"], _log(d, "new.log"))
        # QEMU is alive and its main loop answers.
        assert vm.returncode is None, vm.output()
        assert vm.qmp is not None
        assert (await asyncio.wait_for(vm.qmp.execute("query-status"), 5))["status"] == "running"  # type: ignore[index]
        # The guest's next records are decided by the new process: counted, and a clamp decided for each vCPU.
        await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("records", 0) > 50, timeout=15,
                    what=lambda: f"records served by the new process {_status(d)['vms']['vm0']['counters']}")
        await until(lambda: all(c["uclamp_min"] is not None for c in _status(d)["vms"]["vm0"]["vcpus"]),
                    timeout=10, what="clamps decided by the new process")
        await stop_load()
        # The same thread ids, still pinned as the old process pinned them; the new one holds their records.
        st = _status(d)["vms"]["vm0"]
        assert {c["vcpu"]: c["thread"] for c in st["vcpus"]} == tids
        assert all(os.sched_getaffinity(tids[v]) == {pins[v]} for v in tids)
        state_after = json.loads((d / "state.json").read_text())["threads"]
        assert sorted(state_after, key=lambda r: r["tid"]) == sorted(state_before, key=lambda r: r["tid"])
        # A config read through QEMU goes over the same vhost-user connection, answered by the new process.
        reads = st["counters"].get("config_reads", 0)
        cfg = await asyncio.wait_for(drv.refresh_config(), 10)
        assert cfg.domains
        await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("config_reads", 0) > reads, timeout=5,
                    what="GET_CONFIG answered by the new process")
        # Every buffer comes back; lost batches are counted across the switch, at most those in flight.
        drv.flush()
        await until(lambda: (drv._reclaim(), not drv._inflight)[1], timeout=10,
                    what=lambda: f"{len(drv._inflight)} buffers not returned")
        counters = _status(d)["vms"]["vm0"]["counters"]
        lost = counters.get("lost_batches", 0)
        assert lost <= drv.queue_size, counters
        assert lost == 0, counters  # nothing in flight was left unserved by both processes
        assert counters.get("rejected:stale-batch", 0) == 0, counters  # the sequence went on, not back
        assert "dropped" not in _log(d, "new.log")
        # The new process stops (as for the VM going): it gives the threads the old one changed their
        # original affinity back, from the records it adopted.
        stop_process(new)
        assert new.returncode == 0, _log(d, "new.log")
        assert vm.returncode is None  # read the threads before QEMU notices its back-end went away
        assert all(os.sched_getaffinity(tids[v]) == original for v in tids)
        assert json.loads((d / "state.json").read_text())["threads"] == []
    finally:
        await vm.close()
        stop_process(old)
        if new is not None:
            stop_process(new)
        shutil.rmtree(d, ignore_errors=True)
