"""The README's first command: the demo runs, every record sent arrives, and the views agree.

The demo exits 1 when records went missing or the guest's view of the host
frequencies differs from the host's; this runs the real console script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_delivers_every_record_and_agrees_with_the_host() -> None:
    script = Path(sys.executable).with_name("vhost-user-cpufreq")
    r = subprocess.run([str(script), "demo", "--duration", "3", "--plain"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = dict(line.split(None, 1) for line in r.stdout.split("Summary", 1)[1].strip().splitlines())
    assert int(summary["records_sent"]) == int(summary["records_received"]) > 0, summary
    assert float(summary["guest_matches_host"]) == 1.0 and int(summary["rejected"]) == 0, summary
