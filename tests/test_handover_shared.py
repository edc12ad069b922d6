"""Sessions of the one shared socket across a live handover and a crash: carried with who their peer was,
and served by the next process only once it has checked that peer again.

The "QEMUs" are copies of this interpreter named ``qemu-system-x86_64`` that
connect and wait (tests/test_shared_socket.py), so /proc says what a QEMU's
would; tests/test_qemu_handover_shared.py does it with a real QEMU.  A
session whose peer is not what the snapshot says (another process, another
-smp or cgroup), or which the new configuration would not admit, is dropped
alone, counted by reason, its fds closed: the others go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from vhost_user_cpufreq.backend.service.config import load_config
from vhost_user_cpufreq.backend.service.daemon import Daemon
from vhost_user_cpufreq.backend.vhost.handover import freeze, snapshot, thaw
from vhost_user_cpufreq.protocol.session_snapshot import decode, encode

from .helpers import open_fds, short_tmpdir, stop_process, until
from .minisystemd import MiniSystemd
from .service_proc import answers, read_log, serve, service_exe, status
from .test_shared_socket import Peers, fake_qemu, write_config  # noqa: F401 - fake_qemu is a fixture
from .sysfs_tree import make_sysfs_tree
from .test_shared_socket import HOST


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir("vuc-hsh-") as d:
        make_sysfs_tree(d / "sys", HOST)
        yield d


@pytest.fixture
def peers(workdir: Path) -> Iterator[Peers]:
    ps = Peers(workdir)
    try:
        yield ps
    finally:
        ps.close()


def _alive_and_connected(p: "subprocess.Popen[bytes]") -> bool:
    return p.poll() is None  # the fake QEMU exits when its connection closes (recv returns)


async def test_a_take_over_carries_the_shared_sockets_sessions_and_checks_each_peer_again(
        workdir: Path, peers: Peers, fake_qemu: str) -> None:
    write_config(workdir)
    old = serve(workdir, {}, log="old.log")
    new: subprocess.Popen[bytes] | None = None
    try:
        await until(lambda: answers(workdir, old.pid) or old.poll() is not None, timeout=20, what="old ready")
        web = peers.start(fake_qemu, "-name", "web-1", "-smp", "2")
        db = peers.start(fake_qemu, "-name", "db-1")
        await until(lambda: {"web-1", "db-1"} <= {n for n, v in status(workdir)["vms"].items() if v["connected"]},
                    timeout=10, what="both admitted")
        new = serve(workdir, {}, "--take-over", str(workdir / "control.sock"), log="new.log")
        await until(lambda: old.poll() is not None, timeout=20, what=lambda: read_log(workdir, "old.log"))
        assert old.returncode == 0, read_log(workdir, "old.log")
        await until(lambda: answers(workdir, new.pid) or new.poll() is not None, timeout=20,
                    what=lambda: read_log(workdir, "new.log"))
        st = status(workdir)
        assert st["counters"].get("handovers_taken") == 1, st["counters"]
        assert "handover_dropped:not-carried" not in st["counters"], (st["counters"], read_log(workdir, "old.log"))
        for name in ("web-1", "db-1"):
            vm = st["vms"][name]
            assert vm["connected"] and vm["counters"].get("sessions_resumed") == 1, (vm, read_log(workdir, "new.log"))
        assert len(st["vms"]["web-1"]["vcpus"]) == 2
        # Neither front-end saw its connection close.
        assert _alive_and_connected(web) and _alive_and_connected(db)
        # The new process watches the peers it checked: a QEMU that exits takes its VM with it.
        web.kill()
        web.wait()
        await until(lambda: "web-1" not in status(workdir)["vms"], timeout=10, what="web-1 removed")
        assert status(workdir)["vms"]["db-1"]["connected"]
        # And the name is free for the next QEMU, admitted by the new process.
        peers.start(fake_qemu, "-name", "web-1")
        await until(lambda: status(workdir)["vms"].get("web-1", {}).get("connected"), timeout=10,
                    what="web-1 admitted again")
    finally:
        stop_process(old)
        if new is not None:
            stop_process(new)


async def test_after_sigkill_the_shared_sockets_sessions_come_back_from_the_fd_store(
        workdir: Path, peers: Peers, fake_qemu: str) -> None:
    write_config(workdir)
    sd = MiniSystemd(workdir)
    procs: list[subprocess.Popen[bytes]] = []

    async def start() -> None:
        n = len(procs)
        p = sd.start([service_exe(), "serve", "--config", str(workdir / "config.toml")], dict(os.environ),
                     open(workdir / f"p{n}.log", "wb"))
        procs.append(p)
        await until(lambda: answers(workdir, p.pid) or p.poll() is not None, timeout=30,
                    what=lambda: read_log(workdir, f"p{n}.log"))

    try:
        await start()
        web = peers.start(fake_qemu, "-name", "web-1", "-smp", "2")
        await until(lambda: status(workdir)["vms"].get("web-1", {}).get("connected"), timeout=10, what="admitted")
        await until(lambda: "vuc.web-1.r" in sd.names(), timeout=5, what=sd.names)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        await start()
        vm = status(workdir)["vms"].get("web-1")
        assert vm is not None and vm["connected"] and vm["counters"].get("sessions_resumed") == 1, \
            (vm, read_log(workdir, "p1.log"))
        assert _alive_and_connected(web)
        # SIGTERM parks it; the next start resumes it again.
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(20) == 0
        await start()
        assert status(workdir)["vms"]["web-1"]["connected"] and _alive_and_connected(web)
        # The VM goes: its fds leave the store.
        web.kill()
        web.wait()
        await until(lambda: not [n for n in sd.names() if n.startswith("vuc.web-1.f")], timeout=10,
                    what=lambda: f"fds removed {sd.names()}")
    finally:
        for p in procs:
            stop_process(p)
        sd.close()


async def test_a_peer_that_changed_or_is_no_longer_admitted_is_dropped_alone_and_counted(
        workdir: Path, peers: Peers, fake_qemu: str) -> None:
    """The new process's side, in this process: snapshots of a live session, offered as a predecessor would."""
    a = Daemon(load_config(write_config(workdir)))
    await a.start()
    try:
        peers.start(fake_qemu, "-name", "web-1", "-smp", "2")
        await until(lambda: "web-1" in a.service.vms and a.service.vms["web-1"].connection is not None)
        slot = a.service.vms["web-1"]
        conn = slot.connection
        assert conn is not None and slot.peer_record is not None
        freeze(conn.session)
        raw, fds = snapshot(conn.session, conn.sock.fileno(), mid_message=False, peer=slot.peer_record)
        thaw(conn.session)
        snap = decode(raw, len(fds))
        assert snap.peer == slot.peer_record and snap.peer.vcpus == 2
        p = snap.peer

        def changed(**kw: object) -> bytes:
            return encode(dataclasses.replace(snap, peer=dataclasses.replace(p, **kw)))

        cases = [
            ("another-process", changed(start_time=p.start_time + 1), "", "peer-changed"),
            ("another-pid", changed(pid=p.pid + 1), "", "peer-changed"),
            ("another-smp", changed(vcpus=3), "", "peer-changed"),
            ("another-cgroup", changed(cgroup="/elsewhere"), "", "peer-changed"),
            ("not-registered", raw, 'admit = "registered"\n', "not-registered"),
            ("no-shared-socket", raw, None, "no-shared-socket"),
            ("resumed", raw, "", ""),
        ]
        for what, data, service, reason in cases:
            with short_tmpdir("vuc-hsh-b-") as d2:
                make_sysfs_tree(d2 / "sys", HOST)
                path = write_config(d2, service=service or "")
                if service is None:  # the same service without the shared socket
                    path.write_text("\n".join(ln for ln in path.read_text().splitlines()
                                              if not ln.startswith("shared_socket")))
                b = Daemon(load_config(path))
                await b.start()
                before = open_fds()
                mine = [os.dup(fd) for fd in fds]
                resumed = await b._resume(data, mine)
                if reason:
                    assert not resumed, what
                    assert b.counters.get("handover_dropped", reason) == 1, (what, b.counters.snapshot())
                    assert "web-1" not in b.service.vms, what
                    assert open_fds() == before, what  # every fd offered was closed (the pidfd too)
                else:
                    assert resumed and b.service.vms["web-1"].connection is not None
                    assert b.shared is not None and b.shared.peers["web-1"].peer.pid == p.pid
                await b.stop()
        # The predecessor's session was never disturbed.
        assert slot.connection is conn and not conn.closed.done()
    finally:
        await a.stop()  # (the snapshot's fds are the live session's own: closed with it)
