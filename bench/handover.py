"""The gap in serving at a live handover (``serve --take-over``), over repeated handovers.

    .venv/bin/python bench/handover.py [--rounds N | --tiny] [--out-dir DIR]

The real service binary serves one VM; a modelled guest (this file,
``--guest``, a process of its own) makes one record available every
``--period`` ms and notes, with CLOCK_MONOTONIC, when each buffer comes back
used: a buffer comes back once its record was decided, so the completions are
the decisions as the guest sees them.  The bench then hands the service over
``--rounds`` times (each new process takes over from the previous one) and,
around each handover, takes the longest time between two consecutive
completions: the last decision of the old process -> the first decision of
the new one (a kick that came meanwhile is found by the new one on resume).
The same figure over the quiet stretches between handovers is the baseline
(the ring's ordinary polling and batching).  Each round also reports the
exchange as the old process logged it (freeze -> ACK) and the batches lost
(the new process's ``lost_batches``, by the sequence tracking carried over).

The gap includes the new process's start once it holds the fds: waiting for
the old one's exit, reading the state file, binding the control socket and the
metrics port, resuming each session.  It does not include the new process's
Python start-up (about half a second), which happens before it asks.

``--mode sigkill`` / ``sigterm``: instead of a handover, the process is
killed (SIGKILL) or stopped (SIGTERM: it parks its sessions) and the next one
started from systemd's fd store, systemd's part played by tests/minisystemd.py;
the gap then includes the next process's whole start, Python's included.
After a SIGKILL the sequence tracking starts afresh (service/fdstore.py), so
``lost_batches`` counts nothing there; buffers not returned still would.

Writes ``<date>-handover[-MODE].json`` and ``.md`` into ``--out-dir``
(bench/results by default).  ``--tiny``: two rounds, for the smoke test; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from stats import machine_info, mono_ns, summary  # noqa: E402

from tests.minisystemd import MiniSystemd  # noqa: E402
from vhost_user_cpufreq.backend.service.daemon import query_status  # noqa: E402

QUIET_LEAD_S = 0.3  # a baseline stretch starts this long after a new process answered, ends at the next request
SETTLE_S = 1.0  # between two handovers


# -- the guest (a process of its own) ------------------------------------------------------------------------


async def _guest(sock: str, period_s: float) -> None:
    import guestlib

    g = await guestlib.connect_guest(sock, util_threshold=1, lazy_records=0)
    d = g.driver
    done: list[int] = []
    stdin = select.poll()
    stdin.register(0, select.POLLIN)
    print("ready", flush=True)
    i = 0
    while not stdin.poll(0):
        before = len(d._inflight)
        d._reclaim()
        now = mono_ns()
        done.extend([now] * (before - len(d._inflight)))
        i += 1
        d.set_util(i % 2, 200 if (i // 2) % 2 else 800)  # always a change: always sent
        d.flush()
        time.sleep(period_s)
    deadline = time.monotonic() + 2.0
    while d._inflight and time.monotonic() < deadline:
        d.flush()
        before = len(d._inflight)
        d._reclaim()
        done.extend([mono_ns()] * (before - len(d._inflight)))
        time.sleep(period_s)
    json.dump({"done": done, "batches": d.stats.batches, "not_returned": len(d._inflight),
               "queue_full": d.stats.queue_full}, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    await g.close()


# -- the run ---------------------------------------------------------------------------------------------------


def _exe() -> str:
    return str(Path(sys.executable).with_name("vhost-user-cpufreq"))


def _answers(control: str, pid: int) -> bool:
    try:
        return bool(query_status(control, timeout=2)["pid"] == pid)
    except (OSError, ValueError, KeyError):
        return False


def _wait(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.002)


def gaps_within(done: list[int], lo: int, hi: int) -> list[int]:
    """Consecutive completion intervals (ns) that end in [lo, hi], the one crossing ``lo`` included."""
    out = []
    for a, b in zip(done, done[1:]):
        if lo <= b <= hi and b > a:
            out.append(b - a)
    return out


def run(rounds: int, period_ms: float, tmp: str, mode: str = "takeover") -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="ho-"))
    control = str(d / "control.sock")
    (d / "config.toml").write_text("\n".join([
        "[service]", f'control_socket = "{control}"', f'state_file = "{d}/state.json"',
        "[vm.vm0]", f'socket = "{d}/vm0.sock"', "vcpus = 2", 'pinning = "none"', 'clamp = "none"',
    ]) + "\n")
    sd = MiniSystemd(d) if mode != "takeover" else None

    def serve(*extra: str, log: str) -> "subprocess.Popen[bytes]":
        argv = [_exe(), "serve", "--config", str(d / "config.toml"), *extra]
        if sd is not None:  # under (a stand-in for) systemd: the next process gets the fd store
            return sd.start(argv, dict(os.environ), open(d / log, "wb"))
        return subprocess.Popen(argv, stderr=open(d / log, "wb"))

    procs = [serve(log="p0.log")]
    guest: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, Any]] = []
    try:
        _wait(lambda: _answers(control, procs[0].pid), 30, "the first process")
        guest = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--guest", str(d / "vm0.sock"), "--period", str(period_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert guest.stdout is not None and guest.stdin is not None
        if guest.stdout.readline().strip() != b"ready":
            raise RuntimeError("the guest did not start")
        time.sleep(SETTLE_S)
        for r in range(1, rounds + 1):
            old = procs[-1]
            t_req = mono_ns()
            if mode == "takeover":
                new = serve("--take-over", control, log=f"p{r}.log")
            else:  # systemd's part: the signal, the exit seen, the next process started with the store
                old.send_signal(signal.SIGKILL if mode == "sigkill" else signal.SIGTERM)
                old.wait(30)
                new = serve(log=f"p{r}.log")
            procs.append(new)
            _wait(lambda: old.poll() is not None, 30, f"round {r}: the old process's exit")
            _wait(lambda: _answers(control, new.pid) or new.poll() is not None, 30, f"round {r}: the new process")
            t_ready = mono_ns()
            if new.poll() is not None:
                raise RuntimeError(f"round {r}: the new process exited:\n{(d / f'p{r}.log').read_text()}")
            m = re.search(r"sessions over to pid \d+ in ([\d.]+) ms", (d / f"p{r - 1}.log").read_text())
            rows.append({"round": r, "t_req": t_req, "t_ready": t_ready, "exchange_ms": float(m[1]) if m else None})
            time.sleep(SETTLE_S)
        counters = query_status(control, timeout=5)["vms"]["vm0"]["counters"]
        out, _ = guest.communicate(b"stop\n", timeout=30)
        g = json.loads(out.splitlines()[-1])
    finally:
        if guest is not None and guest.poll() is None:
            guest.kill()
        if sd is not None:
            sd.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    done = sorted(g["done"])
    handover_gaps, quiet = [], []
    for i, row in enumerate(rows):
        gaps = gaps_within(done, row["t_req"], row["t_ready"] + int(QUIET_LEAD_S * 1e9))
        row["gap_ms"] = round(max(gaps) / 1e6, 3) if gaps else None
        if gaps:
            handover_gaps.append(max(gaps))
        nxt = rows[i + 1]["t_req"] if i + 1 < len(rows) else done[-1]
        quiet += gaps_within(done, row["t_ready"] + int(QUIET_LEAD_S * 1e9), nxt)
        del row["t_req"], row["t_ready"]
    exch = [row["exchange_ms"] for row in rows if row["exchange_ms"] is not None]
    return {
        "machine": machine_info(),
        "mode": mode, "rounds": rounds, "period_ms": period_ms,
        "gap_ms": summary(handover_gaps, "ms", 1e-6),
        "exchange_ms": summary(exch, "ms"),
        "quiet_interval_ms": summary(quiet, "ms", 1e-6),
        "batches_sent": g["batches"], "buffers_not_returned": g["not_returned"],
        "lost_batches": counters.get("lost_batches", 0), "stale_batches": counters.get("rejected:stale-batch", 0),
        "queue_full": g["queue_full"],
        "rows": rows,
    }


def markdown(r: dict[str, Any]) -> str:
    m, gap, ex, q = r["machine"], r["gap_ms"], r["exchange_ms"], r["quiet_interval_ms"]
    what = {"takeover": "handovers (serve --take-over)", "sigkill": "SIGKILLs, each followed by a start from "
            "the fd store", "sigterm": "SIGTERMs (parked), each followed by a start from the fd store"}[r["mode"]]
    return "\n".join([
        f"# Serving gap, {r['mode']}, {m['date']}",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"{r['rounds']} {what}, one record every {r['period_ms']} ms.",
        "",
        "| figure | p50 | p99 | max | n |",
        "|---|---|---|---|---|",
        f"| serving gap: last decision of the old process -> first of the next (ms) | {gap['median']} | "
        f"{gap['p99']} | {gap['max']} | {gap['n']} |",
        *([f"| exchange, freeze -> ACK, as the old process logs it (ms) | {ex['median']} | {ex['p99']} | "
           f"{ex['max']} | {ex['n']} |"] if ex["n"] else []),
        f"| interval between decisions away from a handover (ms) | {q['median']} | {q['p99']} | {q['max']} | "
        f"{q['n']} |",
        "",
        f"Batches sent {r['batches_sent']}, not returned {r['buffers_not_returned']}, lost (sequence) "
        f"{r['lost_batches']}, stale {r['stale_batches']}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--period", type=float, default=1.0, help="ms between the guest's records")
    p.add_argument("--mode", choices=("takeover", "sigkill", "sigterm"), default="takeover",
                   help="takeover: serve --take-over; sigkill/sigterm: the process killed or stopped and the next "
                        "one started from the fd store (systemd's part played by tests/minisystemd.py)")
    p.add_argument("--tiny", action="store_true", help="two rounds: the smoke test's")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--guest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.guest:
        asyncio.run(_guest(args.guest, args.period / 1000))
        return 0
    rounds = 2 if args.tiny else args.rounds
    with tempfile.TemporaryDirectory(prefix="vuc-hob-", dir="/tmp") as tmp:
        r = run(rounds, args.period, tmp, args.mode)
    md = markdown(r)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mode = "" if args.mode == "takeover" else f"-{args.mode}"
    stem = time.strftime("%Y-%m-%dT%H%M", time.gmtime()) + "-handover" + mode + ("-tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps(r, indent=1) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
