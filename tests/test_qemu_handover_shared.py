"""A real QEMU 11.1 on the one shared socket across a live handover: still served, never disconnected.

The VM exists only as its session on the shared socket (identified from its
QEMU's -name and -smp); ``serve --take-over`` carries the session with that
identity, and the new process checks the peer again (SO_PEERPIDFD on the
carried connection, /proc) before it serves it.  QEMU aborts when its
back-end's connection closes, so QEMU running afterwards, its guest's next
records decided by the new process and a config read answered on the same
connection are the proof.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vhost_user_cpufreq.guest.driver import CpufreqDriver

from .helpers import require_c_dataplane, start_load, stop_process, until
from .qemu.fixture import QemuInstall, QemuVm
from .service_proc import answers, read_log, serve, status

pytestmark = pytest.mark.qemu


async def test_a_real_qemu_on_the_shared_socket_is_handed_over_without_noticing(qemu_install: QemuInstall) -> None:
    require_c_dataplane()
    d = Path(tempfile.mkdtemp(prefix="vuc-qhsh-", dir=qemu_install.tmpdir()))
    (d / "config.toml").write_text("\n".join([
        "[service]", "nominal_khz = 2000000", "sample_period = 0.05", "min_interval = 0.0",
        f'shared_socket = "{d}/vhost.sock"', f'control_socket = "{d}/control.sock"', f'state_dir = "{d}/state"',
        f'state_file = "{d}/state.json"',
        "[class.default]", 'pinning = "none"', "ceiling = 600",
    ]) + "\n")
    old = serve(d, {}, log="old.log")
    new: subprocess.Popen[bytes] | None = None
    vm = QemuVm(qemu_install, d / "vhost.sock", smp=2, workdir=d / "q", extra_args=("-name", "web-1"))
    try:
        await until(lambda: answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
        await vm.start()
        drv = CpufreqDriver(await vm.open_transport(), util_threshold=1, lazy_records=0)
        await drv.probe()
        assert drv.config.num_vcpus == 2
        stop_load = start_load(drv)
        await until(lambda: status(d)["vms"]["web-1"]["counters"].get("records", 0) > 50, timeout=15,
                    what=lambda: f"served by the old process\n{read_log(d, 'old.log')}")
        new = serve(d, {}, "--take-over", str(d / "control.sock"), log="new.log")
        await until(lambda: old.poll() is not None, timeout=20, what=lambda: "old exit\n" + read_log(d, "old.log"))
        assert old.returncode == 0, read_log(d, "old.log")
        await until(lambda: answers(d, new.pid) or new.poll() is not None, timeout=20,
                    what=lambda: "new ready\n" + read_log(d, "new.log"))
        st = status(d)
        web = st["vms"]["web-1"]
        assert web["connected"] and web["peer_pid"] == vm.pid, (web, read_log(d, "new.log"))
        assert web["counters"].get("sessions_resumed") == 1
        assert "handover_dropped:not-carried" not in st["counters"], st["counters"]
        assert vm.returncode is None, vm.output()
        assert vm.qmp is not None
        assert (await asyncio.wait_for(vm.qmp.execute("query-status"), 5))["status"] == "running"  # type: ignore[index]
        await until(lambda: status(d)["vms"]["web-1"]["counters"].get("records", 0) > 50, timeout=15,
                    what=lambda: f"served by the new process {status(d)['vms']['web-1']['counters']}")
        await stop_load()
        reads = status(d)["vms"]["web-1"]["counters"].get("config_reads", 0)
        assert (await asyncio.wait_for(drv.refresh_config(), 10)).domains
        await until(lambda: status(d)["vms"]["web-1"]["counters"].get("config_reads", 0) > reads, timeout=5,
                    what="GET_CONFIG answered by the new process")
        drv.flush()
        await until(lambda: (drv._reclaim(), not drv._inflight)[1], timeout=10,
                    what=lambda: f"{len(drv._inflight)} buffers not returned")
        c = status(d)["vms"]["web-1"]["counters"]
        assert c.get("lost_batches", 0) == 0 and c.get("rejected:stale-batch", 0) == 0, c
        # The new process watches the peer it checked: the VM goes with its QEMU.
        await vm.close()
        await until(lambda: "web-1" not in status(d)["vms"], timeout=10, what="web-1 removed")
    finally:
        await vm.close()
        stop_process(old)
        if new is not None:
            stop_process(new)
        shutil.rmtree(d, ignore_errors=True)
