"""The handover cut at each point: who serves afterwards, and no fd left behind on either side.

Old side: the real service binary, and a successor played here that breaks
off at each point (no hello, another version, after the listeners, before
its ACK).  The old process must serve on: its guest's records keep being
decided, and it holds exactly the fds it held before.

New side: ``take_over`` in this process against a predecessor played here
that breaks off at each point.  Before ACK nothing is kept; after ACK without
BYE the predecessor's exit decides (it exited: serve; it is alive: it
resumed, give everything back); every fd received is closed or returned.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from vhost_user_cpufreq.backend.service.handover import _next, take_over
from vhost_user_cpufreq.backend.vhost.transport import send_with_fds as _send
from vhost_user_cpufreq.protocol.handover import HANDOVER_VERSION, FrameReader, FrameType, OldSide, encode_frame

from .helpers import open_fds, short_tmpdir, start_guest, stop_process, until
from .test_handover import _answers, _config, _log, _serve, _status


# -- the old side: the real binary, a successor that breaks off ---------------------------------
def _successor(d: Path, how: str) -> None:
    """Play a new process that stops at ``how``; closes whatever it received."""
    reader = FrameReader()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d / "control.sock"))
        s.sendall(b"handover\n")
        try:
            assert _next(reader, s).type is FrameType.HELLO
            if how == "no-hello":
                return
            if how == "other-version":
                _send(s, encode_frame(FrameType.HELLO, struct.pack("<HI", HANDOVER_VERSION + 1, os.getpid())))
                assert s.recv(1) == b""  # the old process closes the connection and serves on
                return
            if how == "abort":
                _send(s, encode_frame(FrameType.ABORT, b"test"))
                assert s.recv(1) == b""
                return
            _send(s, encode_frame(FrameType.HELLO, struct.pack("<HIB", HANDOVER_VERSION, os.getpid(), 0)))
            while True:
                f = _next(reader, s)
                for fd in f.fds:
                    os.close(fd)
                if how == "after-first-listener" and f.type is FrameType.LISTENER:
                    return
                if f.type is FrameType.DONE:
                    assert how == "no-ack"
                    return
        finally:
            for fd in reader.release_fds():
                os.close(fd)


def _fds(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except FileNotFoundError:
            pass
    return out


@pytest.mark.parametrize("how", ["no-hello", "other-version", "abort", "after-first-listener", "no-ack"])
async def test_a_successor_breaking_off_anywhere_before_ack_leaves_the_old_serving_with_no_fd_more(how: str) -> None:
    with short_tmpdir("vuc-hf-") as d:
        _config(d)
        old = _serve(d, {}, log="old.log")
        try:
            await until(lambda: _answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
            g = await start_guest(str(d / "vm0.sock"), util_threshold=1)

            async def served(n: int) -> None:
                before = _status(d)["vms"]["vm0"]["counters"].get("records", 0)
                g.driver.set_util(0, n)
                g.driver.flush()
                await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("records", 0) > before, timeout=5,
                            what="record served by the old process")

            await served(100)
            await asyncio.sleep(0.2)  # the status connection is closed
            fds_before = _fds(old.pid)
            await asyncio.get_running_loop().run_in_executor(None, _successor, d, how)
            await served(200)
            await served(300)
            assert old.poll() is None
            await asyncio.sleep(0.2)
            assert _fds(old.pid) == fds_before
            assert _status(d)["counters"].get("handover_aborted") == 1
            assert _status(d)["vms"]["vm0"]["connected"]
            await g.close()
        finally:
            stop_process(old)
        assert "handover" in _log(d, "old.log")


# -- the new side: take_over here, a predecessor that breaks off -------------------------------
@pytest.fixture
def exited_pid() -> Iterator[int]:
    p = subprocess.Popen(["true"])
    p.wait()
    yield p.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    p = subprocess.Popen(["sleep", "30"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _predecessor(path: str, pid: int, script: Callable[[socket.socket, OldSide, FrameReader], None]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                assert conn.recv(9) == b"handover\n"
                old = OldSide(pid)
                reader = FrameReader()
                try:
                    script(conn, old, reader)
                except (OSError, ConnectionError):
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _everything(stop_at: str) -> Callable[[socket.socket, OldSide, FrameReader], None]:
    def script(conn: socket.socket, old: OldSide, reader: FrameReader) -> None:
        _send(conn, old.hello())
        old.receive(_next(reader, conn))
        if stop_at == "after-hello":
            return
        a, b = socket.socketpair()
        r, w = os.pipe()
        try:
            _send(conn, old.listener("vm0"), [a.fileno()])
            if stop_at == "after-listener":
                return
            _send(conn, old.session(b"not a snapshot", 2), [r, w])
            if stop_at == "after-session":
                return
            _send(conn, old.done())
            if stop_at == "after-done":
                return
            old.receive(_next(reader, conn))  # ACK
            if stop_at == "after-ack":
                return
            _send(conn, old.bye())
        finally:
            a.close(), b.close(), os.close(r), os.close(w)

    return script


@pytest.mark.parametrize("stop_at", ["after-hello", "after-listener", "after-session"])
def test_a_predecessor_gone_before_ack_leaves_nothing_taken_and_no_fd_open(stop_at: str, exited_pid: int) -> None:
    with short_tmpdir("vuc-hf-") as d:
        before = open_fds()
        t = _predecessor(str(d / "c.sock"), exited_pid, _everything(stop_at))
        assert take_over(str(d / "c.sock"), timeout=2) is None
        t.join(5)
        assert open_fds() == before


@pytest.mark.parametrize("stop_at", ["after-done", "after-ack"])  # our ACK lost, or their BYE
def test_after_ack_without_bye_an_exited_predecessor_means_take_over(stop_at: str, exited_pid: int) -> None:
    with short_tmpdir("vuc-hf-") as d:
        before = open_fds()
        t = _predecessor(str(d / "c.sock"), exited_pid, _everything(stop_at))
        taken = take_over(str(d / "c.sock"), timeout=2)
        t.join(5)
        assert taken is not None and taken.old_pid == exited_pid
        assert list(taken.listeners) == ["vm0"] and len(taken.sessions) == 1
        held = {taken.listeners["vm0"].fileno(), *taken.sessions[0][1]}
        assert held <= open_fds()  # what was handed over, open here
        taken.listeners["vm0"].close()
        for fd in taken.sessions[0][1]:
            os.close(fd)
        assert open_fds() == before


@pytest.mark.parametrize("stop_at", ["after-done", "after-ack"])
def test_after_ack_without_bye_a_live_predecessor_resumed_and_everything_is_given_back(stop_at: str,
                                                                                       live_pid: int) -> None:
    with short_tmpdir("vuc-hf-") as d:
        before = open_fds()
        t = _predecessor(str(d / "c.sock"), live_pid, _everything(stop_at))
        assert take_over(str(d / "c.sock"), timeout=1) is None
        t.join(5)
        assert open_fds() == before


def test_a_complete_exchange_is_taken(exited_pid: int) -> None:
    with short_tmpdir("vuc-hf-") as d:
        t = _predecessor(str(d / "c.sock"), exited_pid, _everything("bye"))
        taken = take_over(str(d / "c.sock"), timeout=2)
        t.join(5)
        assert taken is not None and len(taken.sessions) == 1 and len(taken.sessions[0][1]) == 2
        taken.listeners["vm0"].close()
        for fd in taken.sessions[0][1]:
            os.close(fd)


async def test_a_snapshot_that_cannot_be_resumed_drops_that_session_alone_counted_and_closed(tmp_path: Path) -> None:
    """Service.resume: its fds closed (the front-end sees a close), a counter with the reason, nothing raised."""
    from vhost_user_cpufreq.protocol.session_snapshot import DeviceSnapshot, SeqSnapshot, SessionSnapshot, encode

    from .helpers import make_service

    with short_tmpdir("vuc-hf-") as d:
        svc, _, _, slots = await make_service(d, ("vm0", (0, 1)))
        before = open_fds()
        fe, be = socket.socketpair()
        no_rings = SessionSnapshot("vm0", 0, None, True, 0, False, 0, 0, (), (),
                                   DeviceSnapshot(0, bytes(256), SeqSnapshot(None, None, 0, 0, 0), ((0, 0, None),) * 2))
        assert svc.resume(encode(no_rings), [be.detach()]) is None
        assert slots["vm0"].counters.get("handover_dropped", "ring-count") == 1
        assert slots["vm0"].connection is None
        assert fe.recv(1) == b""  # closed: the front-end knows at once
        fe.close()
        r, w = os.pipe()
        assert svc.resume(b"garbage", [r, w]) is None  # undecodable: no VM to count it on, still closed
        for fd in (r, w):
            with pytest.raises(OSError):
                os.fstat(fd)
        await svc.close()


def test_a_frame_with_more_fds_than_allowed_is_refused_and_every_fd_closed() -> None:
    from vhost_user_cpufreq.protocol.handover import MAX_FRAME_FDS, HandoverError

    a, b = socket.socketpair()
    fds = [os.eventfd(0) for _ in range(MAX_FRAME_FDS + 1)]
    try:
        before = open_fds()
        _send(a, encode_frame(FrameType.HELLO, struct.pack("<HIB", HANDOVER_VERSION, 1, 0)), fds)
        reader = FrameReader()
        with pytest.raises(HandoverError) as ei:
            _next(reader, b)
        assert ei.value.reason == "fds-truncated"
        assert reader.release_fds() == []
        assert open_fds() == before  # the ones that did arrive were closed
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()
