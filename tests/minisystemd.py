"""systemd's side of sd_notify and the fd store, played in the test process (the real one runs on the test host).

:class:`MiniSystemd` owns a notify socket, keeps every fd sent with
``FDSTORE=1`` under its ``FDNAME=`` (``FDSTOREREMOVE=1`` closes every fd of a
name; an open file stored already, under any name, is not stored again, as
systemd's ``same_fd`` check does), and starts the service the way systemd does: the stored fds as fds 3..
with ``LISTEN_FDS``, ``LISTEN_PID`` (the service's own pid, set by a small
trampoline before exec) and ``LISTEN_FDNAMES``, and ``$FDSTORE``.  What it does
not do: drop a stored fd on ``POLLHUP`` (systemd's default), so a test sees
exactly what the service removed.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from vhost_user_cpufreq.backend.service.fdstore import same_file

_TRAMPOLINE = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")] if sys.argv[1] else []
top = 3 + len(fds) + max(fds, default=0)
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]  # out of the way of 3.. first
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class MiniSystemd:
    def __init__(self, d: Path, fdstore_max: int = 256) -> None:
        self.path = str(d / "notify.sock")
        self.fdstore_max = fdstore_max
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.store: list[tuple[str, int]] = []
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self.lock:
                self.messages.append(text)
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        if any(same_file(fd, f) for _, f in self.store):
                            os.close(fd)
                        elif len(self.store) < self.fdstore_max:
                            self.store.append((fields.get("FDNAME", "stored"), fd))
                        else:
                            os.close(fd)
                    fds = []
                elif fields.get("FDSTOREREMOVE") == "1":
                    name = fields.get("FDNAME")
                    for n, fd in [e for e in self.store if e[0] == name]:
                        os.close(fd)
                    self.store = [e for e in self.store if e[0] != name]
            for fd in fds:
                os.close(fd)

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.store]

    def fd(self, name: str) -> int:
        with self.lock:
            (fd,) = [f for n, f in self.store if n == name]
            return fd

    def drop(self, name: str) -> None:
        """Lose an fd of the store (as a test of what the service does without it)."""
        with self.lock:
            for n, fd in [e for e in self.store if e[0] == name]:
                os.close(fd)
            self.store = [e for e in self.store if e[0] != name]

    def start(self, argv: list[str], env: dict[str, str], stderr: object) -> "subprocess.Popen[bytes]":
        with self.lock:
            names = [n for n, _ in self.store]
            fds = [fd for _, fd in self.store]
        env = {**env, "NOTIFY_SOCKET": self.path, "FDSTORE": str(self.fdstore_max)}
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        return subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, ",".join(map(str, fds)), *argv],
                                env=env, pass_fds=fds, stderr=stderr)  # type: ignore[arg-type]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()
        with self.lock:
            for _, fd in self.store:
                os.close(fd)
            self.store = []
