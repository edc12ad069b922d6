"""protocol/fdstore.py: the fd store's record and names, refused by reason when they cannot be trusted."""

from __future__ import annotations

import pytest

from vhost_user_cpufreq.protocol.fdstore import (
    BUSY,
    FLAGS_OFFSET,
    decode_record,
    encode_record,
    listener_name,
    name_ok,
    parse_name,
    record_name,
    object_name,
)
from vhost_user_cpufreq.protocol.session_snapshot import SnapshotError

BODY = b"VUCS-any-snapshot-bytes"


NAMES = ["vuc.vm0.f1", "vuc.vm0.f2", "vuc.vm0.f2"]


def test_a_record_reads_back_with_its_names_and_flags() -> None:
    r = decode_record(encode_record(NAMES, BODY, clean=True))
    assert r is not None and (r.names, r.snapshot, r.clean, r.busy) == (tuple(NAMES), BODY, True, False)
    assert decode_record(b"") is None  # an emptied record: the VM had no session


def test_the_busy_byte_is_outside_the_checksum() -> None:
    data = bytearray(encode_record(NAMES, BODY))
    data[FLAGS_OFFSET] = BUSY
    r = decode_record(bytes(data))
    assert r is not None and r.busy and not r.clean


@pytest.mark.parametrize("cut, reason", [
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"x", "truncated"),  # a shorter record written over a longer one, cut before ftruncate
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "torn-record"),
    (lambda d: b"XXXX" + d[4:], "bad-magic"),
    (lambda d: d[:4] + b"\x02\x00" + d[6:], "version-mismatch"),
    (lambda d: d[:FLAGS_OFFSET] + b"\x80" + d[FLAGS_OFFSET + 1:], "bad-header"),
])
def test_a_record_that_cannot_be_trusted_is_refused_by_reason(cut, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SnapshotError) as ei:
        decode_record(cut(encode_record(NAMES, BODY)))
    assert ei.value.reason == reason


def test_names_round_trip_and_others_are_not_ours() -> None:
    assert parse_name(listener_name("web-1")) == ("web-1", "l", None)
    assert parse_name(record_name("web-1")) == ("web-1", "r", None)
    assert parse_name(object_name("web-1", 12)) == ("web-1", "f", 12)
    for other in ("web-1", "vuc.web 1.l", "vuc.a.x", "vuc.a.f", "vuc.a.g1.2", "vuc..l", "stored"):
        assert parse_name(other) is None
    assert name_ok("vm_0") and not name_ok("a:b") and not name_ok("") and not name_ok("a b")
    # Dotted names (a namespace, a libvirt domain) parse back whole: the kind is the last part.
    assert name_ok("ns.vm-1") and parse_name(object_name("ns.vm-1", 3)) == ("ns.vm-1", "f", 3)
    assert parse_name(record_name("a.f3")) == ("a.f3", "r", None)
    assert parse_name(listener_name("a.r")) == ("a.r", "l", None)


def test_a_record_naming_something_else_is_refused() -> None:
    with pytest.raises(SnapshotError) as ei:
        decode_record(encode_record(["vuc.vm0.f1", "other"], BODY))
    assert ei.value.reason == "malformed"


def test_only_whole_read_only_requests_are_kept_for_a_replay() -> None:
    from vhost_user_cpufreq.protocol import vhost_user as vu
    from vhost_user_cpufreq.protocol.fdstore import decode_pending, encode_pending, replayable

    F = vu.FrontendRequest
    get_config = vu.encode_message(F.GET_CONFIG, vu.ConfigSpace(0, 16, 0, bytes(16)))
    get_features = vu.encode_message(F.GET_FEATURES)
    assert replayable(get_config + get_features)
    assert decode_pending(encode_pending(get_config)) == get_config
    assert not replayable(get_config[:-1])  # cut
    assert not replayable(vu.encode_message(F.SET_FEATURES, vu.U64(1)))  # changes the session
    assert not replayable(b"")
    with pytest.raises(SnapshotError):
        decode_pending(encode_pending(vu.encode_message(F.SET_OWNER)))
