"""The shared frequency page (SPEC §8) across a live handover and a crash: the guest keeps reading one
page, and the new process keeps writing it.

The real service binary reads a generated sysfs tree; the modelled guest
(guest-driver-model/frontend.py in QEMU's role) maps the page the back-end
sent with SHMEM_MAP.  After ``serve --take-over``, or SIGKILL and a start
from the fd store (tests/minisystemd.py), a host frequency change shows in
that same mapping, with no new SHMEM_MAP, no config read and no notification:
the new process mapped the same memfd.  Each domain's sequence count only
goes forward (a reader that saw the old count never accepts a torn entry).
A page's memfd that is not ours, or a page without its writer's state, drops
that session alone, counted by reason, every fd closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import struct
import subprocess
from pathlib import Path

from vhost_user_cpufreq.backend.vhost.handover import freeze, snapshot, thaw
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.session_snapshot import decode, encode

from .fuzz.harness import memfd_maps
from .helpers import Guest, make_service, open_fds, short_tmpdir, start_guest, stop_process, until
from .minisystemd import MiniSystemd
from .service_proc import answers, read_log, serve, service_exe, status
from .sysfs_tree import HostSpec, make_sysfs_tree, set_cur_freq

# cpu0-3: a little cluster (policy0), cpu4-7: a big one (policy4); vm0's vCPUs on one of each.
HOST = HostSpec.big_little([(4, 300000, 1800000, 256), (4, 500000, 2800000, 1024)])


def _config(d: Path) -> None:
    make_sysfs_tree(d / "sys", HOST)
    (d / "config.toml").write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        f'sysfs_root = "{d}/sys"', "dry_run = true", "sample_period = 0.02",
        "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", "pinning = [0, 4]", 'clamp = "none"',
        "shared_page = true",
        "[vm.vm1]", f'socket = "{d}/vm1.sock"', "vcpus = 1", "pinning = [4]", 'clamp = "none"',
        "shared_page = true",
    ]) + "\n")


def _counts(g: Guest, ndom: int) -> list[int]:
    return [struct.unpack_from("<I", g.fe.shm[0], abi.page_domain_offset(i))[0] for i in range(ndom)]


async def _page_khz(g: Guest) -> list[int] | None:
    page = await g.driver.page_frequencies()
    return None if page is None else [p.cur_khz for p in page]


async def _moves(d: Path, g: Guest, little: int, big: int) -> None:
    """The host moves; the guest's page shows it, without a message on its connection."""
    reads, notes = g.transport.config_reads, g.fe.config_change_msgs
    set_cur_freq(d / "sys", 0, little)
    set_cur_freq(d / "sys", 4, big)
    deadline = asyncio.get_running_loop().time() + 10
    while await _page_khz(g) != [little, big]:
        assert asyncio.get_running_loop().time() < deadline, (await _page_khz(g), status(d)["vms"]["vm0"])
        await asyncio.sleep(0.02)
    assert g.transport.config_reads == reads and g.fe.config_change_msgs == notes


async def test_a_live_handover_keeps_writing_the_page_the_guest_maps() -> None:
    with short_tmpdir("vuc-hs-") as d:
        _config(d)
        old = serve(d, {}, log="old.log")
        new: subprocess.Popen[bytes] | None = None
        try:
            await until(lambda: answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
            assert old.poll() is None, read_log(d, "old.log")
            g = await start_guest(str(d / "vm0.sock"), util_threshold=1)
            assert g.driver.freq_page
            await until(lambda: status(d)["vms"]["vm0"]["freq_path"] == "page", timeout=10, what="the page in use")
            await _moves(d, g, 900000, 1500000)
            before = _counts(g, 2)
            new = serve(d, {}, "--take-over", str(d / "control.sock"), log="new.log")
            await until(lambda: old.poll() is not None, timeout=20, what=lambda: "old exit\n" + read_log(d, "old.log"))
            await until(lambda: answers(d, new.pid) or new.poll() is not None, timeout=20,
                        what=lambda: "new ready\n" + read_log(d, "new.log"))
            vm = status(d)["vms"]["vm0"]
            assert vm["counters"].get("sessions_resumed") == 1, (vm, read_log(d, "new.log"))
            assert vm["freq_path"] == "page"
            # Still live: the new process did not mark it stale, nor rewrite what did not change.
            assert abi.decode_page_header(bytes(g.fe.shm[0][:16])).live
            assert _counts(g, 2) == before
            await _moves(d, g, 1200000, 2400000)
            after = _counts(g, 2)
            assert all(a == b + 2 for a, b in zip(after, before)), (before, after)  # on from the carried counts
            c = status(d)["vms"]["vm0"]["counters"]
            assert c.get("shmem_maps_sent", 0) == 0 and c.get("freq_page_updates") == 2, c  # no map: the same memfd
            # And the records still flow on the same connection.
            g.driver.set_util(0, 700)
            g.driver.flush()
            await until(lambda: status(d)["vms"]["vm0"]["counters"].get("records", 0) > 0, timeout=5, what="served")
            await g.close()
            assert "dropped" not in read_log(d, "new.log")
        finally:
            stop_process(old)
            if new is not None:
                stop_process(new)


async def test_after_sigkill_the_next_process_writes_the_page_on_from_the_counts_in_it() -> None:
    with short_tmpdir("vuc-hs-") as d:
        _config(d)
        sd = MiniSystemd(d)
        procs: list[subprocess.Popen[bytes]] = []

        async def start() -> subprocess.Popen[bytes]:
            n = len(procs)
            p = sd.start([service_exe(), "serve", "--config", str(d / "config.toml")], dict(os.environ),
                         open(d / f"p{n}.log", "wb"))
            procs.append(p)
            await until(lambda: answers(d, p.pid) or p.poll() is not None, timeout=30,
                        what=lambda: read_log(d, f"p{n}.log"))
            return p

        try:
            p0 = await start()
            g = await start_guest(str(d / "vm0.sock"), util_threshold=1)
            await until(lambda: status(d)["vms"]["vm0"]["freq_path"] == "page", timeout=10, what="the page in use")
            # The record follows the map's ack (it arrives on the back-end channel, not with a message).
            await asyncio.sleep(0.3)
            await _moves(d, g, 900000, 1500000)
            await _moves(d, g, 1000000, 1600000)  # counts beyond what the record says
            before = _counts(g, 2)
            p0.send_signal(signal.SIGKILL)
            p0.wait()
            await start()
            vm = status(d)["vms"]["vm0"]
            assert vm["counters"].get("sessions_resumed") == 1 and vm["freq_path"] == "page", (vm, read_log(d, "p1.log"))
            # Every entry rewritten once from the counts found in the page (its values were not known).
            after = _counts(g, 2)
            assert all(a == b + 2 for a, b in zip(after, before)), (before, after)
            assert await _page_khz(g) == [1000000, 1600000]
            await _moves(d, g, 700000, 2000000)
            assert all(a == b + 4 for a, b in zip(_counts(g, 2), before))
            assert vm["counters"].get("shmem_maps_sent", 0) == 0
            await g.close()
        finally:
            for p in procs:
                stop_process(p)
            sd.close()


async def test_a_page_that_is_not_ours_or_has_no_writer_state_drops_that_session_alone(tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("vm", (0, 0, 1, 2)), shared_page=True)
    g = await start_guest(str(tmp_path / "vm.sock"))
    await until(lambda: slots["vm"].device.freq_path == "page", what="the page in use")
    conn = slots["vm"].connection
    assert conn is not None
    freeze(conn.session)
    raw, fds = snapshot(conn.session, conn.sock.fileno(), mid_message=False)
    thaw(conn.session)
    snap = decode(raw, len(fds))
    assert snap.shmem is not None and snap.shmem.pages[0].in_use and snap.device.page is not None
    (page,) = snap.shmem.pages
    with short_tmpdir("vuc-hs-") as d:
        svc2, _, _, slots2 = await make_service(d, ("vm", (0, 0, 1, 2)), shared_page=True)
        before, maps = open_fds(), memfd_maps()
        for reason, bad in [("page-state-missing", encode(dataclasses.replace(
                                 snap, device=dataclasses.replace(snap.device, page=None)))),
                            ("shmem-not-sealed", None), ("shmem-mismatch", encode(dataclasses.replace(
                                 snap, shmem=dataclasses.replace(snap.shmem, pages=(
                                     dataclasses.replace(page, size=2 * page.size),)))))]:
            mine = [os.dup(fd) for fd in fds]
            if bad is None:  # the page's fd replaced by a memfd nobody sealed
                os.close(mine[page.fd])
                mine[page.fd] = os.memfd_create("not-ours")
                os.ftruncate(mine[page.fd], page.size)
                bad = raw
            assert svc2.resume(bad, mine) is None
            assert slots2["vm"].counters.get("handover_dropped", reason) == 1, slots2["vm"].counters
            assert slots2["vm"].connection is None
        assert open_fds() == before  # every fd given to resume was closed
        assert memfd_maps() == maps  # and guest memory, mapped before the page failed, unmapped
        await svc2.close()
    # The page the first service writes was not touched: still live, still updated.
    assert abi.decode_page_header(bytes(g.fe.shm[0][:16])).live
    source.set_frequencies([1098000, 2253000, 1426000])
    assert await _page_khz(g) == [1098000, 2253000, 1426000]
    await g.close()
    await svc.close()
