"""systemd's protocols for real: sd_notify datagrams and socket activation of ``serve``.

The notify tests bind a real AF_UNIX datagram socket (a path, and the
abstract ``@name`` form) and read what :func:`backend.systemd.notify` sends.
The activation tests play systemd: they bind the VMs' listening sockets,
start ``vhost-user-cpufreq serve --config`` with them as fds 3, 4, ... and
``$LISTEN_FDS``/``$LISTEN_PID``/``$LISTEN_FDNAMES`` (a tiny launcher moves
the fds and sets LISTEN_PID to its own pid before exec'ing, as systemd
does), with ``$NOTIFY_SOCKET`` pointing at the test, then talk vhost-user to
the inherited sockets and drive the daemon with SIGHUP and SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from vhost_user_cpufreq.backend.service import systemd
from vhost_user_cpufreq.backend.service.daemon import query_status

from .helpers import short_tmpdir, start_guest
from .sysfs_tree import HostSpec, make_sysfs_tree

HOST = HostSpec.big_little([(4, 300000, 1800000, 256), (4, 500000, 2800000, 1024)])


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_tmpdir("vuc-sd-") as d:
        yield d


def _dgram_server(addr: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(5)
    return s


# -- sd_notify ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["READY=1", "STATUS=serving 2 VMs, 1 connected", "WATCHDOG=1", "STOPPING=1",
                                   "RELOADING=1", "READY=1\nSTATUS=serving 0 VMs, 0 connected"])
def test_notify_to_path_socket(sockdir: Path, state: str) -> None:
    path = str(sockdir / "notify")
    with _dgram_server(path) as srv:
        assert systemd.notify(state, {"NOTIFY_SOCKET": path})
        assert srv.recv(4096).decode() == state


def test_notify_to_abstract_socket() -> None:
    name = f"vuc-test-{os.getpid()}-{time.monotonic_ns()}"
    with _dgram_server("\0" + name) as srv:
        for state in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
            assert systemd.notify(state, {"NOTIFY_SOCKET": "@" + name})
            assert srv.recv(4096) == state.encode()


def test_notify_without_systemd_is_a_quiet_no(sockdir: Path) -> None:
    assert systemd.notify("READY=1", {}) is False
    # Nobody listening (systemd gone): no exception into the service.
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(sockdir / "absent")}) is False


def test_listen_fds_ignores_another_process_fds() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == []
    assert env["LISTEN_FDS"] == "2"  # not ours: left alone


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert systemd.watchdog_interval({}) is None


def test_listen_fds_in_a_child_names_and_unsets(sockdir: Path) -> None:
    """fds 3 and 4 of a child, named by LISTEN_FDNAMES; the variables are gone afterwards."""
    socks = [_listener(sockdir / f"{n}.sock") for n in ("a", "b")]
    probe = (
        "import json, os, socket\n"
        "from vhost_user_cpufreq.backend.service import systemd\n"
        "got = systemd.listen_fds()\n"
        "print(json.dumps({'fds': [[n, s.fileno(), s.getsockname(), s.type == socket.SOCK_STREAM,\n"
        "                            os.get_inheritable(s.fileno())] for n, s in got],\n"
        "                  'left': sorted(k for k in os.environ if k.startswith('LISTEN_'))}))\n"
    )
    try:
        out = subprocess.run(_activation_argv([s.fileno() for s in socks], ["a", "b"], [sys.executable, "-c", probe]),
                             pass_fds=[s.fileno() for s in socks], capture_output=True, text=True, timeout=30)
    finally:
        for s in socks:
            s.close()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["fds"] == [["a", 3, str(sockdir / "a.sock"), True, False], ["b", 4, str(sockdir / "b.sock"), True, False]]
    assert got["left"] == []


# -- socket activation of the real service ---------------------------------------------------

# Plays systemd between fork and exec: the passed sockets become fds 3.., and
# LISTEN_PID is this process's pid, which exec keeps.
_LAUNCHER = """\
import fcntl, os, sys
src = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(src)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=sys.argv[2])
os.execvp(sys.argv[3], sys.argv[3:])
"""


def _activation_argv(fds: Sequence[int], names: Sequence[str], argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), ":".join(names), *argv]


def service_argv(*args: str) -> list[str]:
    """``vhost-user-cpufreq ARGS``: the venv's console script, as a unit's ExecStart runs it."""
    exe = shutil.which("vhost-user-cpufreq", path=os.path.dirname(sys.executable))
    if exe is None:
        return [sys.executable, "-m", "vhost_user_cpufreq.backend.service.cli", *args]
    return [exe, *args]


def _listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s


@dataclass
class Notifications:
    """The test's end of $NOTIFY_SOCKET: every datagram, in order."""

    sock: socket.socket
    messages: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None  # the sender, once started

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 15.0, what: str = "notification") -> str:
        """The first message since the last wait that satisfies ``pred``; earlier ones are kept in ``messages``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._pending):
                if pred(m):
                    del self._pending[: i + 1]
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; got {self.messages}")
            self.sock.settimeout(min(left, 0.1))
            try:
                m = self.sock.recv(65536).decode()
            except socket.timeout:
                # Nothing queued: if the sender is gone, nothing more will come.
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"no {what}: the service exited with {self.proc.returncode}; "
                                         f"got {self.messages}") from None
                continue
            self.messages.append(m)
            self._pending.append(m)

    def __post_init__(self) -> None:
        self._pending: list[str] = []


def _fields(msg: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in msg.splitlines() if "=" in line)


def write_config(path: Path, sysfs: Path, sockdir: Path, vms: dict[str, dict[str, object]]) -> None:
    lines = ["[service]", f'sysfs_root = "{sysfs}"', f'control_socket = "{sockdir / "control.sock"}"',
             "sample_period = 0.02"]
    for name, extra in vms.items():
        lines += [f"[vm.{name}]", f'socket = "{sockdir / (name + ".sock")}"', 'clamp = "none"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Activated:
    proc: subprocess.Popen[str]
    notes: Notifications
    sockdir: Path
    config: Path

    def status(self) -> dict:  # type: ignore[type-arg]
        return query_status(str(self.sockdir / "control.sock"))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def start_activated(sockdir: Path, sysfs: Path, names: Sequence[str], *, vcpus: int = 2,
                    wrapper: Sequence[str] = (), env: dict[str, str] | None = None,
                    extra_fd_names: Sequence[str] = (), wait: bool = True) -> Activated:
    """``serve --config`` with one systemd-style socket per name.

    With ``wait``, returns once READY=1 came and the control socket answered
    (the event loop is then past start() and the signal handlers are
    installed).  Without, returns at once with the notification queue full,
    so that the service blocks in its first sd_notify until the test reads."""
    config = sockdir / "config.toml"
    write_config(config, sysfs, sockdir, {n: {"vcpus": vcpus} for n in names})
    all_names = [*names, *extra_fd_names]
    listeners = [_listener(sockdir / f"{n}.sock") for n in all_names]
    notes = Notifications(_dgram_server(str(sockdir / "notify")))
    if not wait:
        _fill_queue(str(sockdir / "notify"))
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    child_env.update(NOTIFY_SOCKET=str(sockdir / "notify"), **(env or {}))
    argv = _activation_argv([s.fileno() for s in listeners], all_names,
                            [*wrapper, *service_argv("serve", "--config", str(config))])
    try:
        proc = subprocess.Popen(argv, pass_fds=[s.fileno() for s in listeners], env=child_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        for s in listeners:  # the child holds them now, as systemd would keep its copies
            s.close()
    notes.proc = proc
    act = Activated(proc, notes, sockdir, config)
    if not wait:
        return act
    try:
        notes.wait_for(lambda m: "READY=1" in m.splitlines(), what="READY=1")
        act.status()
    except (AssertionError, OSError) as exc:
        rc, err = act.stop()
        raise AssertionError(f"{exc} (rc {rc}); stderr:\n{err}") from None
    return act


def _fill_queue(path: str) -> int:
    """Queue datagrams on ``path`` until it takes no more (net.unix.max_dgram_qlen)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        n = 0
        while True:
            try:
                s.sendto(b"FILLER=1", path)
            except BlockingIOError:
                return n
            n += 1


def raw_get_features(path: Path) -> int:
    """GET_FEATURES by hand: header {u32 request, u32 flags (version 1), u32 size}, reply carries a u64."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(struct.pack("<III", 1, 0x1, 0))
        data = b""
        while len(data) < 20:
            chunk = s.recv(20 - len(data))
            assert chunk, "back-end closed the connection"
            data += chunk
    req, flags, size = struct.unpack_from("<III", data)
    assert (req, flags & 0x7, flags & 0x4, size) == (1, 0x5, 0x4, 8)  # version 1 | REPLY
    (features,) = struct.unpack_from("<Q", data, 12)
    return int(features)


def run_activation_scenario(sockdir: Path, sysfs: Path, *, wrapper: Sequence[str] = ()) -> list[str]:
    """The whole life of an activated service; returns every notification, for callers' own checks."""
    act = start_activated(sockdir, sysfs, ["a", "b"], wrapper=wrapper, env={"WATCHDOG_USEC": "200000"})
    try:
        ready = act.notes.messages[-1]
        assert _fields(ready)["STATUS"] == "serving 2 VMs, 0 connected"
        # The daemon's own pid is the one systemd set LISTEN_PID to (the launcher exec'd).
        assert act.status()["pid"] == act.proc.pid

        # Watchdog: WATCHDOG_USEC=0.2 s gives a ping every 0.1 s.
        for _ in range(3):
            act.notes.wait_for(lambda m: m == "WATCHDOG=1", timeout=5, what="WATCHDOG=1")

        # VM b: raw vhost-user over its inherited socket.
        features = raw_get_features(sockdir / "b.sock")
        assert features & (1 << 32) and features & (1 << 30)  # VERSION_1, PROTOCOL_FEATURES

        # VM a: a modelled guest, records through shared memory, seen in status.
        async def guest_session() -> None:
            g = await start_guest(str(sockdir / "a.sock"))
            try:
                g.driver.set_util(1, 700)
                g.driver.flush()
                deadline = time.monotonic() + 10
                while True:
                    st = await asyncio.to_thread(act.status)
                    vm = st["vms"]["a"]
                    if vm["connected"] and vm["vcpus"][1]["util"] == 700:
                        break
                    assert time.monotonic() < deadline, f"record never arrived: {vm}"
                    await asyncio.sleep(0.02)
                assert vm["peer_pid"] == os.getpid()

                # SIGHUP with a new VM in the file: RELOADING=1, then READY=1; the guest stays connected.
                write_config(act.config, sysfs, sockdir, {"a": {"vcpus": 2}, "b": {"vcpus": 2}, "c": {"vcpus": 1}})
                act.proc.send_signal(signal.SIGHUP)
                await asyncio.to_thread(act.notes.wait_for, lambda m: m == "RELOADING=1", 10, "RELOADING=1")
                again = await asyncio.to_thread(act.notes.wait_for, lambda m: "READY=1" in m.splitlines(), 10,
                                                "READY=1 after reload")
                assert _fields(again)["STATUS"] == "serving 3 VMs, 1 connected"
                st = await asyncio.to_thread(act.status)
                assert st["vms"]["a"]["connected"] and st["vms"]["a"]["sessions_served"] == 1
                assert (sockdir / "c.sock").exists()  # bound by the daemon itself: no socket unit for it
                g.driver.set_util(0, 400)
                g.driver.flush()
                deadline = time.monotonic() + 10
                while (await asyncio.to_thread(act.status))["vms"]["a"]["vcpus"][0]["util"] != 400:
                    assert time.monotonic() < deadline, "no record after reload"
                    await asyncio.sleep(0.02)
            finally:
                await g.close()

        asyncio.run(guest_session())

        rc, err = act.stop()
        assert rc == 0, err
        act.notes.wait_for(lambda m: m.startswith("STOPPING=1"), timeout=5, what="STOPPING=1")
        return act.notes.messages
    finally:
        act.stop()
        act.notes.sock.close()


def test_socket_activated_service_lifecycle(sockdir: Path) -> None:
    sysfs = make_sysfs_tree(sockdir / "sys", HOST)
    messages = run_activation_scenario(sockdir, sysfs)
    kinds = [m.splitlines()[0].split("=")[0] for m in messages if m != "WATCHDOG=1"]
    # reload() reports the new STATUS= itself; reload_from_signal() then says READY=1.
    assert kinds == ["READY", "RELOADING", "STATUS", "READY", "STOPPING"]


def test_unmatched_inherited_socket_is_closed_and_reported(sockdir: Path) -> None:
    sysfs = make_sysfs_tree(sockdir / "sys", HOST)
    act = start_activated(sockdir, sysfs, ["a"], extra_fd_names=["stray"])
    try:
        assert set(act.status()["vms"]) == {"a"}
        # The daemon closed its only copy: nobody listens on the stray socket any more.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(ConnectionRefusedError):
            s.connect(str(sockdir / "stray.sock"))
    finally:
        rc, err = act.stop()
        act.notes.sock.close()
    assert rc == 0
    assert "inherited socket 'stray' matches no configured VM" in err


def test_reload_with_a_broken_file_keeps_serving(sockdir: Path) -> None:
    sysfs = make_sysfs_tree(sockdir / "sys", HOST)
    act = start_activated(sockdir, sysfs, ["a"])
    try:
        act.config.write_text(act.config.read_text() + "\n[vm.a.oops]\n")
        act.proc.send_signal(signal.SIGHUP)
        act.notes.wait_for(lambda m: m == "RELOADING=1", what="RELOADING=1")
        act.notes.wait_for(lambda m: "READY=1" in m.splitlines(), what="READY=1 after a rejected reload")
        st = act.status()
        assert set(st["vms"]) == {"a"} and st["counters"].get("reload_failed") == 1
        assert raw_get_features(sockdir / "a.sock")
    finally:
        rc, err = act.stop()
        act.notes.sock.close()
    assert rc == 0
    assert "reload rejected, keeping the running configuration" in err and "config.toml: vm.a.oops" in err


# sendto(2), the call sd_notify blocks in when the notification queue is full.
_SENDTO = {"x86_64": 44, "aarch64": 206, "riscv64": 206}


def _caught_signals(pid: int) -> set[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    assert m is not None
    mask = int(m.group(1), 16)
    return {sig.name for sig in (signal.SIGHUP, signal.SIGTERM) if mask & (1 << (sig - 1))}


def test_signal_handlers_are_in_place_when_ready_is_sent(sockdir: Path) -> None:
    """systemd may send SIGHUP (reload) or SIGTERM (stop) as soon as READY=1 arrives.

    Deterministic: the notification queue is full, so the service blocks in
    the sendto() of READY=1; the test looks at its caught signals right then."""
    nr = _SENDTO.get(os.uname().machine)
    if nr is None:
        pytest.skip(f"sendto's system call number on {os.uname().machine} is not in the table")
    sysfs = make_sysfs_tree(sockdir / "sys", HOST)
    act = start_activated(sockdir, sysfs, ["a"], wait=False)
    try:
        deadline = time.monotonic() + 15
        while Path(f"/proc/{act.proc.pid}/syscall").read_text().split()[:1] != [str(nr)]:
            assert act.proc.poll() is None, act.stop()
            assert time.monotonic() < deadline, "the service never blocked in sd_notify"
            time.sleep(0.005)
        handled = _caught_signals(act.proc.pid)
        ready = act.notes.wait_for(lambda m: m != "FILLER=1", what="the blocked notification")
        assert ready.startswith("READY=1\n")  # it was READY=1 that waited
        assert handled == {"SIGHUP", "SIGTERM"}
    finally:
        act.stop()
        act.notes.sock.close()
