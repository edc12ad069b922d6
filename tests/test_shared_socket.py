"""The shared socket in the daemon: VMs identified from the peer process, classes, refusals, the control API.

The "QEMUs" here are copies of this Python interpreter named ``qemu-system-x86_64``
that connect and wait, so /proc/PID/exe, cmdline and cgroup are real.  Each
daemon reads a generated sysfs tree and runs with ``dry_run``: nothing of
this process is pinned or clamped.  tests/test_qemu_shared.py does the same
with real QEMUs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from vhost_user_cpufreq.backend.service.config import ConfigError, load_config
from vhost_user_cpufreq.backend.service.daemon import Daemon, query_status
from vhost_user_cpufreq.backend.service.metrics import render

from .helpers import short_tmpdir, until
from .sysfs_tree import HostSpec, make_sysfs_tree

HOST = HostSpec.big_little([(4, 300000, 1800000, 256), (4, 500000, 2800000, 1024)])
CLASSES = """
[class.db]
match_name = "db-*"
pinning = "none"
clamp = "none"
floor = 256

[class.default]
pinning = "none"
clamp = "none"
ceiling = 700
"""
# Connect and hold the connection until the service closes it.  "fork": the connecting process forks,
# says so, and exits when told (a line on stdin), leaving the connection to its child.  "exit": connect, go.
_HOLD = ("import os,socket,sys\n"
         "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
         "if sys.argv[2] == 'exit':\n"
         "    sys.stdout.write('c'); os._exit(0)\n"
         "if sys.argv[2] == 'fork' and os.fork():\n"
         "    sys.stdout.write('c'); sys.stdout.flush(); sys.stdin.readline(); os._exit(0)\n"
         "if sys.argv[2] != 'fork':\n"
         "    sys.stdout.write('c'); sys.stdout.flush()\n"
         "s.recv(1)\n")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir("vuc-s-") as d:
        make_sysfs_tree(d / "sys", HOST)
        yield d


@pytest.fixture
def fake_qemu(workdir: Path) -> str:
    """This interpreter under QEMU's name: /proc/PID/exe says qemu-system-x86_64."""
    path = workdir / "qemu-system-x86_64"
    shutil.copy(os.path.realpath(sys.executable), path)
    return str(path)


def write_config(workdir: Path, service: str = "", body: str = CLASSES) -> Path:
    path = workdir / "config.toml"
    path.write_text("[service]\n"
                    f'sysfs_root = "{workdir / "sys"}"\n'
                    f'control_socket = "{workdir / "control.sock"}"\n'
                    f'shared_socket = "{workdir / "vhost.sock"}"\n'
                    f'state_dir = "{workdir / "state"}"\n'
                    "dry_run = true\n" + service + "\n" + body)
    return path


class Peers:
    """Fake QEMUs started against the shared socket; all killed at the end."""

    def __init__(self, workdir: Path) -> None:
        self.sock = str(workdir / "vhost.sock")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, exe: str, *args: str, mode: str = "-") -> "subprocess.Popen[bytes]":
        p = subprocess.Popen([exe, "-c", _HOLD, self.sock, mode, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.read(1) == b"c"
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def peers(workdir: Path) -> Iterator[Peers]:
    ps = Peers(workdir)
    try:
        yield ps
    finally:
        ps.close()


@pytest.fixture
async def daemon(workdir: Path) -> AsyncIterator[Daemon]:
    d = Daemon(load_config(write_config(workdir, body=CLASSES + '[vm.a]\nsocket = "%s"\nvcpus = 1\nclamp = "none"\n'
                                        % (workdir / "a.sock"))))
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


async def control(workdir: Path, line: str) -> dict[str, Any]:
    return await asyncio.to_thread(query_status, str(workdir / "control.sock"), line)


def refused(d: Daemon, reason: str) -> int:
    return d.counters.get("shared_refused", reason)


async def test_each_peer_is_served_as_the_vm_its_command_line_names(daemon: Daemon, peers: Peers,
                                                                     fake_qemu: str, workdir: Path) -> None:
    p1 = peers.start(fake_qemu, "-name", "guest=db-1,debug-threads=on", "-smp", "2")
    p2 = peers.start(fake_qemu, "-name", "web-1", "-smp", "cpus=3")
    await until(lambda: {"db-1", "web-1"} <= set(daemon.service.vms), what="both VMs served")
    await until(lambda: all(daemon.service.vms[n].connection for n in ("db-1", "web-1")))
    st = daemon.status()["vms"]
    assert len(st["db-1"]["vcpus"]) == 2 and len(st["web-1"]["vcpus"]) == 3
    assert st["db-1"]["peer_pid"] == p1.pid and st["web-1"]["peer_pid"] == p2.pid
    # First matching class: db-* for db-1, the default for web-1.
    listed = {vm["name"]: vm["connected"] for vm in (await control(workdir, "vm-list"))["vms"]}
    assert (listed["db-1"]["class"], listed["db-1"]["floor"]) == ("db", 256)
    assert (listed["web-1"]["class"], listed["web-1"]["ceiling"]) == ("default", 700)
    assert daemon.host.settings["db-1"].limits.floor == 256
    assert daemon.counters.get("shared_admitted") == 2
    # The per-VM socket of [vm.a] is served as before, beside the shared one.
    assert daemon.service.vms["a"].server is not None


async def test_peers_whose_identity_cannot_be_established_are_refused_with_the_reason(
        daemon: Daemon, peers: Peers, fake_qemu: str) -> None:
    peers.start(sys.executable, "-name", "x1")                     # not a QEMU
    peers.start(fake_qemu, "-smp", "2")                            # no -name
    peers.start(fake_qemu, "-name", "bad name!")                   # not a usable name
    peers.start(fake_qemu, "-name", "a")                           # a [vm.NAME] section's name
    peers.start(fake_qemu, "-name", "x2", "-smp", "sockets=0")      # 0 vCPUs
    exited = peers.start(fake_qemu, "-name", "x3", mode="exit")  # gone before it is accepted
    exited.wait()
    peers.start(fake_qemu, "-name", "web-2")
    await until(lambda: "web-2" in daemon.service.vms)
    peers.start(fake_qemu, "-name", "web-2")                       # a second QEMU claiming a connected VM
    await until(lambda: refused(daemon, "name-in-use") == 2, what="both name collisions refused")
    for reason in ("not-qemu", "no-name", "bad-name", "bad-smp", "peer-gone"):
        await until(lambda: refused(daemon, reason) == 1, what=reason)
    assert set(daemon.service.vms) == {"a", "web-2"}
    # Counted in Prometheus with the reason as a label.
    text = render(daemon).decode()
    assert 'vhost_user_cpufreq_shared_socket_refused_total{reason="not-qemu"} 1.0' in text
    assert 'vhost_user_cpufreq_shared_socket_refused_total{reason="name-in-use"} 2.0' in text


async def test_a_vm_goes_when_its_process_exits_even_if_its_socket_lives_on(daemon: Daemon, peers: Peers,
                                                                            fake_qemu: str) -> None:
    p = peers.start(fake_qemu, "-name", "web-3")
    await until(lambda: "web-3" in daemon.service.vms)
    p.kill()
    p.wait()
    await until(lambda: "web-3" not in daemon.service.vms, what="VM removed when QEMU exited")
    # The connecting process forks, hands the connection to its child and exits: the session ends
    # with the process that was identified, not with the socket.
    parent = peers.start(fake_qemu, "-name", "web-4", mode="fork")
    await until(lambda: daemon.counters.get("shared_admitted") == 2)
    assert daemon.service.vms["web-4"].connection is not None
    assert parent.stdin is not None
    parent.stdin.write(b"go\n")
    parent.stdin.close()
    parent.wait()
    await until(lambda: "web-4" not in daemon.service.vms, what="VM removed when the identified process exited")
    assert daemon.shared is not None and daemon.shared.peers == {}
    # The name is free again.
    peers.start(fake_qemu, "-name", "web-4")
    await until(lambda: "web-4" in daemon.service.vms)


async def test_registrations_apply_in_place_and_survive_a_restart(workdir: Path, peers: Peers,
                                                                  fake_qemu: str) -> None:
    path = write_config(workdir, service='admit = "registered"\n')
    d = Daemon(load_config(path))
    await d.start()
    try:
        peers.start(fake_qemu, "-name", "db-9", "-smp", "2")
        await until(lambda: refused(d, "not-registered") == 1)
        r = await control(workdir, 'vm-register {"name": "db-9", "vcpus": 4, "class": "default", "ceiling": 500}')
        assert r["ok"] and r["applied"] == "not connected"
        peers.start(fake_qemu, "-name", "db-9", "-smp", "2")
        await until(lambda: refused(d, "vcpus-mismatch") == 1)
        assert (await control(workdir, 'vm-update {"name": "db-9", "vcpus": 2}'))["ok"]
        peers.start(fake_qemu, "-name", "db-9", "-smp", "2")
        await until(lambda: "db-9" in d.service.vms)
        s = d.host.settings["db-9"]
        assert (s.limits.floor, s.limits.ceiling) == (0, 500)  # the registration's class and ceiling
        # Limits change in place: the QEMU stays connected.
        r = await control(workdir, 'vm-update {"name": "db-9", "floor": 100}')
        assert r["ok"] and r["applied"].startswith("applied")
        assert d.host.settings["db-9"].limits == type(s.limits)(100, 500)
        assert d.service.vms["db-9"].connection is not None
        bad = [await control(workdir, line) for line in (
            'vm-register {"name": "db-9"}', 'vm-register {"name": "x", "class": "nope"}',
            'vm-register {"name": "x", "floor": 900, "ceiling": 100}', 'vm-register {"name": "a b"}',
            'vm-update {"name": "db-9", "vcpus": 3}', 'vm-remove {"name": "nobody"}', "vm-register [1]",
            'vm-register {"name": "y", "colour": 1}')]
        assert [b["ok"] for b in bad] == [False] * 8
        assert "registered already" in bad[0]["error"] and "cannot change while its QEMU runs" in bad[4]["error"]
        assert (await control(workdir, 'vm-register {"name": "other", "vcpus": 8}'))["ok"]
        # A registration tied to a cgroup: a process elsewhere claiming the name is refused.
        assert (await control(workdir, 'vm-register {"name": "tied", "cgroup": "/machine.slice/machine-qemu*"}'))["ok"]
        peers.start(fake_qemu, "-name", "tied")
        await until(lambda: refused(d, "cgroup-mismatch") == 1)
        assert "tied" not in d.service.vms
        assert (await control(workdir, 'vm-remove {"name": "tied"}'))["ok"]
    finally:
        await d.stop()
    # A restart finds the registrations in the state directory.
    d2 = Daemon(load_config(path))
    await d2.start()
    try:
        assert set(d2.registry.vms) == {"db-9", "other"} and d2.registry.vms["db-9"].floor == 100
        peers.start(fake_qemu, "-name", "db-9", "-smp", "2")
        await until(lambda: "db-9" in d2.service.vms)
        # Removing the registration of a VM that only registered VMs may be: its session ends, the VM goes.
        r = await control(workdir, 'vm-remove {"name": "db-9"}')
        assert r["ok"] and r["applied"].startswith("disconnected")
        await until(lambda: "db-9" not in d2.service.vms)
        assert set(json.loads((workdir / "state" / "registry.json").read_text())["vms"][0]) == {"name", "vcpus"}
    finally:
        await d2.stop()


async def test_peers_outside_the_allowlist_or_every_class_or_their_limits_are_refused(
        workdir: Path, peers: Peers, fake_qemu: str) -> None:
    # No default class: only db-* VMs have one.  The allowlist names another uid than ours first.
    body = CLASSES.split("[class.default]")[0]
    me = os.getuid()
    d = Daemon(load_config(write_config(workdir, service=f"allowed_uids = [{me + 1}]\n", body=body)))
    await d.start()
    try:
        peers.start(fake_qemu, "-name", "db-1")
        await until(lambda: refused(d, "peer-not-allowed") == 1)
        assert d.service.vms == {} and d.counters.get("shared_admitted") == 0
    finally:
        await d.stop()
    d = Daemon(load_config(write_config(workdir, service=f"allowed_uids = [{me}]\n")))
    await d.start()
    try:
        # A registration's floor above its class's ceiling (700): admitted by the API, refused at connect.
        r = await control(workdir, 'vm-register {"name": "web-1", "floor": 800}')
        assert r["ok"], r
        peers.start(fake_qemu, "-name", "web-1")
        await until(lambda: refused(d, "bad-limits") == 1)
        peers.start(fake_qemu, "-name", "web-2")
        await until(lambda: "web-2" in d.service.vms)
    finally:
        await d.stop()
    d = Daemon(load_config(write_config(workdir, body=body)))
    await d.start()
    try:
        peers.start(fake_qemu, "-name", "web-3")                   # matches no class
        await until(lambda: refused(d, "no-class") == 1)
        peers.start(fake_qemu, "-name", "db-3")
        await until(lambda: "db-3" in d.service.vms)
        assert set(d.service.vms) == {"db-3"}
        assert 'vhost_user_cpufreq_shared_socket_refused_total{reason="no-class"} 1.0' in render(d).decode()
    finally:
        await d.stop()


async def test_a_registration_that_cannot_be_kept_on_disk_is_refused_and_changes_nothing(workdir: Path) -> None:
    # A state directory the service may not write (the shipped unit before StateDirectory=: a read-only
    # /var/lib under ProtectSystem=strict): the request is answered with the reason, nothing is registered.
    (workdir / "state").write_text("a file where the directory should be")
    d = Daemon(load_config(write_config(workdir)))
    await d.start()
    try:
        r = await control(workdir, 'vm-register {"name": "db-1", "vcpus": 2}')
        assert not r["ok"] and "cannot keep the registrations in" in r["error"], r
        assert d.registry.vms == {}
        assert (await control(workdir, "vm-list"))["vms"] == []
    finally:
        await d.stop()


async def test_an_unreadable_registry_stops_the_start_naming_the_file(workdir: Path) -> None:
    (workdir / "state").mkdir()
    (workdir / "state" / "registry.json").write_text('{"vms": [{"name": 7}]}')
    d = Daemon(load_config(write_config(workdir)))
    with pytest.raises(ConfigError, match="registry.json"):
        await d.start()
    await d.stop()


def test_classes_and_shared_socket_keys_are_validated(workdir: Path) -> None:
    for body, key in (('[class.x]\npinning = [1, 2]\n', "class.x.pinning"),
                      ('[class.x]\nmatch_name = 3\n', "class.x.match_name"),
                      ('[class.x]\nfloor = 900\nceiling = 10\n', "class.x.floor"),
                      ('[class.x]\ncolour = 1\n', "class.x.colour"),
                      ('[class.x]\nclamp = "cgroup"\n', "class.x.cgroup")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(write_config(workdir, body=body))
    with pytest.raises(ConfigError, match="service.admit"):
        load_config(write_config(workdir, service='admit = "some"\n'))


async def test_cli_vm_subcommands_talk_to_the_control_api(daemon: Daemon, workdir: Path) -> None:
    sock = str(workdir / "control.sock")

    async def run(*argv: str) -> "subprocess.CompletedProcess[str]":
        return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "vhost_user_cpufreq.backend.service.cli",
                                                        "vm", "--control-socket", sock, *argv],
                                       capture_output=True, text=True, timeout=60)

    assert (await run("register", "db-5", "--vcpus", "2", "--class", "db", "--ceiling", "800")).returncode == 0
    assert (await run("update", "db-5", "--floor", "300")).returncode == 0
    again = await run("register", "db-5")
    assert again.returncode == 1 and "registered already" in again.stderr
    listed = await run("list")
    assert listed.returncode == 0
    assert 'VM db-5: not connected; registered {"name": "db-5", "vcpus": 2, "class": "db", "floor": 300, ' \
           '"ceiling": 800}' in listed.stdout
    assert (await run("remove", "db-5")).returncode == 0
    assert daemon.registry.vms == {}
    gone = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "vhost_user_cpufreq.backend.service.cli",
                                                    "vm", "--control-socket", str(workdir / "none.sock"), "list"],
                                   capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "cannot reach the service" in gone.stderr


async def test_a_reload_naming_a_connected_vm_as_a_section_is_refused_whole(workdir: Path, daemon: Daemon,
                                                                            peers: Peers, fake_qemu: str) -> None:
    peers.start(fake_qemu, "-name", "web-5")
    await until(lambda: "web-5" in daemon.service.vms)
    old = daemon.config
    clash = write_config(workdir, body=CLASSES + '[vm.web-5]\nsocket = "%s"\nvcpus = 1\n' % (workdir / "w.sock"))
    with pytest.raises(ConfigError, match="vm.web-5: is connected to the shared socket"):
        await daemon.reload(load_config(clash))
    assert daemon.config is old and daemon.service.vms["web-5"].connection is not None
    # Classes change on reload, and reach the connected VM in place.
    changed = write_config(workdir, body=CLASSES.replace("ceiling = 700", "ceiling = 650"))
    await daemon.reload(load_config(changed))
    assert daemon.host.settings["web-5"].limits.ceiling == 650
    assert daemon.service.vms["web-5"].connection is not None
