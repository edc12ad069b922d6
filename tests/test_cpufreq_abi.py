"""The cpufreq device ABI: config space and request batches (protocol/cpufreq.py, SPEC.md)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.errors import RecordError

SPEC = Path(abi.__file__).with_name("SPEC.md").read_text()

domains = st.builds(
    lambda lo, span, cur, cap: abi.Domain(min(lo + cur, lo + span), lo, lo + span, cap),
    st.integers(1, 3_000_000), st.integers(0, 3_000_000), st.integers(0, 3_000_000), st.integers(1, 1024),
)


@st.composite
def configs(draw: st.DrawFn) -> abi.DeviceConfig:
    doms = tuple(draw(st.lists(domains, min_size=1, max_size=abi.MAX_DOMAINS)))
    runs = draw(st.lists(st.tuples(st.integers(0, len(doms) - 1), st.integers(1, 300)), min_size=1, max_size=20))
    vmap = tuple(d for d, n in runs for _ in range(n))
    return abi.DeviceConfig(draw(st.integers(0, 2**32 - 1)), doms, vmap, draw(st.sampled_from([0, 1])))


@given(configs())
def test_config_round_trips_in_exactly_256_bytes(cfg: abi.DeviceConfig) -> None:
    raw = cfg.encode()
    assert len(raw) == abi.CONFIG_SIZE == 256
    assert abi.DeviceConfig.decode(raw) == cfg


def test_config_offsets_match_the_spec() -> None:
    cfg = abi.DeviceConfig(7, (abi.Domain(1000, 500, 2000, 512), abi.Domain(3000, 1, 4000, 1024)), (0, 0, 1))
    raw = cfg.encode()
    # The layout read back by hand, then each offset the spec's struct names.
    assert struct.unpack_from("<I", raw, 0) == (7,)
    assert struct.unpack_from("<HH", raw, 4) == (2, 3)
    assert struct.unpack_from("<HH", raw, 12) == (2, abi.MAX_RECORDS_PER_BATCH)
    assert struct.unpack_from("<IIIH", raw, 16 + 16) == (3000, 1, 4000, 1024)
    assert raw[144:148] == bytes([0, 2, 1, 1])
    for name, off in (("num_domains", 4), ("num_vcpus", 6), ("flags", 8), ("num_runs", 12), ("max_batch", 14)):
        assert re.search(rf"{name};\s+/\* offset {off}\b", SPEC), f"SPEC.md offset of {name}"
    assert "domains[8];   /* offset 16 */" in SPEC and "runs[56];  /* offset 144 */" in SPEC


def test_map_too_fragmented_for_the_layout_is_refused() -> None:
    vmap = tuple(i % 2 for i in range(abi.MAX_RUNS + 1))
    with pytest.raises(ValueError, match="runs"):
        abi.DeviceConfig(0, (abi.Domain(1, 1, 1), abi.Domain(1, 1, 1)), vmap)


def test_large_vm_with_consecutive_domains_fits() -> None:
    vmap = (0,) * 600 + (1,) * 400
    cfg = abi.DeviceConfig(1, (abi.Domain(1, 1, 1), abi.Domain(2, 2, 2)), vmap)
    assert abi.DeviceConfig.decode(cfg.encode()).vcpu_domain == vmap


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b[:10], "short-config"),
        (lambda b: b[:4] + struct.pack("<H", 0) + b[6:], "bad-config"),
        (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "bad-config"),
        (lambda b: b[:6] + struct.pack("<H", 99) + b[8:], "bad-config"),
    ],
)
def test_inconsistent_config_is_rejected(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    raw = abi.DeviceConfig(1, (abi.Domain(1, 1, 1),), (0, 0)).encode()
    with pytest.raises(RecordError) as ei:
        abi.DeviceConfig.decode(mutate(raw))
    assert ei.value.reason == reason


records = st.builds(abi.Record, st.integers(0, 63), st.integers(0, 1024), st.integers(0, 2**32 - 1))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.lists(records, min_size=1, max_size=256),
       st.sampled_from([0, abi.BATCH_F_RESYNC]))
def test_batch_round_trips(seq: int, ts: int, recs: list[abi.Record], flags: int) -> None:
    b = abi.Batch(seq, ts, tuple(recs), flags)
    raw = abi.encode_batch(b)
    assert len(raw) == 16 + 8 * len(recs)
    res = abi.decode_batch(raw, num_vcpus=64, perf_request=True)
    assert res.batch == b and res.rejected == ()


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\x00" * 15, "short-batch"),
        (struct.pack("<IHHQ", 1, 0, 0, 0), "bad-record-count"),
        (struct.pack("<IHHQ", 1, 257, 0, 0) + bytes(8 * 257), "bad-record-count"),
        (struct.pack("<IHHQ", 1, 2, 0, 0) + bytes(8), "bad-batch-size"),
        (struct.pack("<IHHQ", 1, 1, 0, 0) + bytes(16), "bad-batch-size"),
        (struct.pack("<IHHQ", 1, 1, 0x8000, 0) + bytes(8), "bad-batch-flags"),
    ],
)
def test_malformed_batches_are_dropped_whole(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as ei:
        abi.decode_batch(raw, num_vcpus=4)
    assert ei.value.reason == reason


def test_bad_records_are_dropped_and_the_rest_kept() -> None:
    recs = (abi.Record(0, 100), abi.Record(9, 10), abi.Record(1, 1025), abi.Record(2, 5, 1000), abi.Record(3, 1024))
    res = abi.decode_batch(abi.encode_batch(abi.Batch(5, 0, recs)), num_vcpus=4, perf_request=False)
    assert res.batch.records == (abi.Record(0, 100), abi.Record(3, 1024))
    assert res.rejected == ((1, "bad-vcpu"), (2, "bad-util"), (3, "perf-not-negotiated"))


@given(st.binary(max_size=3000), st.integers(1, 300))
def test_random_bytes_never_escape_as_anything_but_record_error(raw: bytes, nv: int) -> None:
    try:
        res = abi.decode_batch(raw, num_vcpus=nv)
    except RecordError:
        return
    assert all(r.vcpu < nv and r.util <= 1024 for r in res.batch.records)


@pytest.mark.parametrize("seq, last, delta", [(5, 4, 1), (4, 5, -1), (0, 0xFFFFFFFF, 1), (0xFFFFFFFF, 0, -1), (10, 10, 0)])
def test_sequence_numbers_use_serial_arithmetic(seq: int, last: int, delta: int) -> None:
    assert abi.seq_delta(seq, last) == delta


# -- SPEC 6.6: every reason the service counts, collected from the code ------------------------

REPO = Path(abi.__file__).parents[1]
#: Code the service never runs: the driver's and the front-end's halves, which the guest model
#: uses.  Each comes with a name whose absence from backend/ shows the service cannot reach it.
_NOT_THE_SERVICE = {
    ("protocol/virtqueue_driver.py", None): "virtqueue_driver",         # the driver's half of the ring
    ("protocol/cpufreq.py", "DeviceConfig.decode"): "DeviceConfig.decode",  # the driver parses config
    ("protocol/vhost_user/codec.py", "decode_reply"): "expect_reply_to",     # the device reads no replies
    ("protocol/cpufreq.py", "decode_page_header"): "decode_page_header",     # the device never reads the page
    ("protocol/energy.py", "decode_energy_model"): "decode_energy_model",    # ... nor its energy model (SPEC 9.4)
}


#: The live handover between two service processes (README, "Upgrade or restart"): its errors
#: are about what one process hands the next, never input from a guest or a front-end, and are
#: counted as ``handover_dropped`` by reason, not in SPEC 6.6.
_HANDOVER_ERRORS = {"SnapshotError", "HandoverError"}


#: Where ``.fail(reason, detail)`` ends a front-end's session (DeviceHost.fail and its callers).
_SESSION_CODE = ("backend/vhost/", "backend/cpufreq/", "backend/dataplane/")


def _error_classes() -> set[str]:
    """RemoteProtocolError and every class of the code derived from it, read from the source (not
    from ``__subclasses__()``, which would depend on what earlier tests happened to import)."""
    import ast

    bases: dict[str, set[str]] = {}
    for path in [*REPO.joinpath("protocol").rglob("*.py"), *REPO.joinpath("backend").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(ast.unparse(b).split(".")[-1] for b in node.bases)
    names = {"RemoteProtocolError"}
    while True:
        more = {n for n, bs in bases.items() if bs & names} - names
        if not more:
            return names
        names |= more


def _code_reasons() -> dict[str, set[str]]:
    """reason -> how the code counts it: error class names, "rejected", "sessions_closed", ...

    Every RemoteProtocolError raised with a literal slug, every counter bumped with a literal
    reason, every session failure; a reason that is not a literal fails the test, so the list
    cannot drift behind code that builds slugs at run time.
    """
    import ast

    errors = _error_classes()
    found: dict[str, set[str]] = {}
    dynamic: list[str] = []
    for path in sorted([*REPO.joinpath("protocol").rglob("*.py"), *REPO.joinpath("backend").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if (rel, None) in _NOT_THE_SERVICE:
            continue
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, scope: str) -> None:
            for child in ast.iter_child_nodes(node):
                inner = scope
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner = f"{scope}.{child.name}" if scope else child.name
                    if (rel, inner) in _NOT_THE_SERVICE:
                        continue
                if isinstance(child, ast.Call):
                    take(child, f"{rel}:{child.lineno}")
                if isinstance(child, ast.Tuple) and len(child.elts) == 2 and all(
                        isinstance(e, ast.Constant) for e in child.elts) and child.elts[0].value == "rejected":
                    found.setdefault(child.elts[1].value, set()).add("rejected")  # lane.py's counter keys
                visit(child, inner)

        def take(call: ast.Call, where: str) -> None:
            f = call.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            args = call.args
            if name in errors and name not in _HANDOVER_ERRORS:
                arg = args[0] if args else next((k.value for k in call.keywords if k.arg == "reason"), None)
                if arg is None:
                    return
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.setdefault(arg.value, set()).add(name)
                else:
                    dynamic.append(f"{where} {name}({ast.unparse(arg)})")
            elif name == "inc" and len(args) >= 2 and isinstance(args[0], ast.Constant) and args[0].value in (
                    "rejected", "sessions_closed", "connections_refused"):
                if isinstance(args[1], ast.Constant):
                    found.setdefault(args[1].value, set()).add(args[0].value)
                elif ast.unparse(args[1]) not in ("reason", "exc.reason") and not (
                        isinstance(args[1], ast.Subscript) and ast.unparse(args[1].value) == "REASONS"):
                    # Only a reason collected where it is made may pass through: an error's, a fail()'s,
                    # or the drain's (REASONS).
                    dynamic.append(f"{where} inc({ast.unparse(args[1])})")
            elif name == "fail" and isinstance(f, ast.Attribute) and args and rel.startswith(_SESSION_CODE):
                if isinstance(args[0], ast.Constant):
                    found.setdefault(args[0].value, set()).add("sessions_closed")
                else:
                    dynamic.append(f"{where} fail({ast.unparse(args[0])})")

        visit(tree, "")
    assert not dynamic, f"reasons the spec's table cannot list (make them literals): {dynamic}"
    return found


def _spec_reasons() -> list[tuple[str, str, str]]:
    part = SPEC.split("### 6.6 Rejection reasons", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9-]+)` \| (guest|front-end) \| ([a-z-]+) \|", part, re.M)


def test_the_code_never_runs_what_the_reason_collector_leaves_out() -> None:
    # The simulator (backend/sim) plays the guest too, so it may drive the guest's queue; it serves no one.
    backend = "\n".join(p.read_text() for p in REPO.joinpath("backend").rglob("*.py")
                         if "sim" not in p.relative_to(REPO / "backend").parts[:1])
    for (rel, scope), token in _NOT_THE_SERVICE.items():
        assert REPO.joinpath(rel).exists(), rel
        assert token not in backend, f"the service now uses {rel} {scope or ''}: its reasons belong in SPEC 6.6"


def test_the_spec_lists_every_rejection_reason_the_service_counts() -> None:
    from vhost_user_cpufreq.protocol.requests import REASONS

    rows = _spec_reasons()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)), "a reason listed twice in SPEC 6.6"
    code = _code_reasons()
    counted = set(code) | set(REASONS[1:])
    assert set(names) == counted, (
        f"not in SPEC 6.6: {sorted(counted - set(names))}; in SPEC 6.6 but never counted: {sorted(set(names) - counted)}")
    guest = set(REASONS[1:]) | {r for r, how in code.items() if how == {"rejected"}}
    errors = _error_classes()
    # What protocol/shmem.py raises about the back-end channel's acks ends only the shared page.
    page_reasons = set(re.findall(r'Error\("([a-z-]+)"', REPO.joinpath("protocol/shmem.py").read_text()))
    for reason, source, scope in rows:
        how = code.get(reason, set())
        assert (source == "guest") == (reason in guest), f"{reason}: from {source}"
        if source == "guest":
            raised = bool(how & errors)
            # A record's reason is returned by the decode, never raised; a batch's is the device's own.
            want = {"record"} if not raised and reason in REASONS else {"batch"} if reason not in REASONS else {
                "buffer", "entry", "ring"}
            assert scope in want, f"{reason}: scope {scope}, expected one of {sorted(want)}"
        elif reason in page_reasons:
            assert scope == "page", f"{reason}: the back-end channel's acks only decide the shared page"
        elif "connections_refused" in how or "IdentityError" in how:
            # IdentityError: the shared socket's refusals (shared_socket_refused_total), before any message
            assert scope == "connection", reason
        elif "ThreadOwnershipError" in how:
            assert scope == "threads", reason
        elif "SessionStateError" in how:
            assert scope == "refused", f"{reason}: a SessionStateError may be refused with REPLY_ACK"
        else:
            assert scope == "closed", f"{reason}: only a SessionStateError can be refused; this one closes"


def test_the_spec_scopes_the_drains_ring_level_reasons_as_the_c_drain_reports_them() -> None:
    # ring_drain.c's ring-level errors (entries without a buffer, requests.NO_HEAD): "ring" for the
    # one that stops the ring, "entry" for the one that consumed an avail entry.
    c = REPO.joinpath("backend/dataplane/ring_drain.c").read_text().split("uint64_t vuc_drain(", 1)[1]
    ring_level = {m.lower().replace("_", "-") for m in re.findall(r"why = REASON_(\w+);", c)}
    scopes = {r: s for r, _, s in _spec_reasons()}
    assert ring_level == {r for r, s in scopes.items() if s in ("ring", "entry")} == {"avail-index-jump", "bad-head"}
    assert "q->broken = 1;\n                why = REASON_AVAIL_INDEX_JUMP;" in c  # the one that stops the ring
    assert (scopes["avail-index-jump"], scopes["bad-head"]) == ("ring", "entry")
