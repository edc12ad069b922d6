"""Crash survival under the real systemd of the Linux test host (tests/testhost/fdstore_probe.py).

The shipped unit (FileDescriptorStoreMax=, FileDescriptorStorePreserve=yes)
runs the service; a modelled guest, playing QEMU with two named vCPU threads
whose clamps apply for real there, sends records without pause while the
service's main process is killed with SIGKILL (systemd restarts it from its fd
store) and then restarted with ``systemctl restart``.  The guest's connection
never closes, it is served again after each, every buffer comes back, the
vCPU threads keep their clamps and pinning throughout (sampled every
millisecond: never back to unclamped or unpinned), and when the guest goes its
fds leave the store.  The probe's gaps are the README's SIGKILL figures.
"""

from __future__ import annotations

import json

from .testhost.host import SRC, TestHost

KILLS = 4


def test_sigkill_and_restart_under_systemd_keep_the_vm_served_from_the_fd_store(testhost: TestHost) -> None:
    testhost.run(["sh", f"{SRC}/tests/testhost/units.sh"], timeout=120).check()
    r = testhost.sh(f"cd {SRC} && /opt/vuc/bin/python -m tests.testhost.fdstore_probe {KILLS}", timeout=600).check()
    report = json.loads(r.stdout.strip().splitlines()[-1])
    journal = report.get("journal", "")
    print(json.dumps({k: v for k, v in report.items() if k != "journal"}, indent=1))  # the figures, for the README
    print(journal)
    assert report["started"], report
    assert report["verify"] == [], report["verify"]  # every key of the unit known to this systemd (257)
    events = report["events"]
    assert [e["what"] for e in events] == ["sigkill"] * KILLS + ["restart"], (events, journal)
    for e in events:
        assert e["served_again"], (e, journal)
        # The clamps and pinning the service set were never undone while it was down or starting.
        assert all(v > 0 for v in e["util_min_seen"][0] + e["util_min_seen"][1]), (e, journal)
        assert e["affinity_seen"] == [[[0]], [[1]]], e
    c, sc = report["counters"], report["service_counters"]
    assert sc.get("fdstore_restores") == 1 and c.get("sessions_resumed") == 1, (c, sc, journal)
    # After systemctl restart (parked, exact): the sequence went on, nothing lost or stale.
    assert c.get("lost_batches", 0) == 0 and c.get("rejected:stale-batch", 0) == 0, c
    assert not any(k.startswith("handover_dropped") for k in c), c
    assert report["connection_open"] and report["not_returned"] == 0, report
    # The VM went: its session's fds left the store; its listener and record stay.
    store = report["fdstore_after_close"]
    assert "vuc.vm0.l" in store and "vuc.vm0.r" in store and "vuc.vm0.f" not in store, store
    assert "session" not in journal or "dropped" not in journal, journal
