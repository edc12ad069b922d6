"""Crash survival through systemd's fd store, with the real binary and systemd's side played here.

tests/minisystemd.py keeps what the service stores and starts the next
process with it, as systemd does.  A modelled guest sends records without
pause; the service is killed with SIGKILL in the middle of it and started
again from the store: the guest's connection never closes, its next records
are decided, every buffer comes back.  SIGTERM parks the sessions (exact
records), and the next start loses nothing.  A record that cannot be trusted
(busy, another version) or a lost fd drops that VM's session alone; a VM that
really goes takes its fds out of the store.  The same under the real systemd:
tests/test_testhost_fdstore.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.fdstore import FLAGS_OFFSET, PENDING_AREA, REPLAY, encode_pending, record_name

from .helpers import Guest, short_tmpdir, start_guest, stop_process, until
from .minisystemd import MiniSystemd
from .service_proc import answers as _answers, service_exe as _exe, status as _status








class World:
    def __init__(self, d: Path) -> None:
        self.d = d
        self.sd = MiniSystemd(d)
        self.procs: list[subprocess.Popen[bytes]] = []
        (d / "config.toml").write_text("\n".join([
            "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
            "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", 'pinning = "none"', 'clamp = "none"',
            "[vm.vm1]", f'socket = "{d}/vm1.sock"', "vcpus = 1", 'pinning = "none"', 'clamp = "none"',
        ]) + "\n")

    async def start(self) -> "subprocess.Popen[bytes]":
        n = len(self.procs)
        p = self.sd.start([_exe(), "serve", "--config", str(self.d / "config.toml")], dict(os.environ),
                          open(self.d / f"p{n}.log", "wb"))
        self.procs.append(p)
        await until(lambda: _answers(self.d, p.pid) or p.poll() is not None, timeout=30,
                    what=lambda: f"process {n} ready\n{self.log(n)}")
        assert p.poll() is None, self.log(n)
        return p

    def log(self, n: int = -1) -> str:
        n = n if n >= 0 else len(self.procs) - 1
        return (self.d / f"p{n}.log").read_text(errors="replace")

    def counters(self, vm: str = "vm0") -> dict[str, int]:
        c: dict[str, int] = _status(self.d)["vms"][vm]["counters"]
        return c

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.sd.close()


@pytest.fixture
def world() -> Iterator[World]:
    with short_tmpdir("vuc-fds-") as d:
        w = World(d)
        try:
            yield w
        finally:
            w.close()


class Load:
    """The guest sends a record every millisecond until stopped."""

    def __init__(self, g: Guest) -> None:
        self.g = g
        self.n = 0
        self.stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.stop.is_set():
            self.n += 1
            self.g.driver.set_util(self.n % 2, 1 + self.n % 1000)
            self.g.driver.flush()
            await asyncio.sleep(0.001)

    async def end(self) -> None:
        self.stop.set()
        await self.task


async def _all_back(g: Guest) -> None:
    g.driver.flush()
    await until(lambda: (g.driver._reclaim(), not g.driver._inflight)[1], timeout=10,
                what=lambda: f"{len(g.driver._inflight)} buffers not returned")


def _session_fds(w: World, vm: str) -> list[str]:
    return [n for n in w.sd.names() if n.startswith(f"vuc.{vm}.f")]


async def test_sigkill_then_sigterm_the_guest_never_sees_its_connection_close(world: World) -> None:
    w = world
    p0 = await w.start()
    # The listeners the service bound itself (the store's datagrams are read by another thread).
    await until(lambda: sorted(w.sd.names()) == ["vuc.vm0.l", "vuc.vm1.l"], timeout=5, what=w.sd.names)
    g = await start_guest(str(w.d / "vm0.sock"), util_threshold=1)
    sock = g.fe.sock
    load = Load(g)
    try:
        await until(lambda: w.counters().get("records", 0) > 50, timeout=10, what="records served by process 0")
        # The live session is in the store: its record and its fds (connection, channel, ring fds, memory).
        assert "vuc.vm0.r" in w.sd.names()
        assert len(_session_fds(w, "vm0")) >= 4, w.sd.names()
        p0.send_signal(signal.SIGKILL)
        p0.wait()
        await asyncio.sleep(0.2)  # the guest goes on making buffers available meanwhile
        await w.start()
        st = _status(w.d)
        assert st["counters"].get("fdstore_restores") == 1, (st["counters"], w.log())
        c = w.counters()
        assert c.get("sessions_resumed") == 1 and _status(w.d)["vms"]["vm0"]["connected"], (c, w.log())
        await until(lambda: w.counters().get("records", 0) > 50, timeout=10,
                    what=lambda: f"records served by process 1 {w.counters()}")
        # SIGTERM with a store: the sessions are parked, exactly; the next process goes on from there.
        w.procs[-1].send_signal(signal.SIGTERM)
        assert w.procs[-1].wait(20) == 0, w.log()
        assert "parked" in w.log()
        await w.start()
        await until(lambda: w.counters().get("records", 0) > 50, timeout=10,
                    what=lambda: f"records served by process 2 {w.counters()}")
    finally:
        await load.end()
    c = w.counters()
    assert c.get("sessions_resumed") == 1
    # Clean: the sequence tracking went on from the parked record, nothing lost or stale.
    assert c.get("lost_batches", 0) == 0 and c.get("rejected:stale-batch", 0) == 0, c
    assert g.fe.sock is sock
    cfg = await asyncio.wait_for(g.fe.get_config(0, 16), 5)  # the same connection, answered by process 2
    assert len(cfg) == 16
    await _all_back(g)
    assert "dropped" not in w.log(1) + w.log(2)
    # The VM goes: its fds leave the store, its record is emptied; the listeners stay.
    await g.close()
    await until(lambda: not _session_fds(w, "vm0"), timeout=5, what=lambda: f"fds removed {w.sd.names()}")
    assert os.fstat(w.sd.fd(record_name("vm0"))).st_size == 0
    assert "vuc.vm0.l" in w.sd.names()


@pytest.mark.parametrize("fault", ["busy", "version", "lost-fd"])
async def test_a_session_that_cannot_be_trusted_is_dropped_alone(world: World, fault: str) -> None:
    w = world
    p0 = await w.start()
    g0 = await start_guest(str(w.d / "vm0.sock"), util_threshold=1)
    g1 = await start_guest(str(w.d / "vm1.sock"), util_threshold=1)
    g0.driver.set_util(0, 100)
    g1.driver.set_util(0, 100)
    g0.driver.flush()
    g1.driver.flush()
    await until(lambda: w.counters("vm0").get("records") and w.counters("vm1").get("records"), timeout=10,
                what="both VMs served")
    p0.send_signal(signal.SIGKILL)
    p0.wait()
    rec = w.sd.fd(record_name("vm1"))
    if fault == "busy":  # killed with a front-end message read and not acted on
        os.pwrite(rec, b"\x01", PENDING_AREA + FLAGS_OFFSET)
        reason = "mid-message"
    elif fault == "version":
        os.pwrite(rec, b"\x63\x00", PENDING_AREA + 4)
        reason = "version-mismatch"
    else:
        w.sd.drop(sorted(_session_fds(w, "vm1"))[-1])
        reason = "missing-fd"
    await w.start()
    assert w.counters("vm1").get(f"handover_dropped:{reason}") == 1, (w.counters("vm1"), w.log())
    assert w.counters("vm0").get("sessions_resumed") == 1
    # The dropped VM's front-end sees its connection close: nothing holds it any more.
    assert g1.fe.sock is not None
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(g1.fe.sock, 1), 5) == b""
    assert not _session_fds(w, "vm1")
    # The other goes on.
    g0.driver.set_util(0, 700)
    g0.driver.flush()
    await until(lambda: w.counters("vm0").get("records", 0) > 0, timeout=5, what="vm0 served")
    await _all_back(g0)
    await g0.close()
    stop_process(w.procs[-1])


async def test_a_request_read_and_not_answered_when_killed_is_answered_by_the_next_process(world: World) -> None:
    w = world
    p0 = await w.start()
    g = await start_guest(str(w.d / "vm0.sock"), util_threshold=1)
    g.driver.set_util(0, 300)
    g.driver.flush()
    await until(lambda: w.counters().get("records"), timeout=10, what="served")
    await until(lambda: "vuc.vm0.r" in w.sd.names(), timeout=5, what="record stored")
    p0.send_signal(signal.SIGKILL)
    p0.wait()
    # As the killed process left it had it taken a GET_CONFIG from the socket and not answered it yet.
    rec = w.sd.fd(record_name("vm0"))
    os.pwrite(rec, encode_pending(vu.encode_message(vu.FrontendRequest.GET_CONFIG, vu.ConfigSpace(0, 16, 0,
                                                                                              bytes(16)))), 0)
    os.pwrite(rec, bytes([REPLAY]), PENDING_AREA + FLAGS_OFFSET)
    async with g.fe._lock:  # the front-end waits for the answer to the request it sent before the kill
        waiting = asyncio.get_running_loop().create_task(g.fe._read_reply(vu.FrontendRequest.GET_CONFIG))
        await w.start()
        reply = await asyncio.wait_for(waiting, 10)
    assert len(reply.payload.payload) == 16  # type: ignore[union-attr]
    c = w.counters()
    assert c.get("sessions_resumed") == 1 and c.get("config_reads", 0) >= 1, c
    # And the session goes on.
    g.driver.set_util(0, 900)
    g.driver.flush()
    await until(lambda: w.counters().get("records", 0) > 0, timeout=5, what="served after the replay")
    await _all_back(g)
    await g.close()


@pytest.mark.parametrize("front_end", ["not-read-yet", "went-on"])
async def test_an_answer_sent_before_the_kill_is_not_sent_again(world: World, front_end: str) -> None:
    """Killed after answering a kept request and before clearing the record's REPLAY flag (played here by
    setting it again): the next process sees the answer was sent and does not send a second one, which
    the front-end would take for the answer to its next request."""
    w = world
    p0 = await w.start()
    g = await start_guest(str(w.d / "vm0.sock"), util_threshold=1)
    await until(lambda: "vuc.vm0.r" in w.sd.names(), timeout=5, what="record stored")
    get_config = vu.encode_message(vu.FrontendRequest.GET_CONFIG, vu.ConfigSpace(0, 16, 0, bytes(16)))
    assert g.fe.sock is not None
    loop = asyncio.get_running_loop()
    async with g.fe._lock:
        await loop.sock_sendall(g.fe.sock, get_config)
        await until(lambda: w.counters().get("config_reads", 0) >= 1, timeout=5, what="answered by process 0")
        await asyncio.sleep(0.1)  # the answer is in the front-end's socket, unread
        p0.send_signal(signal.SIGKILL)
        p0.wait()
        rec = w.sd.fd(record_name("vm0"))
        os.pwrite(rec, encode_pending(get_config), 0)
        os.pwrite(rec, bytes([REPLAY]), PENDING_AREA + FLAGS_OFFSET)
        if front_end == "went-on":
            first = await asyncio.wait_for(g.fe._read_reply(vu.FrontendRequest.GET_CONFIG), 5)
            assert len(first.payload.payload) == 16  # type: ignore[union-attr]
            # QEMU reads the answer and sends its next request, which waits for the next process.
            await loop.sock_sendall(g.fe.sock, vu.encode_message(vu.FrontendRequest.GET_FEATURES))
        await w.start()
        if front_end == "not-read-yet":
            first = await asyncio.wait_for(g.fe._read_reply(vu.FrontendRequest.GET_CONFIG), 5)
            assert len(first.payload.payload) == 16  # type: ignore[union-attr]
        else:
            # The answer that comes is to GET_FEATURES: no second GET_CONFIG answer before it.
            feats = await asyncio.wait_for(g.fe._read_reply(vu.FrontendRequest.GET_FEATURES), 5)
            assert feats.payload.value == g.fe.offered_features  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        with pytest.raises(BlockingIOError):  # and nothing else was sent
            g.fe.sock.recv(1, socket.MSG_DONTWAIT)
    reason = "answer-unread" if front_end == "not-read-yet" else "front-end-went-on"
    assert w.counters().get(f"replay_skipped:{reason}") == 1, (w.counters(), w.log())
    cfg = await asyncio.wait_for(g.fe.get_config(0, 16), 5)  # the connection goes on in step
    assert len(cfg) == 16
    await g.close()


@pytest.mark.parametrize("successor", ["keeps-the-store", "keeps-none"])
async def test_a_take_over_under_systemd_leaves_the_store_as_the_serving_process_needs_it(
        world: World, successor: str) -> None:
    """``serve --take-over`` in the unit (it has $FDSTORE): the new process goes on with the store's very
    entries (systemd keeps an open file once, under its first name), and a SIGKILL of it is survived.  A
    successor without a store: the old process takes its entries out, or systemd would hold QEMU's
    connections open after the new process closed them."""
    w = world
    p0 = await w.start()
    g = await start_guest(str(w.d / "vm0.sock"), util_threshold=1)
    sock = g.fe.sock
    load = Load(g)
    try:
        await until(lambda: w.counters().get("records", 0) > 20, timeout=10, what="served by process 0")
        await until(lambda: "vuc.vm0.r" in w.sd.names() and _session_fds(w, "vm0"), timeout=5, what=w.sd.names)
        stored = sorted(_session_fds(w, "vm0"))
        env = dict(os.environ)
        if successor == "keeps-the-store":
            env.update(NOTIFY_SOCKET=w.sd.path, FDSTORE=str(w.sd.fdstore_max))
        p1 = subprocess.Popen([_exe(), "serve", "--config", str(w.d / "config.toml"), "--take-over",
                               str(w.d / "control.sock")], env=env, stderr=open(w.d / "take-over.log", "wb"))
        w.procs.append(p1)
        await until(lambda: p0.poll() is not None, timeout=20, what="process 0 exits")
        await until(lambda: _answers(w.d, p1.pid) or p1.poll() is not None, timeout=30,
                    what=lambda: (w.d / "take-over.log").read_text())
        assert w.counters().get("sessions_resumed") == 1, ((w.d / "take-over.log").read_text(), w.counters())
        await until(lambda: w.counters().get("records", 0) > 20, timeout=10, what="served by the new process")
        if successor == "keeps-none":
            # Nothing of the session stays in the store: when the VM goes, QEMU sees its connection close.
            await until(lambda: not [n for n in w.sd.names() if n.startswith("vuc.vm0.")], timeout=5,
                        what=w.sd.names)
            return
        # One record and the same objects, under the names they were stored with; the unit's main pid is p1.
        assert w.sd.names().count("vuc.vm0.r") == 1 and sorted(_session_fds(w, "vm0")) == stored, w.sd.names()
        assert any(m == f"MAINPID={p1.pid}" for m in w.sd.messages)
        assert "not stored" not in (w.d / "take-over.log").read_text()
        p1.send_signal(signal.SIGKILL)
        p1.wait()
        await w.start()
        c = w.counters()
        assert c.get("sessions_resumed") == 1 and "handover_dropped" not in str(c), (c, w.log())
        await until(lambda: w.counters().get("records", 0) > 20, timeout=10, what="served after the SIGKILL")
    finally:
        await load.end()
    assert g.fe.sock is sock
    await _all_back(g)
    await g.close()
