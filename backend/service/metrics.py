"""Prometheus exposition of the daemon's state.

Theory of operation: nothing here runs on the hot path.  Sessions, devices
and actuators only bump plain :class:`~.counters.Counters` dictionaries (and
one latency histogram per VM).  When Prometheus scrapes, :class:`DaemonCollector`
asks its :class:`MetricsSource` (the daemon) for a :class:`DaemonView`: the
counters, the host model, the applied clamps and the mirrored config spaces,
copied into frozen values.  The exporter knows those values and nothing of the
objects behind them, so it does not import the daemon, and the daemon alone
decides what it shows.  Every family is yielded on every scrape, even without samples, so
the names are always declared (dashboards and alert rules can rely on them).

The HTTP endpoint is prometheus_client's WSGI server, serving a private
:class:`CollectorRegistry` from its own threads while the asyncio loop keeps
running.  The view is therefore built by reads only, on the exporter's thread:
attribute loads and ``Counters.snapshot()`` (a C-level dict copy, atomic under
the GIL), copying every dict it iterates that the loop may resize (``service.vms``).
A value may be one update behind another in a scrape; none is ever torn.

Naming: one prefix ``vhost_user_cpufreq_``, base units (seconds, hertz),
``_total`` on counters, ratios 0..1.  Label values are bounded: ``vm`` comes
from the configuration, ``reason`` from the protocol's fixed reason slugs or
errno names, ``vcpu`` and ``domain`` are small indices.
"""

from __future__ import annotations

import errno
import platform
import threading
from importlib import metadata
from typing import TYPE_CHECKING, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..counters import LATENCY_BUCKETS
from ..dataplane.cdrain import dataplane
from ..dataplane.lane import running_lanes
from ..policy.engine import CAPACITY_SCALE
from .metrics_view import MetricsSource, Snapshot

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["PREFIX", "DaemonCollector", "MetricsServer", "build_registry", "render", "start_metrics_server",
           "parse_address"]

PREFIX = "vhost_user_cpufreq_"

try:
    VERSION = metadata.version("vhost-user-cpufreq")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "unknown"




#: Per-VM counters (VmSlot.counters): (event, metric name without prefix, help, reason label?).
VM_COUNTERS: tuple[tuple[str, str, str, bool], ...] = (
    ("records", "records_total", "Valid utilisation records received from the guest.", False),
    ("rejected", "records_rejected_total",
     "Requests rejected (malformed batches, records, descriptor chains or vhost-user messages), by reason.", True),
    ("batches", "batches_total", "Request batches accepted.", False),
    ("lost_batches", "lost_batches_total",
     "Batches missing from the guest's sequence numbers (a rejected buffer is not one: SPEC 6.2).", False),
    ("kicks", "kicks_total", "Request queue kicks read on a started ring (SPEC 6.5).", False),
    ("polls", "polls_total", "Request queue drains without a kick, on the poll grid of a busy ring.", False),
    ("sessions", "sessions_total", "Front-end connections accepted.", False),
    ("sessions_closed", "sessions_closed_total", "Sessions closed by the back-end for a protocol error, by reason.",
     True),
    ("connections_refused", "connections_refused_total", "Front-end connections refused, by reason.", True),
    ("config_updates", "config_updates_total", "Config space changes (new generation).", False),
    ("config_reads", "config_reads_total", "Config space reads by the front-end.", False),
    ("config_notifications", "config_notifications_total", "Configuration change notifications sent.", False),
    ("config_notify_failed", "config_notifications_failed_total",
     "Configuration change notifications that could not be sent, by reason.", True),
    ("config_notify_skipped", "config_notifications_skipped_total",
     "Configuration changes not notified (no back-end channel), by reason.", True),
    ("freq_page_updates", "freq_page_updates_total",
     "Domain entries of the shared frequency page rewritten for a host frequency change.", False),
    ("shmem_maps_sent", "shmem_maps_sent_total", "Shared memory maps asked of the front-end.", False),
    ("shmem_mapped", "shmem_mapped_total", "Shared memory maps the front-end acknowledged.", False),
    ("shmem_dropped", "shmem_dropped_total", "Times the front-end dropped the shared memory (device stopped).",
     False),
    ("shmem_fallback", "shmem_fallback_total",
     "Shared memory not used, so config space carries the frequencies, by reason.", True),
    ("mirror_below_threshold", "mirror_below_threshold_total",
     "Host frequency changes too small to be mirrored to the guest.", False),
    ("threads_attached", "threads_attached_total", "vCPU threads found and attached.", False),
    ("thread_discovery_failed", "thread_discovery_failed_total", "vCPU thread discoveries that failed, by reason.",
     True),
    ("interrupts_dropped", "interrupts_dropped_total",
     "Used-buffer interrupts not sent because the call eventfd could not take them, by reason.", True),
)

#: Service-wide counters (Daemon.counters, shared with the thread actuator).
SERVICE_COUNTERS: tuple[tuple[str, str, str, bool], ...] = (
    ("clamps_applied", "clamps_applied_total", "Util clamps applied to vCPU threads.", False),
    ("clamps_recorded", "clamps_recorded_total", "Util clamps recorded but not applied (degraded or dry run).",
     False),
    ("clamp_failed", "clamps_failed_total", "Util clamps that failed, by errno.", True),
    ("caps_applied", "caps_applied_total", "Power caps (uclamp_max) written to vCPU threads or cgroups.", False),
    ("caps_recorded", "caps_recorded_total", "Power caps recorded but not applied (degraded or dry run).", False),
    ("cap_failed", "caps_failed_total", "Power caps (uclamp_max) that failed, by errno.", True),
    ("pins", "pins_total", "vCPU threads pinned to their planned pCPU.", False),
    ("pin_failed", "pins_failed_total", "vCPU thread pinnings that failed, by errno.", True),
    ("restored", "threads_restored_total", "vCPU threads given back their original affinity and clamps.", False),
    ("restore_failed", "threads_restore_failed_total", "vCPU thread restorations that failed, by errno.", True),
    ("reloads", "reloads_total", "Configuration reloads applied.", False),
    ("reload_failed", "reload_failures_total", "Configuration reloads rejected.", False),
    ("control_requests", "control_requests_total", "Requests on the control socket.", False),
    ("shared_admitted", "shared_socket_admitted_total",
     "Front-ends on the shared socket identified and served as a VM.", False),
    ("shared_refused", "shared_socket_refused_total",
     "Front-ends on the shared socket refused, by reason (identity, name in use, no class...).", True),
    ("recovered_threads", "threads_recovered_total",
     "Threads restored at start from the state file of an instance that did not stop cleanly.", False),
    ("carry_ignored", "carry_ignored_total",
     "Thread or cgroup records a predecessor process handed over that matched nothing of this process's.", False),
)


def _le(bound: float) -> str:
    # Bucket bounds as Go prints them (what Prometheus clients emit): "+Inf", "5e-06", "0.001".
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _counter_families(specs: Iterable[tuple[str, str, str, bool]],
                      sources: list[tuple[list[str], Snapshot]], labels: list[str]) -> Iterator[Metric]:
    """One family per spec; one sample per (label values, reason) found in each source snapshot."""
    for event, name, doc, by_reason in specs:
        fam = CounterMetricFamily(PREFIX + name, doc, labels=labels + (["reason"] if by_reason else []))
        for values, snap in sources:
            if by_reason:
                # Reason-less increments of a reason-keyed event are shown as "unknown", not dropped.
                for (e, r), n in sorted(snap.items()):
                    if e == event:
                        fam.add_metric(values + [r or "unknown"], n)
            else:
                fam.add_metric(values, sum(n for (e, _), n in snap.items() if e == event))
        yield fam


class DaemonCollector:
    """Turns a :class:`MetricsSource`'s view into metric families at scrape time (on the exporter's thread)."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        d = self.source.metrics_view()
        slots = list(d.vms.items())

        yield from _counter_families(VM_COUNTERS, [([vm], s.counters) for vm, s in slots], ["vm"])
        yield from _counter_families(SERVICE_COUNTERS, [([], d.counters)], [])

        hist = HistogramMetricFamily(
            PREFIX + "kick_to_decision_seconds",
            "Time from reading a guest kick to every record of it decided on.", labels=["vm"])
        for vm, s in slots:
            h = s.latency
            cum = h.cumulative() if h is not None else [(b, 0) for b in (*LATENCY_BUCKETS, float("inf"))]
            # The count comes from the +Inf bucket, so buckets and count always agree in one scrape.
            hist.add_metric([vm], [(_le(b), n) for b, n in cum], h.sum if h is not None else 0.0)
        yield hist

        connected = GaugeMetricFamily(PREFIX + "sessions_connected", "1 while a front-end is connected to the VM.",
                                      labels=["vm"])
        generation = GaugeMetricFamily(PREFIX + "config_generation", "Config space generation of the VM's device.",
                                       labels=["vm"])
        page = GaugeMetricFamily(PREFIX + "freq_page_in_use",
                                 "1 while host frequencies reach the guest through the shared page (SPEC 8), "
                                 "0 while through config space.", labels=["vm"])
        uclamp = GaugeMetricFamily(
            PREFIX + "vcpu_uclamp_min_ratio",
            "Util clamp (uclamp.min) applied to the vCPU thread, as a ratio of the biggest CPU's capacity.",
            labels=["vm", "vcpu"])
        ucap = GaugeMetricFamily(
            PREFIX + "vcpu_uclamp_max_ratio",
            "Power cap (uclamp.max) of the vCPU, as a ratio of the biggest CPU's capacity; 1: no cap.",
            labels=["vm", "vcpu"])
        util = GaugeMetricFamily(
            PREFIX + "vcpu_guest_utilization_ratio",
            "Last utilisation the guest reported for the vCPU, as a ratio of the vCPU's capacity.",
            labels=["vm", "vcpu"])
        dom_cur = GaugeMetricFamily(PREFIX + "domain_frequency_hertz",
                                    "Frequency mirrored to the guest for its frequency domain.", labels=["vm", "domain"])
        dom_max = GaugeMetricFamily(PREFIX + "domain_frequency_max_hertz",
                                    "Maximum frequency advertised to the guest for its frequency domain.",
                                    labels=["vm", "domain"])
        for vm, s in slots:
            connected.add_metric([vm], 1 if s.connected else 0)
            cfg = s.config
            generation.add_metric([vm], cfg.generation)
            page.add_metric([vm], 1 if s.freq_page else 0)
            for v, u in enumerate(s.utils):
                # A vCPU the engine never touched has no clamp from us: 0.
                uclamp.add_metric([vm, str(v)], (s.clamps.get(v) or 0) / CAPACITY_SCALE)
                ucap.add_metric([vm, str(v)], s.caps.get(v, CAPACITY_SCALE) / CAPACITY_SCALE)
                util.add_metric([vm, str(v)], u / CAPACITY_SCALE)
            for i, dom in enumerate(cfg.domains):
                dom_cur.add_metric([vm, str(i)], dom.cur_khz * 1000.0)
                dom_max.add_metric([vm, str(i)], dom.max_khz * 1000.0)
        yield from (connected, generation, page, uclamp, ucap, util, dom_cur, dom_max)

        yield GaugeMetricFamily(PREFIX + "vms_configured", "VMs configured (served sockets).", value=len(slots))

        host = d.host
        h_cur = GaugeMetricFamily(PREFIX + "host_domain_frequency_hertz",
                                  "Current frequency of the host frequency domain (cpufreq policy).", labels=["domain"])
        h_min = GaugeMetricFamily(PREFIX + "host_domain_frequency_min_hertz",
                                  "Minimum frequency of the host frequency domain.", labels=["domain"])
        h_max = GaugeMetricFamily(PREFIX + "host_domain_frequency_max_hertz",
                                  "Maximum frequency of the host frequency domain.", labels=["domain"])
        h_cap = GaugeMetricFamily(PREFIX + "host_domain_capacity_ratio",
                                  "Capacity of the host domain's CPUs, as a ratio of the biggest CPU's.",
                                  labels=["domain"])
        for i, hd in enumerate(host.domains):
            h_cur.add_metric([str(i)], hd.cur_khz * 1000.0)
            h_min.add_metric([str(i)], hd.min_khz * 1000.0)
            h_max.add_metric([str(i)], hd.max_khz * 1000.0)
            h_cap.add_metric([str(i)], hd.capacity / CAPACITY_SCALE)
        yield from (h_cur, h_min, h_max, h_cap)

        yield CounterMetricFamily(PREFIX + "host_frequency_samples_total", "Host frequency samples taken.",
                                  value=host.samples)
        yield CounterMetricFamily(PREFIX + "host_frequency_changes_total",
                                  "Host frequency samples where some domain moved.", value=host.changes)
        yield CounterMetricFamily(PREFIX + "host_frequency_read_errors_total",
                                  "scaling_cur_freq reads that failed or did not parse.", value=host.read_errors)
        yield CounterMetricFamily(PREFIX + "host_model_rebuilds_total", "Host CPU model rebuilds from sysfs.",
                                  value=host.rebuilds)
        yield CounterMetricFamily(PREFIX + "cpu_hotplug_events_total", "CPU online/offline/add/remove uevents seen.",
                                  value=host.hotplug_events)

        degraded = GaugeMetricFamily(
            PREFIX + "degraded",
            "1 while a component runs degraded: cpufreq (nominal frequencies), uclamp (clamps recorded, not "
            "applied), hotplug (no uevents; periodic rebuilds only), dataplane (pure Python), lane_slice (the "
            "kick lane asked for a short scheduler slice and did not get it).", labels=["component"])
        degraded.add_metric(["cpufreq"], 1 if host.cpufreq_degraded else 0)
        degraded.add_metric(["uclamp"], 1 if d.uclamp_degraded else 0)
        degraded.add_metric(["hotplug"], 0 if host.hotplug_available else 1)
        degraded.add_metric(["dataplane"], 0 if dataplane().kind == "c" else 1)
        lanes = running_lanes()
        degraded.add_metric(["lane_slice"], 1 if any(ln.sched.requested_ns and not ln.sched.applied for ln in lanes) else 0)
        yield degraded
        if lanes:
            yield GaugeMetricFamily(
                PREFIX + "kick_lane_slice_seconds",
                "Scheduler slice of the kick lane thread as the kernel reports it (0: the kernel's default slice "
                "applies); present while the lane runs.", value=max(ln.sched.slice_ns for ln in lanes) / 1e9)

        yield GaugeMetricFamily(PREFIX + "start_time_seconds", "Start time of the service, seconds since the epoch.",
                                value=d.started)
        info = GaugeMetricFamily(PREFIX + "build_info", "Always 1; the labels say which build runs.",
                                 labels=["version", "python_version"])
        info.add_metric([VERSION, platform.python_version()], 1)
        yield info


def build_registry(source: MetricsSource) -> CollectorRegistry:
    """A private registry holding only the daemon's collector (no default process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source))
    return registry


def render(source: MetricsSource) -> bytes:
    """The daemon's metrics in the Prometheus text format."""
    return generate_latest(build_registry(source))


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces); raises OSError(EINVAL) otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise OSError(errno.EINVAL, f"metrics address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9860")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class MetricsServer:
    """The running HTTP endpoint; :meth:`shutdown` stops it and closes its socket."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, address: str) -> None:
        self._httpd: WSGIServer | None = httpd
        self._thread = thread
        self.address = address
        self.port: int = httpd.server_address[1]  # the real one when the address asked for port 0

    def shutdown(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()  # waits for serve_forever to return
        httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(source: MetricsSource, address: str) -> MetricsServer:
    """Serve ``/metrics`` (any path, in fact) on ``address`` from a background thread.

    Raises OSError naming the address when it cannot listen (port in use,
    unknown host, bad syntax).
    """
    host, port = parse_address(address)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=build_registry(source))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {address}: {exc.strerror or exc}") from exc
    return MetricsServer(httpd, thread, address)
