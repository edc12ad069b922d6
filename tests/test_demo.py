"""The README's first command: the demo runs, every record sent arrives, and the views agree.

The demo exits 1 when records went missing or the guest's view of the host
frequencies differs from the host's; this runs the real console script.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_demo_delivers_every_record_and_agrees_with_the_host() -> None:
    script = Path(sys.executable).with_name("vhost-user-cpufreq")
    r = subprocess.run([str(script), "demo", "--duration", "3", "--plain"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # Each summary line: key, value, then what the key means.
    summary = dict(line.split()[:2] for line in r.stdout.split("Summary", 1)[1].strip().split("\n\n")[0].splitlines())
    assert int(summary["records_sent"]) == int(summary["records_received"]) > 0, summary
    assert float(summary["guest_matches_host"]) == 1.0 and int(summary["rejected"]) == 0, summary
    # It ends with what the guest gained: the simulator's two runs of the same load, as printed.
    from vhost_user_cpufreq.backend.service.demo import DemoOptions, what_the_guest_gained

    gained = r.stdout.split("What the guest gained: the same 3 s of this load", 1)
    assert len(gained) == 2, r.stdout[-2000:]
    m = re.search(r"without the device: +([\d.]+)% of the guest's bursts done in time, ([\d.]+) J\n"
                  r" +with the device: +([\d.]+)% done in time, ([\d.]+) J; work done in time per joule ([+-]\d+)%",
                  gained[1])
    assert m, gained[1]
    g = what_the_guest_gained(DemoOptions(duration=3))
    assert [float(x) for x in m.groups()[:4]] == [
        round(g["baseline_on_time"] * 100, 1), round(g["baseline_energy_j"], 2),
        round(g["device_on_time"] * 100, 1), round(g["device_energy_j"], 2)], (m.groups(), g)
    assert int(m.group(5)) == round((g["device_perf_per_j"] / g["baseline_perf_per_j"] - 1) * 100)


def _interruptible() -> None:
    # A background job of a non-interactive shell (CI) inherits SIGINT ignored; a user's Ctrl-C is not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_demo_quietly_with_the_summary_of_what_ran() -> None:
    script = Path(sys.executable).with_name("vhost-user-cpufreq")
    proc = subprocess.Popen([str(script), "demo", "--duration", "30", "--plain"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        # Interrupt once the guest is running: the first screen is printed 80 ms after it starts.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("vhost-user-cpufreq demo"), first
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    head, _, rest = out.partition("Summary (interrupted after ")
    assert rest, out[-2000:]
    summary = dict(line.split()[:2] for line in rest.splitlines()[1:] if line.strip())
    assert 0 < float(summary["seconds"]) < 30
    assert int(summary["records_sent"]) == int(summary["records_received"]) > 0, summary


def test_the_demo_screen_keeps_its_columns_and_says_why_the_host_differs() -> None:
    script = Path(sys.executable).with_name("vhost-user-cpufreq")
    r = subprocess.run([str(script), "demo", "--duration", "4", "--plain", "--refresh", "0.2"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"\s+\d+  (little|mid|big) ", line)]
    assert len(rows) >= 4 * 10, r.stdout[-2000:]
    # The three frequency columns end at the same offsets on every row, whatever the bar's length.
    ends = {tuple(m.end() for m in re.finditer(r"(\d+|-) MHz|  - ", row))[:3] for row in rows}
    assert len(ends) == 1, ends
    assert "[thermal cap: big cluster at most 1426 MHz]" in r.stdout
    # Each row's reason agrees with its figures (which reasons appear depends on the workload's timing;
    # the reasons themselves are pinned by test_why_names_the_reason_host_and_policy_differ).
    for row in rows:
        m = re.search(r"(\d+|-) MHz?\s+(\d+) MHz\s+(\d+) MHz\s*(.*)$", row.replace("  -  ", "  - MHz "))
        assert m, row
        wants, runs, why = m.group(1), int(m.group(2)), m.group(4)
        if why == "":
            assert wants != "-" and int(wants) == runs, row
        elif why.startswith("thermal cap"):
            assert " big " in row and runs == 1426, row
        elif why == "no record yet":
            assert wants == "-", row
        else:
            assert why in ("next OPP up", "host steps every 100 ms") or why.startswith("cluster shared with vCPU"), row
            assert wants != "-" and int(wants) != runs, row


@pytest.mark.parametrize(
    ("v", "wants", "runs", "cap", "expected"),
    [
        (0, {}, 300_000, None, "no record yet"),
        (0, {0: 300_000}, 300_000, None, ""),
        (0, {0: 310_000}, 574_000, None, "next OPP up"),
        (3, {3: 2_500_000}, 1_426_000, 1_426_000, "thermal cap 1426 MHz"),
        (0, {0: 300_000, 1: 1_500_000}, 1_803_000, None, "cluster shared with vCPU 1"),
        (0, {0: 1_500_000}, 300_000, None, "host steps every 100 ms"),
    ],
)
def test_why_names_the_reason_host_and_policy_differ(v: int, wants: dict[int, int], runs: int, cap: int | None,
                                                      expected: str) -> None:
    from vhost_user_cpufreq.backend.service.demo import _why

    assert _why(v, (0, 0, 1, 2), wants, runs, cap) == expected
