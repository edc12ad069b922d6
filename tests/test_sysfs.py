"""Host CPU model from sysfs (generated trees, the shared fixtures, this machine) and SysfsSource."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.cpufreq.hostfreq import HostSnapshot
from vhost_user_cpufreq.backend.host.sysfs import (
    DEFAULT_CAPACITY,
    FALLBACK_NOMINAL_KHZ,
    HostCpuModel,
    parse_cpu_list,
    read_host_model,
)
from vhost_user_cpufreq.backend.host.sysfs_source import SysfsSource

from .sysfs_tree import (
    HostSpec,
    cpu_dir,
    fixture_path,
    make_sysfs_tree,
    set_cpu_online,
    set_cur_freq,
    write_cpuinfo,
)

PHONE = [(4, 300000, 1800000, 160), (3, 400000, 2400000, 600), (1, 500000, 3000000, 1024)]
NO_CPUINFO = "/nonexistent/cpuinfo"


def phone(tmp_path: Path, **kw: object) -> Path:
    spec = HostSpec.big_little(PHONE)
    for k, v in kw.items():
        setattr(spec, k, v)
    return make_sysfs_tree(tmp_path / "sys", spec)


def policy_dir(root: Path, n: int) -> Path:
    return cpu_dir(root) / "cpufreq" / f"policy{n}"


# -- parsing ---------------------------------------------------------------------------


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,5,7-8\n") == (0, 1, 2, 3, 5, 7, 8)
    assert parse_cpu_list("0 1 2 3\n") == (0, 1, 2, 3)
    assert parse_cpu_list("\n") == () == parse_cpu_list("")
    for bad in ("3-1", "a", "0-", "-1", "+1", "1_0", "0-999999999", "\u0661"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_tree_uses_linux_formats(tmp_path: Path) -> None:
    root = phone(tmp_path, offline={5})
    base = cpu_dir(root)
    assert (base / "online").read_text() == "0-4,6-7\n"
    assert (base / "offline").read_text() == "5\n"
    assert (policy_dir(root, 0) / "related_cpus").read_text() == "0 1 2 3\n"
    assert (policy_dir(root, 4) / "affected_cpus").read_text() == "4 6\n"
    avail = (policy_dir(root, 0) / "scaling_available_frequencies").read_text()
    assert avail.startswith("300000 ") and avail.endswith("1800000 \n")
    assert not (base / "cpu0" / "online").exists() and (base / "cpu5" / "online").read_text() == "0\n"
    assert os.readlink(base / "cpu5" / "cpufreq") == "../cpufreq/policy4"


# -- host models -----------------------------------------------------------------------


def test_big_little_phone(tmp_path: Path) -> None:
    m = read_host_model(str(phone(tmp_path)))
    snap = m.snapshot()
    assert m.degraded is None and m.problems == ()
    assert [d.cpus for d in snap.domains] == [(0, 1, 2, 3), (4, 5, 6), (7,)]
    assert [d.capacity for d in snap.domains] == [160, 600, 1024]
    assert [(d.min_khz, d.max_khz, d.cur_khz) for d in snap.domains] == [
        (300000, 1800000, 300000), (400000, 2400000, 400000), (500000, 3000000, 500000)
    ]
    assert not snap.nominal
    p0 = m.policies[0]
    assert p0.available_khz[0] == 300000 and p0.available_khz[-1] == 1800000 and len(p0.available_khz) == 8
    assert (p0.driver, p0.governor) == ("cpufreq-dt", "schedutil")
    assert [m.domain_of_cpu(c) for c in range(8)] == [0, 0, 0, 0, 1, 1, 1, 2]
    assert m.domain_of_cpu(8) is None
    assert m.capacity_classes() == {160: (0, 1, 2, 3), 600: (4, 5, 6), 1024: (7,)}
    assert m.online_cpus() == tuple(range(8)) and m.possible == m.present == tuple(range(8))
    assert [c.policy for c in m.cpus] == [0, 0, 0, 0, 4, 4, 4, 7]


def test_gs101_fixture(tmp_path: Path) -> None:
    m = read_host_model(str(make_sysfs_tree(tmp_path, HostSpec.from_fixture(fixture_path("google-gs101-pixel6")))))
    snap = m.snapshot()
    assert [d.cpus for d in snap.domains] == [(0, 1, 2, 3), (4, 5), (6, 7)]
    assert [d.capacity for d in snap.domains] == [160, 498, 1024]
    assert [(d.min_khz, d.max_khz) for d in snap.domains] == [(300000, 1803000), (400000, 2253000), (500000, 2802000)]
    assert [len(p.available_khz) for p in m.policies] == [11, 14, 17]
    assert m.policies[2].available_khz[-1] == 2802000


def test_mt8183_fixture(tmp_path: Path) -> None:
    m = read_host_model(str(make_sysfs_tree(tmp_path, HostSpec.from_fixture(fixture_path("mediatek-mt8183-chromebook")))))
    assert [(d.cpus, d.capacity) for d in m.snapshot().domains] == [((0, 1, 2, 3), 741), ((4, 5, 6, 7), 1024)]
    assert [p.id for p in m.policies] == [0, 4]
    assert all(len(p.available_khz) == 16 for p in m.policies)
    assert m.capacity_classes() == {741: (0, 1, 2, 3), 1024: (4, 5, 6, 7)}


def test_xeon_fixtures(tmp_path: Path) -> None:
    pstate = read_host_model(
        str(make_sysfs_tree(tmp_path / "a", HostSpec.from_fixture(fixture_path("intel-xeon-platinum-8260l-intel_pstate"))))
    )
    assert len(pstate.snapshot().domains) == 96 and pstate.degraded is None
    assert all(p.available_khz == () and p.driver == "intel_pstate" for p in pstate.policies)
    assert {d.capacity for d in pstate.snapshot().domains} == {DEFAULT_CAPACITY}
    acpi = read_host_model(
        str(make_sysfs_tree(tmp_path / "b", HostSpec.from_fixture(fixture_path("intel-xeon-d-2796nt-acpi-cpufreq"))))
    )
    p0 = acpi.policies[0]
    assert (p0.cur_khz, p0.max_khz, p0.driver) == (800152, 2001000, "acpi-cpufreq")
    # acpi-cpufreq lists P-states highest first; the model keeps them ascending.
    assert p0.available_khz[0] == 800000 and p0.available_khz[-1] == 2001000


def test_two_socket_server(tmp_path: Path) -> None:
    m = read_host_model(str(make_sysfs_tree(tmp_path / "a", HostSpec.server(2, 4))))
    snap = m.snapshot()
    assert [d.cpus for d in snap.domains] == [(c,) for c in range(8)]
    assert all(p.available_khz == () for p in m.policies)
    assert all(c.capacity == DEFAULT_CAPACITY for c in m.cpus)
    assert m.capacity_classes() == {1024: tuple(range(8))}
    shared = read_host_model(
        str(make_sysfs_tree(tmp_path / "b", HostSpec.server(2, 2, threads_per_core=2, per_cpu_policies=False)))
    )
    assert [d.cpus for d in shared.snapshot().domains] == [(0, 1, 4, 5), (2, 3, 6, 7)]


def test_offline_cpus(tmp_path: Path) -> None:
    root = phone(tmp_path, offline={5, 7})
    m = read_host_model(str(root))
    snap = m.snapshot()
    # policy7's only CPU is offline: it drops out of the snapshot but stays in the model.
    assert [d.cpus for d in snap.domains] == [(0, 1, 2, 3), (4, 6)]
    p4, p7 = m.policies[1], m.policies[2]
    assert p4.related_cpus == (4, 5, 6) and p4.online_cpus == (4, 6)
    assert p7.related_cpus == (7,) and p7.online_cpus == ()
    assert m.online_cpus() == (0, 1, 2, 3, 4, 6)
    assert m.domain_of_cpu(5) is None and m.domain_of_cpu(7) is None and m.domain_of_cpu(6) == 1
    assert {c.id: c.policy for c in m.cpus}[5] == 4
    assert m.capacity_classes() == {160: (0, 1, 2, 3), 600: (4, 6)}
    set_cpu_online(root, 7, True)
    assert len(read_host_model(str(root)).snapshot().domains) == 3


# -- degraded mode ---------------------------------------------------------------------


def test_degraded_nominal_from_argument(tmp_path: Path) -> None:
    root = make_sysfs_tree(tmp_path, HostSpec.no_cpufreq(4, capacities={0: 512, 1: 512, 2: 1024, 3: 1024}))
    m = read_host_model(str(root), nominal_khz=2_000_000, proc_cpuinfo=NO_CPUINFO)
    snap = m.snapshot()
    assert snap.nominal and len(snap.domains) == 1
    d = snap.domains[0]
    assert (d.cpus, d.min_khz, d.max_khz, d.cur_khz, d.capacity) == ((0, 1, 2, 3), 2_000_000, 2_000_000, 2_000_000, 1024)
    assert m.degraded == (
        f"no cpufreq in {cpu_dir(root) / 'cpufreq'}: frequencies are nominal (2000000 kHz given by the caller)"
    )
    assert m.capacity_classes() == {512: (0, 1), 1024: (2, 3)}


def test_degraded_nominal_from_cpuinfo_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_sysfs_tree(tmp_path / "sys", HostSpec.no_cpufreq(2))
    info = write_cpuinfo(tmp_path / "cpuinfo", [1200.0, 2445.43])
    with caplog.at_level(logging.WARNING, logger="vhost_user_cpufreq.sysfs"):
        m = read_host_model(str(root), proc_cpuinfo=str(info))
        again = read_host_model(str(root), proc_cpuinfo=str(info))
    assert m == again
    assert m.snapshot().domains[0].cur_khz == 2445430
    assert m.degraded is not None and m.degraded.endswith(f"(2445430 kHz from {info})")
    records = [r for r in caplog.records if r.name == "vhost_user_cpufreq.sysfs"]
    assert [r.getMessage() for r in records] == [m.degraded]


def test_degraded_fallback_without_cpu_mhz(tmp_path: Path) -> None:
    root = make_sysfs_tree(tmp_path / "sys", HostSpec.no_cpufreq(2))
    info = write_cpuinfo(tmp_path / "cpuinfo", [None, None])  # arm64-like: no "cpu MHz"
    m = read_host_model(str(root), proc_cpuinfo=str(info))
    assert m.snapshot().domains[0].cur_khz == FALLBACK_NOMINAL_KHZ
    assert m.degraded is not None and "fallback" in m.degraded
    with pytest.raises(ValueError):
        read_host_model(str(root), nominal_khz=0)
    with pytest.raises(FileNotFoundError):
        read_host_model(str(tmp_path / "nothing"))


# -- malformed files -------------------------------------------------------------------


def test_malformed_files_skip_and_record(tmp_path: Path) -> None:
    root = phone(tmp_path)
    (policy_dir(root, 0) / "scaling_cur_freq").write_text("fast\n")
    (policy_dir(root, 4) / "cpuinfo_max_freq").unlink()
    (cpu_dir(root) / "cpu7" / "cpu_capacity").write_text("")
    m = read_host_model(str(root))
    assert m.degraded is None and m.policies == (m.policies[0],) and m.policies[0].id == 7
    assert len(m.problems) == 3
    assert any("policy0/scaling_cur_freq" in p and "policy0 skipped" in p for p in m.problems)
    assert any("cpuinfo_max_freq: missing" in p for p in m.problems)
    assert any("cpu7 skipped" in p for p in m.problems)
    # cpu7 is skipped, so policy7 has no usable CPU and no domain.
    assert m.snapshot().domains == () and 7 not in m.online_cpus()


def test_optional_files_malformed_keep_policy(tmp_path: Path) -> None:
    root = phone(tmp_path)
    (policy_dir(root, 0) / "scaling_available_frequencies").write_text("300000 x \n")
    (policy_dir(root, 4) / "affected_cpus").write_text("\x00\n")
    (policy_dir(root, 7) / "scaling_governor").write_text("\n")
    m = read_host_model(str(root))
    assert len(m.snapshot().domains) == 3 and len(m.problems) == 3
    assert m.policies[0].available_khz == () and m.policies[1].online_cpus == (4, 5, 6)
    assert m.policies[2].governor == ""


def test_all_policies_broken_degrades(tmp_path: Path) -> None:
    root = phone(tmp_path)
    for n in (0, 4, 7):
        (policy_dir(root, n) / "related_cpus").write_text("garbage\n")
    m = read_host_model(str(root), nominal_khz=1_500_000)
    assert m.degraded is not None and m.degraded.startswith("no usable cpufreq policy")
    assert m.snapshot().nominal and m.snapshot().domains[0].cpus == tuple(range(8))


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


_SMALL = HostSpec.big_little([(2, 300000, 1800000, 300), (1, 500000, 2800000, 1024)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=10_000),
            st.one_of(
                st.binary(max_size=40),
                st.text(alphabet="0123456789-, \n\t+_xé", max_size=30).map(str.encode),
                st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: f"{i}\n".encode()),
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_garbage_never_raises(picks: list[tuple[int, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_sysfs_tree(Path(tmp), _SMALL)
        files = _tree_files(root)
        with SysfsSource(str(root), proc_cpuinfo=NO_CPUINFO) as src:
            for index, content in picks:
                files[index % len(files)].write_bytes(content)
            m = read_host_model(str(root), proc_cpuinfo=NO_CPUINFO)
            assert isinstance(m, HostCpuModel) and isinstance(m.snapshot(), HostSnapshot)
            src.sample()
            src.rebuild()
            src.sample()


# -- SysfsSource -----------------------------------------------------------------------


def test_source_sample_detects_change(tmp_path: Path) -> None:
    root = phone(tmp_path)
    with SysfsSource(str(root)) as src:
        seen: list[HostSnapshot] = []
        unsubscribe = src.subscribe(seen.append)
        assert src.sample() is False and seen == []
        set_cur_freq(root, 4, 1_200_000)
        assert src.sample() is True
        assert len(seen) == 1 and [d.cur_khz for d in seen[0].domains] == [300000, 1_200_000, 500000]
        assert src.snapshot() == seen[0] and src.model.policies[1].cur_khz == 1_200_000
        assert src.sample() is False and len(seen) == 1
        # Same value, different bytes (no newline): parsed, equal, no call.
        (policy_dir(root, 4) / "scaling_cur_freq").write_text("1200000")
        assert src.sample() is False and len(seen) == 1
        assert (src.samples, src.changes) == (4, 1)
        unsubscribe()
        set_cur_freq(root, 0, 900000)
        assert src.sample() is True and len(seen) == 1


def test_source_rebuild_after_hotplug(tmp_path: Path) -> None:
    root = phone(tmp_path)
    with SysfsSource(str(root)) as src:
        seen: list[HostSnapshot] = []
        src.subscribe(seen.append)
        assert src.rebuild() is False and seen == []
        set_cpu_online(root, 7, False)
        assert src.rebuild() is True
        assert [d.cpus for d in seen[-1].domains] == [(0, 1, 2, 3), (4, 5, 6)]
        # The offline policy is no longer sampled; the others still are.
        set_cur_freq(root, 7, 3_000_000)
        assert src.sample() is False
        set_cur_freq(root, 0, 600000)
        assert src.sample() is True and seen[-1].domains[0].cur_khz == 600000


def test_source_garbled_read_rebuilds_and_listener_errors_contained(tmp_path: Path) -> None:
    root = phone(tmp_path)
    with SysfsSource(str(root)) as src:
        seen: list[HostSnapshot] = []

        def broken(_: HostSnapshot) -> None:
            raise RuntimeError("listener bug")

        src.subscribe(broken)
        src.subscribe(seen.append)
        (policy_dir(root, 7) / "scaling_cur_freq").write_text("<unknown>\n")
        assert src.sample() is True
        assert src.read_errors == 1 and src.rebuilds == 1
        assert [d.cpus for d in seen[-1].domains] == [(0, 1, 2, 3), (4, 5, 6)]
        assert any("policy7 skipped" in p for p in src.model.problems)


def test_source_degraded_samples_nothing(tmp_path: Path) -> None:
    root = make_sysfs_tree(tmp_path, HostSpec.no_cpufreq(2))
    with SysfsSource(str(root), nominal_khz=2_000_000) as src:
        assert src.snapshot().nominal and src.sample() is False and src.samples == 1


async def test_source_run_with_injected_clock(tmp_path: Path) -> None:
    root = phone(tmp_path)
    now = [100.0]
    sleeps: list[float] = []
    src: SysfsSource

    async def sleep(dt: float) -> None:
        sleeps.append(dt)
        now[0] += dt + (0.5 if len(sleeps) == 3 else 0.0)  # one late wake-up
        if len(sleeps) == 2:
            set_cur_freq(root, 7, 2_000_000)
        if len(sleeps) == 9:
            src.close()

    src = SysfsSource(str(root), clock=lambda: now[0], sleep=sleep)
    seen: list[HostSnapshot] = []
    src.subscribe(seen.append)
    await src.run(0.1, rebuild_every=0.45)
    assert len(seen) == 1 and seen[0].domains[2].cur_khz == 2_000_000
    # Ticks at 100.0, .1, .2, a late wake at .8 (rebuild due since .45; no
    # burst of missed ticks), .9, 101.0, .1, .2, .3 (rebuild due since 101.25).
    assert sleeps == pytest.approx([0.1] * 9)
    assert src.rebuilds == 2 and src.samples == 7
    with pytest.raises(ValueError):
        await src.run(0)


# -- this machine ----------------------------------------------------------------------


def test_this_machine() -> None:
    m = read_host_model("/sys")
    assert os.sched_getaffinity(0) <= set(m.online_cpus())
    assert len(m.online_cpus()) == os.cpu_count()
    freq_dir = Path("/sys/devices/system/cpu/cpufreq")
    if freq_dir.is_dir() and any(p.name.startswith("policy") for p in freq_dir.iterdir()):
        assert m.degraded is None  # a host with cpufreq: real frequencies
        return
    assert m.degraded is not None and m.snapshot().nominal
    assert m.degraded.startswith("no cpufreq in /sys/devices/system/cpu/cpufreq: frequencies are nominal (")
    (dom,) = m.snapshot().domains
    assert dom.cpus == m.online_cpus()
    with open("/proc/cpuinfo") as f:
        mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    if mhz:
        assert dom.cur_khz == round(max(mhz) * 1000) and "from /proc/cpuinfo" in m.degraded
