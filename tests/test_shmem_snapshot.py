"""The shared page's snapshot sections (protocol/shmem_snapshot.py): round trips, version 1 still read,
hostile sections refused by reason, a machine with SHMEM restored as it was, counts that only go forward."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.session_snapshot import (
    SNAPSHOT_VERSION,
    DeviceSnapshot,
    PageSnapshot,
    RegionSnapshot,
    SeqSnapshot,
    SessionSnapshot,
    ShmemSnapshot,
    SnapshotError,
    at_page,
    decode,
    encode,
    machine_state,
    restore_machine,
)
from vhost_user_cpufreq.protocol.shmem_snapshot import ShmemPageRef

from .test_session_machine import DEVICE_FEATURES, PROTOCOL_FEATURES
from .test_session_snapshot import _snapshot_of as plain
from .test_session_shmem import PAGE_BIT, machine, realized, start

u32 = st.integers(0, (1 << 32) - 1)


@st.composite
def pages(draw: st.DrawFn) -> PageSnapshot:
    seq = tuple(draw(u32) & ~1 for _ in range(abi.MAX_DOMAINS))
    values = tuple(draw(st.none() | st.tuples(u32, st.integers(0, 1024), st.integers(0, 1024)))
                   for _ in range(abi.MAX_DOMAINS))
    return PageSnapshot(seq, values)


@st.composite
def shmems(draw: st.DrawFn, first_fd: int) -> ShmemSnapshot:
    shmids = sorted(draw(st.sets(st.integers(0, 7), max_size=3)))
    broken = draw(st.none() | st.sampled_from(["bad-ack", "backend-channel-closed", "send-BrokenPipeError"]))
    mapped = draw(st.booleans())
    channel = mapped or draw(st.booleans())
    refs = tuple(ShmemPageRef(s, 4096 * draw(st.integers(1, 16)), first_fd + i, mapped and draw(st.booleans()))
                 for i, s in enumerate(shmids))
    pending = () if broken or not shmids else tuple(draw(st.lists(st.sampled_from(shmids), max_size=3)))
    ack = b"" if broken else draw(st.binary(max_size=19))
    return ShmemSnapshot(channel, mapped, refs, pending, ack, broken)


def _base(nfds_extra: int = 0) -> SessionSnapshot:
    return SessionSnapshot("vm0", 0, 1, True, 0, True, 0, 15, (), (RegionSnapshot(0, 0x10000, 0x7F0000000000, 0, 2),),
                           DeviceSnapshot(0, bytes(256), SeqSnapshot(7, -5, 1, 0, 3), ((10, 0, 1.5),)))


@given(st.none() | shmems(3), st.none() | pages())
@settings(max_examples=200, deadline=None)
def test_every_shmem_and_page_section_decodes_to_itself(shmem: ShmemSnapshot | None, page: PageSnapshot | None) -> None:
    snap = dataclasses.replace(_base(), shmem=shmem, device=dataclasses.replace(_base().device, page=page))
    nfds = 3 + (len(shmem.pages) if shmem else 0)
    assert decode(encode(snap), nfds) == snap


def _body(snap: SessionSnapshot) -> dict[str, object]:
    body: dict[str, object] = json.loads(encode(snap)[12:])
    return body


def _reencode(body: object, version: int = SNAPSHOT_VERSION) -> bytes:
    data = json.dumps(body).encode()
    return struct.pack("<4sHHI", b"VUCS", version, 0, len(data)) + data


def test_a_version_1_snapshot_is_read_without_the_new_parts_and_a_version_2_one_must_have_them() -> None:
    body = _body(_base())
    del body["shmem"]
    del body["peer"]
    del body["device"]["page"]  # type: ignore[attr-defined]
    del body["device"]["clamps"]  # type: ignore[attr-defined]
    del body["device"]["host"]  # type: ignore[attr-defined]
    snap = decode(_reencode(body, 1), 3)
    assert snap == _base() and snap.shmem is None and snap.device.page is None
    with pytest.raises(SnapshotError, match="missing") as err:
        decode(_reencode(body, 2), 3)
    assert err.value.reason == "malformed"
    with pytest.raises(SnapshotError, match="unexpected"):
        decode(_reencode(_body(_base()), 1), 3)  # version 1 knew no page: keys it cannot have
    with pytest.raises(SnapshotError) as err:
        decode(_reencode(_body(_base()), 3), 3)
    assert err.value.reason == "version-mismatch"


GOOD = ShmemSnapshot(True, True, (ShmemPageRef(0, 4096, 3, True),), (), b"", None)
PAGE = PageSnapshot((2,) * abi.MAX_DOMAINS, ((1800000, 1024, 256),) + (None,) * (abi.MAX_DOMAINS - 1))


@pytest.mark.parametrize("mutate,reason,detail", [
    (lambda s: s["pages"][0].update(size=4097), "malformed", "page multiple"),
    (lambda s: s["pages"][0].update(size=0), "malformed", "size"),
    (lambda s: s["pages"][0].update(shmid=8), "malformed", "shmid"),
    (lambda s: s["pages"].append(dict(s["pages"][0])), "malformed", "increasing"),
    (lambda s: s.update(pending=[1]), "malformed", "pending"),
    (lambda s: s.update(pending=[True]), "malformed", "pending"),
    (lambda s: s.update(ack_buf="00" * 20), "malformed", "ack_buf"),
    (lambda s: s.update(ack_buf="zz"), "malformed", "ack_buf"),
    (lambda s: s.update(broken="no spaces"), "malformed", "slug"),
    (lambda s: s.update(broken="x", pending=[0]), "inconsistent-shmem", "acks awaited"),
    (lambda s: s.update(channel=False), "inconsistent-shmem", "without a back-end channel"),
    (lambda s: s.update(mapped=False, channel=True), "inconsistent-shmem", "never mapped"),
    (lambda s: s.pop("broken"), "malformed", "missing"),
    (lambda s: s.update(page=1), "malformed", "unexpected"),
])
def test_a_hostile_shmem_section_is_refused_by_reason(mutate: object, reason: str, detail: str) -> None:
    body = _body(dataclasses.replace(_base(), shmem=GOOD))
    mutate(body["shmem"])  # type: ignore[operator]
    with pytest.raises(SnapshotError) as err:
        decode(_reencode(body), 4)
    assert err.value.reason == reason and detail in err.value.detail


@pytest.mark.parametrize("mutate,detail", [
    (lambda p: p["seq"].__setitem__(0, 3), "even"),
    (lambda p: p["seq"].pop(), "even"),
    (lambda p: p["seq"].__setitem__(0, 1 << 32), "even"),
    (lambda p: p["values"].__setitem__(1, [1, 1025, 0]), "values"),
    (lambda p: p["values"].__setitem__(1, [1, 2]), "values"),
    (lambda p: p["values"].pop(), "entries"),
])
def test_a_hostile_page_section_is_refused(mutate: object, detail: str) -> None:
    body = _body(dataclasses.replace(_base(), device=dataclasses.replace(_base().device, page=PAGE)))
    mutate(body["device"]["page"])  # type: ignore[index, operator]
    with pytest.raises(SnapshotError) as err:
        decode(_reencode(body), 3)
    assert err.value.reason == "malformed" and detail in err.value.detail


def test_the_page_memfd_is_an_fd_of_the_list() -> None:
    snap = dataclasses.replace(_base(), shmem=GOOD)
    with pytest.raises(SnapshotError) as err:
        decode(encode(snap), 3)
    assert err.value.reason == "missing-fd"
    assert decode(encode(snap), 4).shmem == GOOD


def test_after_a_crash_the_counts_go_on_from_the_page_never_back() -> None:
    snap = dataclasses.replace(_base(), device=dataclasses.replace(_base().device, page=PAGE))
    counts = [0, 1, 6, 7, 0xFFFFFFFF, 0xFFFFFFFE, 100, 2]
    p = at_page(snap, counts).device.page
    assert p is not None
    assert p.seq == (0, 2, 6, 8, 0, 0xFFFFFFFE, 100, 2)  # an odd count (cut mid-update) goes on to the next even
    assert p.values == (None,) * abi.MAX_DOMAINS  # unknown: every entry is rewritten
    assert at_page(_base(), counts) == _base()  # no page, nothing to do
    with pytest.raises(SnapshotError):
        at_page(snap, counts[:3])


# -- the rules' state ---------------------------------------------------------------------
def _snapshot_of(m: object, shmem: ShmemSnapshot | None) -> SessionSnapshot:
    return dataclasses.replace(plain(m), backend_channel_fd=9, shmem=shmem)


def test_a_machine_with_the_page_mapped_is_restored_as_it_was() -> None:
    m = realized()
    start(m, DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT)
    assert m.shmem.mapped and m.shmem.channel
    snap = _snapshot_of(m, dataclasses.replace(GOOD, pages=(ShmemPageRef(0, 4096, 3, True),)))
    r = restore_machine(m.device, snap)
    assert machine_state(r) == machine_state(m)
    assert (r.shmem.channel, r.shmem.mapped) == (True, True)
    assert r.offered_features == m.offered_features and r.offered_features & PAGE_BIT
    # A restored machine, like the original, does not map again on the next start (QEMU maps it already).
    assert r.shmem.mapped


def test_a_machine_with_regions_this_device_does_not_have_is_refused() -> None:
    m = realized()
    start(m, DEVICE_FEATURES | PROTOCOL_FEATURES | PAGE_BIT)
    snap = _snapshot_of(m, GOOD)
    for device, bad, reason in [
        (machine(()).device, snap, "protocol-features-not-offered"),  # no regions here: SHMEM not offered
        (machine((8192,)).device, snap, "shmem-mismatch"),
        (m.device, dataclasses.replace(snap, backend_channel_fd=None), "inconsistent-shmem"),
        (m.device, dataclasses.replace(snap, shmem=dataclasses.replace(GOOD, channel=False, mapped=False,
                                                                        pages=())), "features-not-offered"),
    ]:
        with pytest.raises(SnapshotError) as err:
            restore_machine(device, bad)
        assert err.value.reason == reason, (bad, err.value)
