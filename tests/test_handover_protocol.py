"""The handover exchange without sockets: both sides wired in memory, a cut at every point."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user_cpufreq.protocol.handover import (
    HANDOVER_VERSION,
    Frame,
    FrameReader,
    FrameType,
    HandoverError,
    NewSide,
    OldSide,
    Outcome,
    encode_frame,
)


def frames(data: bytes, fds: tuple[int, ...] = ()) -> list[Frame]:
    r = FrameReader()
    r.receive(data, fds)
    out = []
    while (f := r.next_frame()) is not None:
        out.append(f)
    return out


def one(data: bytes, fds: tuple[int, ...] = ()) -> Frame:
    (f,) = frames(data, fds)
    return f


class _Cut(Exception):
    pass


def run(cut_after: int | None = None) -> tuple[OldSide, NewSide, list[str]]:
    """A full exchange of 2 listeners and 1 session; the connection is cut after ``cut_after`` frames crossed."""
    old, new = OldSide(100), NewSide(200)
    log: list[str] = []

    def cross(data: bytes, fds: tuple[int, ...] = ()) -> Frame:
        if cut_after is not None and len(log) >= cut_after:
            raise _Cut
        f = one(data, fds)
        log.append(f.type.name)
        return f

    def to_new(data: bytes, fds: tuple[int, ...] = ()) -> bytes | None:
        return new.receive(cross(data, fds))

    def to_old(data: bytes | None) -> None:
        assert data is not None
        old.receive(cross(data))

    try:
        to_old(to_new(old.hello()))
        to_new(old.listener("vm0"), (10,))
        to_new(old.listener("vm1"), (11,))
        to_new(old.session(b"snap", 3), (20, 21, 22))
        to_old(to_new(old.done()))
        to_new(old.bye())
    except _Cut:
        pass
    return old, new, log


def test_a_full_exchange_hands_every_listener_session_and_fd_over() -> None:
    old, new, log = run()
    assert log == ["HELLO", "HELLO", "LISTENER", "LISTENER", "SESSION", "DONE", "ACK", "BYE"]
    assert new.listeners == [("vm0", 10), ("vm1", 11)]
    assert new.sessions == [(b"snap", (20, 21, 22))]
    assert (old.peer_pid, new.peer_pid) == (200, 100)
    assert old.outcome() is Outcome.NEW_SERVES and new.outcome() is Outcome.NEW_SERVES


#: frames crossed -> (who the old side says serves, who the new side says serves)
CUTS = {
    0: (Outcome.OLD_SERVES, Outcome.OLD_SERVES),
    1: (Outcome.OLD_SERVES, Outcome.OLD_SERVES),  # the new side's HELLO lost
    2: (Outcome.OLD_SERVES, Outcome.OLD_SERVES),
    3: (Outcome.OLD_SERVES, Outcome.OLD_SERVES),
    4: (Outcome.OLD_SERVES, Outcome.OLD_SERVES),
    5: (Outcome.OLD_SERVES, Outcome.OLD_SERVES),  # DONE lost
    6: (Outcome.OLD_SERVES, Outcome.UNCERTAIN),  # ACK lost: the old is alive and resumes
    7: (Outcome.NEW_SERVES, Outcome.UNCERTAIN),  # BYE lost: the old has committed and exits
    8: (Outcome.NEW_SERVES, Outcome.NEW_SERVES),
}


@pytest.mark.parametrize("cut_after", sorted(CUTS))
def test_a_cut_at_each_point_leaves_one_process_serving_or_a_question_the_pid_answers(cut_after: int) -> None:
    old, new, log = run(cut_after)
    assert len(log) == cut_after
    assert (old.outcome(), new.outcome()) == CUTS[cut_after]
    # Never both certain to serve; the new side is never certain while the old might resume.
    assert not (old.outcome() is Outcome.OLD_SERVES and new.outcome() is Outcome.NEW_SERVES)


def test_a_peer_of_another_version_is_refused_and_the_old_goes_on() -> None:
    old, new = OldSide(1), NewSide(2)
    hello = encode_frame(FrameType.HELLO, struct.pack("<HI", HANDOVER_VERSION + 1, 1))
    old.hello()
    answer = new.receive(one(hello))
    assert answer is not None and one(answer).type is FrameType.ABORT
    assert one(answer).body == b"version-mismatch"
    old.receive(one(answer))
    assert old.outcome() is Outcome.OLD_SERVES and new.outcome() is Outcome.OLD_SERVES


def test_frames_out_of_order_are_refused() -> None:
    new = NewSide(2)
    with pytest.raises(HandoverError) as err:
        new.receive(Frame(FrameType.SESSION, b"x", ()))
    assert err.value.reason == "out-of-order"
    old = OldSide(1)
    with pytest.raises(HandoverError):
        old.listener("vm0")  # before the hello
    old.hello()
    with pytest.raises(HandoverError) as err:
        old.receive(Frame(FrameType.ACK, b""))
    assert err.value.reason == "out-of-order"


def test_done_with_counts_that_do_not_match_what_came_is_refused() -> None:
    old, new = OldSide(1), NewSide(2)
    old.receive(one(new.receive(one(old.hello())) or b""))
    new.receive(one(old.listener("vm0"), (5,)))
    bad = encode_frame(FrameType.DONE, struct.pack("<III", 1, 1, 0))
    with pytest.raises(HandoverError) as err:
        new.receive(one(bad))
    assert err.value.reason == "count-mismatch"
    assert new.outcome() is Outcome.OLD_SERVES
    assert new.received_fds() == [5]


def test_a_frame_whose_fds_did_not_arrive_is_an_error_not_a_misattribution() -> None:
    r = FrameReader()
    r.receive(encode_frame(FrameType.SESSION, b"abc", 2), [7])
    with pytest.raises(HandoverError) as err:
        r.next_frame()
    assert err.value.reason == "missing-fd"
    assert r.release_fds() == [7]


def test_fds_go_to_frames_in_order_whatever_the_chunking() -> None:
    data = encode_frame(FrameType.LISTENER, b"a", 1) + encode_frame(FrameType.SESSION, b"bb", 2)
    r = FrameReader()
    got = []
    for i, byte in enumerate(data):
        r.receive(bytes([byte]), [1] if i == 0 else ([2, 3] if i == 13 else []))
        while (f := r.next_frame()) is not None:
            got.append(f)
    assert [(f.type, f.body, f.fds) for f in got] == [(FrameType.LISTENER, b"a", (1,)),
                                                       (FrameType.SESSION, b"bb", (2, 3))]
    assert not r.pending


@pytest.mark.parametrize("data,reason", [
    (b"XXXX" + bytes(8), "bad-magic"),
    (struct.pack("<4sBxHI", b"VUCH", 99, 0, 0), "unknown-frame"),
    (struct.pack("<4sBxHI", b"VUCH", 3, 0, 1 << 30), "frame-too-large"),
    (struct.pack("<4sBxHI", b"VUCH", 3, 1000, 0), "frame-too-large"),
])
def test_hostile_headers_are_refused_by_reason(data: bytes, reason: str) -> None:
    r = FrameReader()
    r.receive(data)
    with pytest.raises(HandoverError) as err:
        r.next_frame()
    assert err.value.reason == reason


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_give_frames_none_or_a_handover_error(data: bytes) -> None:
    r = FrameReader()
    r.receive(data)
    new = NewSide(1)
    try:
        while (f := r.next_frame()) is not None:
            new.receive(f)
    except HandoverError:
        pass


def test_hello_with_fds_or_a_bad_length_is_refused() -> None:
    new = NewSide(1)
    answer = new.receive(Frame(FrameType.HELLO, struct.pack("<H", HANDOVER_VERSION), ()))
    assert answer is not None and one(answer).body == b"bad-hello"
    assert new.outcome() is Outcome.OLD_SERVES


# -- systemd's fd store entries (STORE) -----------------------------------------------------------
def _greeted(old_flags: int, new_flags: int) -> tuple[OldSide, NewSide]:
    old, new = OldSide(1, old_flags), NewSide(2, new_flags)
    old.receive(one(new.receive(one(old.hello())) or b""))
    return old, new


def test_the_store_entries_of_a_session_go_with_it_when_both_keep_the_store() -> None:
    from vhost_user_cpufreq.protocol.handover import F_KEEPS_STORE

    old, new = _greeted(F_KEEPS_STORE, F_KEEPS_STORE)
    assert old.both_keep_store and new.both_keep_store
    new.receive(one(old.session(b"snap", 2), (10, 11)))
    new.receive(one(old.store("vm0", 7, ["vuc.vm0.f6", "vuc.vm0.f7"]), (12,)))
    assert new.stores == {0: ("vm0", 7, ("vuc.vm0.f6", "vuc.vm0.f7"), 12)}
    assert 12 in new.received_fds()  # given back with the rest if the old process serves on
    with pytest.raises(HandoverError) as err:  # a second STORE for the same session
        new.receive(one(old.store("vm0", 7, ["vuc.vm0.f6"]), (13,)))
    assert err.value.reason == "bad-store"


@pytest.mark.parametrize("case", ["new-keeps-none", "before-any-session", "another-vms-name", "a-listener-name",
                                  "no-fd"])
def test_store_entries_that_do_not_fit_are_refused(case: str) -> None:
    from vhost_user_cpufreq.protocol.handover import F_KEEPS_STORE

    old, new = _greeted(F_KEEPS_STORE, 0 if case == "new-keeps-none" else F_KEEPS_STORE)
    if case == "new-keeps-none":
        with pytest.raises(HandoverError):  # the old side does not even write it
            old.store("vm0", 1, [])
        new.receive(one(old.session(b"snap", 0)))
    elif case != "before-any-session":
        new.receive(one(old.session(b"snap", 0)))
    names = {"another-vms-name": ["vuc.vm1.f1"], "a-listener-name": ["vuc.vm0.l"]}.get(case, ["vuc.vm0.f1"])
    body = struct.pack("<Q", 1) + "\n".join(["vm0", *names]).encode()
    with pytest.raises(HandoverError) as err:
        new.receive(one(encode_frame(FrameType.STORE, body, 0 if case == "no-fd" else 1),
                        () if case == "no-fd" else (9,)))
    assert err.value.reason == "bad-store"
