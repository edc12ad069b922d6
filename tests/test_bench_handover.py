"""bench/handover.py in its tiny configuration: two handovers of the real binary, figures produced."""

from __future__ import annotations

import json
import subprocess

import pytest
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["takeover", "sigkill", "sigterm"])
def test_handover_bench_tiny_end_to_end(tmp_path: Path, mode: str) -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "handover.py"), "--tiny", "--mode", mode,
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (jpath,) = tmp_path.glob("*-handover*-tiny.json")
    res = json.loads(jpath.read_text())
    assert res["mode"] == mode and res["rounds"] == 2 and len(res["rows"]) == 2
    assert res["gap_ms"]["n"] == 2 and res["gap_ms"]["max"] > 0
    # the old process logged each exchange (a handover's only)
    assert res["exchange_ms"]["n"] == (2 if mode == "takeover" else 0)
    assert res["quiet_interval_ms"]["n"] > 0
    assert res["buffers_not_returned"] == 0 and res["lost_batches"] == 0, res
    assert "serving gap" in (tmp_path / jpath.name.replace(".json", ".md")).read_text()
