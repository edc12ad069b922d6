"""One hostile front-end against the real service binary: it loses its own session, nobody else anything.

Each test starts ``vhost-user-cpufreq serve`` with two VMs.  A hostile front-end
(``tests/attacks.py``, a process of its own) attacks through one VM's socket
while this test plays the other VM, whose records must keep being served
during and after the attack.  Afterwards the service is alive, the attacker's
session closed with the expected counted reason (or kept, for an attack that
only hurts the attacker), and the service holds no fd or mapping more than it
did before the attacker came.  Every attack runs on each data-plane path the
service has: the kick lane, the C drain with kicks on the event loop, and the
pure-Python drain (guest memory is guarded on all three, see backend/dataplane/guard.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest

from vhost_user_cpufreq.backend.service.daemon import query_status

from .helpers import require_c_dataplane, short_tmpdir, start_guest, stop_process, unavailable, until

ROOT = Path(__file__).resolve().parent.parent
PATHS = {
    "lane": {},
    "event-loop": {"VUC_KICK_LANE": "0"},
    "python-drain": {"VUC_DATAPLANE": "python"},
}


def _exe() -> str:
    return str(Path(sys.executable).with_name("vhost-user-cpufreq"))


class Host:
    """The real service serving two VMs, ``attacker`` and ``victim``, in a directory of its own."""

    def __init__(self, d: Path, env: dict[str, str]) -> None:
        self.d = d
        cfg = d / "config.toml"
        lines = ["[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"']
        for name in ("attacker", "victim"):
            lines += [f"[vm.{name}]", f'socket = "{d}/{name}.sock"', "vcpus = 2", "pinning = [0, 1]",
                      'clamp = "none"']
        cfg.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([_exe(), "serve", "--config", str(cfg)], env={**os.environ, **env},
                                     stderr=open(d / "service.log", "wb"))

    def sock(self, name: str) -> str:
        return str(self.d / f"{name}.sock")

    def status(self) -> dict:  # type: ignore[type-arg]
        return query_status(str(self.d / "control.sock"), timeout=2)

    def counters(self, vm: str) -> dict[str, int]:
        return self.status()["vms"][vm]["counters"]  # type: ignore[no-any-return]

    def fds(self) -> dict[str, str]:
        out = {}
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                out[fd] = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except FileNotFoundError:
                pass
        return out

    async def settled_fds(self) -> dict[str, str]:
        """fds once the control connection of the last status query is surely closed."""
        await asyncio.sleep(0.2)
        return self.fds()

    def guest_mappings(self) -> int:
        with open(f"/proc/{self.proc.pid}/maps") as f:
            return sum("vuc-guest-ram" in line or "vuc-tmpfs" in line for line in f)

    def log(self) -> str:
        return (self.d / "service.log").read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def _answers(host: Host) -> bool:
    try:
        return "vms" in host.status()
    except (OSError, ValueError):
        return False


@pytest.fixture(params=list(PATHS))
async def host(request: pytest.FixtureRequest) -> AsyncIterator[Host]:
    if request.param != "python-drain":
        require_c_dataplane()
    from vhost_user_cpufreq.backend.dataplane.guard import guard

    if guard() is None:
        unavailable("VUC_REQUIRE_TOOLS", "the guest-memory guard (backend/dataplane/guard.c) needs a C compiler")
    with short_tmpdir("vuc-br-") as d:
        h = Host(d, PATHS[request.param])
        try:
            await until(lambda: _answers(h) or not h.alive(), timeout=20, what="service ready")
            assert h.alive(), h.log()
            yield h
        finally:
            stop_process(h.proc)


class Victim:
    """The well-behaved VM: sends a record and waits until the service has counted it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.n = 0

    async def __aenter__(self) -> "Victim":
        self.g = await start_guest(self.host.sock("victim"), util_threshold=1)
        await self.served()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.g.close()

    async def served(self, within: float = 5.0) -> None:
        before = self.host.counters("victim").get("records", 0)
        self.n += 1
        self.g.driver.set_util(self.n % 2, 100 + self.n % 900)
        self.g.driver.flush()
        await until(lambda: self.host.counters("victim").get("records", 0) > before, timeout=within,
                    what="the victim's record served")


class Attacker:
    def __init__(self, host: Host, mode: str, *, prefix: tuple[str, ...] = (), seconds: float = 3) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.attacks", mode, host.sock("attacker")],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "ATTACK_SECONDS": str(seconds)})

    async def delivered(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 20)
        if line.strip() != b"attacked":
            self.stop()
            assert self.proc.stderr is not None
            raise AssertionError(f"the attack was not delivered: {line!r}\n{self.proc.stderr.read().decode()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def _attack(host: Host, mode: str, *, closed_by: str | None, prefix: tuple[str, ...] = ()) -> Attacker:
    """Run ``mode`` against the attacker VM while the victim is served; check what became of both."""
    fds0, maps0 = await host.settled_fds(), host.guest_mappings()
    async with Victim(host) as victim:
        fds_with_victim = await host.settled_fds()
        attacker = Attacker(host, mode, prefix=prefix)
        try:
            await attacker.delivered()
            for _ in range(5):
                await victim.served()
            if closed_by is not None:
                await until(lambda: host.counters("attacker").get(f"sessions_closed:{closed_by}", 0) == 1,
                            timeout=10, what=lambda: f"the attacker's session closed with {closed_by}: "
                            f"{host.counters('attacker')}\n{host.log()}")
                assert host.status()["vms"]["attacker"]["connected"] is False
            assert host.alive(), host.log()
            await victim.served()
        finally:
            attacker.stop()
        await until(lambda: host.fds() == fds_with_victim, timeout=5,
                    what=lambda: f"the attacker's fds all closed: {host.fds()} != {fds_with_victim}")
    await until(lambda: host.fds() == fds0 and host.guest_mappings() == maps0, timeout=5,
                what="every fd and mapping released")
    assert host.alive(), host.log()
    return attacker


async def test_guest_ram_truncated_then_a_reset_loses_only_that_session(host: Host) -> None:
    """Audit reproduction 1: the ring taken back from the lane is drained on the event loop."""
    await _attack(host, "shrink-then-reset", closed_by="guest-memory-gone")


async def test_a_misaligned_ring_is_refused_before_it_can_reach_a_slower_path(host: Host) -> None:
    """Audit reproduction 2: an odd avail ring address is a counted rejection at SET_VRING_ADDR."""
    await _attack(host, "misaligned-ring", closed_by="misaligned-ring")
    assert host.counters("attacker")["rejected:misaligned-ring"] == 1


async def test_a_kick_fd_made_blocking_and_drained_by_the_front_end_never_blocks_the_service(host: Host) -> None:
    """The front-end clears O_NONBLOCK on the kick eventfd and reads every kick itself: nothing for
    the back-end to read when its poll says readable.  The attack breaks no rule, so the session stays."""
    await _attack(host, "blocking-kick", closed_by=None)


async def test_a_call_fd_made_blocking_and_kept_full_costs_the_front_end_its_session(host: Host) -> None:
    await _attack(host, "full-call", closed_by="call-fd-stalled")


async def test_guest_ram_on_a_full_tmpfs_faults_without_truncation_and_loses_only_that_session(host: Host) -> None:
    if os.geteuid() != 0:
        unavailable("VUC_REQUIRE_ROOT", "mounting a small tmpfs in a mount namespace needs root")
    await _attack(host, "tmpfs-full", closed_by="guest-memory-gone", prefix=("unshare", "--mount"))


async def test_fds_piled_up_behind_an_incomplete_message_close_that_session(host: Host) -> None:
    await _attack(host, "pile-fds", closed_by="too-many-fds")


async def test_a_sigbus_sent_by_another_process_is_ignored_and_counted(host: Host) -> None:
    async with Victim(host) as victim:
        for n in (1, 2, 3):  # one at a time: a pending standard signal is not queued twice
            os.kill(host.proc.pid, signal.SIGBUS)
            await until(lambda: host.status()["guard"]["stray_sigbus"] == n,
                        what=lambda: f"SIGBUS number {n} counted: {host.status()['guard']}")
            await victim.served()
        assert host.alive(), host.log()
        assert host.status()["guard"]["memory_faults"] == 0
