"""Prometheus exposition: values, promtool lint, alert rules, dashboard, and a real Prometheus scraping the service.

The service is a whole :class:`Daemon` on a generated sysfs tree, served over
real unix sockets to a modelled guest; "QEMU" is this test process, whose
four threads are named like QEMU's vCPU threads (dry run: nothing is pinned or
clamped for real, the clamps are recorded).  Tests that need promtool or the
prometheus server (Debian package ``prometheus``, ``bash .ci/tools.sh``) skip
with the reason when they are missing, and fail instead under
``VUC_REQUIRE_TOOLS=1`` (CI).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vhost_user_cpufreq.backend.service.config import VmSettings, parse_config
from vhost_user_cpufreq.backend.service.daemon import Daemon
from vhost_user_cpufreq.backend.dataplane.lane import running_lanes
from vhost_user_cpufreq.backend.service.metrics import parse_address, render, start_metrics_server
from vhost_user_cpufreq.protocol import cpufreq as abi

from .helpers import kernel_has_fair_slices, named_vcpu_threads, Guest, start_guest, unavailable, until
from .sysfs_tree import HostSpec, make_sysfs_tree, set_cur_freq

HOST = HostSpec.big_little([(4, 300000, 1800000, 160), (3, 400000, 2200000, 498), (1, 500000, 2800000, 1024)])
REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE = REPO / "deploy" / "prometheus" / "scrape.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "vhost-user-cpufreq.json"
METRIC_NAME = re.compile(r"\bvhost_user_cpufreq_[a-zA-Z0-9_]+")
UTILS = (100, 400, 700, 1000)  # last value sent per vCPU


def _tool(name: str) -> str:
    """Path of a Prometheus tool; skips (or fails under VUC_REQUIRE_TOOLS=1) without it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        unavailable("VUC_REQUIRE_TOOLS", f"{name} not found (Debian package 'prometheus'; `bash .ci/tools.sh` installs it)")
    return path


@pytest.fixture
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture
def prometheus_bin() -> str:
    return _tool("prometheus")


@pytest.fixture
def vcpu_threads() -> Iterator[list[int]]:
    with named_vcpu_threads(4) as tids:
        yield tids


@dataclass
class Running:
    daemon: Daemon
    root: Path
    guest: Guest

    async def close(self) -> None:
        await self.guest.close()
        await self.daemon.stop()


async def _running(tmp_path: Path, *, metrics_address: str | None = None) -> Running:
    """A started daemon with one connected guest that sent records, one malformed batch and saw a frequency move."""
    root = make_sysfs_tree(tmp_path / "sys", HOST)
    service: dict[str, Any] = {"sysfs_root": str(root), "sample_period": 0.01, "dry_run": True,
                               "mirror_threshold": 0.01, "min_interval": 0.0, "lane_slice_us": 250}
    if metrics_address is not None:
        service["metrics_address"] = metrics_address
    config = parse_config({"service": service, "vm": {"vm0": {"socket": str(tmp_path / "vm0.sock"), "vcpus": 4}}})
    daemon = Daemon(config)
    await daemon.start()
    g = await start_guest(str(tmp_path / "vm0.sock"), util_threshold=1)
    slot = daemon.service.vms["vm0"]
    await until(lambda: len(daemon.policy.vms["vm0"].tids) == 4, what="vCPU threads attached")

    # One malformed request: a batch truncated to 7 bytes, written straight into the ring.
    q, mem = g.driver.queue, g.transport.ram.memory
    raw = abi.encode_batch(abi.Batch(0, 0, (abi.Record(0, 100),), abi.BATCH_F_RESYNC))
    gpa = g.transport.ram.alloc(len(raw))
    mem.view(gpa, len(raw))[:] = raw
    q.add([(gpa, 7)])
    q.publish()
    g.transport.notify(0)
    await until(lambda: slot.counters.get("rejected", "short-batch") == 1, what="the short batch rejected")
    q.reclaim()  # take our buffer back before the driver reclaims its own

    for step in range(1, 5):
        for v, u in enumerate(UTILS):
            g.driver.set_util(v, u * step // 4)
        g.driver.flush()
        await until(lambda: slot.counters.get("records") == g.driver.stats.records, what="records delivered")

    set_cur_freq(root, 7, 1500000)  # the big cluster speeds up: mirrored into vm0's domain 2
    await until(lambda: slot.device.config.domains[2].cur_khz == 1500000
                and slot.counters.get("config_notifications") >= 1, what="frequency mirrored and notified")
    return Running(daemon, root, g)


def _parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _names(text: str) -> set[str]:
    """Every sample name and family name the exposition declares (with or without samples)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
    return names


async def test_exposition_reports_what_the_service_counted(tmp_path: Path, vcpu_threads: list[int]) -> None:
    r = await _running(tmp_path)
    d, slot = r.daemon, r.daemon.service.vms["vm0"]
    c = slot.counters
    s = _parse(render(d).decode())
    P = "vhost_user_cpufreq_"
    vm = {"vm": "vm0"}

    assert _value(s, P + "records_total", **vm) == c.get("records") == r.guest.driver.stats.records == 16
    assert _value(s, P + "records_rejected_total", vm="vm0", reason="short-batch") == 1
    assert _value(s, P + "batches_total", **vm) == c.get("batches") == r.guest.driver.stats.batches
    assert _value(s, P + "lost_batches_total", **vm) == 0
    assert _value(s, P + "sessions_total", **vm) == 1
    assert _value(s, P + "sessions_connected", **vm) == 1
    assert _value(s, P + "freq_page_in_use", **vm) == 0  # this VM is not offered the page: config space
    assert _value(s, P + "freq_page_updates_total", **vm) == 0
    assert _value(s, P + "config_reads_total", **vm) == c.get("config_reads") >= 3
    assert _value(s, P + "config_notifications_total", **vm) == c.get("config_notifications") >= 1
    assert _value(s, P + "config_updates_total", **vm) == c.get("config_updates") >= 1
    assert _value(s, P + "threads_attached_total", **vm) == 4
    # The latency histogram: one observation per kick, buckets consistent with the count.
    kicks = _value(s, P + "kicks_total", **vm)
    # Each eventfd read counts once; kicks the guest sent before a read merge into it.
    assert kicks == c.get("kicks") and 1 <= kicks <= r.guest.transport.notifications
    assert _value(s, P + "kick_to_decision_seconds_count", **vm) == kicks
    assert _value(s, P + "kick_to_decision_seconds_bucket", vm="vm0", le="+Inf") == kicks
    assert 0 < _value(s, P + "kick_to_decision_seconds_sum", **vm) < kicks * 0.1
    # Applied clamps as ratios of capacity, exactly the engine's; the guest's last util too.
    clamps = d.policy.vms["vm0"].engine.vcpus
    for v in range(4):
        assert _value(s, P + "vcpu_uclamp_min_ratio", vm="vm0", vcpu=str(v)) == (clamps[v] or 0) / 1024
        assert _value(s, P + "vcpu_guest_utilization_ratio", vm="vm0", vcpu=str(v)) == UTILS[v] / 1024
    assert _value(s, P + "vcpu_uclamp_min_ratio", vm="vm0", vcpu="3") == 1000 / 1024  # big vCPU on the big pCPU
    # No power cap configured: every vCPU's uclamp_max is the whole capacity.
    assert all(_value(s, P + "vcpu_uclamp_max_ratio", vm="vm0", vcpu=str(v)) == 1 for v in range(4))
    # Frequencies in hertz: vm0's vCPUs sit on the little, little, mid and big CPUs.
    assert [_value(s, P + "domain_frequency_hertz", vm="vm0", domain=str(i)) for i in range(3)] == [3e8, 4e8, 1.5e9]
    assert [_value(s, P + "host_domain_frequency_hertz", domain=str(i)) for i in range(3)] == [3e8, 4e8, 1.5e9]
    assert _value(s, P + "host_domain_frequency_max_hertz", domain="2") == 2.8e9
    # Service-wide: dry run records clamps instead of applying them, and says so.
    assert _value(s, P + "clamps_recorded_total") == d.counters.get("clamps_recorded") > 0
    assert _value(s, P + "clamps_applied_total") == 0
    assert _value(s, P + "pins_total") == 4
    assert _value(s, P + "degraded", component="uclamp") == 1
    assert _value(s, P + "degraded", component="cpufreq") == 0
    hp = d.host.hotplug
    assert _value(s, P + "degraded", component="hotplug") == (0 if hp is not None and hp.available else 1)
    from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane

    assert _value(s, P + "degraded", component="dataplane") == (0 if dataplane().kind == "c" else 1)
    # The kick lane serves vm0's queue with the configured slice, where the C lane runs at all.
    # This daemon's lane is its loop's; a lane an earlier test's loop still holds is not its own.
    lanes = [ln for ln in running_lanes() if ln._loop is asyncio.get_running_loop()]
    if dataplane().kind == "c" and dataplane().lane:
        assert len(lanes) == 1 and lanes[0].sched.requested_ns == 250_000
        applied = lanes[0].sched.applied
        assert applied == kernel_has_fair_slices()
        assert _value(s, P + "kick_lane_slice_seconds") == (250e-6 if applied else lanes[0].sched.slice_ns / 1e9)
        assert _value(s, P + "degraded", component="lane_slice") == (0 if applied else 1)
    else:
        assert not lanes and not [k for k in s if k[0] == P + "kick_lane_slice_seconds"]
        assert _value(s, P + "degraded", component="lane_slice") == 0
    assert _value(s, P + "vms_configured") == 1
    assert _value(s, P + "reloads_total") == 0 and _value(s, P + "reload_failures_total") == 0
    assert _value(s, P + "start_time_seconds") == d.started
    assert [k for k in s if k[0] == P + "build_info"] and all(v == 1 for k, v in s.items() if k[0] == P + "build_info")

    # The guest goes: no boost outlives it, and the gauges say so.
    await r.guest.close()
    await until(lambda: slot.connection is None, what="session closed")
    s = _parse(render(d).decode())
    assert _value(s, P + "sessions_connected", **vm) == 0
    assert all(_value(s, P + "vcpu_uclamp_min_ratio", vm="vm0", vcpu=str(v)) == 0 for v in range(4))
    await d.stop()


async def test_a_vm_on_the_shared_page_says_so_in_metrics_and_status(tmp_path: Path) -> None:
    root = make_sysfs_tree(tmp_path / "sys", HOST)
    config = parse_config({"service": {"sysfs_root": str(root), "sample_period": 0.01, "dry_run": True,
                                       "mirror_threshold": 0.01},
                           "vm": {"vm0": {"socket": str(tmp_path / "vm0.sock"), "vcpus": 2, "shared_page": True,
                                          "pinning": [0, 7], "clamp": "none"}}})
    daemon = Daemon(config)
    await daemon.start()
    g = await start_guest(str(tmp_path / "vm0.sock"))
    try:
        slot = daemon.service.vms["vm0"]
        await until(lambda: slot.device.freq_path == "page", what="the page in use")
        set_cur_freq(root, 7, 1500000)  # the big cluster speeds up: written to the page, not notified
        await until(lambda: slot.counters.get("freq_page_updates") >= 1, what="the page updated")
        s = _parse(render(daemon).decode())
        P, vm = "vhost_user_cpufreq_", {"vm": "vm0"}
        assert _value(s, P + "freq_page_in_use", **vm) == 1
        assert _value(s, P + "freq_page_updates_total", **vm) == slot.counters.get("freq_page_updates") >= 1
        assert _value(s, P + "config_notifications_total", **vm) == 0
        assert daemon.status()["vms"]["vm0"]["freq_path"] == "page"
    finally:
        await g.close()
        await daemon.stop()


async def test_http_endpoint_serves_the_exposition_until_shutdown(tmp_path: Path, vcpu_threads: list[int]) -> None:
    r = await _running(tmp_path, metrics_address="127.0.0.1:0")
    server = r.daemon.metrics_server
    url = f"http://127.0.0.1:{server.port}/metrics"

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.headers["Content-Type"], resp.read().decode()

    ctype, text = await asyncio.to_thread(get)
    assert ctype.startswith("text/plain")
    s = _parse(text)
    assert _value(s, "vhost_user_cpufreq_records_total", vm="vm0") == r.guest.driver.stats.records
    await r.close()
    with pytest.raises(OSError):
        await asyncio.to_thread(get)  # shut down: nothing listens any more


def test_a_busy_port_is_one_clear_error_naming_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(OSError) as exc:
            start_metrics_server(None, address)  # type: ignore[arg-type]  # never reaches the collector
    assert exc.value.errno == errno.EADDRINUSE
    assert address in str(exc.value) and "in use" in str(exc.value)
    for bad in ("9860", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(OSError) as exc:
            start_metrics_server(None, bad)  # type: ignore[arg-type]
        assert exc.value.errno == errno.EINVAL and bad in str(exc.value)
    assert parse_address("[::1]:9860") == ("::1", 9860)
    assert parse_address(":9860") == ("0.0.0.0", 9860)


async def test_scrapes_from_another_thread_while_vms_come_and_go(tmp_path: Path, vcpu_threads: list[int]) -> None:
    r = await _running(tmp_path)
    d = r.daemon
    stop = threading.Event()
    errors: list[BaseException] = []
    scrapes = 0

    def scraper() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                text = render(d).decode()
                assert "vhost_user_cpufreq_records_total" in text
                scrapes += 1
                # A pause, as any scraper has: a thread that never leaves the GIL makes every system
                # call of the event loop wait a switch interval (5 ms) to get it back.
                time.sleep(0.001)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
                return

    t = threading.Thread(target=scraper)
    t.start()
    try:
        for i in range(30):
            await d.host.add_vm(VmSettings("vm1", str(tmp_path / "vm1.sock"), 2), notify_interval=0.01,
                                mirror_threshold=0.0)
            for v, u in enumerate(UTILS):
                r.guest.driver.set_util(v, (u + 37 * i) % 1025)
            r.guest.driver.flush()
            await asyncio.sleep(0.002)
            await d.host.remove_vm("vm1")
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        await asyncio.to_thread(t.join)
    assert errors == [] and scrapes > 0
    await r.close()


async def test_promtool_accepts_the_exposition(tmp_path: Path, vcpu_threads: list[int], promtool: str) -> None:
    r = await _running(tmp_path)
    text = render(r.daemon)
    await r.close()
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (res.stdout + res.stderr).decode()


def test_every_metric_in_alerts_and_dashboard_is_exported(tmp_path: Path) -> None:
    # A bare daemon (never started) declares every family too: names do not depend on traffic.
    root = make_sysfs_tree(tmp_path / "sys", HOST)
    exported = _names(render(Daemon(parse_config({"service": {"sysfs_root": str(root)}}))).decode())
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    exprs = _dashboard_exprs(dash)
    assert len(exprs) >= 20
    used = {n for e in exprs for n in METRIC_NAME.findall(e)} | set(METRIC_NAME.findall(ALERTS.read_text()))
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"


def _dashboard_exprs(node: Any) -> list[str]:
    """Every PromQL expression in a dashboard: panel targets and query variables."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str) and "(" in v["query"]:
                out.append(v["query"])
            else:
                out += _dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            out += _dashboard_exprs(v)
    return out


def test_dashboard_queries_are_valid_promql(tmp_path: Path, promtool: str) -> None:
    # promtool has no expression checker; recording rules wrap each query so `check rules` parses it.
    exprs = [e for e in _dashboard_exprs(json.loads(DASHBOARD.read_text())) if not e.startswith("label_values(")]
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$vm", ".*")
        rules += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(e)}"]
    (tmp_path / "dash.yml").write_text("\n".join(rules) + "\n")
    res = subprocess.run([promtool, "check", "rules", str(tmp_path / "dash.yml")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests(tmp_path: Path, promtool: str) -> None:
    res = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    inst = 'instance="h:9860", job="vhost-user-cpufreq"'
    (tmp_path / "alerts_test.yml").write_text(f"""
rule_files: [{json.dumps(str(ALERTS))}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{{inst}}}'
        values: '1 1 0 0 0 0 0'
      - series: 'vhost_user_cpufreq_records_rejected_total{{{inst}, vm="vm0", reason="bad-util"}}'
        values: '0+60x30'
      - series: 'vhost_user_cpufreq_records_rejected_total{{{inst}, vm="vm1", reason="bad-util"}}'
        values: '0x30'
      - series: 'vhost_user_cpufreq_degraded{{{inst}, component="uclamp"}}'
        values: '1x30'
      - series: 'vhost_user_cpufreq_degraded{{{inst}, component="cpufreq"}}'
        values: '0x30'
      - series: 'vhost_user_cpufreq_clamps_failed_total{{{inst}, reason="esrch"}}'
        values: '0x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: VhostUserCpufreqDown
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "h:9860", job: vhost-user-cpufreq}}
            exp_annotations:
              summary: "vhost-user-cpufreq on h:9860 is not answering scrapes"
              description: "Prometheus could not scrape h:9860 for 2 minutes. Guests lose frequency mirroring and host util clamps while the service is down (systemctl status vhost-user-cpufreq)."
      - eval_time: 20m
        alertname: VhostUserCpufreqRecordsRejected
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "h:9860", vm: vm0, reason: bad-util}}
            exp_annotations:
              summary: "VM vm0 sends malformed requests (bad-util)"
              description: "1/s requests from VM vm0 on h:9860 are rejected with reason bad-util: the guest driver or the VMM breaks the protocol (protocol/SPEC.md). Its requests are dropped, not applied."
      - eval_time: 20m
        alertname: VhostUserCpufreqDegraded
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "h:9860", component: uclamp}}
            exp_annotations:
              summary: "vhost-user-cpufreq on h:9860 runs degraded: uclamp"
              description: "cpufreq: no usable cpufreq, guests see nominal frequencies; uclamp: clamps are recorded but not applied (kernel without CONFIG_UCLAMP_TASK, or dry run); hotplug: no uevents, CPU hotplug is only noticed by the periodic rebuild. `vhost-user-cpufreq status` says why."
      - eval_time: 20m
        alertname: VhostUserCpufreqClampsFailing
        exp_alerts: []
""")
    res = subprocess.run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scrape_snippet_is_a_valid_scrape_config(tmp_path: Path, promtool: str) -> None:
    snippet = "\n".join("  " + line for line in SCRAPE.read_text().splitlines())
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"rule_files: [{json.dumps(str(ALERTS))}]\nscrape_configs:\n{snippet}\n")
    res = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


async def test_a_real_prometheus_scrapes_the_service(tmp_path: Path, vcpu_threads: list[int],
                                                     prometheus_bin: str) -> None:
    r = await _running(tmp_path, metrics_address="127.0.0.1:0")
    target = f"127.0.0.1:{r.daemon.metrics_server.port}"
    web = f"127.0.0.1:{_free_port()}"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        f"scrape_configs:\n  - job_name: vhost-user-cpufreq\n    static_configs: [{{targets: [{json.dumps(target)}]}}]\n")
    log = tmp_path / "prometheus.log"
    expected = str(r.guest.driver.stats.records)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        base, seen = f"http://{web}", None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"prometheus exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                res = await asyncio.to_thread(_api, base, "/api/v1/query", query="vhost_user_cpufreq_records_total")
                seen = res["data"]["result"]
                if seen and seen[0]["value"][1] == expected:
                    break
            except OSError:
                pass  # not listening yet
            await asyncio.sleep(0.25)
        else:
            pytest.fail(f"Prometheus never saw records_total == {expected} (last: {seen}):\n{log.read_text()[-3000:]}")
        assert seen[0]["metric"] == {"__name__": "vhost_user_cpufreq_records_total", "vm": "vm0",
                                     "job": "vhost-user-cpufreq", "instance": target}
        up = await asyncio.to_thread(_api, base, "/api/v1/query", query='up{job="vhost-user-cpufreq"}')
        assert up["data"]["result"][0]["value"][1] == "1"
        rules = await asyncio.to_thread(_api, base, "/api/v1/rules")
        loaded = [rule for g in rules["data"]["groups"] for rule in g["rules"]]
        assert loaded and all(rule["health"] != "err" for rule in loaded), loaded
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await r.close()
