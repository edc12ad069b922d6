"""The outer back-end: this project's service on the CI machine, serving the test host's cpufreq device.

The test host's QEMU gets the paravirtual cpufreq device (``vhost-user-test-device-pci``,
virtio id 38) connected to a real ``vhost-user-cpufreq serve`` here.  Its host
model is a generated sysfs tree of two frequency domains (a little CPU and a
big one), so the test host's ``virtio_cpufreq.ko`` registers two cpufreq
policies with real OPP ranges, driven by the test host's schedutil; the
service inside the test host reads that tree as its host.  The outer service
runs with ``dry_run``: it must not pin or clamp this machine's QEMU threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vhost_user_cpufreq.backend.service.daemon import query_status

from ..sysfs_tree import HostSpec, make_sysfs_tree
from .host import CHROOT, TestHostError, in_chroot

__all__ = ["OuterBackend", "OUTER_HOST", "build_module"]

#: cpu0: little (300 MHz - 1.8 GHz, capacity 256), cpu1: big (500 MHz - 2.8 GHz, capacity 1024).
OUTER_HOST = HostSpec.big_little([(1, 300000, 1800000, 256), (1, 500000, 2800000, 1024)])
REPO = Path(__file__).resolve().parents[2]


def build_module() -> Path:
    """virtio_cpufreq.ko built against the test host's kernel (guest-driver-model/linux/build.sh)."""
    res = subprocess.run(["bash", str(REPO / "guest-driver-model/linux/build.sh")], capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise TestHostError(f"building virtio_cpufreq.ko failed: {res.stderr[-2000:]}")
    kv = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return CHROOT / kv["MODULE"].lstrip("/")


class OuterBackend:
    """``vhost-user-cpufreq serve`` for the VM "testhost", listening where the chroot's QEMU can reach it."""

    def __init__(self) -> None:
        (CHROOT / "tmp").mkdir(exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="vuc-outer-", dir=CHROOT / "tmp"))
        make_sysfs_tree(self.dir / "sys", OUTER_HOST)
        self.socket = self.dir / "vm.sock"
        cfg = self.dir / "config.toml"
        cfg.write_text("\n".join([
            "[service]", f'sysfs_root = "{self.dir / "sys"}"', f'control_socket = "{self.dir / "control.sock"}"',
            "dry_run = true", "sample_period = 0.02",
            "[vm.testhost]", f'socket = "{self.socket}"', "vcpus = 2", "pinning = [0, 1]", 'clamp = "none"']) + "\n")
        exe = str(Path(sys.executable).with_name("vhost-user-cpufreq"))
        self.proc = subprocess.Popen([exe, "serve", "--config", str(cfg)], stderr=open(self.dir / "service.log", "wb"))
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TestHostError(f"the outer back-end did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def qemu_args(self) -> tuple[str, ...]:
        """The cpufreq device, connected to this back-end, for the test host's QEMU."""
        return ("-chardev", f"socket,id=vuc,path={in_chroot(self.socket)}",
                "-device", "vhost-user-test-device-pci,chardev=vuc,virtio-id=38,num_vqs=1,vq_size=256,config_size=256")

    def status(self) -> dict:  # type: ignore[type-arg]
        return query_status(str(self.dir / "control.sock"), timeout=5)

    def vm(self) -> dict:  # type: ignore[type-arg]
        return self.status()["vms"]["testhost"]  # type: ignore[no-any-return]

    def log(self) -> str:
        return (self.dir / "service.log").read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __repr__(self) -> str:
        return f"OuterBackend({json.dumps(str(self.socket))})"
