"""py-spy over the back-end process while a section's load runs, folded into per-function shares.

Imported by bench/run.py, which puts bench/ and the repository on sys.path first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any


async def profile_during(pid: int, work: Any, seconds: float, tmp: str, tag: str) -> dict[str, Any]:
    """py-spy the back-end while ``work`` (a coroutine) runs; top self and inclusive frames."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        await work
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out_file = os.path.join(tmp, f"profile-{tag}.txt")
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
        "--format", "raw", "--output", out_file,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.3)
    await work
    _, err = await proc.communicate()
    if proc.returncode != 0 or not os.path.exists(out_file):
        return {"skipped": f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"}
    return summarize_profile(out_file)


def _function(frame: str, parent: str | None) -> str:
    """'name (file:line)' -> 'name (file)'; a dataclass __init__ is named after its caller."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    if file == "<string>" and parent is not None:
        return f"dataclass __init__ <- {_function(parent, None)}"
    return f"{name} ({file})"


def summarize_profile(path: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function (lines folded) from py-spy's raw output."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    idle = 0
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        raw = [f for f in stack.split(";") if f]
        frames = [_function(f, raw[i - 1] if i else None) for i, f in enumerate(raw)]
        leaf = frames[-1] if frames else "?"
        if leaf.startswith(("EpollSelector.select", "select (")):
            idle += count
        selfc[leaf] = selfc.get(leaf, 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count

    def fmt(d: dict[str, int]) -> list[dict[str, Any]]:
        return [{"frame": k, "pct": round(100 * v / total, 1)} for k, v in sorted(d.items(), key=lambda x: -x[1])[:top]]

    return {"samples": total, "idle_pct": round(100 * idle / total, 1) if total else None,
            "top_self": fmt(selfc), "top_inclusive": fmt(incl), "raw": path}


# -- report ---------------------------------------------------------------------------------------
