"""The driver's config refresh (SPEC 5.2) against a device that keeps changing its config.

Over a real session.  A guest that is slow next to the host's changes (a
loaded host, a guest under emulation) can see every try torn; the refresher
must then keep its cached copy and live on to the device's final
notification of the storm, as the Linux module does, not die with the VM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_user_cpufreq.guest.driver import CONFIG_TRIES
from vhost_user_cpufreq.guest.frontend import connect_guest
from vhost_user_cpufreq.protocol.errors import RemoteProtocolError

from .helpers import make_service, until

LOW, HIGH = [300000, 400000, 500000], [1803000, 400000, 500000]


async def test_a_storm_that_tears_every_try_leaves_the_cached_config_and_the_storms_end_is_read(
        tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("vm", (0, 1, 2)))
    g = await connect_guest(str(tmp_path / "vm.sock"))
    d = g.driver
    storm = {"on": False, "n": 0}
    read = d.t.read_config

    async def read_while_the_host_moves(offset: int, size: int) -> bytes:
        # Every guest read is followed by a host change: no try can see one generation twice.
        data = await read(offset, size)
        if storm["on"]:
            storm["n"] += 1
            source.set_frequencies(HIGH if storm["n"] % 2 else LOW)
        return data

    d.t.read_config = read_while_the_host_moves  # type: ignore[method-assign]
    try:
        cached = d.config
        assert cached is not None and [x.cur_khz for x in cached.domains] == LOW
        storm["on"] = True
        source.set_frequencies(HIGH)
        await until(lambda: d.stats.config_unstable >= 1, what="a refresh given up")
        assert d.stats.torn_reads >= CONFIG_TRIES
        assert d.config is cached, "a torn read replaced the cached config"
        assert d._refresher is not None and not d._refresher.done(), "the refresher died with the storm"
        storm["on"] = False
        source.set_frequencies([1401000, 400000, 500000])  # the storm's last change, announced at its end
        await until(lambda: d.config is not None and d.config.domains[0].cur_khz == 1401000,
                    what="the last change of the storm read")
        assert d.config.generation == slots["vm"].device.config.generation
    finally:
        await g.close()  # raises if the refresher died
        await svc.close()


async def test_a_device_that_never_settles_fails_the_probe_with_a_reason(tmp_path: Path) -> None:
    svc, source, _, _ = await make_service(tmp_path, ("vm", (0, 1, 2)))
    g = await connect_guest(str(tmp_path / "vm.sock"))
    d = g.driver
    read, n = d.t.read_config, [0]

    async def never_settles(offset: int, size: int) -> bytes:
        data = await read(offset, size)
        n[0] += 1
        source.set_frequencies(HIGH if n[0] % 2 else LOW)
        return data

    d.t.read_config = never_settles  # type: ignore[method-assign]
    try:
        with pytest.raises(RemoteProtocolError) as e:
            await d.refresh_config()
        assert e.value.reason == "config-unstable" and n[0] >= 3 * CONFIG_TRIES
    finally:
        d.t.read_config = read  # type: ignore[method-assign]
        await g.close()
        await svc.close()
