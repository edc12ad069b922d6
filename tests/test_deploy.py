"""The files in deploy/: each checked by the tool that consumes it, where one is installable.

* systemd units: ``systemd-analyze verify`` (and ``security --offline``) on
  copies whose ExecStart names this venv's console script, since
  /usr/bin/vhost-user-cpufreq does not exist here; broken copies must fail.
  The unit's seccomp settings (SystemCallFilter=@system-service,
  MemoryDenyWriteExecute=, RestrictAddressFamilies=, LockPersonality=) are
  rebuilt with libseccomp around a socket-activated service doing real work.
* the configuration: loads, and a daemon serves it on a generated host.
* the vhost-user descriptor: the fields of QEMU's vhost-user.json schema.
* the libvirt domain: well-formed, the right QEMU arguments, and libvirt's own
  schema (``virt-xml-validate``).
* the QEMU command line: ``sh -n``, and run against a real QEMU >= 10.2.
* the DaemonSet: parsed with PyYAML, its embedded configuration loaded.

A missing tool skips its test with the reason, or fails it under
``VUC_REQUIRE_TOOLS=1`` (Debian: systemd, libvirt-clients, libxml2-utils,
python3-seccomp; PyPI: pyyaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from vhost_user_cpufreq.backend.service.config import load_config, parse_config
from vhost_user_cpufreq.backend.service.daemon import Daemon

from .helpers import short_tmpdir, unavailable, until
from .qemu.fixture import QemuInstall
from .sysfs_tree import HostSpec, make_sysfs_tree
from .test_systemd import run_activation_scenario, service_argv

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SERVICE = DEPLOY / "systemd" / "vhost-user-cpufreq.service"
SOCKET = DEPLOY / "systemd" / "vhost-user-cpufreq@.socket"
CONFIG = DEPLOY / "config.toml"
DESCRIPTOR = DEPLOY / "vhost-user" / "50-vhost-user-cpufreq.json"
DOMAIN = DEPLOY / "libvirt" / "domain-snippet.xml"
QEMU_SH = DEPLOY / "qemu" / "command-line.sh"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
HOST = HostSpec.big_little([(4, 300000, 1800000, 256), (4, 500000, 2800000, 1024)])


def require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable("VUC_REQUIRE_TOOLS", f"{name} not installed ({why})")
    return path


def require_module(name: str, why: str) -> Any:
    if os.environ.get("VUC_REQUIRE_TOOLS") == "1":
        try:
            return __import__(name)
        except ImportError:
            pytest.fail(f"VUC_REQUIRE_TOOLS=1 but Python module {name} is missing ({why})", pytrace=False)
    return pytest.importorskip(name, reason=f"{why}: pip install {name}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir("vuc-dep-") as d:
        yield d


def unit_settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order (systemd allows a key more than once)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


# -- systemd -----------------------------------------------------------------------------


def console_script() -> str:
    exe = shutil.which("vhost-user-cpufreq", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no vhost-user-cpufreq console script next to this Python (pip install -e .)")
    return exe


def installable_units(dest: Path, service_text: str | None = None, socket_text: str | None = None) -> Path:
    """The units as they would be installed, ExecStart pointing at this venv's console script."""
    text = service_text if service_text is not None else SERVICE.read_text()
    (dest / SERVICE.name).write_text(text.replace("/usr/bin/vhost-user-cpufreq", console_script()))
    (dest / SOCKET.name).write_text(socket_text if socket_text is not None else SOCKET.read_text())
    return dest


def verify(unit_dir: Path, *units: str) -> tuple[int, list[str]]:
    """``systemd-analyze verify``: exit status and every line that concerns these units.

    Parse warnings ("Unknown key ...", "Failed to parse ...") exit 0, so the
    lines matter as much as the status."""
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    r = subprocess.run([analyze, "verify", "--man=no", "--recursive-errors=no", *(str(unit_dir / u) for u in units)],
                       capture_output=True, text=True, timeout=120, cwd=unit_dir)
    ours = [line for line in (r.stdout + r.stderr).splitlines()
            if str(unit_dir) in line or "vhost-user-cpufreq" in line or any(u in line for u in units)]
    return r.returncode, ours


UNITS = ("vhost-user-cpufreq.service", "vhost-user-cpufreq@web1.socket")


#: keys newer than some systemd still in use, with the version that knows them
NEWER_KEYS = {"FileDescriptorStorePreserve": 254}


def _systemd_version() -> int:
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"systemd (\d+)", out)
    assert m is not None, out
    return int(m.group(1))


def test_units_verify_cleanly(workdir: Path) -> None:
    rc, lines = verify(installable_units(workdir), *UNITS)
    # An older systemd ignores (and names) a key it does not know yet; nothing else may appear.
    # The test host's systemd (tests/test_testhost_fdstore.py) verifies the unit with every key known.
    version = _systemd_version()
    too_new = [f"Unknown key '{k}'" for k, v in NEWER_KEYS.items() if version < v]
    lines = [line for line in lines if not any(t in line for t in too_new)]
    assert (rc if not too_new else 0, lines) == (0, [])


@pytest.mark.parametrize("where,old,new,expect", [
    ("service", "Type=notify", "Type=notfy", "Failed to parse service type"),
    ("service", "WatchdogSec=30", "WatchdgSec=30", "Unknown key"),
    ("service", "SystemCallFilter=@system-service", "SystemCallFilter=@system-servce", "Unknown system call group"),
    ("service", "ExecStart=/usr/bin/vhost-user-cpufreq", "ExecStart=/nonexistent/vhost-user-cpufreq",
     "is not executable"),
    ("socket", "ListenStream=/run/vhost-user-cpufreq/%i.sock\n", "", "has no Listen setting"),
    ("socket", "Service=vhost-user-cpufreq.service", "Service=vhost-user-cpufreq-typo.service", "not loaded"),
], ids=["bad type", "misspelt key", "unknown syscall group", "missing binary", "no listen", "wrong service"])
def test_broken_units_are_caught(workdir: Path, where: str, old: str, new: str, expect: str) -> None:
    service, socket = SERVICE.read_text(), SOCKET.read_text()
    if where == "service":
        assert old in service
        service = service.replace(old, new)
    else:
        assert old in socket
        socket = socket.replace(old, new)
    rc, lines = verify(installable_units(workdir, service, socket), *UNITS)
    assert rc != 0 or lines, "systemd-analyze accepted a broken unit"
    assert any(expect in line for line in lines), lines


def test_service_is_well_confined(workdir: Path) -> None:
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    installable_units(workdir)
    r = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(workdir / SERVICE.name)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout  # "OK" band; 2.0 when written


def test_unit_settings_fit_together() -> None:
    svc, sock = unit_settings(SERVICE), unit_settings(SOCKET)
    s = {k: v[-1] for (sec, k), v in svc.items() if sec == "Service"}
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and s["WatchdogSec"] == "30"
    assert s["ExecStart"] == "/usr/bin/vhost-user-cpufreq serve --config /etc/vhost-user-cpufreq/config.toml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["CapabilityBoundingSet"] == s["AmbientCapabilities"] == "CAP_SYS_NICE"
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["ProtectControlGroups"] == "no"
    assert s["MemoryDenyWriteExecute"] == "yes" and s["SystemCallFilter"] == "@system-service"
    assert s["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"]
    assert s["RuntimeDirectory"] == "vhost-user-cpufreq" and s["RuntimeDirectoryMode"] == "0750"
    # The socket units keep their files in the runtime directory: it must outlive a stop.
    assert s["RuntimeDirectoryPreserve"] == "yes"
    # Crash survival (service/fdstore.py): the store holds every VM's fds, across a restart and a stop.
    assert int(s["FileDescriptorStoreMax"]) >= 1024 and s["FileDescriptorStorePreserve"] == "yes"
    assert s["Restart"] == "on-failure"

    k = {k: v[-1] for (sec, k), v in sock.items() if sec == "Socket"}
    assert k["Service"] == SERVICE.name  # every instance feeds the one service
    assert k["FileDescriptorName"] == "%i"  # ... named after the VM
    assert (k["SocketUser"], k["SocketGroup"]) == (s["User"], s["Group"])
    cfg = load_config(CONFIG)
    for name, vm in cfg.vms.items():
        # The instance name is the [vm.NAME]; the socket unit and the file must agree on the path.
        assert k["ListenStream"].replace("%i", name) == vm.socket
        assert vm.socket.startswith(f"/run/{s['RuntimeDirectory']}/")
        assert vm.socket_mode == int(k["SocketMode"], 8) == 0o660
    assert cfg.control_socket and cfg.control_socket.startswith(f"/run/{s['RuntimeDirectory']}/")


def syscall_set(group: str, seen: set[str] | None = None) -> set[str]:
    """Every system call in a ``systemd-analyze syscall-filter`` group, nested groups expanded."""
    analyze = require_tool("systemd-analyze", "apt-get install systemd")
    seen = set() if seen is None else seen
    text = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    out: set[str] = set()
    for line in text.splitlines()[1:]:
        line = line.strip()
        if line.startswith("@") and line not in seen:
            seen.add(line)
            out |= syscall_set(line, seen)
        elif line and not line.startswith(("#", "@")):
            out.add(line)
    return out


def test_system_service_filter_allows_pinning_and_clamps() -> None:
    assert {"sched_setaffinity", "sched_getaffinity", "sched_setattr", "sched_getattr"} <= syscall_set(
        "@system-service")


# The unit's seccomp settings as systemd 252 builds them, around an exec: one
# filter per setting, as systemd loads them (the strictest verdict wins).
# Violations kill (SIGSYS) where the unit would return an errno: stricter, so
# that nothing can fail quietly here.
_SANDBOX = r"""
import errno, os, socket, subprocess, sys
import seccomp

def expand(group, seen):
    out = set()
    text = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True)
    for line in text.stdout.splitlines()[1:]:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if line not in seen:
                seen.add(line)
                out |= expand(line, seen)
        else:
            out.add(line)
    return out

# SystemCallFilter=@system-service (systemd always lets these through as well).
calls = seccomp.SyscallFilter(seccomp.KILL_PROCESS)
for name in sorted(expand("@system-service", set()) | {"execve", "exit", "exit_group", "rt_sigreturn"}):
    try:
        calls.add_rule(seccomp.ALLOW, name)
    except Exception:
        pass  # not a system call of this architecture

rest = seccomp.SyscallFilter(seccomp.ALLOW)
W, X, SHM_EXEC = 0x2, 0x4, 0o100000
# MemoryDenyWriteExecute=yes: no W+X mapping, no mprotect to X, no SHM_EXEC.
rest.add_rule(seccomp.KILL_PROCESS, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
rest.add_rule(seccomp.KILL_PROCESS, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
rest.add_rule(seccomp.KILL_PROCESS, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
rest.add_rule(seccomp.KILL_PROCESS, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
# RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6: any other family is refused.
allowed = {socket.AF_UNIX, socket.AF_NETLINK, socket.AF_INET, socket.AF_INET6}
for fam in range(64):
    if fam not in allowed:
        rest.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, fam))
rest.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GE, 64))
# LockPersonality=yes: no change of execution domain (queries refused too: stricter).
rest.add_rule(seccomp.ERRNO(errno.EPERM), "personality", seccomp.Arg(0, seccomp.NE, 0))

for f in (rest, calls):  # the allow list last: it does not allow seccomp() itself
    f.set_attr(seccomp.Attr.CTL_NNP, 1)  # NoNewPrivileges=yes
    f.load()
os.execvp(sys.argv[1], sys.argv[1:])
"""


def sandbox_argv(workdir: Path) -> list[str]:
    system_python = "/usr/bin/python3"
    require_tool("systemd-analyze", "apt-get install systemd")
    probe = subprocess.run([system_python, "-c", "import seccomp"], capture_output=True) if os.path.exists(
        system_python) else None
    if probe is None or probe.returncode != 0:
        unavailable("VUC_REQUIRE_TOOLS", "no libseccomp binding for /usr/bin/python3 (apt-get install python3-seccomp)")
    script = workdir / "sandbox.py"
    script.write_text(_SANDBOX)
    return [system_python, str(script)]


def test_sandbox_emulation_bites(workdir: Path) -> None:
    """The emulated filter is not a no-op: a W+X mapping kills, other address families are refused."""
    wrap = sandbox_argv(workdir)
    wx = subprocess.run([*wrap, sys.executable, "-c",
                         "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
                        capture_output=True, timeout=60)
    assert wx.returncode == -31  # SIGSYS
    families = subprocess.run([*wrap, sys.executable, "-c", _FAMILIES], capture_output=True, text=True, timeout=60)
    assert families.returncode == 0, families.stderr
    assert json.loads(families.stdout) == {
        "AF_UNIX": "ok", "AF_INET": "ok", "AF_INET6": "ok", "AF_NETLINK": "ok",
        "AF_PACKET": "EAFNOSUPPORT", "AF_BLUETOOTH": "EAFNOSUPPORT", "AF_VSOCK": "EAFNOSUPPORT"}


_FAMILIES = """
import errno, json, socket
out = {}
families = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17, "AF_BLUETOOTH": 31,
            "AF_VSOCK": 40}
for fam, number in families.items():
    try:
        socket.socket(number, socket.SOCK_RAW if fam in ("AF_NETLINK", "AF_PACKET") else socket.SOCK_STREAM).close()
        out[fam] = "ok"
    except OSError as exc:
        out[fam] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def test_service_runs_under_the_units_seccomp_policy(workdir: Path) -> None:
    """Socket activation, a guest over shared memory, reload, watchdog, stop: all inside the filter."""
    wrap = sandbox_argv(workdir)
    sysfs = make_sysfs_tree(workdir / "sys", HOST)
    messages = run_activation_scenario(workdir, sysfs, wrapper=wrap)
    assert messages[-1].startswith("STOPPING=1")
    for args in (["check", "--json", "--sysfs-root", str(sysfs)], ["serve", "--print-capabilities"]):
        r = subprocess.run([*wrap, *service_argv(*args)], capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 1) and json.loads(r.stdout), r.stderr


# -- configuration -------------------------------------------------------------------------


def test_example_config_loads() -> None:
    cfg = load_config(CONFIG)
    assert set(cfg.vms) == {"web1", "db1"}
    # CPUs 0 and 1: the example serves as it is on a 2-CPU machine (issue 22)
    assert cfg.vms["db1"].pinning == (0, 1) and cfg.vms["db1"].limits.floor == 256
    assert cfg.vms["db1"].limits.uclamp_max == 768 and cfg.vms["web1"].limits.uclamp_max == 1024
    assert cfg.state_file == "/run/vhost-user-cpufreq/state.json"


async def test_example_config_is_served(workdir: Path) -> None:
    """The example as is, but with its paths moved under a test directory and a generated host."""
    data = tomllib.loads(CONFIG.read_text())
    data["service"].update(sysfs_root=str(make_sysfs_tree(workdir / "sys", HOST)), dry_run=True)
    for key in ("control_socket", "state_file", "shared_socket", "state_dir"):
        data["service"][key] = str(workdir / Path(data["service"][key]).name)
    for vm in data["vm"].values():
        vm["socket"] = str(workdir / Path(vm["socket"]).name)
    d = Daemon(parse_config(data, str(CONFIG)))
    await d.start()
    try:
        st = d.status()
        assert [c["pcpu"] for c in st["vms"]["db1"]["vcpus"]] == [0, 1]
        assert [c["uclamp_max"] for c in st["vms"]["db1"]["vcpus"]] == [768, 768]
        assert len(st["vms"]["web1"]["vcpus"]) == 4
        assert (workdir / "web1.sock").stat().st_mode & 0o777 == 0o660
        assert (workdir / "vhost.sock").stat().st_mode & 0o777 == 0o660
        assert list(d.config.classes) == ["db", "default"]
    finally:
        await d.stop()


# -- vhost-user backend descriptor -------------------------------------------------------------


def test_vhost_user_descriptor() -> None:
    desc = json.loads(DESCRIPTOR.read_text())
    # VhostUserBackend in QEMU's docs/interop/vhost-user.json: these members and no others.
    assert set(desc) <= {"description", "type", "binary", "tags"}
    assert {"description", "type", "binary"} <= set(desc)
    assert isinstance(desc["description"], str) and desc["description"]
    assert all(isinstance(t, str) for t in desc.get("tags", []))
    # The binary is what the unit runs, and its type is what it reports itself.
    assert desc["binary"] == unit_settings(SERVICE)[("Service", "ExecStart")][0].split()[0]
    caps = subprocess.run(service_argv("serve", "--print-capabilities"), capture_output=True, text=True, timeout=60)
    assert json.loads(caps.stdout)["type"] == desc["type"]
    assert re.match(r"^\d\d-", DESCRIPTOR.name)  # sorted by a two-digit prefix


# -- libvirt -----------------------------------------------------------------------------------


#: The shape of the domain KubeVirt's virt-launcher hands its onDefineDomain hooks (made up here, not copied).
KUBEVIRT_DOMAIN = """<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
  <name>default_web-1</name>
  <memory unit="b">2147483648</memory>
  <os><type arch="x86_64" machine="pc-q35-rhel9.6.0">hvm</type><smbios mode="sysinfo"></smbios></os>
  <sysinfo type="smbios"><system><entry name="uuid">0b7f3e4e-3d55-4d5e-9a34-5c3c2d8f6a10</entry></system></sysinfo>
  <devices>
    <interface type="ethernet">
      <model type="virtio-non-transitional"></model><alias name="ua-default"></alias>
    </interface>
    <channel type="unix"><target name="org.qemu.guest_agent.0" type="virtio"></target></channel>
    <controller type="usb" index="0" model="none"></controller>
    <controller type="virtio-serial" index="0" model="virtio-non-transitional"></controller>
    <disk device="disk" type="file">
      <source file="/var/run/kubevirt-ephemeral-disks/disk-data/root/disk.qcow2"></source>
      <target bus="virtio" dev="vda"></target>
      <driver cache="none" error_policy="stop" name="qemu" type="qcow2" discard="unmap"></driver>
      <alias name="ua-root"></alias>
    </disk>
    <memballoon model="virtio-non-transitional"><stats period="10"></stats></memballoon>
  </devices>
  <metadata>
    <kubevirt xmlns="http://kubevirt.io"><uid>5e0b1d6c-9f3e-4b0e-8f0a-1b2c3d4e5f60</uid></kubevirt>
  </metadata>
  <features><acpi></acpi></features>
  <cpu mode="host-model"><topology sockets="1" cores="2" threads="1"></topology></cpu>
  <vcpu placement="static">2</vcpu>
</domain>
"""


def _cpufreq_domain() -> Any:
    """deploy/libvirt/cpufreq-domain.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cpufreq_domain", DEPLOY / "libvirt" / "cpufreq-domain.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpufreq_parts(root: ET.Element) -> list[str]:
    """What the device adds to a domain, canonical: memoryBacking, the bridge, the QEMU arguments."""
    bridge = [c for c in root.iterfind("devices/controller") if c.find("alias[@name='ua-vucpufreq']") is not None]
    parts = [root.find("memoryBacking"), *bridge, root.find(f"{{{QEMU_NS}}}commandline")]
    return [ET.canonicalize(ET.tostring(p, encoding="unicode"), strip_text=True) for p in parts if p is not None]


def test_libvirt_domain_has_the_device_and_shared_memory() -> None:
    root = ET.parse(DOMAIN).getroot()
    assert root.tag == "domain"
    mb = root.find("memoryBacking")
    assert mb is not None
    assert mb.find("source").get("type") == "memfd"  # type: ignore[union-attr]
    assert mb.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    args = [a.get("value", "") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args[0::2] == ["-chardev", "-device"]
    backend, *opts = args[1].split(",")
    chardev = dict(kv.split("=", 1) for kv in opts)
    assert backend == "socket"
    device = json.loads(args[3])
    assert device == {"driver": "vhost-user-test-device-pci", "id": "vucpufreq", "chardev": chardev["id"],
                      "virtio-id": 38, "num_vqs": 1, "vq_size": 256, "config_size": 256,
                      "bus": "ua-vucpufreq", "addr": "0x1f"}
    # Its bus is a bridge libvirt creates (so it knows the slot is taken), on q35's root bus.
    (bridge,) = [c for c in root.iterfind("devices/controller") if c.find("alias[@name='ua-vucpufreq']") is not None]
    assert (bridge.get("type"), bridge.get("model")) == ("pci", "dmi-to-pci-bridge")
    # The same arguments for every VM: the shared socket; the VM is told by <name> and <vcpu>.
    cfg = load_config(CONFIG)
    assert chardev["path"] == cfg.shared_socket
    # Its name must not be a [vm.NAME] of the example (that would be refused: name-in-use).
    assert root.findtext("name") not in cfg.vms


def test_cpufreq_domain_adds_exactly_the_snippets_parts_to_any_domain_once() -> None:
    mod = _cpufreq_domain()
    snippet = ET.parse(DOMAIN).getroot()
    # The snippet without its cpufreq parts, given to the script: the same parts come back.
    base = ET.parse(DOMAIN).getroot()
    for tag in ("memoryBacking", f"{{{QEMU_NS}}}commandline"):
        base.remove(base.find(tag))  # type: ignore[arg-type]
    devices = base.find("devices")
    assert devices is not None
    devices.remove(next(c for c in devices.iterfind("controller") if c.find("alias") is not None))
    added = mod.add_device(ET.tostring(base, encoding="unicode"))
    assert _cpufreq_parts(ET.fromstring(added)) == _cpufreq_parts(snippet)
    assert mod.add_device(added) == added  # once
    # The pc machine gets a pci-bridge; the index is the next free one; hugepages keep their own backing;
    # an anonymous source becomes memfd; NUMA cells share.
    pc = ET.fromstring(mod.add_device(
        "<domain type='kvm'><name>x</name><os><type machine='pc-i440fx-9.2'>hvm</type></os>"
        "<memoryBacking><hugepages/><access mode='private'/></memoryBacking>"
        "<cpu><numa><cell id='0' cpus='0' memory='1' memAccess='private'/></numa></cpu>"
        "<devices><controller type='pci' index='0' model='pci-root'/>"
        "<controller type='pci' index='4' model='pci-bridge'/></devices></domain>"))
    (bridge,) = [c for c in pc.iterfind("devices/controller") if c.find("alias") is not None]
    assert (bridge.get("model"), bridge.get("index")) == ("pci-bridge", "5")
    assert pc.find("memoryBacking/source") is None
    assert pc.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    assert pc.find("cpu/numa/cell").get("memAccess") == "shared"  # type: ignore[union-attr]
    anon = ET.fromstring(mod.add_device("<domain><os><type machine='q35'>hvm</type></os>"
                                        "<memoryBacking><source type='anonymous'/></memoryBacking></domain>"))
    assert anon.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    for bad in ("<domain", "<network/>", "<domain><devices><controller type='pci' index='x'/></devices></domain>"):
        with pytest.raises(mod.DomainError):
            mod.add_device(bad)


def test_cpufreq_domain_runs_as_kubevirts_ondefinedomain_and_as_a_filter() -> None:
    script = DEPLOY / "libvirt" / "cpufreq-domain.py"
    assert os.access(script, os.X_OK)
    xml = "<domain type='kvm'><name>default_vm1</name><os><type machine='pc-q35-rhel9.6.0'>hvm</type></os></domain>"
    # The sidecar-shim's call: the VMI as JSON, the domain as an argument; the new domain on stdout.
    shim = subprocess.run([sys.executable, str(script), "--vmi", '{"kind": "VirtualMachineInstance"}', "--domain", xml],
                          capture_output=True, text=True, timeout=60)
    piped = subprocess.run([sys.executable, str(script), "--socket", "/var/run/vuc/vhost.sock"], input=xml,
                           capture_output=True, text=True, timeout=60)
    assert shim.returncode == 0 and piped.returncode == 0, shim.stderr + piped.stderr
    assert "path=/run/vhost-user-cpufreq/vhost.sock" in shim.stdout
    assert "path=/var/run/vuc/vhost.sock" in piped.stdout
    bad = subprocess.run([sys.executable, str(script), "--domain", "<vmi/>"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "not a libvirt domain" in bad.stderr


def test_libvirt_domain_validates_against_libvirts_schema(workdir: Path) -> None:
    tool = require_tool("virt-xml-validate", "apt-get install libvirt-clients libxml2-utils")
    require_tool("xmllint", "apt-get install libxml2-utils")
    ok = subprocess.run([tool, str(DOMAIN), "domain"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # What the script makes of a minimal domain of each machine type, too.
    mod = _cpufreq_domain()
    for machine in ("q35", "pc"):
        out = workdir / f"{machine}.xml"
        out.write_text(mod.add_device(f"<domain type='kvm'><name>v</name><memory>65536</memory>"
                                      f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os></domain>"))
        r = subprocess.run([tool, str(out), "domain"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    # A domain as virt-launcher defines it (its shape: KubeVirt's metadata in its own namespace, user aliases,
    # the qemu namespace declared, no PCI controller yet): valid after the hook, KubeVirt's metadata kept.
    kv = workdir / "kubevirt.xml"
    kv.write_text(mod.add_device(KUBEVIRT_DOMAIN))
    r = subprocess.run([tool, str(kv), "domain"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = ET.parse(kv).getroot()
    kv_ns = "{http://kubevirt.io}"
    assert out.findtext("name") == "default_web-1"
    assert out.findtext(f"metadata/{kv_ns}kubevirt/{kv_ns}uid") == "5e0b1d6c-9f3e-4b0e-8f0a-1b2c3d4e5f60"
    assert [c.get("index") for c in out.iterfind("devices/controller[@type='pci']")] == ["1"]
    broken = workdir / "broken.xml"
    broken.write_text(DOMAIN.read_text().replace("<access mode='shared'/>", "<access mode='sharing'/>"))
    bad = subprocess.run([tool, str(broken), "domain"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


# -- QEMU command line -----------------------------------------------------------------------


def test_qemu_script_is_valid_sh() -> None:
    r = subprocess.run(["sh", "-n", str(QEMU_SH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.access(QEMU_SH, os.X_OK)
    text = QEMU_SH.read_text()
    assert "QEMU >= 10.2" in text
    assert "vhost-user-test-device-pci,chardev=vucpufreq,virtio-id=38,num_vqs=1,vq_size=256,config_size=256" in text
    assert "memory-backend-memfd,id=mem,size=$MEM,share=on" in text and "q35,memory-backend=mem" in text


@contextlib.asynccontextmanager
async def script_qemu(qemu_install: QemuInstall) -> AsyncIterator[tuple[Daemon, asyncio.subprocess.Process]]:
    """A daemon serving VM web1 (2 vCPUs, dry run), and the unchanged script running a QEMU against it."""
    d = Path(tempfile.mkdtemp(prefix="vuc-cl-", dir=qemu_install.tmpdir()))
    daemon: Daemon | None = None
    qemu: asyncio.subprocess.Process | None = None
    try:
        sysfs = make_sysfs_tree(d / "sys", HOST)
        (d / "config.toml").write_text(
            f'[service]\nsysfs_root = "{sysfs}"\ndry_run = true\n'
            f'[vm.web1]\nsocket = "{d / "web1.sock"}"\nvcpus = 2\nclamp = "thread"\n')
        daemon = Daemon(load_config(d / "config.toml"))
        await daemon.start()
        env = dict(os.environ, QEMU=shlex.join(qemu_install.prefix), MEM="256M", SMP="2", ACCEL="tcg",
                   VUC_SOCKET=qemu_install.guest_path(d / "web1.sock"))
        qemu = await asyncio.create_subprocess_exec(str(QEMU_SH), "web1", "-nodefaults", "-display", "none", "-S",
                                                    env=env, stderr=subprocess.PIPE)
        yield daemon, qemu
    finally:
        if qemu is not None:
            if qemu.returncode is None:
                qemu.terminate()
            await asyncio.wait_for(qemu.communicate(), 30)
        if daemon is not None:
            await daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.qemu
async def test_qemu_script_connects_to_the_service(qemu_install: QemuInstall) -> None:
    async with script_qemu(qemu_install) as (daemon, qemu):
        conn = await daemon.service.wait_connected("web1", timeout=30)
        assert conn.peer_pid == qemu.pid  # the script exec's QEMU: the same process
        # Realize finishes the handshake (features, owner) and leaves QEMU running, waiting (-S).
        await until(lambda: conn.session.owner and conn.session.protocol_features != 0, timeout=10,
                    what="the realize handshake")
        await asyncio.sleep(0.3)
        assert qemu.returncode is None and daemon.service.vms["web1"].connection is conn


@pytest.mark.qemu
async def test_vcpu_threads_of_a_qemu_started_by_the_script_are_found(qemu_install: QemuInstall) -> None:
    async with script_qemu(qemu_install) as (daemon, qemu):
        await daemon.service.wait_connected("web1", timeout=30)
        await until(lambda: all(c["thread"] for c in daemon.status()["vms"]["web1"]["vcpus"]), timeout=3,
                    what="vCPU threads of the QEMU")
        for c in daemon.status()["vms"]["web1"]["vcpus"]:
            with open(f"/proc/{qemu.pid}/task/{c['thread']}/comm") as f:
                assert f.read().strip() == f"CPU {c['vcpu']}/TCG"


# -- Kubernetes ------------------------------------------------------------------------------


def test_daemonset() -> None:
    yaml = require_module("yaml", "parses deploy/kubernetes/daemonset.yaml")
    docs = {d["kind"]: d for d in yaml.safe_load_all(DAEMONSET.read_text())}
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    ns = docs["Namespace"]["metadata"]["name"]
    cm, ds = docs["ConfigMap"], docs["DaemonSet"]
    assert cm["metadata"]["namespace"] == ds["metadata"]["namespace"] == ns
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"  # a restart would cost the node's VMs their device
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostPID"] is True

    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_NICE"]}
    assert sc["allowPrivilegeEscalation"] is False and "privileged" not in sc

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} == set(volumes)
    host = {volumes[m["name"]]["hostPath"]["path"]: p for p, m in mounts.items() if "hostPath" in volumes[m["name"]]}
    assert host == {"/run/vhost-user-cpufreq": "/run/vhost-user-cpufreq", "/sys": "/host/sys",
                    "/run/vhost-user-cpufreq/vms": "/run/vhost-user-cpufreq/vms"}
    assert mounts["/host/sys"]["readOnly"] is True
    (config_mount,) = [p for p, m in mounts.items() if "configMap" in volumes[m["name"]]]
    assert volumes[mounts[config_mount]["name"]]["configMap"]["name"] == cm["metadata"]["name"]

    # The embedded configuration loads, and its paths are where the pod mounts them.
    cfg = parse_config(tomllib.loads(cm["data"]["config.toml"]), "daemonset.yaml:config.toml")
    assert c["command"] == ["vhost-user-cpufreq", "serve", "--config", f"{config_mount}/config.toml"]
    assert cfg.sysfs_root == "/host/sys"
    assert cfg.vms == {} and list(cfg.classes) == ["default"]  # no VM listed: every VM on the one socket
    for path in [cfg.control_socket, cfg.state_file, cfg.shared_socket]:
        assert path is not None and path.startswith("/run/vhost-user-cpufreq/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == ["vhost-user-cpufreq", "status", "--control-socket",
                                               cfg.control_socket]
    assert cfg.metrics_address is not None
    assert c["ports"][0]["containerPort"] == int(cfg.metrics_address.rpartition(":")[2])
    # QEMU in virt-launcher (uid/gid 107) may connect; the daemon can hand it the socket.
    assert cfg.allowed_uids == (107,)
    assert cfg.shared_socket_group == 107 and cfg.shared_socket_mode == 0o660
    assert 107 in spec["securityContext"]["supplementalGroups"]


def test_kubevirt_hook_runs_the_libvirt_script_and_mounts_only_the_shared_socket_into_virt_launcher() -> None:
    yaml = require_module("yaml", "parses deploy/kubernetes/*.yaml")
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kubevirt.yaml").read_text())}
    pv, pvc, cm = docs["PersistentVolume"], docs["PersistentVolumeClaim"], docs["ConfigMap"]
    # The hook is the libvirt script itself, not a copy that could drift.
    assert cm["data"]["onDefineDomain"] == (DEPLOY / "libvirt" / "cpufreq-domain.py").read_text()
    # The PV is the node's directory the DaemonSet's service listens in; only this namespace's claim binds it.
    ds_cm = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d["kind"] == "ConfigMap"][0]
    cfg = parse_config(tomllib.loads(ds_cm["data"]["config.toml"]), "daemonset.yaml:config.toml")
    assert cfg.shared_socket is not None
    host_dir, sock = os.path.split(cfg.shared_socket)
    assert pv["spec"]["hostPath"]["path"] == host_dir
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert cm["metadata"]["namespace"] == pvc["metadata"]["namespace"]
    # The example VM's annotation: KubeVirt's sidecar-shim running that ConfigMap's key as onDefineDomain,
    # and the claim mounted in the compute container where the script's default socket path lies.
    vm = yaml.safe_load((DEPLOY / "kubernetes" / "examples" / "vm.yaml").read_text())
    (hook,) = json.loads(vm["spec"]["template"]["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
    assert "image" not in hook  # KubeVirt's own sidecar-shim, of the cluster's KubeVirt release
    assert hook["configMap"] == {"name": cm["metadata"]["name"], "key": "onDefineDomain",
                                 "hookPath": "/usr/bin/onDefineDomain"}
    assert hook["pvc"]["name"] == pvc["metadata"]["name"]
    assert vm["metadata"]["namespace"] == pvc["metadata"]["namespace"]
    script = _cpufreq_domain()
    assert os.path.join(hook["pvc"]["sharedComputePath"], sock) == script.SOCKET


def test_the_runtime_directory_is_made_by_hand_as_systemd_makes_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # README's `serve --socket-path /run/vhost-user-cpufreq/vm0.sock` on a machine without the unit.
    from vhost_user_cpufreq.backend import defaults

    run = tmp_path / "run-vuc"
    monkeypatch.setattr(defaults, "RUNTIME_DIR", str(run))
    defaults.make_runtime_dir(str(tmp_path / "elsewhere" / "a.sock"))
    assert not run.exists() and not (tmp_path / "elsewhere").exists()  # only the service's own directory
    defaults.make_runtime_dir(str(run / "vm0.sock"))
    assert run.is_dir() and run.stat().st_mode & 0o777 == 0o755


#: The Kubernetes releases the manifests must be valid for: the oldest still maintained here, and the newest.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    yaml = require_module("yaml", "parses deploy/kubernetes/*.yaml")
    kv = require_module("kubernetes_validate", "the Kubernetes API schemas")
    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert DAEMONSET in manifests
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            for version in K8S_VERSIONS:
                # strict: a field the API does not know (a typo) is an error, as kubectl --validate=strict has it
                kv.validate(doc, version, strict=True)
    # The check bites: a misspelt field and a wrong type are refused.
    ds = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d["kind"] == "DaemonSet"][0]
    typo = json.loads(json.dumps(ds))
    typo["spec"]["template"]["spec"]["hostPid"] = True
    wrong = json.loads(json.dumps(ds))
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9860"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S_VERSIONS[-1], strict=True)
