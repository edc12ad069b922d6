"""The daemon in-process: start from a file, status, control socket, reload, bad files, thread discovery.

Every daemon here reads a generated sysfs tree (``service.sysfs_root``) and
runs with ``dry_run = true``: thread discovery and pinning decisions happen,
but no thread of the test process is really pinned or clamped.  The CLI tests
at the end run the installed console script.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from vhost_user_cpufreq.backend.host import vcpu_threads as threads_mod
from vhost_user_cpufreq.backend.service.config import ConfigError, load_config
from vhost_user_cpufreq.backend.service.daemon import Daemon, query_status
from vhost_user_cpufreq.backend.policy.engine import VmLimits
from vhost_user_cpufreq.backend.dataplane.library import prebuilt_status

from .helpers import named_vcpu_threads, short_tmpdir, start_guest, unavailable, until
from .sysfs_tree import HostSpec, make_sysfs_tree

# cpu0-3: a little cluster (capacity 256), cpu4-7: a big one (1024).
HOST = HostSpec.big_little([(4, 300000, 1800000, 256), (4, 500000, 2800000, 1024)])


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir("vuc-d-") as d:
        yield d


def vm_table(workdir: Path, name: str, **kw: Any) -> str:
    keys = {"socket": str(workdir / f"{name}.sock"), "vcpus": 2, "clamp": "none", **kw}
    return f"[vm.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def write_config(workdir: Path, *vms: str, service: str = "") -> Path:
    path = workdir / "config.toml"
    path.write_text(
        "[service]\n"
        f'sysfs_root = "{workdir / "sys"}"\n'
        f'control_socket = "{workdir / "control.sock"}"\n'
        "dry_run = true\n"
        "sample_period = 0.02\n"
        + service + "\n" + "\n".join(vms)
    )
    return path


@pytest.fixture
def sysfs(workdir: Path) -> Path:
    return make_sysfs_tree(workdir / "sys", HOST)


@pytest.fixture
async def daemon(workdir: Path, sysfs: Path) -> AsyncIterator[Daemon]:
    """VMs a (pinned to the big cluster) and b, started from a file."""
    path = write_config(workdir, vm_table(workdir, "a", pinning=[4, 5]), vm_table(workdir, "b"))
    d = Daemon(load_config(path), config_path=str(path))
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


async def status_over_socket(workdir: Path, command: str = "status") -> dict[str, Any]:
    # query_status blocks; the daemon answers from this very loop.
    return await asyncio.to_thread(query_status, str(workdir / "control.sock"), command)


# -- start and status --------------------------------------------------------------------


async def test_start_from_file_serves_every_vm(daemon: Daemon, workdir: Path) -> None:
    st = daemon.status()
    assert set(st["vms"]) == {"a", "b"}
    a = st["vms"]["a"]
    assert a["socket"] == str(workdir / "a.sock") and not a["connected"] and a["peer_pid"] is None
    assert a["freq_path"] == "config"  # no front-end, no shared page
    assert [c["pcpu"] for c in a["vcpus"]] == [4, 5]
    # Both of a's vCPUs sit in the big cluster's domain, which the guest sees at its max.
    assert {c["guest_domain"] for c in a["vcpus"]} == {0}
    assert a["domains"][0]["max_khz"] == 2800000 and a["domains"][0]["capacity"] == 1024
    b_pcpus = [c["pcpu"] for c in st["vms"]["b"]["vcpus"]]
    assert len(b_pcpus) == 2 and not set(b_pcpus) & {4, 5}  # never on another VM's pCPU
    assert st["degraded"]["cpufreq"] is None
    assert st["host"]["online_cpus"] == list(range(8))
    assert [d["max_khz"] for d in st["host"]["domains"]] == [1800000, 2800000]
    assert st["pid"] == os.getpid()
    assert daemon.status_line() == "serving 2 VMs, 0 connected"
    for name in ("a", "b"):
        assert (workdir / f"{name}.sock").is_socket()


async def test_control_socket_answers_status_and_commands(daemon: Daemon, workdir: Path) -> None:
    st = await status_over_socket(workdir)
    assert set(st["vms"]) == {"a", "b"} and st["pid"] == os.getpid()
    assert (workdir / "control.sock").stat().st_mode & 0o077 == 0  # owner only
    assert (await status_over_socket(workdir, "bogus")) == {
        "ok": False, "error": "unknown command 'bogus' (try: status, reload)"}
    assert (await status_over_socket(workdir, "reload")) == {"ok": True, "changes": []}
    assert daemon.status()["counters"]["control_requests"] == 3


async def test_status_command_line_against_a_running_daemon(daemon: Daemon, workdir: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cli("status", "--json", "--control-socket", str(workdir / "control.sock")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert set(json.loads(out)["vms"]) == {"a", "b"}


# -- reload --------------------------------------------------------------------------------


async def test_reload_adds_and_removes_vms_without_dropping_a_connected_one(daemon: Daemon, workdir: Path) -> None:
    g = await start_guest(str(workdir / "a.sock"))
    try:
        conn = await daemon.service.wait_connected("a")
        g.driver.set_util(0, 600)
        g.driver.flush()
        await until(lambda: daemon.status()["vms"]["a"]["vcpus"][0]["util"] == 600, what="first record")

        write_config(workdir, vm_table(workdir, "a", pinning=[4, 5]), vm_table(workdir, "c", vcpus=1))
        changes = await daemon.reload()
        assert sorted(changes) == ["added c", "removed b"]

        assert set(daemon.service.vms) == {"a", "c"}
        assert not (workdir / "b.sock").exists() and (workdir / "c.sock").is_socket()
        slot = daemon.service.vms["a"]
        assert slot.connection is conn and slot.sessions_served == 1 and not conn.closed.done()
        g.driver.set_util(1, 900)
        g.driver.flush()
        await until(lambda: daemon.status()["vms"]["a"]["vcpus"][1]["util"] == 900, what="record after reload")
        assert daemon.status()["counters"]["reloads"] == 1
        assert daemon.status_line() == "serving 2 VMs, 1 connected"
    finally:
        await g.close()


async def test_reload_applies_changed_limits_in_place(daemon: Daemon, workdir: Path) -> None:
    g = await start_guest(str(workdir / "a.sock"))
    try:
        conn = await daemon.service.wait_connected("a")
        g.driver.set_util(0, 1024)
        g.driver.flush()
        await until(lambda: (daemon.status()["vms"]["a"]["vcpus"][0]["uclamp_min"] or 0) > 700, what="boost")

        write_config(workdir, vm_table(workdir, "a", pinning=[4, 5], floor=100, ceiling=300), vm_table(workdir, "b"))
        assert await daemon.reload() == ["updated a"]
        assert daemon.policy.vms["a"].engine.limits == VmLimits(100, 300)
        assert daemon.host.settings["a"].limits == VmLimits(100, 300)
        assert daemon.service.vms["a"].connection is conn

        g.driver.set_util(0, 1000)  # a new request is bounded by the new ceiling
        g.driver.flush()
        await until(lambda: daemon.status()["vms"]["a"]["vcpus"][0]["uclamp_min"] == 300, what="ceiling applied")
    finally:
        await g.close()


async def test_invalid_reload_keeps_the_running_configuration(daemon: Daemon, workdir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    before = daemon.config
    path = workdir / "config.toml"
    path.write_text(path.read_text() + '\n[vm.c]\nsocket = "relative.sock"\n')
    with pytest.raises(ConfigError, match=r"config\.toml: vm\.c\.socket: must be an absolute path"):
        await daemon.reload()
    assert daemon.config is before and set(daemon.service.vms) == {"a", "b"}

    caplog.set_level(logging.INFO, logger="vhost_user_cpufreq")
    await daemon.reload_from_signal()
    assert daemon.config is before and set(daemon.service.vms) == {"a", "b"}
    assert daemon.status()["counters"]["reload_failed"] == 1
    assert "reloads" not in daemon.status()["counters"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "reload rejected, keeping the running configuration" in errors[0].getMessage()
    assert "vm.c.socket" in errors[0].getMessage()

    # Settings that need a restart are refused, naming the key.
    path.write_text(path.read_text().replace(str(workdir / "control.sock"), str(workdir / "other.sock"))
                    .replace('\n[vm.c]\nsocket = "relative.sock"\n', ""))
    with pytest.raises(ConfigError, match=r"service\.control_socket: cannot change on reload"):
        await daemon.reload()
    # The kick lane's slice is set once, when its thread starts.
    path.write_text(path.read_text().replace(str(workdir / "other.sock"), str(workdir / "control.sock"))
                    .replace("[service]\n", "[service]\nlane_slice_us = 500\n"))
    with pytest.raises(ConfigError, match=r"service\.lane_slice_us: cannot change on reload"):
        await daemon.reload()


async def test_reload_without_a_file_is_refused(workdir: Path, sysfs: Path) -> None:
    d = Daemon(load_config(write_config(workdir, vm_table(workdir, "a"))))  # as from flags: no path
    await d.start()
    try:
        with pytest.raises(ConfigError, match="no configuration file to reload"):
            await d.reload()
    finally:
        await d.stop()


# -- configuration errors name the file and the key -------------------------------------------

BAD_CONFIGS = [
    ("floor above ceiling", 'floor = 800\nceiling = 200\n', "vm.a.floor", "800 is above ceiling 200"),
    ("unknown VM key", 'frequency = 3\n', "vm.a.frequency", "unknown key"),
    ("pinning length", 'pinning = [4]\n', "vm.a.pinning", "lists 1 pCPUs for 2 vCPUs"),
    ("pinning mode", 'pinning = "spread"\n', "vm.a.pinning", 'must be "auto", "keep", "none" or a list'),
    ("ceiling out of range", 'ceiling = 2000\n', "vm.a.ceiling", "must be an integer 0..1024, got 2000"),
    ("clamp mechanism", 'clamp = "magic"\n', "vm.a.clamp", "must be"),
    ("shared page not a bool", 'shared_page = 1\n', "vm.a.shared_page", "must be true or false"),
]


def test_shared_page_is_a_per_vm_choice_off_by_default(workdir: Path) -> None:
    path = workdir / "page.toml"
    path.write_text('[vm.a]\nsocket = "/run/a.sock"\nvcpus = 2\nshared_page = true\n'
                    '[vm.b]\nsocket = "/run/b.sock"\nvcpus = 2\n')
    cfg = load_config(path)
    assert cfg.vms["a"].shared_page and not cfg.vms["b"].shared_page


@pytest.mark.parametrize("extra,key,why", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_config_errors_name_file_and_key(workdir: Path, extra: str, key: str, why: str) -> None:
    path = workdir / "bad.toml"
    path.write_text(f'[vm.a]\nsocket = "/run/a.sock"\nvcpus = 2\n{extra}')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {key}: ") and why in str(err.value)


@pytest.mark.parametrize("text,key,why", [
    ('[vm.a]\nsocket = "/run/x.sock"\n[vm.b]\nsocket = "/run/x.sock"\n', "vm.b.socket", "already used by vm.a"),
    ('[service]\nsample_rate = 1\n', "service.sample_rate", "unknown key"),
    ('[services]\n', "services", "unknown section"),
    ('[vm.a]\nvcpus = 1\n', "vm.a.socket", "is required"),
    ('[vm."a b"]\nsocket = "/run/a.sock"\n', "vm.a b", "letters, digits"),
    ('[service]\nlane_slice_us = 50\n', "service.lane_slice_us", "0 or microseconds 100..100000"),
    ('[service]\nlane_slice_us = 1.5\n', "service.lane_slice_us", "got 1.5"),
], ids=["duplicate socket", "unknown service key", "unknown section", "missing socket", "VM name",
        "lane slice below the kernel's", "lane slice not an integer"])
def test_more_config_errors(workdir: Path, text: str, key: str, why: str) -> None:
    path = workdir / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {key}: ") and why in str(err.value)


def test_unreadable_and_malformed_files_name_the_file(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{workdir}/absent.toml: cannot read: No such file or directory$"):
        load_config(workdir / "absent.toml")
    (workdir / "broken.toml").write_text("[vm.a\n")
    with pytest.raises(ConfigError, match=rf"^{workdir}/broken.toml: not valid TOML: "):
        load_config(workdir / "broken.toml")


# -- start failures ----------------------------------------------------------------------------


async def test_missing_socket_directory_is_a_clear_error(workdir: Path, sysfs: Path) -> None:
    missing = workdir / "no-such-dir" / "a.sock"
    d = Daemon(load_config(write_config(workdir, vm_table(workdir, "a", socket=str(missing)))))
    with pytest.raises(OSError) as err:
        await d.start()
    try:
        assert str(missing) in str(err.value)
    finally:
        await d.stop()  # what cli.py does after a failed start


def test_missing_socket_directory_on_the_command_line(workdir: Path, sysfs: Path) -> None:
    missing = workdir / "no-such-dir" / "a.sock"
    path = write_config(workdir, vm_table(workdir, "a", socket=str(missing)))
    out = subprocess.run(cli("serve", "--config", str(path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "cannot start: " in out.stderr and str(missing) in out.stderr


# -- vCPU threads: QMP that does not answer ------------------------------------------------------


@pytest.fixture
def vcpu_threads() -> Iterator[list[int]]:
    with named_vcpu_threads(2) as tids:
        yield tids


@pytest.fixture
def silent_qmp(workdir: Path) -> Iterator[Path]:
    """A QMP socket that accepts and then never says a word (a hung QEMU monitor)."""
    path = workdir / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    try:
        yield path
    finally:
        srv.close()


async def test_silent_qmp_falls_back_to_proc(workdir: Path, sysfs: Path, vcpu_threads: list[int],
                                             silent_qmp: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # discover_threads waits 5 s for QMP; the same path, sooner.
    monkeypatch.setattr(threads_mod.threads_from_qmp, "__defaults__", (0.3,))
    caplog.set_level(logging.INFO)
    path = write_config(workdir, vm_table(workdir, "a", pinning=[4, 5], clamp="thread", qmp=str(silent_qmp)))
    d = Daemon(load_config(path), config_path=str(path))
    await d.start()
    g = await start_guest(str(workdir / "a.sock"))
    try:
        await until(lambda: d.status()["vms"]["a"]["vcpus"][1]["thread"] is not None, timeout=10,
                    what="vCPU threads from /proc")
        assert [c["thread"] for c in d.status()["vms"]["a"]["vcpus"]] == vcpu_threads
        warned = [r.getMessage() for r in caplog.records if r.name == "vhost_user_cpufreq.threads"]
        assert any(f"QMP {silent_qmp} did not answer query-cpus-fast" in m and f"/proc/{os.getpid()}/task" in m
                   for m in warned), warned
        # dry run: planned pins recorded, nothing applied
        assert d.actuator.pinned == {vcpu_threads[0]: 4, vcpu_threads[1]: 5}
        assert all(os.sched_getaffinity(t) == os.sched_getaffinity(0) for t in vcpu_threads)
    finally:
        await g.close()
        await d.stop()


# -- command line ----------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    exe = shutil.which("vhost-user-cpufreq", path=os.path.dirname(sys.executable))
    return [exe, *args] if exe else [sys.executable, "-m", "vhost_user_cpufreq.backend.service.cli", *args]


def test_check_json_lists_every_probe(sysfs: Path) -> None:
    out = subprocess.run(cli("check", "--json", "--sysfs-root", str(sysfs)), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode in (0, 1), out.stderr  # 1: something is degraded on this host
    findings = json.loads(out.stdout)
    assert [f["name"] for f in findings] == ["cpufreq", "dataplane", "isolation", "uclamp", "cgroup", "invariance",
                                             "permissions", "hotplug", "qemu"]
    assert all(f["state"] in ("ok", "degraded", "info") and f["detail"] for f in findings)
    cpufreq = findings[0]
    assert cpufreq["state"] == "ok" and "2 frequency domains over 8 online CPUs" in cpufreq["detail"]
    if os.environ.get("VUC_DATAPLANE") == "python":
        assert findings[1]["state"] == "degraded" and "VUC_DATAPLANE=python" in findings[1]["detail"], findings[1]
    elif not prebuilt_status() or shutil.which("cc") or shutil.which("gcc"):
        how = "C, prebuilt extension (" if not prebuilt_status() else "C, built at run time in "
        assert findings[1]["state"] == "ok" and findings[1]["detail"].startswith(how), findings[1]
        assert "C kick lane" in findings[1]["detail"] or os.environ.get("VUC_KICK_LANE") == "0", findings[1]
        assert findings[2]["state"] == "ok" and "SIGBUS" in findings[2]["detail"], findings[2]
    assert out.returncode == (1 if any(f["state"] == "degraded" for f in findings) else 0)


def _no_compiler(tmp_path: Path) -> dict[str, str]:
    nowhere = str(tmp_path)  # no built library in any cache directory, and a compiler that fails
    return {**os.environ, "CC": "/bin/false", "VUC_CACHE_DIR": nowhere, "XDG_CACHE_HOME": nowhere, "TMPDIR": nowhere,
            "HOME": nowhere}


def test_check_says_what_a_hostile_vmm_can_do_where_the_guard_cannot_be_built(sysfs: Path, tmp_path: Path) -> None:
    env = dict(_no_compiler(tmp_path), VUC_PREBUILT="0")  # and no prebuilt extension either
    out = subprocess.run(cli("check", "--json", "--sysfs-root", str(sysfs)), capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 1, out.stderr
    found = {f["name"]: f for f in json.loads(out.stdout)}
    isolation = found["isolation"]
    assert isolation["state"] == "degraded"
    assert "shrinks its guest RAM ends the service" in isolation["detail"]
    assert found["dataplane"]["state"] == "degraded"
    assert found["dataplane"]["detail"].startswith("pure Python (prebuilt extension skipped: VUC_PREBUILT=0; no "
                                                   "run-time build: /bin/false failed (exit 1)"), found["dataplane"]


def test_check_runs_the_prebuilt_extension_without_a_compiler(sysfs: Path, tmp_path: Path) -> None:
    if os.environ.get("VUC_PREBUILT") == "0" or os.environ.get("VUC_SANITIZE"):
        pytest.skip("this run asks for the run-time build (VUC_PREBUILT=0 or VUC_SANITIZE)")
    if prebuilt_status():
        unavailable("VUC_REQUIRE_TOOLS", f"the package was installed without its extension: {prebuilt_status()}")
    out = subprocess.run(cli("check", "--json", "--sysfs-root", str(sysfs)), capture_output=True, text=True,
                         timeout=60, env=_no_compiler(tmp_path))
    found = {f["name"]: f for f in json.loads(out.stdout)}
    assert found["dataplane"]["detail"].startswith("C, prebuilt extension ("), found["dataplane"]
    assert found["isolation"]["state"] == "ok", found["isolation"]
    assert not list(tmp_path.iterdir())  # nothing was built


def test_print_capabilities_is_json() -> None:
    out = subprocess.run(cli("serve", "--print-capabilities"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    caps = json.loads(out.stdout)
    assert caps["type"] == "cpufreq" and caps["virtio-id"] == 38 and caps["features"] == []


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the APERF/MPERF probe is x86's")
def test_check_says_whether_schedutil_is_frequency_invariant(tmp_path: Path) -> None:
    from vhost_user_cpufreq.backend.service.check import _invariance

    with_counters = tmp_path / "with"
    with_counters.write_text("processor\t: 0\nflags\t\t: fpu tsc aperfmperf constant_tsc\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu tsc constant_tsc\n")
    assert _invariance(str(with_counters)).state == "ok"
    f = _invariance(str(without))
    assert f.state == "degraded" and "ceiling below 820" in f.detail
