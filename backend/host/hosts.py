"""Embedded host descriptions, so the demo runs on any machine.

``PIXEL6`` is Google Tensor GS101 as upstream Linux describes it
(arch/arm64/boot/dts/exynos/google/gs101.dtsi): three frequency domains,
4x Cortex-A55, 2x A76, 2x X1, with the capacities Linux derives from
``capacity-dmips-mhz`` and each cluster's top frequency.
"""

from __future__ import annotations

from ..cpufreq.hostfreq import HostDomain, HostSnapshot

__all__ = ["PIXEL6", "PIXEL6_OPPS_KHZ"]

PIXEL6_OPPS_KHZ: tuple[tuple[int, ...], ...] = (
    (300000, 574000, 738000, 930000, 1098000, 1197000, 1328000, 1401000, 1598000, 1704000, 1803000),
    (400000, 553000, 696000, 799000, 910000, 1024000, 1197000, 1328000, 1491000, 1663000, 1836000,
     1999000, 2130000, 2253000),
    (500000, 851000, 984000, 1106000, 1277000, 1426000, 1582000, 1745000, 1826000, 2048000, 2188000,
     2252000, 2401000, 2507000, 2630000, 2704000, 2802000),
)

PIXEL6 = HostSnapshot(
    (
        HostDomain((0, 1, 2, 3), 300000, 1803000, 300000, 160),
        HostDomain((4, 5), 400000, 2253000, 400000, 498),
        HostDomain((6, 7), 500000, 2802000, 500000, 1024),
    )
)
