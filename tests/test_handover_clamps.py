"""The clamp engine's decisions across a live handover: what is in place stays, neither applied again nor
forgotten.

The real service binary clamps the vCPU threads of its front-end's process:
this test process, whose threads named "CPU i/KVM" stand for a QEMU's
(tests/helpers.py named_vcpu_threads).  The guest asks for the same work
before and after ``serve --take-over``: the new process applies nothing (the
decisions came with the session, so the request is no change), and when the
guest goes quiet it drops the boost at the stale time, as the old one would
have (the stale timer came too).  Without the carried state the new process
would apply every clamp again on the first record, and never drop a boost it
did not know it had.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest
from pathlib import Path

from vhost_user_cpufreq.backend.host.sched import sched_getattr

from .helpers import named_vcpu_threads, require_c_dataplane, short_tmpdir, start_guest, stop_process, until
from .service_proc import answers, read_log, serve, status

STALE = 1.5
#: the C engine on the kick lane, and engine.py's ClampEngine on the event loop
PATHS = {"c-engine-lane": {}, "python-engine": {"VUC_DATAPLANE": "python"}}
# Pinned, so that the handover carries affinity as well as clamps (the lane clamps unpinned threads too,
# tests/test_kick_lane.py).
PINS = [0, 1 % len(os.sched_getaffinity(0))]


def _config(d: Path) -> None:
    (d / "config.toml").write_text("\n".join([
        "[service]", f'control_socket = "{d}/control.sock"', f'state_file = "{d}/state.json"',
        "min_interval = 0.0", f"stale_after = {STALE}",
        "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", f"pinning = {PINS}", 'clamp = "thread"',
    ]) + "\n")


def _actuated(st: dict[str, object]) -> int:
    c = st["counters"]
    assert isinstance(c, dict)
    return int(c.get("clamps_applied", 0)) + int(c.get("clamps_recorded", 0))


def _clamps(d: Path) -> list[int | None]:
    return [c["uclamp_min"] for c in status(d)["vms"]["vm0"]["vcpus"]]


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_take_over_neither_applies_again_nor_forgets_the_clamps_in_place(path: str) -> None:
    if path == "c-engine-lane":
        require_c_dataplane()
    env = PATHS[path]
    with short_tmpdir("vuc-hc-") as d, named_vcpu_threads(2) as tids:
        _config(d)
        old = serve(d, env, log="old.log")
        new: subprocess.Popen[bytes] | None = None
        try:
            await until(lambda: answers(d, old.pid) or old.poll() is not None, timeout=20, what="old ready")
            g = await start_guest(str(d / "vm0.sock"), util_threshold=1)
            await until(lambda: all(c["thread"] for c in status(d)["vms"]["vm0"]["vcpus"]), timeout=10,
                        what=lambda: "threads found\n" + read_log(d, "old.log"))

            async def ask(util: int) -> None:
                for v in (0, 1):
                    g.driver.set_util(v, util)
                g.driver.flush()

            await ask(600)
            await until(lambda: all(c is not None and c > 0 for c in _clamps(d)), timeout=10, what="clamped")
            before = _clamps(d)
            applied_before = _actuated(status(d))
            assert applied_before == 2, status(d)["counters"]
            kernel = [sched_getattr(t).util_min for t in tids]
            new = serve(d, env, "--take-over", str(d / "control.sock"), log="new.log")
            await until(lambda: old.poll() is not None, timeout=20, what=lambda: read_log(d, "old.log"))
            await until(lambda: answers(d, new.pid) or new.poll() is not None, timeout=20,
                        what=lambda: read_log(d, "new.log"))
            await until(lambda: all(c["thread"] for c in status(d)["vms"]["vm0"]["vcpus"]), timeout=10,
                        what=lambda: "threads found by the new process\n" + read_log(d, "new.log"))
            assert _clamps(d) == before  # the decisions came with the session
            records = status(d)["vms"]["vm0"]["counters"].get("records", 0)
            await ask(601)  # the same work, within the hysteresis of what is applied: no change
            await until(lambda: status(d)["vms"]["vm0"]["counters"].get("records", 0) >= records + 2, timeout=10,
                        what="the records decided by the new process")
            t_quiet = time.monotonic()
            st = status(d)
            assert _actuated(st) == 0, st["counters"]  # nothing applied again
            assert _clamps(d) == before
            assert [sched_getattr(t).util_min for t in tids] == kernel  # the threads as the old process left them
            # The guest goes quiet: the boost goes at the stale time, counted from its last request.
            await until(lambda: _clamps(d) == [0, 0], timeout=STALE + 5,
                        what=lambda: f"the boost dropped {_clamps(d)} {status(d)['counters']}")
            assert time.monotonic() - t_quiet >= STALE - 0.3
            assert _actuated(status(d)) == 2
            await g.close()
            assert "dropped" not in read_log(d, "new.log")
        finally:
            stop_process(old)
            if new is not None:
                stop_process(new)
        await asyncio.sleep(0)
