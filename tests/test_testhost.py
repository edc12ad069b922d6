"""The Linux test host (tests/testhost/): a kernel with util clamps, cgroup v2 and systemd, for real.

The CI machine's kernel has no ``CONFIG_UCLAMP_TASK``, no cgroup v2 hierarchy
and no systemd as PID 1.  These tests boot the trixie-backports kernel under
QEMU with a Debian root and run the service there: the util clamps it sets
are read back from the kernel, and the actuator and recovery tests that only
ever saw EOPNOTSUPP here run inside, where the clamps really apply.
"""

from __future__ import annotations

import json
import os
import time
import shutil
import tempfile
from pathlib import Path

import pytest

from .helpers import unavailable
from .testhost.host import SRC, TestHost


def test_the_test_host_has_util_clamps_cgroup_v2_and_systemd_as_pid_1(testhost: TestHost) -> None:
    assert testhost.run(["uname", "-r"]).check().stdout.strip() == testhost.kver
    facts = testhost.sh("cat /proc/sys/kernel/sched_util_clamp_max; stat -fc %T /sys/fs/cgroup; "
                        "cat /proc/1/comm; cat /sys/fs/cgroup/cgroup.controllers").check().stdout.split("\n")
    assert facts[0] == "1024"
    assert facts[1] == "cgroup2fs"
    assert facts[2] == "systemd"
    assert "cpu" in facts[3].split()
    state = testhost.run(["systemctl", "is-system-running", "--wait"], timeout=120).stdout.strip()
    assert state in ("running", "degraded"), testhost.run(["systemctl", "--failed", "--no-pager"]).stdout


def test_check_in_the_test_host_finds_util_clamps_and_cgroup_v2(testhost: TestHost) -> None:
    out = testhost.run(["/opt/vuc/bin/vhost-user-cpufreq", "check", "--json"], timeout=120)
    found = {f["name"]: f for f in json.loads(out.stdout)}
    assert found["uclamp"]["state"] == "ok", found["uclamp"]
    assert found["cgroup"]["state"] == "ok", found["cgroup"]
    assert found["isolation"]["state"] == "ok", found["isolation"]
    # TCG has no APERF/MPERF: check names the fact that shapes the closed loop's ceiling figures.
    assert found["invariance"]["state"] == "degraded" and "820" in found["invariance"]["detail"], found["invariance"]
    assert found["dataplane"]["state"] == "ok" and "C kick lane" in found["dataplane"]["detail"], found["dataplane"]
    # The wheel's prebuilt extension (built on the CI host, abi3), not a build in the root.
    assert found["dataplane"]["detail"].startswith("C, prebuilt extension (/opt/vuc/"), found["dataplane"]


def test_a_guest_record_sets_a_real_util_clamp_that_falls_with_it_and_goes_with_the_vm(testhost: TestHost) -> None:
    r = testhost.sh(f"cd {SRC} && d=$(mktemp -d) && /opt/vuc/bin/python -m tests.testhost.clamp_probe $d",
                    timeout=300).check()
    report = json.loads(r.stdout.strip().splitlines()[-1])
    log = report["log"]
    assert report["service_ready"], log
    assert all(a["util_min"] == 0 for a in report["before"]), report["before"]
    assert report["raised"], (report, log)
    high = report["high"][0]["util_min"]
    assert high > 0 and report["status_clamp"] == high  # what the kernel holds is what the service says
    # The power cap (uclamp_max = 600) on both threads, read back from the kernel; the clamp within it.
    assert report["capped"] and [a["util_max"] for a in report["high"]] == [600, 600], report["high"]
    assert high <= 600 and report["status_cap"] == [600, 600]
    # SIGHUP with a cap of 400: lowered in place, the clamp with it (the kernel refuses min > max).
    assert report["recapped"] and all(a["util_min"] <= 400 for a in report["reloaded"]), report["reloaded"]
    assert report["high"][0]["flags"] & 0x01  # SCHED_FLAG_RESET_ON_FORK: a fork of a vCPU thread starts unclamped
    assert report["high"][1]["util_min"] == 0  # vCPU 1 sent nothing
    assert report["lowered"], report
    assert report["counters"].get("clamps_applied", 0) >= 2, report["counters"]
    assert report["restored"] and report["after"] == report["before"], report
    assert report["service_rc"] == 0, log


def test_actuator_and_recovery_tests_pass_inside_with_clamps_that_apply(testhost: TestHost) -> None:
    # VUC_CACHE_DIR: the data plane built into the root (TestHost._install), also for the service as nobody.
    r = testhost.sh(f"cd {SRC} && VUC_REQUIRE_ROOT=1 VUC_REQUIRE_UCLAMP=1 VUC_CACHE_DIR=/var/cache/vhost-user-cpufreq "
                    "/opt/vuc/bin/python -m pytest -q "
                    "-p no:cacheprovider tests/test_actuators.py tests/test_recovery.py", timeout=900)
    assert r.rc == 0, r.stdout[-4000:] + r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert "passed" in last and "failed" not in last and "skipped" not in last, last


def test_a_test_host_that_cannot_boot_fails_at_once_with_the_console_not_a_hang(tmp_path: Path) -> None:
    from .testhost.host import CHROOT, TestHost, TestHostError, provisioned

    if provisioned():
        unavailable("VUC_REQUIRE_TESTHOST", f"no test host: {provisioned()}")
    empty = Path(tempfile.mkdtemp(prefix="vuc-empty-root-", dir=CHROOT / "tmp"))  # no /sbin/init, no systemd
    try:
        with pytest.raises(TestHostError) as ei:
            TestHost(shared_root=empty).start()
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    msg = str(ei.value)
    assert "QEMU exited" in msg and "Kernel panic" in msg, msg


def test_a_kernel_without_util_clamps_is_named_as_such() -> None:
    from .testhost.host import Result, TestHost, TestHostError

    th = TestHost()
    th.kver = "6.1.0-no-uclamp"
    th.sh = lambda script, **kw: Result(1 if "sched_util_clamp" in script else 0, "", "", False)  # type: ignore[method-assign]
    with pytest.raises(TestHostError, match=r"lacks per-task util clamps \(CONFIG_UCLAMP_TASK"):
        th.require_features()


def _systemctl(testhost: TestHost, *args: str) -> None:
    r = testhost.run(["systemctl", *args], timeout=180)
    if r.rc != 0:
        journal = testhost.run(["journalctl", "-b", "-u", "vhost-user-cpufreq*", "--no-pager", "-n", "30"]).stdout
        raise AssertionError(f"systemctl {' '.join(args)}: {r.stderr}\n{journal}")


def _unit(testhost: TestHost, prop: str) -> str:
    return testhost.run(["systemctl", "show", "-P", prop, "vhost-user-cpufreq.service"]).check().stdout.strip()


def _vms(testhost: TestHost) -> list[str]:
    r = testhost.run(["vhost-user-cpufreq", "status", "--json", "--control-socket",
                      "/run/vhost-user-cpufreq/control.sock"], timeout=60).check()
    return sorted(json.loads(r.stdout)["vms"])


def test_the_shipped_units_run_under_systemd_notify_reload_watchdog_and_socket_activation(testhost: TestHost) -> None:
    testhost.run(["sh", f"{SRC}/tests/testhost/units.sh"], timeout=120).check()
    try:
        # Type=notify: "started" means READY=1 arrived, with STATUS=.
        _systemctl(testhost, "start", "vhost-user-cpufreq.service")
        assert _unit(testhost, "ActiveState") == "active"
        assert _unit(testhost, "StatusText").startswith("serving 1 VMs"), _unit(testhost, "StatusText")
        assert testhost.sh("stat -c %U /proc/$(systemctl show -P MainPID vhost-user-cpufreq)").stdout.strip() \
            == "vhost-user-cpufreq"
        assert _vms(testhost) == ["vm0"]
        # Reload (SIGHUP, RELOADING=1 ... READY=1): a VM added to the file is served.
        testhost.sh("printf '[vm.vm1]\\nsocket = \"/run/vhost-user-cpufreq/vm1.sock\"\\nvcpus = 1\\n"
                    "pinning = [1]\\nclamp = \"none\"\\n' >> /etc/vhost-user-cpufreq/config.toml").check()
        _systemctl(testhost, "reload", "vhost-user-cpufreq.service")
        assert _vms(testhost) == ["vm0", "vm1"]
        # Socket activation: the socket unit's fd is handed to the service, which serves it by its name.
        testhost.sh("printf '[vm.vm2]\\nsocket = \"/run/vhost-user-cpufreq/vm2.sock\"\\nvcpus = 1\\npinning = [0]\\n"
                    "clamp = \"none\"\\n' "
                    ">> /etc/vhost-user-cpufreq/config.toml").check()
        _systemctl(testhost, "stop", "vhost-user-cpufreq.service")
        _systemctl(testhost, "start", "vhost-user-cpufreq@vm2.socket")
        inode = testhost.sh("stat -c %i /run/vhost-user-cpufreq/vm2.sock").check().stdout
        _systemctl(testhost, "start", "vhost-user-cpufreq.service")
        assert _vms(testhost) == ["vm0", "vm1", "vm2"]
        # Served from systemd's socket, not one the service bound in its place.
        assert testhost.sh("stat -c %i /run/vhost-user-cpufreq/vm2.sock").check().stdout == inode
        # The watchdog: a service that stops answering is killed and started again.
        restarts = int(_unit(testhost, "NRestarts"))
        testhost.sh("kill -STOP $(systemctl show -P MainPID vhost-user-cpufreq)").check()
        deadline = time.monotonic() + 120
        while int(_unit(testhost, "NRestarts")) == restarts or _unit(testhost, "ActiveState") != "active":
            assert time.monotonic() < deadline, testhost.run(["journalctl", "-b", "-u", "vhost-user-cpufreq",
                                                              "--no-pager", "-n", "40"]).stdout
            time.sleep(2)
        journal = testhost.run(["journalctl", "-b", "-u", "vhost-user-cpufreq", "--no-pager"]).stdout
        assert "Watchdog timeout" in journal, journal[-3000:]
        assert "ready: serving" in journal  # the service's own log lines reach journald
    finally:
        testhost.sh("systemctl stop vhost-user-cpufreq.service 'vhost-user-cpufreq@*.socket'; "
                    "systemctl reset-failed", timeout=120)


def test_cpufreq_in_the_test_host_comes_from_our_driver_served_from_outside(testhost: TestHost) -> None:
    from .testhost.outer import OUTER_HOST

    cf = "/sys/devices/system/cpu/cpufreq"
    r = testhost.sh(f"for p in {cf}/policy*; do echo $(cat $p/scaling_driver $p/scaling_governor "
                    "$p/related_cpus $p/cpuinfo_min_freq $p/cpuinfo_max_freq); done").check()
    policies = [line.split() for line in r.stdout.strip().splitlines()]
    want = [["virtio-cpufreq", "schedutil", str(cpu), str(p.min_khz), str(p.max_khz)]
            for cpu, p in enumerate(OUTER_HOST.policies)]
    assert policies == want, r.stdout
    found = {f["name"]: f for f in json.loads(testhost.run(["/opt/vuc/bin/vhost-user-cpufreq", "check", "--json"],
                                                           timeout=120).stdout)}
    assert found["cpufreq"]["state"] == "ok" and "virtio-cpufreq" in found["cpufreq"]["detail"], found["cpufreq"]
    vm = testhost.outer.vm()  # type: ignore[attr-defined]
    assert vm["connected"] and vm["counters"].get("records", 0) > 0, vm  # schedutil's requests reached us


def test_threaded_cgroups_take_the_vcpu_threads_clamp_them_and_give_them_back(testhost: TestHost) -> None:
    # The probe plays QEMU in a systemd unit of its own (a cgroup with the cpu controller).
    r = testhost.sh(f"d=$(mktemp -d) && systemd-run --wait --pipe --collect --unit=vuc-cgroup-probe "
                    f"-p CPUWeight=100 -p WorkingDirectory={SRC} /opt/vuc/bin/python -m tests.testhost.cgroup_probe "
                    "$d $d/report.json >/dev/null 2>$d/err; rc=$?; cat $d/report.json; echo; tail -5 $d/err; exit $rc",
                    timeout=300).check()
    report = json.loads(r.stdout.strip().splitlines()[0])
    log = report["log"]
    home = report["home"].removeprefix("/sys/fs/cgroup")
    assert report["service_ready"] and report["made"], (report, log)
    capped = report["capped"]
    # One threaded cgroup per frequency domain, each holding its vCPU's thread, with its clamp in percent.
    assert capped["types"] == {"vuc-domain0": "threaded", "vuc-domain1": "threaded"}, capped
    assert capped["threads"] == {"vuc-domain0": [str(report["tids"][0])], "vuc-domain1": [str(report["tids"][1])]}
    assert capped["uclamp_min"] == {"vuc-domain0": "29.30", "vuc-domain1": "87.89"}
    # The power cap (uclamp_max = 950) in each cgroup's cpu.uclamp.max, and the kernel's effective max.
    assert capped["uclamp_max"] == {"vuc-domain0": "92.77", "vuc-domain1": "92.77"}
    assert capped["effective_max"] == [950, 950], capped
    assert [c["uclamp_max"] for c in report["status_cgroups"]] == [950, 950]
    assert "cpu" in capped["home_subtree_control"] and "cpu" not in report["before"]["home_subtree_control"]
    # system.slice's cpu.uclamp.min is 0: the kernel caps the clamps, and the service says so.
    assert capped["effective"] == [0, 0]
    assert [c["cap"] for c in report["status_cgroups"]] == [0, 0]
    assert report["counters"].get("clamps_capped:cgroup-ancestor", 0) >= 2, report["counters"]
    assert "capped at 0 by an ancestor" in log
    # Ancestors raised: the kernel applies exactly the service's clamps, and lowers them with the guest.
    assert report["effective_raised"] and report["uncapped"]["effective"] == [300, 900], report["uncapped"]
    assert report["fell"], report
    # Disconnect: threads back in the unit's cgroup, directories and the enabled controller gone.
    for when in ("after_disconnect", "after_recovery"):
        after = report[when]
        assert after["dirs"] == [] and after["thread_cgroups"] == [f"0::{home}"] * 2, (when, after)
        assert "cpu" not in after["home_subtree_control"], (when, after, log)
    assert report["moved_back"]
    # SIGKILL leaves them behind; the next instance undoes them from its state file.
    assert report["made_again"] and report["killed"] and report["after_kill"]["dirs"] == ["vuc-domain0",
                                                                                          "vuc-domain1"]
    assert report["recovered"] and report["recovery_counters"]["recovered_cgroups"] == 2, report
    assert report["state_file"] == {"threads": [], "cgroups": []}


#: guest changes of the latency run (0 -> 900 -> 0 ...), each held TOGGLE (0.5 s)
CHANGES = 120
LOW_CEILING = 512  # the second run's per-VM ceiling: the highest clamp (uclamp_min) the service sets


def test_the_closed_loop_a_guest_record_raises_the_test_hosts_frequency_request_within_the_ceiling(
        testhost: TestHost) -> None:
    from .testhost.loop_figures import OuterPoller, latencies, percentile, walks
    from .testhost.outer import OUTER_HOST

    outer = testhost.outer  # type: ignore[attr-defined]
    big = OUTER_HOST.policies[1]  # the 500-2800 MHz domain, the test host's CPU 1
    top, bottom = 1024, big.min_khz * 1024 // big.max_khz  # the test host's util at 2800 and at 500 MHz
    before = testhost.clock_offset()
    with OuterPoller(outer.status, vcpu=1) as poll:  # the test host's CPU 1 is the outer VM's vCPU 1
        r = testhost.sh(f"cd {SRC} && d=$(mktemp -d) && /opt/vuc/bin/python -m tests.testhost.closed_loop "
                        f"$d 1024 {CHANGES}", timeout=900).check()
    after = testhost.clock_offset()
    run = json.loads(r.stdout.strip().splitlines()[-1])
    r = testhost.sh(f"cd {SRC} && d=$(mktemp -d) && /opt/vuc/bin/python -m tests.testhost.closed_loop "
                    f"$d {LOW_CEILING}", timeout=600).check()
    capped = json.loads(r.stdout.strip().splitlines()[-1])
    for rep in (run, capped):
        assert rep["service_rc"] == 0, rep["log"]
    assert run["events"] > 0, run
    fmax, fmin = big.max_khz, big.min_khz
    ph, cph = run["phases"], capped["phases"]
    # Without the service (no record) the 20%-duty thread leaves the request at the bottom; the guest's 900
    # raises it near the top, util 0 and a silent guest (stale decay) bring it down again.
    assert ph["alone"] < fmin * 1.2, ph
    assert ph["guest-0"] < fmin * 1.2 and ph["guest-silent"] < fmin * 1.2, ph
    raised = run["probe"][1]
    assert run["probe"][0]["kernel_uclamp_min"] == 0 and raised["kernel_uclamp_min"] == raised["service_uclamp_min"]
    # While the guest asks for 900: the service's part, the clamp the kernel holds (sampled every 20 ms),
    # and schedutil's, running near the top (80% of the maximum or more) for most of the phase.  Not
    # the mean: on a loaded CI machine the TCG test host's walk up the table has its dips (one run's
    # mean fell to 2,119 MHz), and the claim is where the request stays, not how fast TCG climbs.
    for name in ("guest-900", "guest-900-again"):
        assert run["clamps"][name]["median"] == raised["kernel_uclamp_min"] > 0, (name, run["clamps"], raised)
        assert run["near_top"][name] > 0.5, (name, run["near_top"], ph)
    # The per-VM ceiling holds the clamp at 512.  On this host's non-invariant schedutil (docs/testhost.md)
    # a clamp asks for 1.25 x the current frequency x clamp / 1024, and 512 asks for less than the current
    # one even with the DVFS headroom on top (x 1.25 again): the request stays at the bottom, as alone.
    # (768 sat between the two readings of the kernel, 1024/1.25 and 1024/1.25^2, and a loaded run could
    # lift it.)
    assert capped["probe"][1]["kernel_uclamp_min"] == LOW_CEILING, capped["probe"]
    assert capped["clamps"]["guest-900"]["median"] == LOW_CEILING, capped["clamps"]
    assert cph["guest-900"] < fmin * 1.2, (cph, ph)
    # Every change reaches the outer back-end as the test host's request, before the next change.
    offset = (before[0] + after[0]) / 2
    lat = latencies([tuple(c) for c in run["changes"]], poll.seen, offset, top, bottom)
    seen = len(lat.rise) + len(lat.fall)
    assert seen >= 100 and len(lat.missed) <= CHANGES // 20, (lat.missed, poll.seen[:40])
    # Inside the test host, from the trace: the service's part (to schedutil's first step up) and the walk
    # up the table; then the trip of the top request to the outer back-end.
    walk = walks([tuple(c) for c in run["changes"]], [tuple(e) for e in run["frequencies"]], fmax)
    arrivals = sorted(t for t, u in poll.seen if u == top)
    trip = [next(a for a in arrivals if a >= t - offset - 0.001) - (t - offset) for t in walk.top_at
            if any(a >= t - offset - 0.001 for a in arrivals)]
    assert len(walk.first_step) >= CHANGES // 2 - 3, walk
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "changes": CHANGES, "seen": seen,
        "clock_offset_uncertainty_ms": round(1000 * max(before[1], after[1], abs(after[0] - before[0]) / 2), 2),
        "polls": poll.polls,
        "rise_ms": {q: round(1000 * percentile(lat.rise, q), 1) for q in (50, 90, 99)},
        "fall_ms": {q: round(1000 * percentile(lat.fall, q), 1) for q in (50, 90, 99)},
        "rise_first_step_in_test_host_ms": {q: round(1000 * percentile(walk.first_step, q), 1) for q in (50, 90, 99)},
        "rise_to_top_in_test_host_ms": {q: round(1000 * percentile(walk.to_top, q), 1) for q in (50, 90, 99)},
        "top_request_to_outer_ms": {q: round(1000 * percentile(trip, q), 1) for q in (50, 90, 99)},
        "mean_khz": {"ceiling 1024": ph, f"ceiling {LOW_CEILING}": cph},
        "near_top_share": {"ceiling 1024": run["near_top"], f"ceiling {LOW_CEILING}": capped["near_top"]},
        "kernel_uclamp_min": {"ceiling 1024": run["clamps"], f"ceiling {LOW_CEILING}": capped["clamps"]},
    }
    out = os.environ.get("VUC_CLOSED_LOOP_OUT")
    if out:
        Path(out).write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


def test_the_simulator_replayed_on_the_test_hosts_kernel_matches_its_pelt_and_schedutil(testhost: TestHost) -> None:
    """The simulator's PELT, util_est and schedutil against this kernel's (tests/sim_replay.py).

    The same comparison as tests/test_sim_validation.py, on a fresh run:
    ``VUC_PELT_PROBE_RECORD=FILE`` keeps the probe's report (gzip) as that
    test's fixture; ``VUC_SIM_VALIDATION_OUT=FILE`` writes the figures
    (docs/simulator.md).
    """
    import gzip

    from .sim_replay import check, replay_all

    r = testhost.sh(f"cd {SRC} && /opt/vuc/bin/python -m tests.testhost.pelt_probe", timeout=600).check()
    raw = r.stdout.strip().splitlines()[-1]
    report = json.loads(raw)
    record = os.environ.get("VUC_PELT_PROBE_RECORD")
    if record:
        Path(record).write_bytes(gzip.compress(raw.encode(), mtime=0))
    rows = replay_all(report)
    out = os.environ.get("VUC_SIM_VALIDATION_OUT")
    if out:
        Path(out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "kernel": report["kernel"], "rate_limit_us": report["rate_limit_us"],
                                         "rows": rows}, indent=1) + "\n")
    print(json.dumps(rows))
    check(report, rows)


# -- libvirt ------------------------------------------------------------------------------------

#: A domain as small as libvirt takes: no disk, no network; cpufreq-domain.py adds the device.
_DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>{vcpus}</vcpu>{cputune}
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def _control(testhost: TestHost, *args: str) -> dict:  # type: ignore[type-arg]
    r = testhost.run(["vhost-user-cpufreq", *args, "--control-socket", "/run/vhost-user-cpufreq/control.sock"]
                     if args[0] == "status" else
                     ["vhost-user-cpufreq", "vm", "--json", "--control-socket", "/run/vhost-user-cpufreq/control.sock",
                      *args], timeout=60).check()
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _threads(testhost: TestHost, pid: int) -> dict[int, tuple[str, str, str]]:
    """Every task of ``pid``: (name, allowed CPUs, cgroup), read by the kernel's /proc."""
    r = testhost.sh(f"for t in /proc/{pid}/task/*; do echo \"${{t##*/}}|$(cat $t/comm)|"
                    f"$(sed -n 's/^Cpus_allowed_list:\\s*//p' $t/status)|$(cat $t/cgroup)\"; done").check()
    out = {}
    for line in r.stdout.strip().splitlines():
        tid, comm, cpus, cgroup = line.split("|")
        out[int(tid)] = (comm, cpus, cgroup)
    return out


def test_libvirt_domains_share_the_one_socket_each_served_with_its_vcpus_and_a_destroyed_one_goes_alone(
        testhost: TestHost) -> None:
    """A real libvirtd (Debian's packages) starts two domains, paused, that differ only in name, vCPUs and machine
    type; deploy/libvirt/cpufreq-domain.py adds the same device to both and the hook registers them."""
    setup = testhost.sh(f"sh {SRC}/tests/testhost/libvirt.sh", timeout=300)
    if setup.rc == 3:
        unavailable("VUC_REQUIRE_TESTHOST", setup.stderr.strip())
    setup.check()
    doms = {"lv-pinned-1": (1, "q35"), "lv-web-2": (2, "pc")}
    # lv-web-2's class keeps libvirt's affinity: its vCPU 0 pinned by <vcpupin>, its vCPU 1 free.
    cputune = {"lv-web-2": "\n  <cputune><vcpupin vcpu='0' cpuset='1'/></cputune>"}
    web_affinity = {0: "1", 1: "0-1"}
    try:
        for name, (vcpus, machine) in doms.items():
            xml = _DOMAIN.format(name=name, vcpus=vcpus, machine=machine, cputune=cputune.get(name, ""))
            testhost.run(["sh", "-c", f"python3 {SRC}/deploy/libvirt/cpufreq-domain.py >/tmp/{name}.xml && "
                          f"virsh define /tmp/{name}.xml"], stdin=xml, timeout=60).check()
        for name in doms:
            r = testhost.run(["virsh", "start", "--paused", name], timeout=180)
            assert r.rc == 0, (r.stderr, testhost.sh(f"tail -5 /var/log/libvirt/qemu/{name}.log; journalctl -b -u "
                                                     "vhost-user-cpufreq --no-pager -o cat -n 15").stdout)
        pids = {n: int(testhost.run(["cat", f"/run/libvirt/qemu/{n}.pid"]).check().stdout) for n in doms}

        # Both on the one socket, each as the QEMU libvirt started, with its own vCPU count and class.
        listed = {vm["name"]: vm for vm in _control(testhost, "list")["vms"]}
        assert {n: (vm["connected"]["pid"], vm["connected"]["vcpus"], vm["connected"]["class"])
                for n, vm in listed.items()} == {"lv-pinned-1": (pids["lv-pinned-1"], 1, "pinned"),
                                                 "lv-web-2": (pids["lv-web-2"], 2, "libvirt")}, listed
        # The hook registered each before QEMU started, tied to the machine scope of that very domain.
        for n, vm in listed.items():
            dom_id = testhost.run(["virsh", "domid", n]).check().stdout.strip()
            assert vm["registered"] == {"name": n, "cgroup": f"/machine.slice/machine-qemu\\x2d{dom_id}\\x2d*"}, vm
        status = _control(testhost, "status", "--json")["vms"]
        threads = {n: _threads(testhost, pids[n]) for n in doms}
        for n, (vcpus, _) in doms.items():
            served = status[n]["vcpus"]
            assert [v["vcpu"] for v in served] == list(range(vcpus)), served
            for v in served:
                # Its vCPU threads are found among its own QEMU's tasks, named so with debug-threads=on,
                # in libvirt's per-vCPU cgroups of that domain's machine scope.
                comm, _, cgroup = threads[n][v["thread"]]
                assert comm == f"CPU {v['vcpu']}/TCG" and cgroup.endswith(f"/libvirt/vcpu{v['vcpu']}"), (comm, cgroup)
        # lv-pinned-1's vCPU has a pCPU of its own; lv-web-2's affinity is libvirt's (its <vcpupin>), untouched.
        pinned = status["lv-pinned-1"]["vcpus"][0]
        assert threads["lv-pinned-1"][pinned["thread"]][1] == str(pinned["pcpu"])
        assert status["lv-web-2"]["pinning"]["mode"] == "keep", status["lv-web-2"]["pinning"]
        assert {v["vcpu"]: threads["lv-web-2"][v["thread"]][1] for v in status["lv-web-2"]["vcpus"]} == web_affinity
        # And decided for where libvirt lets each run (its pin may come after the threads were found).
        deadline = time.monotonic() + 10
        while {v["vcpu"]: v["cpus"] for v in status["lv-web-2"]["vcpus"]} != {0: [1], 1: [0, 1]}:
            assert time.monotonic() < deadline, status["lv-web-2"]["vcpus"]
            time.sleep(0.5)
            status = _control(testhost, "status", "--json")["vms"]
        state = json.loads(testhost.run(["cat", "/run/vhost-user-cpufreq/state.json"]).check().stdout)
        # Every clamped thread is on record before its first change (write-ahead): the pinned one with the
        # affinity it had, lv-web-2's with none (the service never changes it).
        web_threads = {v["thread"] for v in status["lv-web-2"]["vcpus"]}
        assert sorted((t["tid"], t["affinity"]) for t in state["threads"]) == sorted(
            [(pinned["thread"], [0, 1]), *((t, None) for t in web_threads)]), state

        # Destroyed: its VM goes, its registration with it (the hook), its thread leaves the state file
        # (nothing for a restart to put back onto a reused id); lv-web-2 is untouched and still served.
        web_before = (status["lv-web-2"], threads["lv-web-2"])
        testhost.run(["virsh", "destroy", "lv-pinned-1"], timeout=120).check()
        deadline = time.monotonic() + 60
        while "lv-pinned-1" in (listed := {vm["name"]: vm for vm in _control(testhost, "list")["vms"]}):
            assert time.monotonic() < deadline, listed
            time.sleep(1)
        state = json.loads(testhost.run(["cat", "/run/vhost-user-cpufreq/state.json"]).check().stdout)
        assert sorted((t["tid"], t["affinity"]) for t in state["threads"]) == sorted(
            (t, None) for t in web_threads), state
        after = _control(testhost, "status", "--json")["vms"]
        assert set(after) == {"lv-web-2"} and after["lv-web-2"]["connected"], after
        assert (after["lv-web-2"]["vcpus"], _threads(testhost, pids["lv-web-2"])) == \
            (web_before[0]["vcpus"], web_before[1])
        assert after["lv-web-2"]["sessions_served"] == 1  # the same session, never interrupted

        # A manager pins lv-web-2 and lets it go again: libvirt's QEMU's threads get their affinity back.
        # libvirt's <vcpupin> is also a cpuset on vCPU 0's cgroup: a pin outside it is refused by the
        # kernel, and status says so rather than claim it.
        _control(testhost, "update", "lv-web-2", "--class", "pinned")
        web = _control(testhost, "status", "--json")["vms"]["lv-web-2"]
        assert sorted(v["pcpu"] for v in web["vcpus"]) == [0, 1], web["vcpus"]
        now = _threads(testhost, pids["lv-web-2"])
        for v in web["vcpus"]:
            allowed = {0, 1} if web_affinity[v["vcpu"]] == "0-1" else {int(web_affinity[v["vcpu"]])}
            applied = v["pcpu"] in allowed
            assert v["pin_applied"] is applied, v
            assert now[v["thread"]][1] == (str(v["pcpu"]) if applied else web_affinity[v["vcpu"]]), (v, now)
        _control(testhost, "update", "lv-web-2", "--class", "libvirt")
        web = _control(testhost, "status", "--json")["vms"]["lv-web-2"]
        assert {v["vcpu"]: _threads(testhost, pids["lv-web-2"])[v["thread"]][1] for v in web["vcpus"]} == web_affinity
        journal = testhost.run(["journalctl", "-b", "-u", "vhost-user-cpufreq", "--no-pager", "-o", "cat"]).stdout
        assert "refused" not in journal, journal[-3000:]
    finally:
        testhost.sh("for d in $(virsh list --all --name); do virsh destroy $d; virsh undefine $d; done; "
                    "systemctl stop vhost-user-cpufreq.service; systemctl clean --what=fdstore vhost-user-cpufreq; "
                    "systemctl reset-failed", timeout=180)
