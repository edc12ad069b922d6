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
