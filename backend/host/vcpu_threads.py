"""Finding a VM's vCPU threads, and proving they belong to the right QEMU.

QMP ``query-cpus-fast`` gives each vCPU's ``thread-id``; without a QMP socket
the names QEMU gives its vCPU threads ("CPU 3/KVM", "CPU 3/TCG") in
``/proc/PID/task/*/comm`` do.  Either way, every thread id is checked to be a
task of the process at the other end of that VM's vhost-user socket
(SO_PEERCRED pid): the service never touches a thread of any other process,
whatever a QMP socket or a config file claims.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

from vhost_user_cpufreq.protocol.errors import RemoteProtocolError

__all__ = ["ThreadOwnershipError", "threads_from_proc", "threads_from_qmp", "threads_from_qmp_client", "verify_threads", "discover_threads"]

log = logging.getLogger("vhost_user_cpufreq.threads")
_VCPU_COMM = re.compile(r"^CPU (\d+)/(KVM|TCG|HVF|WHPX|NVMM)$")


class ThreadOwnershipError(RemoteProtocolError):
    """A claimed vCPU thread is not a task of the connected QEMU process."""


def threads_from_proc(pid: int, proc: str = "/proc") -> dict[int, int]:
    """vCPU index -> thread id from QEMU's thread names."""
    out: dict[int, int] = {}
    task_dir = os.path.join(proc, str(pid), "task")
    for name in os.listdir(task_dir):
        try:
            with open(os.path.join(task_dir, name, "comm")) as f:
                m = _VCPU_COMM.match(f.read().strip())
        except OSError:
            continue  # the thread exited while we looked
        if m:
            out[int(m.group(1))] = int(name)
    return out


async def threads_from_qmp(qmp_socket: str, timeout: float = 5.0) -> dict[int, int]:
    """vCPU index -> thread id from QMP ``query-cpus-fast``."""
    import asyncio

    from qemu.qmp import QMPClient

    client = QMPClient("vhost-user-cpufreq")
    try:
        await asyncio.wait_for(client.connect(qmp_socket), timeout)
        return await threads_from_qmp_client(client, timeout)
    finally:
        await client.disconnect()


async def threads_from_qmp_client(client: Any, timeout: float = 5.0) -> dict[int, int]:
    """The same over an already connected ``qemu.qmp.QMPClient``."""
    import asyncio

    cpus: Any = await asyncio.wait_for(client.execute("query-cpus-fast"), timeout)
    return {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}


def verify_threads(pid: int, threads: Mapping[int, int], proc: str = "/proc") -> dict[int, int]:
    """Raise unless every thread id is a task of ``pid``."""
    tasks = {int(t) for t in os.listdir(os.path.join(proc, str(pid), "task"))}
    foreign = {v: t for v, t in threads.items() if t not in tasks}
    if foreign:
        raise ThreadOwnershipError(
            "foreign-thread", f"thread ids {sorted(foreign.values())} are not tasks of QEMU pid {pid}"
        )
    return dict(threads)


async def discover_threads(pid: int, qmp_socket: str | None = None, proc: str = "/proc") -> dict[int, int]:
    """Thread ids of ``pid``'s vCPUs, from QMP when given, else from /proc; always verified."""
    threads: dict[int, int] = {}
    if qmp_socket:
        try:
            threads = await threads_from_qmp(qmp_socket)
        except Exception as exc:  # noqa: BLE001 - any QMP failure falls back to /proc
            log.warning("QMP %s did not answer query-cpus-fast (%s); using /proc/%d/task", qmp_socket, exc, pid)
    if not threads:
        threads = threads_from_proc(pid, proc)
    return verify_threads(pid, threads, proc)
