"""A session as a value: round trips, a machine restored as it was, hostile snapshots refused by reason."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.session_snapshot import (
    MAX_SNAPSHOT_BYTES,
    SNAPSHOT_VERSION,
    DeviceSnapshot,
    RegionSnapshot,
    RingSnapshot,
    SeqSnapshot,
    SessionSnapshot,
    SnapshotError,
    decode,
    encode,
    machine_state,
    restore_machine,
)

from .test_session_machine import F, configured, machine, negotiated, send

u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, (1 << 64) - 1)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[SessionSnapshot, int]:
    """A snapshot and the number of fds sent with it (every index named once)."""
    nrings = draw(st.integers(1, 3))
    nregions = draw(st.integers(0, 4))
    slots: list[str] = ["conn"]
    backend = draw(st.booleans())
    if backend:
        slots.append("backend")
    ring_fds = [[draw(st.booleans()) for _ in range(3)] for _ in range(nrings)]
    for i, has in enumerate(ring_fds):
        slots += [f"r{i}.{k}" for k, h in zip("kce", has) if h]
    slots += [f"g{i}" for i in range(nregions)]
    order = draw(st.permutations(range(len(slots))))
    fd = dict(zip(slots, order))
    rings = []
    for i, has in enumerate(ring_fds):
        addr = draw(st.none() | st.builds(vu.VringAddr, st.just(i), st.integers(0, 1), u64, u64, u64, u64))
        rings.append(RingSnapshot(
            i, draw(st.sampled_from([0, 1, 2, 64, 256, 32768])), addr, draw(st.booleans()), draw(st.booleans()),
            draw(st.booleans()), draw(st.booleans()), draw(u16), draw(u16), draw(st.none() | u16),
            fd.get(f"r{i}.k"), fd.get(f"r{i}.c"), fd.get(f"r{i}.e")))
    regions = []
    for i in range(nregions):
        size = draw(st.integers(1, 1 << 40))
        regions.append(RegionSnapshot(draw(st.integers(0, (1 << 64) - size)), size,
                                      draw(st.integers(0, (1 << 64) - size)), draw(u64), fd[f"g{i}"]))
    times = st.none() | st.floats(allow_nan=False, allow_infinity=False)
    dev = DeviceSnapshot(draw(u64), draw(st.binary(max_size=256)),
                         SeqSnapshot(draw(st.none() | st.integers(0, (1 << 32) - 1)), draw(st.none() | i64),
                                     draw(st.integers(0, (1 << 63) - 1)), draw(st.integers(0, (1 << 63) - 1)),
                                     draw(i64)),
                         tuple(draw(st.lists(st.tuples(st.integers(0, 1024), st.integers(0, (1 << 32) - 1), times),
                                             max_size=16))))
    snap = SessionSnapshot(draw(st.text(min_size=1, max_size=20)), fd["conn"], fd.get("backend"), draw(st.booleans()),
                           draw(u64), draw(st.booleans()), draw(u64), draw(st.integers(0, 255)), tuple(rings),
                           tuple(regions), dev)
    return snap, len(slots)


@given(snapshots())
@settings(max_examples=200, deadline=None)
def test_every_snapshot_decodes_to_itself(case: tuple[SessionSnapshot, int]) -> None:
    snap, nfds = case
    assert decode(encode(snap), nfds) == snap


@given(snapshots(), st.data())
@settings(max_examples=100, deadline=None)
def test_a_truncated_snapshot_is_refused_as_truncated(case: tuple[SessionSnapshot, int], data: st.DataObject) -> None:
    snap, nfds = case
    raw = encode(snap)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(SnapshotError) as err:
        decode(raw[:cut], nfds)
    assert err.value.reason == "truncated"


@given(snapshots())
@settings(max_examples=50, deadline=None)
def test_a_missing_or_an_unnamed_fd_is_refused(case: tuple[SessionSnapshot, int]) -> None:
    snap, nfds = case
    raw = encode(snap)
    with pytest.raises(SnapshotError) as err:
        decode(raw, nfds - 1)
    assert err.value.reason == "missing-fd"
    with pytest.raises(SnapshotError) as err:
        decode(raw, nfds + 1)
    assert err.value.reason == "unnamed-fd"


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_are_refused_with_a_reason_never_another_exception(raw: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode(raw, 0)


def _simple() -> SessionSnapshot:
    ring = RingSnapshot(0, 64, vu.VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0), True, True, False, True, 5, 5, 4,
                        1, 2, None)
    return SessionSnapshot("vm0", 0, None, True, 1 << 32, True, 0, 15, (ring,),
                           (RegionSnapshot(0, 0x10000, 0x7F0000000000, 0, 3),),
                           DeviceSnapshot(1 << 32, bytes(256), SeqSnapshot(7, -5, 1, 0, 3), ((10, 0, 1.5),)))


def _body(raw: bytes) -> dict[str, object]:
    body: dict[str, object] = json.loads(raw[12:])
    return body


def _reencode(body: object, version: int = SNAPSHOT_VERSION) -> bytes:
    data = json.dumps(body).encode()
    return struct.pack("<4sHHI", b"VUCS", version, 0, len(data)) + data


def test_a_snapshot_of_another_version_is_refused_by_name() -> None:
    raw = _reencode(_body(encode(_simple())), SNAPSHOT_VERSION + 1)
    with pytest.raises(SnapshotError) as err:
        decode(raw, 4)
    assert err.value.reason == "version-mismatch"


@pytest.mark.parametrize("mutate,detail", [
    (lambda b: b.pop("status"), "missing"),
    (lambda b: b.update(extra=1), "unexpected"),
    (lambda b: b.update(status=256), "status"),
    (lambda b: b.update(owner=1), "owner"),
    (lambda b: b.update(acked_features=True), "acked_features"),
    (lambda b: b.update(acked_features=1.0), "acked_features"),
    (lambda b: b.update(acked_features=1 << 64), "acked_features"),
    (lambda b: b["rings"][0].update(index=1), "index"),
    (lambda b: b["rings"][0].update(num=100), "size"),
    (lambda b: b["rings"][0].update(last_avail=-1), "last_avail"),
    (lambda b: b["regions"][0].update(size=0), "size"),
    (lambda b: b["regions"][0].update(gpa=(1 << 64) - 1), "wraps"),
    (lambda b: b["device"].update(config="zz"), "config"),
    (lambda b: b["device"].update(vcpus=[[1, 2]]), "vcpus"),
    (lambda b: b.update(vm=""), "vm"),
])
def test_a_malformed_field_is_refused_and_named(mutate: object, detail: str) -> None:
    body = _body(encode(_simple()))
    mutate(body)  # type: ignore[operator]
    with pytest.raises(SnapshotError) as err:
        decode(_reencode(body), 4)
    assert err.value.reason in ("malformed", "bad-queue-size")
    assert detail in err.value.detail


def test_nan_duplicate_keys_trailing_bytes_and_oversize_are_refused() -> None:
    raw = encode(_simple())
    nan = raw.replace(b'"stale":0', b'"stale":NaN')
    dup = raw.replace(b'"status":15', b'"status":15,"status":15')
    for bad in (nan, dup):
        bad = struct.pack("<4sHHI", b"VUCS", SNAPSHOT_VERSION, 0, len(bad) - 12) + bad[12:]
        with pytest.raises(SnapshotError) as err:
            decode(bad, 4)
        assert err.value.reason == "malformed"
    with pytest.raises(SnapshotError) as err:
        decode(raw + b" ", 4)
    assert err.value.reason == "trailing-bytes"
    with pytest.raises(SnapshotError) as err:
        decode(struct.pack("<4sHHI", b"VUCS", SNAPSHOT_VERSION, 0, MAX_SNAPSHOT_BYTES + 1), 4)
    assert err.value.reason == "too-large"
    with pytest.raises(SnapshotError) as err:
        decode(b"XXXX" + raw[4:], 4)
    assert err.value.reason == "bad-magic"


def test_an_fd_named_twice_is_refused() -> None:
    snap = _simple()
    twice = dataclasses.replace(snap, rings=(dataclasses.replace(snap.rings[0], call_fd=1),))
    with pytest.raises(SnapshotError) as err:
        decode(encode(twice), 4)
    assert err.value.reason == "fd-named-twice"


# -- the machine's hooks --------------------------------------------------------------------
def _snapshot_of(m: object) -> SessionSnapshot:
    owner, acked, fset, pf, status, rings = machine_state(m)  # type: ignore[arg-type]
    rs = tuple(RingSnapshot(r.index, r.num, r.addr, r.started, r.enabled, r.polling, r.running, 0, 0, None,
                            None if r.polling or not r.started else 10 + r.index, None, None) for r in rings)
    return SessionSnapshot("vm", 0, None, owner, acked, fset, pf, status, rs, (),
                           DeviceSnapshot(0, b"", SeqSnapshot(None, None, 0, 0, 0), ()))


def test_a_restored_machine_goes_on_as_the_original_would() -> None:
    m = negotiated()
    configured(m)
    send(m, F.SET_VRING_KICK, vu.U64(0), (10,))
    send(m, F.SET_VRING_ENABLE, vu.VringState(0, 1))
    assert m.rings[0].running
    snap = _snapshot_of(m)
    r = restore_machine(m.device, snap)
    assert machine_state(r) == machine_state(m)
    # The same next request has the same effects on both.
    assert send(r, F.GET_VRING_BASE, vu.VringState(0, 0)) == send(m, F.GET_VRING_BASE, vu.VringState(0, 0))
    assert machine_state(r) == machine_state(m)


def test_a_machine_is_not_restored_with_what_this_device_does_not_offer() -> None:
    m = negotiated()
    configured(m)
    snap = _snapshot_of(m)
    for bad, reason in [
        (dataclasses.replace(snap, acked_features=1 << 60), "features-not-offered"),
        (dataclasses.replace(snap, protocol_features=1 << 40), "protocol-features-not-offered"),
        (dataclasses.replace(snap, rings=snap.rings[:1]), "ring-count"),
        (dataclasses.replace(snap, rings=(dataclasses.replace(snap.rings[0], num=512), snap.rings[1])),
         "bad-queue-size"),
        (dataclasses.replace(snap, rings=(dataclasses.replace(snap.rings[0], running=True), snap.rings[1])),
         "inconsistent-ring"),
        (dataclasses.replace(snap, rings=(dataclasses.replace(snap.rings[0], started=True, kick_fd=None),
                                          snap.rings[1])), "missing-fd"),
    ]:
        with pytest.raises(SnapshotError) as err:
            restore_machine(m.device, bad)
        assert err.value.reason == reason


def test_a_failed_session_has_no_snapshot() -> None:
    m = machine()
    m.error = "bad-thing"
    with pytest.raises(SnapshotError) as err:
        machine_state(m)
    assert err.value.reason == "session-failed"


# -- a shared socket's peer ------------------------------------------------------------------
def test_a_peer_identity_round_trips_and_a_hostile_one_is_refused() -> None:
    from vhost_user_cpufreq.protocol.session_snapshot import PeerSnapshot

    peer = PeerSnapshot(4242, 123456789, "vm0", 2, "/machine.slice/machine-qemu\\x2d1.scope")
    snap = dataclasses.replace(_simple(), peer=peer)
    assert decode(encode(snap), 4).peer == peer
    for mutate, detail in [
        (lambda p: p.update(name="vm1"), "is not the session's VM"),
        (lambda p: p.update(pid=0), "pid"),
        (lambda p: p.update(vcpus=0), "vcpus"),
        (lambda p: p.update(start_time=-1), "start_time"),
        (lambda p: p.update(cgroup=7), "cgroup"),
        (lambda p: p.pop("cgroup"), "missing"),
    ]:
        body = _body(encode(snap))
        mutate(body["peer"])  # type: ignore[operator]
        with pytest.raises(SnapshotError) as err:
            decode(_reencode(body), 4)
        assert err.value.reason == "malformed" and detail in err.value.detail, (detail, err.value)


# -- the clamp engine's decisions --------------------------------------------------------------
def test_clamp_decisions_round_trip_are_dropped_after_a_crash_and_a_hostile_one_is_refused() -> None:
    from vhost_user_cpufreq.protocol.session_snapshot import ClampSnapshot, at_used

    clamps = (ClampSnapshot(0, 600, 600, 12.5, 12.5, False), ClampSnapshot(1, 0, None, None, None, True))
    snap = dataclasses.replace(_simple(), device=dataclasses.replace(_simple().device, clamps=clamps))
    assert decode(encode(snap), 4).device.clamps == clamps
    # A record written while the service ran may be behind the clamps applied since: not carried then.
    assert at_used(snap, {0: 9}).device.clamps is None
    for bad, detail in [
        ([[0, 600, 600, 1.0, 1.0]], "device.clamps"),
        ([[0, 1025, 600, 1.0, 1.0, False]], "device.clamps"),
        ([[0, 600, -1, 1.0, 1.0, False]], "device.clamps"),
        ([[0, 600, 600, "x", 1.0, False]], "time"),
        ([[0, 600, 600, 1.0, 1.0, 0]], "device.clamps"),
        ([[0, 600, 600, 1.0, 1.0, False], [0, 1, 1, None, None, False]], "twice"),
    ]:
        body = _body(encode(snap))
        body["device"]["clamps"] = bad  # type: ignore[index]
        with pytest.raises(SnapshotError) as err:
            decode(_reencode(body), 4)
        assert err.value.reason == "malformed" and detail in err.value.detail, (bad, err.value)
