"""Running a real QEMU against the back-end: for the end-to-end tests and benchmarks.

* :func:`find_qemu` finds a QEMU >= 10.2 that has ``vhost-user-test-device``:
  ``$VUC_QEMU`` (a command prefix such as ``chroot /var/cache/vhost-user-cpufreq/trixie
  qemu-system-x86_64``), else ``.ci/provision-qemu.sh`` when
  ``VUC_REQUIRE_QEMU=1``, else a finished chroot (``$VUC_QEMU_CHROOT`` or the
  default) or a suitable ``qemu-system-x86_64`` on PATH.  It raises
  :class:`QemuUnavailable` with the reason otherwise.
* :func:`qemu_command` is *the* command line (deploy docs quote it).
* :class:`QemuVm` is one QEMU process as an async context manager: its guest
  RAM shared with this process, its qtest and QMP connections, and a teardown
  that always kills it and removes its files.
* :class:`QemuLab` is what one test needs: a directory under the QEMU root's
  ``/tmp``, an in-process back-end :class:`Service` and any number of QEMUs.

A QEMU in a chroot sees ``$CHROOT/tmp/x`` as ``/tmp/x``: every file it opens
(the firmware, the sockets, the RAM file) is created under ``$CHROOT/tmp``
and passed to it by its path inside (:meth:`QemuInstall.guest_path`).  QEMU
connects to the qtest and QMP sockets (we listen, as libqtest does), so there
is no waiting for files to appear.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from qemu.qmp import QMPClient

from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig, VmSlot
from vhost_user_cpufreq.guest.driver import CpufreqDriver
from vhost_user_cpufreq.guest.qtest import QtestTransport
from vhost_user_cpufreq.guest.qtest_client import QtestClient
from vhost_user_cpufreq.guest.shared_ram import SharedRam
from vhost_user_cpufreq.protocol.cpufreq import DEFAULT_DEVICE_ID

from .bios import idle_bios

__all__ = [
    "QemuUnavailable",
    "QemuInstall",
    "find_qemu",
    "qemu_command",
    "QemuVm",
    "QemuLab",
    "QemuGuest",
    "DEFAULT_CHROOT",
    "DEVICE",
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHROOT = "/var/cache/vhost-user-cpufreq/trixie"
DEVICE = "vhost-user-test-device"
MIN_VERSION = (10, 2)
_UNIX_PATH_MAX = 107


class QemuUnavailable(Exception):
    """No usable QEMU; the message says why."""


@dataclass(frozen=True)
class QemuInstall:
    prefix: tuple[str, ...]  # the command that runs qemu-system-x86_64
    root: Path  # the host directory QEMU sees as "/" (a chroot, or /)
    version: str

    def guest_path(self, host_path: str | Path) -> str:
        """The path QEMU must be given for ``host_path`` (which must lie under ``root``)."""
        p = Path(host_path).resolve()
        rel = p.relative_to(self.root)
        return "/" + str(rel) if str(rel) != "." else "/"

    def host_path(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    def tmpdir(self) -> Path:
        return self.root / "tmp"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def check_qemu(prefix: Sequence[str]) -> QemuInstall:
    """Verify that ``prefix`` runs a QEMU >= 10.2 with the device; raises QemuUnavailable."""
    prefix = tuple(prefix)
    if not prefix:
        raise QemuUnavailable("empty QEMU command")
    root = Path("/")
    if os.path.basename(prefix[0]) == "chroot":
        if len(prefix) < 3:
            raise QemuUnavailable(f"cannot read a chroot directory from {shlex.join(prefix)!r}")
        root = Path(prefix[1]).resolve()
        if not root.is_dir():
            raise QemuUnavailable(f"chroot directory {root} does not exist")
        if os.geteuid() != 0:
            raise QemuUnavailable(f"QEMU runs in chroot {root}, which needs root")
    if shutil.which(prefix[0]) is None:
        raise QemuUnavailable(f"{prefix[0]!r} not found")
    try:
        out = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuUnavailable(f"{shlex.join(prefix)} --version: {exc}") from None
    m = re.search(r"QEMU emulator version (\d+(?:\.\d+)+)", out.stdout)
    if out.returncode != 0 or m is None:
        raise QemuUnavailable(f"{shlex.join(prefix)} --version failed: {(out.stderr or out.stdout).strip()[:200]}")
    version = m.group(1)
    if _version_tuple(version) < MIN_VERSION:
        raise QemuUnavailable(f"{shlex.join(prefix)} is QEMU {version}; need >= {'.'.join(map(str, MIN_VERSION))}")
    try:
        dev = subprocess.run([*prefix, "-device", "help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuUnavailable(f"{shlex.join(prefix)} -device help: {exc}") from None
    if DEVICE not in dev.stdout:
        raise QemuUnavailable(f"QEMU {version} at {shlex.join(prefix)} has no {DEVICE}")
    return QemuInstall(prefix, root, version)


@functools.lru_cache(maxsize=None)
def _find_qemu(env_qemu: str | None, require: bool, chroot: str) -> QemuInstall:
    if env_qemu:
        try:
            return check_qemu(shlex.split(env_qemu))
        except QemuUnavailable as exc:
            raise QemuUnavailable(f"VUC_QEMU={env_qemu!r}: {exc}") from None
    if require:
        script = REPO / ".ci" / "provision-qemu.sh"
        try:
            r = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise QemuUnavailable(f"{script} failed: {exc}") from None
        lines = r.stdout.strip().splitlines()
        if r.returncode != 0 or not lines:
            raise QemuUnavailable(f"{script} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        return check_qemu(shlex.split(lines[-1]))
    reasons = []
    if os.path.isfile(os.path.join(chroot, ".vuc-qemu-version")):
        try:
            return check_qemu(("chroot", chroot, "qemu-system-x86_64"))
        except QemuUnavailable as exc:
            reasons.append(str(exc))
    else:
        reasons.append(f"no QEMU chroot at {chroot} (build one with .ci/provision-qemu.sh)")
    host = shutil.which("qemu-system-x86_64")
    if host:
        try:
            return check_qemu((host,))
        except QemuUnavailable as exc:
            reasons.append(str(exc))
    else:
        reasons.append("no qemu-system-x86_64 on PATH")
    raise QemuUnavailable("; ".join(reasons) + "; or set VUC_QEMU to a QEMU >= 10.2 command")


def find_qemu() -> QemuInstall:
    """The QEMU to test with (see module doc); raises :class:`QemuUnavailable`."""
    return _find_qemu(
        os.environ.get("VUC_QEMU") or None,
        os.environ.get("VUC_REQUIRE_QEMU") == "1",
        os.environ.get("VUC_QEMU_CHROOT", DEFAULT_CHROOT),
    )


def qemu_command(
    prefix: Sequence[str] = ("qemu-system-x86_64",),
    *,
    vu_socket: str,
    mem_mib: int = 256,
    mem_path: str | None = None,
    smp: int = 1,
    device_id: int = DEFAULT_DEVICE_ID,
    vq_size: int = 256,
    bios: str | None = None,
    qmp: str | None = None,
    qtest: str | None = None,
    machine: str = "q35",
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line for a VM with the cpufreq device.

    ``vu_socket`` is where the back-end listens (it must listen before QEMU
    starts).  Guest RAM must be shared with the back-end: a memfd
    (``mem_path=None``) or the file ``mem_path``.  ``qmp`` and ``qtest`` are
    QEMU chardev addresses such as ``unix:/tmp/qmp.sock`` (QEMU connects) or
    ``unix:/tmp/qmp.sock,server=on,wait=off`` (QEMU listens).  All paths are
    as QEMU sees them.
    """
    if mem_path is None:
        backend = f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on"
    else:
        backend = f"memory-backend-file,id=mem,size={mem_mib}M,mem-path={mem_path},share=on"
    cmd = [
        *prefix,
        "-machine", f"{machine},memory-backend=mem",
        "-m", f"{mem_mib}M",
        "-object", backend,
        "-smp", str(smp),
        "-nodefaults",
        "-display", "none",
    ]
    if bios is not None:
        cmd += ["-bios", bios]
    cmd += [
        "-chardev", f"socket,id=vuc,path={vu_socket}",
        "-device", f"vhost-user-test-device-pci,chardev=vuc,virtio-id={device_id},num_vqs=1,"
                   f"vq_size={vq_size},config_size=256",
    ]
    if qmp is not None:
        cmd += ["-qmp", qmp]
    if qtest is not None:
        cmd += ["-qtest", qtest, "-qtest-log", "/dev/null"]
    return cmd + list(extra)


def _child_setup() -> None:
    """In the child before exec: die with the test process (no orphaned QEMU), dump no core."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # some tests make QEMU abort on purpose
    except Exception:  # noqa: BLE001 - best effort
        pass


def _listener(path: Path) -> socket.socket:
    if len(str(path)) > _UNIX_PATH_MAX:
        raise ValueError(f"socket path too long for AF_UNIX: {path}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(str(path))
    s.listen(1)
    s.setblocking(False)
    return s


class QemuVm:
    """One QEMU process with the cpufreq device, driven through qtest.

    ``vu_socket`` is the back-end's socket as a host path under the QEMU root.
    ``async with QemuVm(...) as vm`` starts it; then ``await vm.open_transport()``
    gives the virtio-pci driver transport.  ``ram="file"`` puts guest RAM in a
    file under the work directory (``memory-backend-file``), ``"memfd"`` in
    QEMU's own memfd (``memory-backend-memfd``, opened here via /proc/PID/fd).
    """

    def __init__(
        self,
        install: QemuInstall,
        vu_socket: str | Path,
        *,
        smp: int = 1,
        ram: Literal["file", "memfd"] = "file",
        mem_mib: int = 256,
        vq_size: int = 256,
        device_id: int = DEFAULT_DEVICE_ID,
        interrupts: Literal["intx", "poll"] = "intx",
        workdir: Path | None = None,
        timeout: float = 20.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.install = install
        self.vu_socket = Path(vu_socket)
        self.smp = smp
        self.ram_kind = ram
        self.mem_mib = mem_mib
        self.vq_size = vq_size
        self.device_id = device_id
        self.interrupts = interrupts
        self.timeout = timeout
        self.extra_args = tuple(extra_args)  # e.g. ("-name", "web1"): the shared socket identifies VMs by them
        tmp = install.tmpdir()
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="vuc-", dir=tmp))
        else:
            workdir.mkdir(parents=True)
            self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.qtest: QtestClient | None = None
        self.qmp: QMPClient | None = None
        self.ram: SharedRam | None = None
        self.transport: QtestTransport | None = None
        self.command: list[str] = []
        self.log_path = self.workdir / "qemu.log"
        self._output = ""
        self._closed = False

    # -- paths ------------------------------------------------------------------------------
    def guest(self, p: Path) -> str:
        return self.install.guest_path(p)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def output(self) -> str:
        """What QEMU printed (stdout and stderr) so far."""
        if self._output:
            return self._output
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> "QemuVm":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> "QemuVm":
        wd = self.workdir
        (wd / "idle.bin").write_bytes(idle_bios())
        qtest_l = _listener(wd / "qtest.sock")
        qmp_l = _listener(wd / "qmp.sock")
        try:
            self.command = qemu_command(
                self.install.prefix,
                vu_socket=self.guest(self.vu_socket),
                mem_mib=self.mem_mib,
                mem_path=self.guest(wd / "guest-ram") if self.ram_kind == "file" else None,
                smp=self.smp,
                device_id=self.device_id,
                vq_size=self.vq_size,
                bios=self.guest(wd / "idle.bin"),
                qmp=f"unix:{self.guest(wd / 'qmp.sock')}",
                qtest=f"unix:{self.guest(wd / 'qtest.sock')}",
                extra=self.extra_args,
            )
            with open(self.log_path, "wb") as logf:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup,
                )
            qtest_sock = await self._accept(qtest_l, "qtest")
            qmp_sock = await self._accept(qmp_l, "QMP")
        finally:
            qtest_l.close()
            qmp_l.close()
            for n in ("qtest.sock", "qmp.sock"):
                (wd / n).unlink(missing_ok=True)
        self.qtest = await QtestClient.adopt(qtest_sock)
        self.qmp = QMPClient(f"vuc-{wd.name}")
        # QMP commands run in QEMU's main loop: once this answers, the machine
        # (RAM, the device and its vhost-user connection) exists.
        await asyncio.wait_for(self.qmp.connect(qmp_sock), self.timeout)
        status = await asyncio.wait_for(self.qmp.execute("query-status"), self.timeout)
        if status.get("status") != "running":  # type: ignore[union-attr]
            raise RuntimeError(f"QEMU is {status}, not running")
        size = self.mem_mib << 20
        if self.ram_kind == "file":
            self.ram = SharedRam.open_file(str(wd / "guest-ram"), size)
        else:
            self.ram = SharedRam.open_memfd_of(self.pid, size)
        return self

    async def _accept(self, listener: socket.socket, what: str) -> socket.socket:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({accept, exited}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        if accept in done:
            exited.cancel()
            sock, _ = accept.result()
            sock.setblocking(False)
            return sock
        accept.cancel()
        exited.cancel()
        if exited in done:
            raise RuntimeError(f"QEMU exited with {self.proc.returncode} before connecting {what}:\n"
                               f"{shlex.join(self.command)}\n{self.output()}")
        raise TimeoutError(f"QEMU did not connect {what} within {self.timeout}s:\n{self.output()}")

    async def open_transport(self, **kw: object) -> QtestTransport:
        """The virtio-pci transport to the device (found, BARs assigned, reset, ACKNOWLEDGE|DRIVER)."""
        assert self.qtest is not None and self.ram is not None, "QEMU not started"
        if self.transport is None:
            kw.setdefault("device_id", self.device_id)
            kw.setdefault("interrupts", self.interrupts)
            self.transport = await QtestTransport.open(self.qtest, self.ram, **kw)  # type: ignore[arg-type]
        return self.transport

    async def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def quit(self, timeout: float = 10.0) -> int:
        """QMP ``quit``; returns QEMU's exit status."""
        assert self.qmp is not None
        try:
            await asyncio.wait_for(self.qmp.execute("quit"), timeout)
        except Exception:  # noqa: BLE001 - QEMU may hang up before or after replying
            pass
        return await self.wait(timeout)

    async def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.wait(timeout)

    async def close(self) -> None:
        """Tear everything down (idempotent; safe after any failure)."""
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            await self.transport.close()
        if self.qtest is not None:
            await self.qtest.close()
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            except Exception:  # noqa: BLE001 - the peer may be dead already
                pass
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                pass
        self._output = self.output()
        if self.ram is not None:
            self.ram.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- per-test helpers -------------------------------------------------------------------------------


@dataclass
class QemuGuest:
    """A running QEMU plus the driver model probed through it."""

    vm: QemuVm
    transport: QtestTransport
    driver: CpufreqDriver

    async def remove_driver(self) -> None:
        await self.driver.remove()


class QemuLab:
    """One test's world: a back-end Service in this event loop and the QEMUs it serves.

    Everything lives in a fresh directory under the QEMU root's /tmp and goes
    away in :meth:`close`, which also kills every QEMU still running.
    """

    def __init__(self, install: QemuInstall) -> None:
        self.install = install
        self.dir = Path(tempfile.mkdtemp(prefix="vuc-", dir=install.tmpdir()))
        self.source = StaticSource(PIXEL6)
        self.policy = RecordingPolicy()
        self.service = Service(self.source, self.policy)
        self.vms: list[QemuVm] = []
        self.guests: list[QemuGuest] = []
        self._n = 0

    def socket_path(self, name: str) -> Path:
        return self.dir / f"{name}.sock"

    async def add_vm(self, name: str, vcpu_host_domain: tuple[int, ...] = (0, 0, 1, 2),
                     notify_interval: float = 0.01, shared_page: bool = False) -> VmSlot:
        """Serve VM ``name`` (the back-end listens on ``socket_path(name)``)."""
        return await self.service.add_vm(
            VmConfig(name, str(self.socket_path(name)), vcpu_host_domain, notify_interval=notify_interval,
                     shared_page=shared_page))

    async def start_qemu(self, name: str, **kw: object) -> QemuVm:
        """Start a QEMU connected to VM ``name``'s socket (``smp`` defaults to its vCPU count)."""
        slot = self.service.vms.get(name)
        if slot is not None:
            kw.setdefault("smp", len(slot.config.vcpu_host_domain))
        self._n += 1
        vm = QemuVm(self.install, self.socket_path(name), workdir=self.dir / f"q{self._n}", **kw)  # type: ignore[arg-type]
        self.vms.append(vm)
        await vm.start()
        return vm

    async def start_guest(self, name: str, *, qemu: dict[str, object] | None = None,
                          **driver_kw: object) -> QemuGuest:
        """Start QEMU for VM ``name`` and probe the driver model through it."""
        vm = await self.start_qemu(name, **(qemu or {}))
        return await self.probe(vm, **driver_kw)

    async def probe(self, vm: QemuVm, **driver_kw: object) -> QemuGuest:
        t = await vm.open_transport()
        # Kick whenever the device asks: tests wait for a record's effect without ticking.
        driver_kw.setdefault("lazy_records", 0)
        driver = CpufreqDriver(t, **driver_kw)  # type: ignore[arg-type]
        await driver.probe()
        g = QemuGuest(vm, t, driver)
        self.guests.append(g)
        return g

    async def close(self) -> None:
        for g in self.guests:
            try:
                await g.driver.remove()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        for vm in self.vms:
            await vm.close()
        await self.service.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def describe_skip(exc: QemuUnavailable) -> str:
    return f"needs QEMU >= 10.2 with {DEVICE}: {exc}"


if __name__ == "__main__":  # pragma: no cover - manual check
    try:
        inst = find_qemu()
    except QemuUnavailable as e:
        print("unavailable:", e)
        sys.exit(1)
    print(inst)
    print(shlex.join(qemu_command(inst.prefix, vu_socket="/tmp/vm0.sock")))
