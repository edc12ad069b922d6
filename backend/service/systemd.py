"""systemd's two small protocols, without libsystemd: readiness notification and socket activation.

Notification (sd_notify(3)): one datagram of ``KEY=VALUE`` lines to the unix
socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract
namespace).  Socket activation (sd_listen_fds(3)): fds 3.. are inherited,
``$LISTEN_FDS`` says how many, ``$LISTEN_PID`` must be our pid, and
``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the .socket unit) names them
colon-separated; the variables are removed so children do not inherit them.
"""

from __future__ import annotations

import array
import os
import socket
from typing import MutableMapping

__all__ = ["notify", "notify_with_fds", "listen_fds", "listen_fds_raw", "watchdog_interval", "fdstore_max",
           "SD_LISTEN_FDS_START"]

SD_LISTEN_FDS_START = 3


def notify(state: str, env: MutableMapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving 2 VMs"``); False when not under systemd."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), addr)
        except OSError:
            return False
    return True


def notify_with_fds(state: str, fds: list[int], env: MutableMapping[str, str] = os.environ) -> bool:
    """``state`` with ``fds`` attached (SCM_RIGHTS), as sd_pid_notify_with_fds(3): ``FDSTORE=1`` uploads them."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendmsg([state.encode()], anc, 0, addr)
        except OSError:
            return False
    return True


def fdstore_max(env: MutableMapping[str, str] = os.environ) -> int:
    """How many fds systemd keeps for us ($FDSTORE, FileDescriptorStoreMax=; 0: no store)."""
    try:
        return max(0, int(env.get("FDSTORE", "0"))) if env.get("NOTIFY_SOCKET") else 0
    except ValueError:
        return 0


def listen_fds_raw(env: MutableMapping[str, str] = os.environ, *, unset: bool = True) -> list[tuple[str, int]]:
    """Every fd passed by systemd (sockets, and whatever the fd store held), with its name."""
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return []
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID"):
            env.pop(k, None)
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((names[i] if i < len(names) else "unknown", fd))
    return out


def listen_fds(env: MutableMapping[str, str] = os.environ, *, unset: bool = True) -> list[tuple[str, socket.socket]]:
    """Sockets passed by systemd, with their names ("unknown" where unnamed)."""
    return [(name, socket.socket(fileno=fd)) for name, fd in listen_fds_raw(env, unset=unset)]


def watchdog_interval(env: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2e6
