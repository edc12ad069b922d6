"""The energy model in the shared page (protocol/energy.py, SPEC 9.4): layout, bounds, hostile tables
refused with a reason, the back-end's fill from the host description, and the driver model reading it
over real sockets and memfds."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user_cpufreq.backend.cpufreq.device import CpufreqDevice
from vhost_user_cpufreq.backend.cpufreq.hostfreq import HostSnapshot, StaticSource
from vhost_user_cpufreq.backend.cpufreq.power import em_power_uw, guest_energy
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.sim.hostmodel import load_host
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import energy as em
from vhost_user_cpufreq.protocol.errors import RecordError

from .helpers import RecordingPolicy, make_service, start_guest, until

SPEC = Path(abi.__file__).with_name("SPEC.md").read_text()
DOMS = (abi.Domain(300, 300, 1000, 160), abi.Domain(500, 400, 2000, 1024))
MODEL = em.EnergyModel((em.EmDomain((em.PerfState(300, 10), em.PerfState(1000, 90))),
                        em.EmDomain((em.PerfState(400, 50), em.PerfState(1200, 400), em.PerfState(2000, 1500)))))


def read(section: bytes, doms: tuple[abi.Domain, ...] = DOMS) -> em.EnergyModel | None:
    seq = struct.unpack_from("<I", section)[0]
    return em.decode_energy_model(seq, section, seq, doms)


def test_layout_matches_the_spec() -> None:
    assert re.search(r"\|\s*2\s*\|\s*`VIRTIO_CPUFREQ_F_ENERGY_MODEL`", SPEC) and em.F_ENERGY_MODEL == 2
    assert f"/* offset {em.EM_OFFSET}" in SPEC and em.EM_OFFSET == 256
    assert em.em_domain_offset(0) == 272 and em.em_domain_offset(1) - em.em_domain_offset(0) == 264
    assert "states[32]" in SPEC and em.EM_MAX_STATES == 32
    assert em.EM_OFFSET + em.EM_SIZE <= abi.FREQ_PAGE_SIZE
    # Nothing overlaps the frequency entries.
    assert abi.page_domain_offset(abi.MAX_DOMAINS - 1) + 16 <= em.EM_OFFSET
    raw = em.encode_energy_model(MODEL, seq=4)
    assert struct.unpack_from("<IH", raw, 0) == (4, 2)
    assert struct.unpack_from("<H", raw, em.em_domain_offset(1) - em.EM_OFFSET) == (3,)
    assert struct.unpack_from("<II", raw, em.em_domain_offset(1) - em.EM_OFFSET + 8 + 8) == (1200, 400)


states = st.lists(st.tuples(st.integers(1, 50_000), st.integers(1, em.EM_MAX_POWER_UW)), min_size=1,
                  max_size=em.EM_MAX_STATES, unique_by=lambda t: t[0])


@given(st.lists(states, min_size=1, max_size=abi.MAX_DOMAINS))
def test_models_round_trip(tables: list[list[tuple[int, int]]]) -> None:
    model = em.EnergyModel(tuple(em.EmDomain(tuple(em.PerfState(k, p) for k, p in sorted(t))) for t in tables))
    doms = tuple(abi.Domain(1, 1, d.max_khz) for d in model.domains)
    assert read(em.encode_energy_model(model), doms) == model


def test_a_torn_read_asks_for_a_retry() -> None:
    raw = em.encode_energy_model(MODEL, seq=3)
    assert em.decode_energy_model(3, raw, 3, DOMS) is None  # odd: the device is writing
    assert em.decode_energy_model(2, raw, 4, DOMS) is None  # it wrote in between


def _patch(fmt: str, off: int, *vals: int) -> bytes:
    raw = bytearray(em.encode_energy_model(MODEL))
    struct.pack_into(fmt, raw, off, *vals)
    return bytes(raw)


D0, D1 = em.em_domain_offset(0) - em.EM_OFFSET, em.em_domain_offset(1) - em.EM_OFFSET


@pytest.mark.parametrize("raw, reason", [
    (em.encode_energy_model(MODEL)[:100], "short-em"),
    (em.encode_energy_model(None), "no-em"),
    (_patch("<H", 4, 3), "bad-em-header"),
    (_patch("<H", 4, 9), "bad-em-header"),
    (_patch("<H", D0, 0), "bad-em-states"),
    (_patch("<H", D1, 33), "bad-em-states"),
    (_patch("<H", D1, 0xFFFF), "bad-em-states"),
    (_patch("<I", D1 + 8 + 8, 400), "bad-em-frequency"),  # equal to the one before
    (_patch("<I", D1 + 8 + 8, 0xFFFFFFFF), "bad-em-frequency"),  # above the next
    (_patch("<I", D0 + 8, 0), "bad-em-frequency"),
    (_patch("<I", D0 + 8 + 4, 0), "bad-em-power"),
    (_patch("<I", D1 + 8 + 4, em.EM_MAX_POWER_UW + 1), "bad-em-power"),
    (_patch("<I", D1 + 8 + 16 + 4, 0xFFFFFFFF), "bad-em-power"),
    (_patch("<H", D1, 2), "em-top-mismatch"),  # top state 1200 kHz, the domain's max is 2000
    (_patch("<I", D0 + 8 + 8, 999), "em-top-mismatch"),
])
def test_hostile_sections_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as ei:
        read(raw)
    assert ei.value.reason == reason


@given(st.binary(min_size=em.EM_SIZE, max_size=em.EM_SIZE))
def test_random_sections_never_escape_as_anything_but_record_error(raw: bytes) -> None:
    try:
        model = read(raw)
    except RecordError:
        return
    if model is None:
        assert raw[0] & 1  # an odd count: the device is writing, read again
        return
    for d, dom in zip(model.domains, DOMS):
        assert d.max_khz == dom.max_khz and len(d.states) <= em.EM_MAX_STATES
        assert all(0 < s.power_uw <= em.EM_MAX_POWER_UW for s in d.states)


def test_the_device_side_refuses_to_build_a_bad_table() -> None:
    with pytest.raises(ValueError, match="bad-em-frequency"):
        em.EmDomain((em.PerfState(5, 1), em.PerfState(5, 2)))
    with pytest.raises(ValueError, match="bad-em-states"):
        em.EmDomain(())
    with pytest.raises(ValueError):
        em.EnergyModel(())


def test_stores_write_the_count_odd_then_the_words_then_even() -> None:
    stores = em.energy_model_stores(6, MODEL)
    assert stores[0] == (em.EM_OFFSET, 7) and stores[-1] == (em.EM_OFFSET, 8)
    page = bytearray(em.EM_OFFSET + em.EM_SIZE)
    for off, val in stores:
        struct.pack_into("<I", page, off, val)
    assert read(bytes(page[em.EM_OFFSET:])) == MODEL
    with pytest.raises(ValueError, match="odd"):
        em.energy_model_stores(7, MODEL)
    # A topology without power figures, once the feature was offered: an empty section, refused as no-em.
    for off, val in em.energy_model_stores(8, None):
        struct.pack_into("<I", page, off, val)
    with pytest.raises(RecordError) as ei:
        read(bytes(page[em.EM_OFFSET:]))
    assert ei.value.reason == "no-em" and struct.unpack_from("<I", page, em.EM_OFFSET)[0] == 10


# -- the back-end's fill ------------------------------------------------------------------------


def test_pixel6_power_is_the_simulators_from_the_gs101_device_tree() -> None:
    sim = load_host("gs101")
    for host, simd in zip(PIXEL6.domains, sim.domains):
        assert [k for k, _ in host.energy] == [o.khz for o in simd.opps]
        assert [p for _, p in host.energy] == [round(o.power_uw) for o in simd.opps]
    # One number by hand: the X1 at 2802 MHz and 1056.25 mV, coefficient 650.
    assert PIXEL6.domains[2].energy[-1] == (2802000, round(650 * 1056.25 ** 2 * 2802 / 1e6))
    assert em_power_uw(650, 1056.25, 2802) == pytest.approx(2_031_959, abs=1)


def test_a_vm_with_slower_vcpus_gets_a_table_that_tops_at_its_max() -> None:
    energy = PIXEL6.domains[2].energy
    t = guest_energy(energy, 2000000)
    assert t is not None and t.max_khz == 2000000
    assert t.states[-1].power_uw == dict(energy)[2048000]  # the OPP the host runs to give 2 GHz
    assert all(s.khz < 2000000 for s in t.states[:-1])
    assert guest_energy(energy, 2802000) == em.EmDomain(tuple(em.PerfState(k, p) for k, p in energy))
    assert guest_energy((), 1000) is None and guest_energy(energy, 9_999_999) is None


def test_the_device_offers_the_model_only_with_the_page_and_power_figures() -> None:
    dev = CpufreqDevice("vm", (0, 0, 1, 2), StaticSource(PIXEL6), RecordingPolicy(), shared_page=True)
    assert dev.shmem_features == 1 << abi.F_FREQ_PAGE | 1 << em.F_ENERGY_MODEL
    assert dev.energy_model is not None and [d.max_khz for d in dev.energy_model.domains] == [
        d.max_khz for d in dev.config.domains]
    assert not CpufreqDevice("vm", (0,), StaticSource(PIXEL6), RecordingPolicy()).shmem_features
    bare = HostSnapshot(tuple(d.__class__(d.cpus, d.min_khz, d.max_khz, d.cur_khz, d.capacity) for d in PIXEL6.domains))
    nopower = CpufreqDevice("vm", (0, 1), StaticSource(bare), RecordingPolicy(), shared_page=True)
    assert nopower.energy_model is None and nopower.shmem_features == 1 << abi.F_FREQ_PAGE
    slow = CpufreqDevice("vm", (2,), StaticSource(PIXEL6), RecordingPolicy(), shared_page=True, max_khz=2000000)
    assert slow.energy_model is not None and slow.energy_model.domains[0].max_khz == 2000000


# -- the driver model, over real sockets and memfds -------------------------------------------------

VMAP = (0, 0, 1, 2)


async def test_the_driver_reads_the_model_and_follows_a_remap(tmp_path: Path) -> None:
    svc, source, _, slots = await make_service(tmp_path, ("vm", VMAP), shared_page=True)
    slot = slots["vm"]
    g = await start_guest(str(tmp_path / "vm.sock"))
    assert g.driver.features & (1 << em.F_ENERGY_MODEL)
    await until(lambda: slot.device.freq_path == "page", what="the page in use")
    reads = g.transport.config_reads
    model = await g.driver.energy_model()
    assert model == slot.device.energy_model and model is not None
    assert [len(d.states) for d in model.domains] == [len(d.energy) for d in PIXEL6.domains]
    assert g.transport.config_reads == reads  # memory reads only
    # A remap that drops the mid domain: the section is rewritten before the notification.
    slot.device.remap((0, 0, 2, 2))
    await until(lambda: g.driver.config_changed.is_set(), what="the new config")
    model = await g.driver.energy_model()
    assert model is not None and [d.max_khz for d in model.domains] == [1803000, 2802000]
    assert slot.counters.get("energy_model_updates") == 1 and g.driver.stats.em_reads == 2
    # A guest that scribbles on the page hurts only its own model: rejected, counted.
    struct.pack_into("<I", g.fe.shm[0], em.em_domain_offset(1) + 8 + 4, 0)
    assert await g.driver.energy_model() is None and g.driver.stats.em_rejected == {"bad-em-power": 1}
    await g.close()
    await svc.close()


async def test_a_driver_without_the_page_gets_no_model(tmp_path: Path) -> None:
    svc, _, _, slots = await make_service(tmp_path, ("vm", VMAP), shared_page=True)
    g = await start_guest(str(tmp_path / "vm.sock"), shmem="off")
    assert not g.driver.features & (1 << em.F_ENERGY_MODEL)
    assert await g.driver.energy_model() is None
    await g.close()
    await svc.close()
