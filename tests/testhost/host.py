"""The Linux test host: a real kernel with util clamps, cgroup v2, systemd as PID 1, booted under QEMU.

Theory of operation: ``.ci/provision-testhost.sh`` builds a Debian trixie root
file system inside the QEMU chroot.  :meth:`TestHost.start` installs this
checkout into it (a wheel built here, installed with the root's own pip by
``chroot``, at native speed), installs the agent (``agent.py``) as a systemd
service, builds the C data plane into the root's cache directory, and boots
the trixie-backports kernel under QEMU (TCG: this machine's KVM cannot run
the kernel's decompressor) with the root shared by the chroot's
``virtiofsd``.  The tests then run commands in it through the agent, over a
virtio-serial port: :meth:`TestHost.run` and :meth:`TestHost.python` return
the exit code and output.

Every wait is bounded: a test host that does not boot within
``BOOT_TIMEOUT`` seconds, whose QEMU or virtiofsd exits, or whose command
outlives its timeout raises :class:`TestHostError` with the console's last
lines.  Nothing here needs the tests' event loop: the API is synchronous.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TestHost", "TestHostError", "Result", "CHROOT", "ROOT_IN_CHROOT", "SRC", "in_chroot", "provisioned"]

REPO = Path(__file__).resolve().parents[2]
CHROOT = Path(os.environ.get("VUC_QEMU_CHROOT", "/var/cache/vhost-user-cpufreq/trixie"))
ROOT_IN_CHROOT = "/var/cache/vuc-testhost/root"
ROOT = CHROOT / ROOT_IN_CHROOT.lstrip("/")
VENV = "/opt/vuc"
SRC = "/opt/vuc-src"  # pyproject.toml and tests/ of this checkout, inside the test host
BOOT_TIMEOUT = 300.0
CPU_MODEL = "qemu64,vendor=GenuineIntel,family=6,model=15"  # constant_tsc: see tests/test_linux_guest.py
AGENT_UNIT = """[Unit]
Description=vhost-user-cpufreq test agent (tests/testhost/agent.py)
After=dev-virtio\\x2dports-vuc.agent.device
Requires=dev-virtio\\x2dports-vuc.agent.device

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/vuc-agent.py
# What runs from here finds the C data plane built into the root once, not again under TCG.
Environment=VUC_CACHE_DIR=/var/cache/vhost-user-cpufreq
Restart=always

[Install]
WantedBy=multi-user.target
"""


def in_chroot(p: Path) -> str:
    """A path under the QEMU chroot as QEMU and virtiofsd, which run in it, see it."""
    return "/" + str(p.relative_to(CHROOT))


class TestHostError(RuntimeError):
    """The test host could not be provisioned, booted or reached; the message says what is missing."""


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str
    timed_out: bool

    def check(self) -> "Result":
        if self.rc != 0:
            raise AssertionError(f"exit {self.rc}{' (timed out)' if self.timed_out else ''}\n"
                                 f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
        return self


def provisioned() -> str | None:
    """None when the test host can boot here, else what is missing."""
    if not (CHROOT / ".vuc-qemu-version").is_file():
        return f"no QEMU chroot at {CHROOT} (.ci/provision-qemu.sh)"
    if not (CHROOT / ".vuc-guest-kernel").is_file():
        return f"no guest kernel in {CHROOT} (.ci/provision-guest.sh)"
    if not (ROOT / ".vuc-testhost").is_file():
        return f"no test host root at {ROOT} (.ci/provision-testhost.sh)"
    if os.geteuid() != 0:
        return "booting the test host needs root (chroot, mount namespaces)"
    return None


class TestHost:
    """One booted test host.  ``with TestHost() as th: th.run([...])``."""

    __test__ = False  # a fixture, not a test class

    def __init__(self, *, memory_mib: int = 1024, cpus: int = 2, qemu_args: tuple[str, ...] = (),
                 cmdline: str = "", shared_root: Path | None = None, module: Path | None = None) -> None:
        #: virtio_cpufreq.ko to load once booted (the cpufreq device must be among ``qemu_args``)
        self.module = module
        self.dataplane = ""  # what the installed package runs in the root (set by _install)
        #: another root to boot (a directory inside the chroot), as is: nothing is installed into it
        self.shared_root = shared_root
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.qemu_args = qemu_args
        self.cmdline = cmdline
        self.kver = ""
        self._work: Path | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        self._lock_fd: int | None = None

    # -- paths --------------------------------------------------------------------------------
    @property
    def work(self) -> Path:
        """This boot's directory, on the host (inside the chroot's /tmp)."""
        assert self._work is not None
        return self._work

    @property
    def _root_in_chroot(self) -> str:
        return ROOT_IN_CHROOT if self.shared_root is None else in_chroot(self.shared_root)

    @property
    def console(self) -> str:
        try:
            return (self.work / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    # -- life ---------------------------------------------------------------------------------
    def __enter__(self) -> "TestHost":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        missing = provisioned()
        if missing:
            raise TestHostError(missing)
        self.kver = (CHROOT / ".vuc-guest-kernel").read_text().strip()
        (CHROOT / "tmp").mkdir(exist_ok=True)
        self._work = Path(tempfile.mkdtemp(prefix="vuc-testhost-", dir=CHROOT / "tmp"))
        try:
            if self.shared_root is None:
                self._lock_root()
                self._install()
            self._boot()
            if self.shared_root is None:
                self.require_features()
            if self.module is not None:
                self._load_module()
        except BaseException:
            self.close()
            raise

    def _load_module(self) -> None:
        r = self.run(["insmod", f"{VENV}/virtio_cpufreq.ko"], timeout=60)
        if r.rc != 0:
            raise TestHostError(f"insmod virtio_cpufreq.ko failed: {r.stderr}")
        if self.sh("test -d /sys/devices/system/cpu/cpufreq/policy0", timeout=30).rc != 0:
            dmesg = self.run(["dmesg"]).stdout[-3000:]
            raise TestHostError(f"virtio_cpufreq.ko loaded but registered no cpufreq policy:\n{dmesg}")

    def _lock_root(self, timeout: float = 600) -> None:
        """One test host on the root at a time (it is a directory, not a copy); a bounded wait."""
        self._lock_fd = os.open(ROOT.parent / ".boot.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TestHostError(f"another test host kept {ROOT} for {timeout:.0f} s") from None
                time.sleep(0.5)

    def require_features(self) -> None:
        """What the tests rely on, named when missing: util clamps, cgroup v2 with cpu, systemd as PID 1."""
        probes = {
            "per-task util clamps (CONFIG_UCLAMP_TASK: /proc/sys/kernel/sched_util_clamp_max)":
                "test -e /proc/sys/kernel/sched_util_clamp_max",
            "the unified cgroup v2 hierarchy at /sys/fs/cgroup": "test $(stat -fc %T /sys/fs/cgroup) = cgroup2fs",
            "the cpu controller in cgroup v2": "grep -qw cpu /sys/fs/cgroup/cgroup.controllers",
            "systemd as PID 1": "test $(cat /proc/1/comm) = systemd",
        }
        missing = [what for what, probe in probes.items() if self.sh(probe, timeout=30).rc != 0]
        if missing:
            raise TestHostError(f"the test host's kernel {self.kver} lacks " + "; ".join(missing))

    def _install(self) -> None:
        """This checkout, the agent and its unit, and the C data plane, into the root."""
        wheels = ROOT / "tmp" / "vuc-wheel"
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
              str(REPO)], "building this checkout's wheel")
        whl = next(wheels.glob("*.whl"))
        _run(["chroot", str(ROOT), f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall",
              "--disable-pip-version-check", f"/tmp/vuc-wheel/{whl.name}"], "installing it in the test host's root")
        shutil.rmtree(wheels, ignore_errors=True)
        # The tests too, for what runs inside (``cd /opt/vuc-src && python -m pytest ...``).
        src = ROOT / "opt/vuc-src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        shutil.copy(REPO / "pyproject.toml", src / "pyproject.toml")
        for d in ("tests", "deploy"):
            shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(Path(__file__).with_name("agent.py"), ROOT / "usr/local/lib/vuc-agent.py")
        if self.module is not None:
            shutil.copy(self.module, ROOT / VENV.lstrip("/") / "virtio_cpufreq.ko")
        unit = ROOT / "etc/systemd/system/vuc-agent.service"
        unit.write_text(AGENT_UNIT)
        wants = ROOT / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "vuc-agent.service"
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/vuc-agent.service")
        # The data plane the root runs: the wheel's prebuilt extension (abi3, built above against this
        # host's Python headers, so the root's newer Python loads it), or, should it not load there, a
        # run-time build into the service's CacheDirectory (the root has gcc), made here once rather than
        # under TCG at every start.  Anything but C fails the set-up.
        cache = ROOT / "var/cache/vhost-user-cpufreq"
        cache.mkdir(parents=True, exist_ok=True)
        self.dataplane = _run(["unshare", "--mount", "sh", "-c",
                               f"mount -t proc proc {ROOT}/proc && exec chroot {ROOT} env "
                               f"VUC_CACHE_DIR=/var/cache/vhost-user-cpufreq "
                               f"{VENV}/bin/python -m vhost_user_cpufreq.backend.dataplane.cdrain"],
                              "loading the C data plane in the root").strip()
        for f in cache.iterdir():
            f.chmod(0o755)  # readable by the service's own user, whose CacheDirectory this becomes

    def _boot(self) -> None:
        w = in_chroot(self.work)
        vfs_log = open(self.work / "virtiofsd.log", "wb")
        self._procs.append(subprocess.Popen(
            ["unshare", "--mount", "sh", "-c",
             f"mount -t proc proc {CHROOT}/proc && exec chroot {CHROOT} /usr/libexec/virtiofsd "
             f"--socket-path={w}/vfs.sock --shared-dir={self._root_in_chroot} --cache=auto --sandbox=none --xattr"],
            stdout=vfs_log, stderr=subprocess.STDOUT))
        self._wait_for(lambda: (self.work / "vfs.sock").exists(), 20, "virtiofsd's socket")
        cmdline = (f"console=ttyS0 root=root rootfstype=virtiofs rw init=/lib/systemd/systemd loglevel=4 panic=-1 "
                   "cpufreq.default_governor=schedutil "
                   f"systemd.show_status=error {self.cmdline}")
        qemu = [
            "chroot", str(CHROOT), "qemu-system-x86_64", "-accel", "tcg", "-cpu", CPU_MODEL,
            "-machine", "q35,memory-backend=mem", "-m", f"{self.memory_mib}M", "-smp", str(self.cpus),
            "-object", f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on",
            "-kernel", f"/usr/lib/modules/{self.kver}/vmlinuz", "-append", cmdline,
            "-chardev", f"socket,id=vfs,path={w}/vfs.sock", "-device", "vhost-user-fs-pci,chardev=vfs,tag=root",
            "-chardev", f"socket,id=agent,path={w}/agent.sock,server=on,wait=off",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=agent,name=vuc.agent",
            "-display", "none", "-no-reboot", "-serial", f"file:{w}/console.log", "-monitor", "none",
            *self.qemu_args,
        ]
        qemu_log = open(self.work / "qemu.log", "wb")
        self._procs.append(subprocess.Popen(qemu, stdout=qemu_log, stderr=subprocess.STDOUT,
                                            preexec_fn=_no_core_dumps))
        self._wait_for(lambda: (self.work / "agent.sock").exists(), 20, "QEMU's agent socket")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.work / "agent.sock"))
        self._sock = s
        # What we write before the agent opens its port is lost: ping until one is answered.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            self._alive_or_raise("while booting")
            if time.monotonic() > deadline:
                raise TestHostError(f"the test host did not answer within {BOOT_TIMEOUT:.0f} s; console:\n"
                                    f"{self.console_tail()}")
            try:
                rid = self._send(["true"], 10)
            except OSError:
                self._channel_closed()
            reply = self._read_reply(rid, min(2.0, deadline - time.monotonic()), booting=True)
            if reply is not None:
                break
        self.booted_after = BOOT_TIMEOUT - (deadline - time.monotonic())

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._send(["systemctl", "poweroff"], 5)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        for p in reversed(self._procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        if self._work is not None and os.environ.get("VUC_TESTHOST_KEEP") != "1":
            shutil.rmtree(self._work, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- commands -----------------------------------------------------------------------------
    def run(self, argv: list[str], *, timeout: float = 60, stdin: str = "", env: dict[str, str] | None = None,
            cwd: str | None = None) -> Result:
        """Run ``argv`` in the test host; its exit code and output.  Never waits past ``timeout`` + 30 s."""
        if self._sock is None:
            raise TestHostError("the test host is not running")
        rid = self._send(argv, timeout, stdin=stdin, env=env or {}, cwd=cwd)
        reply = self._read_reply(rid, timeout + 30)
        if reply is None:
            raise TestHostError(f"no answer to {argv} within {timeout + 30:.0f} s; console:\n{self.console_tail()}")
        return Result(reply["rc"], reply["stdout"], reply["stderr"], reply["timed_out"])

    def sh(self, script: str, **kw: object) -> Result:
        return self.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]

    def python(self, code: str, **kw: object) -> Result:
        """``code`` run by the test host's Python, with this checkout installed."""
        return self.run([f"{VENV}/bin/python", "-c", code], **kw)  # type: ignore[arg-type]

    def clock_offset(self, samples: int = 40) -> tuple[float, float]:
        """The test host's ``CLOCK_MONOTONIC`` minus this machine's, and its uncertainty (seconds).

        From the agent's clock answers: the reading is taken between sending
        and receiving, so the offset is known to half the round trip; the
        sample with the shortest round trip wins.
        """
        assert self._sock is not None
        best: tuple[float, float] | None = None
        for _ in range(samples):
            rid = self._next_id
            self._next_id += 1
            t0 = time.monotonic()
            self._sock.sendall(json.dumps({"id": rid, "clock": True}).encode() + b"\n")
            reply = self._read_reply(rid, 10)
            t1 = time.monotonic()
            if reply is None or "monotonic" not in reply:
                raise TestHostError(f"the agent gave no clock reading: {reply}")
            half = (t1 - t0) / 2
            if best is None or half < best[1]:
                best = (reply["monotonic"] - (t0 + half), half)
        assert best is not None
        return best

    def _send(self, argv: list[str], timeout: float, **extra: object) -> int:
        assert self._sock is not None
        rid = self._next_id
        self._next_id += 1
        self._sock.sendall(json.dumps({"id": rid, "argv": argv, "timeout": timeout, **extra}).encode() + b"\n")
        return rid

    def _read_reply(self, rid: int, timeout: float, *, booting: bool = False) -> dict | None:  # type: ignore[type-arg]
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                reply = json.loads(line)
                if reply.get("id") == rid:
                    return reply  # type: ignore[no-any-return]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._alive_or_raise("while waiting for the agent" if booting else "while a command ran")
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self._channel_closed()
            self._buf += chunk

    def _channel_closed(self) -> None:
        """QEMU going away closes the channel: say that, with why, rather than a socket error."""
        for p in self._procs[1:]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._alive_or_raise("and closed the agent's channel")
        raise TestHostError(f"the agent's channel closed; console:\n{self.console_tail()}")

    # -- waiting ------------------------------------------------------------------------------
    def _alive_or_raise(self, when: str) -> None:
        for p, what in reversed(list(zip(self._procs, ("virtiofsd", "QEMU")))):  # QEMU's end explains virtiofsd's
            if p.poll() is not None:
                log = (self.work / ("virtiofsd.log" if what == "virtiofsd" else "qemu.log")).read_text(errors="replace")
                raise TestHostError(f"{what} exited with {p.returncode} {when}:\n{log[-2000:]}\nconsole:\n"
                                    f"{self.console_tail()}")

    def _wait_for(self, cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            self._alive_or_raise(f"before {what} appeared")
            if time.monotonic() > deadline:
                raise TestHostError(f"no {what} within {timeout:.0f} s")
            time.sleep(0.05)


def _run(argv: list[str], what: str) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise TestHostError(f"{what}: timed out") from None
    if res.returncode != 0:
        raise TestHostError(f"{what} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def _no_core_dumps() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
