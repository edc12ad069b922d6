"""The shared frequency page under a real QEMU 11.1 across a live handover: BAR 4 keeps being written.

QEMU maps the back-end's page memfd into the device's BAR 4 once (SHMEM_MAP)
and never again while the device runs; after ``serve --take-over`` the new
process maps that same memfd (carried with the session) and writes it.  A
host frequency change after the switch appears in BAR 4 as read by the guest
(the driver model over qtest), with no new map, no config read and no
notification, and QEMU runs on.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vhost_user_cpufreq.guest.driver import CpufreqDriver

from .helpers import stop_process, until
from .qemu.fixture import QemuInstall, QemuVm
from .service_proc import answers, read_log, serve, status
from .sysfs_tree import make_sysfs_tree, set_cur_freq
from .test_handover_shmem import HOST

pytestmark = pytest.mark.qemu


async def _bar4(drv: CpufreqDriver, want: list[int], d: Path) -> None:
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        page = await drv.page_frequencies()
        got = None if page is None else [p.cur_khz for p in page]
        if got == want:
            return
        assert asyncio.get_running_loop().time() < deadline, (got, want, status(d)["vms"]["vm0"])
        await asyncio.sleep(0.05)


async def test_a_host_change_after_a_handover_appears_in_bar4(qemu_install: QemuInstall) -> None:
    d = Path(tempfile.mkdtemp(prefix="vuc-qhs-", dir=qemu_install.tmpdir()))
    make_sysfs_tree(d / "sys", HOST)
    (d / "config.toml").write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        f'sysfs_root = "{d}/sys"', "dry_run = true", "sample_period = 0.02",
        "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", "pinning = [0, 4]", 'clamp = "none"',
        "shared_page = true",
    ]) + "\n")
    old = serve(d, {}, log="old.log")
    new: subprocess.Popen[bytes] | None = None
    vm = QemuVm(qemu_install, d / "vm0.sock", smp=2, workdir=d / "q")
    try:
        await until(lambda: answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
        await vm.start()
        t = await vm.open_transport()
        drv = CpufreqDriver(t, util_threshold=1, lazy_records=0)
        await drv.probe()
        assert drv.freq_page
        await until(lambda: status(d)["vms"]["vm0"]["freq_path"] == "page", timeout=15,
                    what=lambda: f"the page in use\n{read_log(d, 'old.log')}")
        set_cur_freq(d / "sys", 0, 900000)
        set_cur_freq(d / "sys", 4, 1500000)
        await _bar4(drv, [900000, 1500000], d)
        drv.set_util(0, 300)
        drv.flush()
        await until(lambda: status(d)["vms"]["vm0"]["counters"].get("records", 0) > 0, timeout=10, what="served")

        new = serve(d, {}, "--take-over", str(d / "control.sock"), log="new.log")
        await until(lambda: old.poll() is not None, timeout=20, what=lambda: "old exit\n" + read_log(d, "old.log"))
        await until(lambda: answers(d, new.pid) or new.poll() is not None, timeout=20,
                    what=lambda: "new ready\n" + read_log(d, "new.log"))
        st = status(d)["vms"]["vm0"]
        assert st["counters"].get("sessions_resumed") == 1 and st["freq_path"] == "page", (st, read_log(d, "new.log"))
        reads, changes = t.config_reads, t.config_changes
        set_cur_freq(d / "sys", 0, 1200000)
        set_cur_freq(d / "sys", 4, 2400000)
        await _bar4(drv, [1200000, 2400000], d)  # written by the new process into QEMU's same mapping
        assert t.config_reads == reads and t.config_changes == changes
        c = status(d)["vms"]["vm0"]["counters"]
        assert c.get("shmem_maps_sent", 0) == 0 and c.get("freq_page_updates") == 2, c
        assert vm.returncode is None, vm.output()
        assert vm.qmp is not None
        assert (await asyncio.wait_for(vm.qmp.execute("query-status"), 5))["status"] == "running"  # type: ignore[index]
        # Records go on, decided by the new process.
        drv.set_util(1, 700)
        drv.flush()
        await until(lambda: status(d)["vms"]["vm0"]["counters"].get("records", 0) > 0, timeout=10,
                    what="served by the new process")
        assert "dropped" not in read_log(d, "new.log")
    finally:
        await vm.close()
        stop_process(old)
        if new is not None:
            stop_process(new)
        shutil.rmtree(d, ignore_errors=True)
