"""identify.py: QEMU's -name and -smp as QEMU reads them, and the peer's process pinned by a pidfd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from vhost_user_cpufreq.backend.service.identify import (
    IdentityError,
    identify,
    open_peer,
    parse_name,
    parse_qemu_args,
    parse_smp,
)


@pytest.mark.parametrize("value, name", [
    ("web1", "web1"),
    ("guest=web1,debug-threads=on", "web1"),        # libvirt's form
    ("web1,process=qemu-web1", "web1"),
    ("process=qemu-x", ""),                          # no guest name at all
    ("a,,b", "a,b"),                                 # a doubled comma is a literal comma
])
def test_name_is_read_in_every_form_qemu_accepts(value: str, name: str) -> None:
    assert parse_name(value) == name


@pytest.mark.parametrize("value, vcpus", [
    ("4", 4),
    ("cpus=3", 3),
    ("2,sockets=2,dies=1,clusters=1,cores=1,threads=1", 2),  # libvirt's form
    ("sockets=2,cores=3,threads=2", 12),                      # cpus from the topology, as QEMU computes it
    ("cpus=2,maxcpus=8", 2),                                  # hot-pluggable vCPUs not present at start
])
def test_smp_gives_the_vcpus_qemu_starts_with(value: str, vcpus: int) -> None:
    assert parse_smp(value) == vcpus


@pytest.mark.parametrize("value", ["0", "x", "cpus=5000", "cpus=2,bogus=1", "2,3"])
def test_malformed_smp_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_smp(value)


def test_command_line_last_option_wins_and_missing_values_are_refused() -> None:
    argv = ["qemu-system-x86_64", "-name", "a", "-smp", "2", "--name=guest=b", "-smp=cpus=4"]
    assert parse_qemu_args(argv) == ("b", 4)
    assert parse_qemu_args(["qemu"]) == (None, 1)
    with pytest.raises(IdentityError) as ei:
        parse_qemu_args(["qemu", "-smp", "many"])
    assert ei.value.reason == "bad-smp"
    with pytest.raises(IdentityError) as ei:
        parse_qemu_args(["qemu", "-name"])
    assert ei.value.reason == "bad-cmdline"


def _pair(path: str, argv_tail: list[str], *, argv0: str = sys.executable,
          comm: str = "") -> tuple[socket.socket, "subprocess.Popen[bytes]"]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    rename = f"open('/proc/self/comm', 'w').write({comm!r}); " if comm else ""
    code = (f"import socket,sys; {rename}s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "sys.stdout.write('c'); sys.stdout.flush(); sys.stdin.read()")
    # PYTHONHOME: Python finds its library from argv[0], which may be made up here.
    child = subprocess.Popen([argv0, "-c", code, path, *argv_tail], executable=sys.executable,
                             env={**os.environ, "PYTHONHOME": sys.base_prefix}, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.read(1) == b"c"
    conn, _ = srv.accept()
    srv.close()
    return conn, child


def test_a_live_peer_is_identified_from_its_own_proc_entries() -> None:
    path = f"/tmp/vuc-id-{os.getpid()}.sock"
    try:
        conn, child = _pair(path, ["-name", "guest=fake1", "-smp", "3"])
    finally:
        os.unlink(path)
    try:
        peer = open_peer(conn)
        assert peer.pid == child.pid and peer.alive()
        # A process that is not a QEMU is refused by what it runs, whatever its arguments say.
        with pytest.raises(IdentityError) as ei:
            identify(peer)
        assert ei.value.reason == "not-qemu"
        ident = identify(peer, binaries=("python3*",))
        assert (ident.name, ident.vcpus) == ("fake1", 3)
        with open(f"/proc/{child.pid}/cgroup") as f:
            assert ident.cgroup in f.read()
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
        # Exited and reaped: its pid may name another process from now on; the pidfd knows.
        assert peer.exited() and not peer.alive()
        with pytest.raises(IdentityError) as ei:
            identify(peer, binaries=("python3*",))
        assert ei.value.reason == "peer-gone"
        peer.close()
    finally:
        conn.close()
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_peer_that_exited_before_accept_is_refused() -> None:
    path = f"/tmp/vuc-id2-{os.getpid()}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        code = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, path, "-name", "x"], check=True)
        conn, _ = srv.accept()  # the connection waited in the backlog; its process is gone (and reaped)
    finally:
        srv.close()
        os.unlink(path)
    with conn, pytest.raises(IdentityError) as ei:
        open_peer(conn)
    assert ei.value.reason == "peer-gone"


def test_another_users_qemu_whose_exe_link_is_refused_is_known_by_its_comm_and_argv0(monkeypatch) -> None:
    """/proc/PID/exe needs ptrace access, which the service (its own user, CAP_SYS_NICE only) lacks for
    libvirt's QEMU: the kernel's comm and argv[0] must then both name a QEMU."""
    real_readlink = os.readlink

    def no_ptrace_access(path: str) -> str:
        if path.endswith("/exe"):
            raise PermissionError(13, "Permission denied")
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", no_ptrace_access)
    for argv0, comm, served in (("/usr/bin/qemu-system-x86_64", "qemu-system-x86", True),  # as exec sets them
                                ("/usr/bin/qemu-system-x86_64", "", False),  # comm: python3, whatever argv[0] says
                                ("python3", "qemu-system-x86", False)):  # a renamed thread is not enough
        path = f"/tmp/vuc-id3-{os.getpid()}.sock"
        try:
            conn, child = _pair(path, ["-name", "guest=lv1,debug-threads=on", "-smp", "2"], argv0=argv0, comm=comm)
        finally:
            os.unlink(path)
        try:
            peer = open_peer(conn)
            if served:
                ident = identify(peer)
                assert (ident.name, ident.vcpus, ident.exe) == ("lv1", 2, argv0)
            else:
                with pytest.raises(IdentityError) as ei:
                    identify(peer)
                assert ei.value.reason == "not-qemu" and "exe unreadable" in str(ei.value), ei.value
            peer.close()
        finally:
            conn.close()
            child.kill()
            child.wait()


def test_kubevirts_longest_domain_names_are_served_and_one_more_character_is_not() -> None:
    """KubeVirt names the domain NAMESPACE_NAME: two DNS labels of up to 63, 127 characters in all."""
    longest = "n" * 63 + "_" + "v" * 63
    for name, ok in ((longest, True), (longest + "x", False)):
        path = f"/tmp/vuc-id4-{os.getpid()}.sock"
        try:
            conn, child = _pair(path, ["-name", f"guest={name},debug-threads=on"])
        finally:
            os.unlink(path)
        try:
            peer = open_peer(conn)
            if ok:
                assert identify(peer, binaries=("python*",)).name == name
            else:
                with pytest.raises(IdentityError) as ei:
                    identify(peer, binaries=("python*",))
                assert ei.value.reason == "bad-name"
            peer.close()
        finally:
            conn.close()
            child.kill()
            child.wait()
