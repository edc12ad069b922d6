"""Who is on the shared socket: a VM identified from the peer process itself.

Theory of operation
-------------------
On the one socket every VM shares, nothing the front-end sends says which VM
it is, so the service asks the kernel.  ``SO_PEERPIDFD`` (Linux 6.5) gives a
pidfd for the very process that called ``connect()``; where it is missing the
pid from ``SO_PEERCRED`` is opened with ``pidfd_open`` at accept time.  Then:

* ``/proc/PID/exe`` must be a QEMU system emulator (``qemu-system-*``,
  ``qemu-kvm``), else ``not-qemu``.  That link is readable only with ptrace
  access: a service running as its own user (the shipped unit) is refused
  it for a QEMU of another user (libvirt's ``libvirt-qemu``), and is not
  given ``CAP_SYS_PTRACE``, which would let it read every guest's memory.
  Then the name the kernel gave the process at exec (``/proc/PID/comm``,
  the file's name cut to 15 bytes) *and* the basename of ``argv[0]`` must
  both be a QEMU's.  Either way it is a guard against the wrong peer, not
  authentication: a binary can be named anything (see the socket's mode and
  ``allowed_uids``);
* ``/proc/PID/cmdline`` gives the VM's name from ``-name NAME`` or
  ``-name guest=NAME,...`` (libvirt's form), else ``no-name``, and its vCPU
  count from ``-smp`` (``N``, ``cpus=N``, or the topology's product, as QEMU
  computes it), else ``bad-smp``;
* ``/proc/PID/cgroup`` gives its cgroup (libvirt's
  ``machine.slice/machine-qemu\\x2d...scope``), for class matching.

Everything read from /proc is trusted only once the pidfd shows the process
still alive *after* the reads (``peer-gone`` otherwise): while it lives its pid
cannot be reused, so the files read were that process's.  The pidfd stays
open with the session; :meth:`PeerProcess.alive` re-checks (pidfd not
readable and the same start time) before any of its threads is touched, and
the service ends the session when the pidfd says the process exited.  The
command line is the peer's own claim: it decides only what the peer's own
session and threads get, never which other threads are touched.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import select
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from vhost_user_cpufreq.protocol.errors import RemoteProtocolError

from ..host.statefile import thread_start_time

__all__ = ["IdentityError", "PeerProcess", "PeerIdentity", "QEMU_BINARIES", "parse_name", "parse_smp",
           "parse_qemu_args", "open_peer", "identify"]

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 lacks the constant
#: What /proc/PID/exe of a front-end on the shared socket may be called.
QEMU_BINARIES = ("qemu-system-*", "qemu-kvm")
#: Names used as metric labels and log prefixes: bounded and printable; 127 fits KubeVirt's domain names
#: (NAMESPACE_NAME, two DNS labels of up to 63).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$")
MAX_VCPUS = 4096


class IdentityError(RemoteProtocolError):
    """The peer on the shared socket is not a VM the service can serve; ``reason`` says why."""


def _split_opts(value: str) -> list[str]:
    """QEMU's option syntax: ``a=b,c=d``; a doubled comma is a literal comma."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    return parts


def parse_name(value: str) -> str:
    """The guest name in a ``-name`` value: ``NAME[,...]`` or ``guest=NAME[,...]``."""
    parts = _split_opts(value)
    name = parts[0]
    for p in parts:
        if p.startswith("guest="):
            name = p[len("guest="):]
    if "=" in name and not name.startswith("guest="):
        # "-name process=x" alone: no guest name given
        name = ""
    return name


def parse_smp(value: str) -> int:
    """The vCPU count QEMU boots with for a ``-smp`` value (ValueError when malformed)."""
    cpus: int | None = None
    topo: dict[str, int] = {}
    for i, p in enumerate(_split_opts(value)):
        if not p:
            continue
        key, eq, val = p.partition("=")
        if not eq:
            if i != 0:
                raise ValueError(f"unexpected {p!r}")
            key, val = "cpus", p
        if not val.isdigit():
            raise ValueError(f"{key} is not a number: {val!r}")
        if key == "cpus":
            cpus = int(val)
        elif key in ("sockets", "dies", "clusters", "modules", "cores", "threads", "books", "drawers"):
            topo[key] = int(val)
        elif key != "maxcpus":
            raise ValueError(f"unknown -smp key {key!r}")
    if cpus is None:
        # QEMU computes cpus as the product of the topology given (missing levels are 1).
        cpus = 1
        for n in topo.values():
            cpus *= n
    if not 1 <= cpus <= MAX_VCPUS:
        raise ValueError(f"{cpus} vCPUs is out of range 1..{MAX_VCPUS}")
    return cpus


def parse_qemu_args(argv: Sequence[str]) -> tuple[str | None, int]:
    """(guest name or None, vCPU count) from a QEMU command line; the last option wins, as in QEMU."""
    name: str | None = None
    smp = "1"
    i = 1
    while i < len(argv):
        arg = argv[i]
        opt, eq, inline = arg.partition("=")
        if opt.startswith("--"):
            opt = opt[1:]
        if opt in ("-name", "-smp"):
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise IdentityError("bad-cmdline", f"{opt} has no value")
            if opt == "-name":
                name = parse_name(value) or None
            else:
                smp = value
        i += 1
    try:
        return name, parse_smp(smp)
    except ValueError as exc:
        raise IdentityError("bad-smp", f"-smp {smp!r}: {exc}") from None


class PeerProcess:
    """A pidfd for the process on the other end of a connection, and its start time."""

    def __init__(self, pid: int, pidfd: int, start_time: int | None, proc: str = "/proc") -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.start_time = start_time
        self.proc = proc

    def exited(self) -> bool:
        """True once the process has exited (its pidfd polls readable)."""
        if self.pidfd < 0:
            return True
        r, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(r)

    def alive(self) -> bool:
        """The process is running and ``pid`` still names it (not exited, same start time)."""
        return not self.exited() and thread_start_time(self.pid, self.proc) == self.start_time

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def open_peer(sock: socket.socket, proc: str = "/proc") -> PeerProcess:
    """The connecting process, pinned by a pidfd (SO_PEERPIDFD, else pidfd_open of SO_PEERCRED's pid)."""
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if pid <= 0:
        raise IdentityError("no-peer-pid", "the peer has no pid in this pid namespace")
    try:
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise IdentityError("peer-gone", f"pid {pid} exited before it was accepted") from None
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise IdentityError("peer-gone", f"SO_PEERPIDFD: {exc.strerror}") from None
        # Older kernel: a pid reused between connect() and here is not detectable (README, failure modes).
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc2:
            raise IdentityError("peer-gone", f"pid {pid}: {exc2.strerror}") from None
    os.set_inheritable(pidfd, False)
    peer = PeerProcess(pid, pidfd, thread_start_time(pid, proc), proc)
    if peer.start_time is None or peer.exited():
        peer.close()
        raise IdentityError("peer-gone", f"pid {pid} exited before it was identified")
    return peer


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    name: str
    vcpus: int
    cgroup: str  # the unified (cgroup v2) path, "" if none
    exe: str  # /proc/PID/exe, or argv[0] where that link is not readable (another user's process)


def identify(peer: PeerProcess, binaries: Sequence[str] = QEMU_BINARIES) -> PeerIdentity:
    """Read the peer's identity from /proc; raise :class:`IdentityError` naming why it cannot be served."""
    base = f"{peer.proc}/{peer.pid}"
    comm: str | None = None
    try:
        with open(f"{base}/cmdline", "rb") as fb:
            raw = fb.read(1 << 20)
        with open(f"{base}/cgroup") as f:
            cgroup_lines = f.read(1 << 16).splitlines()
        try:
            exe = os.readlink(f"{base}/exe")
        except PermissionError:
            exe = ""  # another user's process: no ptrace access (see above)
            with open(f"{base}/comm") as fc:
                comm = fc.read(64).rstrip("\n")
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            raise IdentityError("peer-gone", f"/proc/{peer.pid}: {exc.strerror}") from None
        raise IdentityError("proc-unreadable", f"/proc/{peer.pid}: {exc.strerror}") from None
    # Reads done: they were this process's only if it is still the one the pidfd holds.
    if not peer.alive():
        raise IdentityError("peer-gone", f"pid {peer.pid} exited while it was identified")
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]

    def qemu(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in binaries)

    if comm is None:
        exe_name = os.path.basename(exe.removesuffix(" (deleted)"))
        if not qemu(exe_name):
            raise IdentityError("not-qemu", f"pid {peer.pid} runs {exe_name!r}, not a QEMU system emulator")
    else:
        argv0 = os.path.basename(argv[0]) if argv else ""
        # comm is the exec'd file's name cut to 15 bytes: "qemu-system-x86" still matches "qemu-system-*".
        if not (qemu(comm) and qemu(argv0)):
            raise IdentityError("not-qemu", f"pid {peer.pid} (another user's: /proc/PID/exe unreadable) is "
                                f"{comm!r}, argv[0] {argv0[:80]!r}, not a QEMU system emulator")
        exe = argv[0]
    name, vcpus = parse_qemu_args(argv)
    if name is None:
        raise IdentityError("no-name", f"QEMU pid {peer.pid} has no -name: the VM cannot be told apart")
    if not _NAME.match(name):
        raise IdentityError("bad-name", f"QEMU pid {peer.pid}: -name {name[:80]!r} is not 1-127 of [A-Za-z0-9._-]")
    cgroup = next((ln[3:] for ln in cgroup_lines if ln.startswith("0::")), "")
    return PeerIdentity(name, vcpus, cgroup, exe)
