"""Embedded host descriptions, so the demo runs on any machine.

``PIXEL6`` is Google Tensor GS101 as upstream Linux describes it
(arch/arm64/boot/dts/exynos/google/gs101.dtsi): three frequency domains,
4x Cortex-A55, 2x A76, 2x X1, with the capacities Linux derives from
``capacity-dmips-mhz`` and each cluster's top frequency, and the power per
OPP Linux's energy model derives from the OPPs' voltages and each core's
``dynamic-power-coefficient`` (cpufreq/power.py; the same figures as the
simulator's gs101 host, tests/test_energy_model.py holds them equal).
"""

from __future__ import annotations

from ..cpufreq.hostfreq import HostDomain, HostSnapshot
from ..cpufreq.power import opp_energy

__all__ = ["PIXEL6", "PIXEL6_OPPS_KHZ", "PIXEL6_OPPS_UV", "PIXEL6_DPC"]

PIXEL6_OPPS_KHZ: tuple[tuple[int, ...], ...] = (
    (300000, 574000, 738000, 930000, 1098000, 1197000, 1328000, 1401000, 1598000, 1704000, 1803000),
    (400000, 553000, 696000, 799000, 910000, 1024000, 1197000, 1328000, 1491000, 1663000, 1836000,
     1999000, 2130000, 2253000),
    (500000, 851000, 984000, 1106000, 1277000, 1426000, 1582000, 1745000, 1826000, 2048000, 2188000,
     2252000, 2401000, 2507000, 2630000, 2704000, 2802000),
)
#: opp-microvolt of each OPP above (gs101.dtsi's cpucl0/1/2 OPP tables)
PIXEL6_OPPS_UV: tuple[tuple[int, ...], ...] = (
    (537500, 600000, 618750, 668750, 712500, 731250, 762500, 781250, 831250, 862500, 906250),
    (506250, 537500, 562500, 581250, 606250, 625000, 662500, 687500, 731250, 775000, 818750, 868750,
     918750, 968750),
    (500000, 556250, 575000, 606250, 631250, 662500, 693750, 731250, 750000, 793750, 831250, 850000,
     887500, 925000, 968750, 1000000, 1056250),
)
#: dynamic-power-coefficient of the A55, A76 and X1 cores
PIXEL6_DPC = (70, 284, 650)

_CPUS = ((0, 1, 2, 3), (4, 5), (6, 7))
_CAPACITY = (160, 498, 1024)

PIXEL6 = HostSnapshot(
    tuple(
        HostDomain(cpus, opps[0], opps[-1], opps[0], cap, None, opp_energy(opps, uv, dpc))
        for cpus, opps, uv, dpc, cap in zip(_CPUS, PIXEL6_OPPS_KHZ, PIXEL6_OPPS_UV, PIXEL6_DPC, _CAPACITY)
    )
)
