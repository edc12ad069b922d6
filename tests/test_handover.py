"""Live handover with the real service binary: a guest under load never sees its connection close.

The old ``vhost-user-cpufreq serve`` serves a modelled guest (tests/helpers.py
start_guest) that sends records without pause; ``serve --take-over`` starts a
second process that takes the VM over in the middle of it.  The guest's
connection, memory table and rings are never touched by the test: the next
records are decided by the new process, a GET_CONFIG round trip on the same
connection is answered by it, every buffer the guest made available comes
back, and the batches lost at the switch are counted (by the sequence
tracking carried over) and bounded by what was in flight.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest


from .helpers import require_c_dataplane, short_tmpdir, start_guest, stop_process, until
from .service_proc import answers as _answers, read_log as _log, serve as _serve, service_exe as _exe, status as _status

PATHS = {
    "lane": {},
    "event-loop": {"VUC_KICK_LANE": "0"},
    "python-drain": {"VUC_DATAPLANE": "python"},
}




def _config(d: Path) -> Path:
    cfg = d / "config.toml"
    cfg.write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", "pinning = [0, 1]", 'clamp = "none"',
        "[vm.idle]", f'socket = "{d}/idle.sock"', "vcpus = 1", "pinning = [0]", 'clamp = "none"',
    ]) + "\n")
    return cfg










@pytest.mark.parametrize("path", list(PATHS))
async def test_a_guest_under_load_is_taken_over_without_noticing(path: str) -> None:
    if path != "python-drain":
        require_c_dataplane()
    with short_tmpdir("vuc-ho-") as d:
        _config(d)
        env = PATHS[path]
        old = _serve(d, env, log="old.log")
        new: subprocess.Popen[bytes] | None = None
        try:
            await until(lambda: _answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
            assert old.poll() is None, _log(d, "old.log")
            g = await start_guest(str(d / "vm0.sock"), util_threshold=1)
            sock_before = g.fe.sock
            stop = asyncio.Event()
            n = 0

            async def load() -> None:
                nonlocal n
                while not stop.is_set():
                    n += 1
                    g.driver.set_util(n % 2, 1 + n % 1000)
                    g.driver.flush()
                    await asyncio.sleep(0.001)

            task = asyncio.get_running_loop().create_task(load())
            await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("records", 0) > 50, timeout=10,
                        what="records served by the old process")
            new = _serve(d, env, "--take-over", str(d / "control.sock"), log="new.log")
            await until(lambda: old.poll() is not None, timeout=20, what=lambda: "old exit\n" + _log(d, "old.log"))
            assert old.returncode == 0, _log(d, "old.log")
            await until(lambda: _answers(d, new.pid) or new.poll() is not None, timeout=20,
                        what=lambda: "new ready\n" + _log(d, "new.log"))
            assert new.poll() is None, _log(d, "new.log")
            st = _status(d)
            vm = st["vms"]["vm0"]
            assert vm["connected"] and vm["counters"].get("sessions_resumed") == 1, (vm, _log(d, "new.log"))
            assert st["counters"].get("handovers_taken") == 1
            assert not st["vms"]["idle"]["connected"]
            # The guest's next records are decided by the new process.
            await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("records", 0) > 50, timeout=10,
                        what=lambda: f"records served by the new process {_status(d)['vms']['vm0']['counters']}")
            stop.set()
            await task
            # The very same connection answers a request, now from the new process.
            assert g.fe.sock is sock_before
            cfg = await asyncio.wait_for(g.fe.get_config(0, 16), 5)
            assert len(cfg) == 16
            # Every buffer comes back; the batches lost at the switch are counted, at most those in flight.
            g.driver.flush()
            await until(lambda: (g.driver._reclaim(), not g.driver._inflight)[1], timeout=5,
                        what=lambda: f"{len(g.driver._inflight)} buffers not returned")
            counters = _status(d)["vms"]["vm0"]["counters"]
            lost = counters.get("lost_batches", 0)
            assert lost <= g.driver.queue_size
            assert lost == 0, counters  # nothing was in flight that neither process served
            assert counters.get("rejected:stale-batch", 0) == 0, counters  # the sequence went on, not back
            # The idle VM's listening socket moved too: a new front-end is served by the new process.
            g2 = await start_guest(str(d / "idle.sock"))
            g2.driver.set_util(0, 500)
            g2.driver.flush()
            await until(lambda: _status(d)["vms"]["idle"]["counters"].get("records", 0) > 0, timeout=5,
                        what="idle VM served")
            await g2.close()
            await g.close()
            assert "dropped" not in _log(d, "new.log")
        finally:
            stop_process(old)
            if new is not None:
                stop_process(new)


async def test_a_take_over_of_nothing_fails_and_leaves_no_process_serving() -> None:
    with short_tmpdir("vuc-ho-") as d:
        _config(d)
        p = subprocess.run([_exe(), "serve", "--config", str(d / "config.toml"), "--take-over",
                            str(d / "control.sock")], capture_output=True, timeout=30)
        assert p.returncode == 1
        assert b"did not hand over" in p.stderr


async def test_a_session_caught_mid_message_is_dropped_alone_and_counted() -> None:
    with short_tmpdir("vuc-ho-") as d:
        _config(d)
        old = _serve(d, {}, log="old.log")
        new: subprocess.Popen[bytes] | None = None
        try:
            await until(lambda: _answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
            g = await start_guest(str(d / "vm0.sock"), util_threshold=1)
            bad = await start_guest(str(d / "idle.sock"))
            assert bad.fe.sock is not None
            bad.fe.sock.send(b"\x01\x00\x00\x00")  # the first 4 bytes of a 12-byte header
            await asyncio.sleep(0.3)  # read (and buffered) by the old process
            new = _serve(d, {}, "--take-over", str(d / "control.sock"), log="new.log")
            await until(lambda: _answers(d, new.pid) or new.poll() is not None, timeout=20,
                        what=lambda: "new ready\n" + _log(d, "new.log"))
            st = _status(d)
            assert st["vms"]["vm0"]["connected"] and not st["vms"]["idle"]["connected"]
            assert st["counters"].get("handover_dropped:not-carried") == 1, st["counters"]
            assert "mid-message" in _log(d, "old.log")
            # The session that was carried goes on.
            g.driver.set_util(0, 700)
            g.driver.flush()
            await until(lambda: _status(d)["vms"]["vm0"]["counters"].get("records", 0) > 0, timeout=5,
                        what="vm0 served by the new process")
            # The other front-end sees its connection closed (the old process exited), nothing else.
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(bad.fe.sock, 1), 5) == b""
            await g.close()
        finally:
            stop_process(old)
            if new is not None:
                stop_process(new)
