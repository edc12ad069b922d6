"""What the metrics exporter is shown: frozen values the daemon copies out of the running service.

The exporter (``metrics.py``) turns a :class:`DaemonView` into metric
families and knows nothing of the objects behind it; the daemon builds the
view (``Daemon.metrics_view``) and alone decides what it shows.  The view is
built on the exporter's thread while the event loop runs, so building it may
only read: attribute loads, ``Counters.snapshot()``, and copies of any dict
the loop may resize.  Kept apart from ``metrics.py`` so the daemon can build
views without loading prometheus_client when no metrics address is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from vhost_user_cpufreq.protocol.cpufreq import DeviceConfig

from ..counters import Histogram
from ..cpufreq.hostfreq import HostDomain

__all__ = ["DaemonView", "HostView", "MetricsSource", "Snapshot", "VmView"]

Snapshot = Mapping[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class VmView:
    """One VM, as exported."""

    counters: Snapshot
    latency: Histogram | None  # kick to decision; read once, through cumulative()
    connected: bool
    config: DeviceConfig  # immutable, replaced whole by the loop
    utils: tuple[int, ...]  # last util each vCPU reported
    clamps: Mapping[int, int | None]  # uclamp.min per vCPU (None: the engine has not clamped it)
    freq_page: bool = False  # host frequencies reach the guest through the shared page, not config space
    caps: Mapping[int, int] = field(default_factory=dict)  # uclamp_max (power cap) per vCPU; 1024: none


@dataclass(frozen=True, slots=True)
class HostView:
    """The host model and its sources, as exported."""

    domains: Sequence[HostDomain]
    cpufreq_degraded: bool
    samples: int
    changes: int
    read_errors: int
    rebuilds: int
    hotplug_events: int
    hotplug_available: bool


@dataclass(frozen=True, slots=True)
class DaemonView:
    """Everything one scrape shows, copied out of the running service."""

    vms: Mapping[str, VmView]
    counters: Snapshot  # service-wide
    host: HostView
    uclamp_degraded: bool
    started: float


class MetricsSource(Protocol):
    def metrics_view(self) -> DaemonView:
        """A fresh view; called on the exporter's thread, so it may only read."""
