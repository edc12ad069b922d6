"""The real service binary as the handover and fd-store tests drive it: started on a directory's
config.toml, asked over its control socket, its stderr kept in a log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vhost_user_cpufreq.backend.service.daemon import query_status


def service_exe() -> str:
    """The console script installed beside this interpreter."""
    return str(Path(sys.executable).with_name("vhost-user-cpufreq"))


def status(d: Path) -> dict[str, Any]:
    return query_status(str(d / "control.sock"), timeout=2)


def answers(d: Path, pid: int) -> bool:
    """The control socket in ``d`` is served, and by process ``pid`` (not a predecessor)."""
    try:
        return bool(status(d)["pid"] == pid)
    except (OSError, ValueError, KeyError):
        return False


def serve(d: Path, env: dict[str, str], *extra: str, log: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([service_exe(), "serve", "--config", str(d / "config.toml"), *extra],
                            env={**os.environ, **env}, stderr=open(d / log, "wb"))


def read_log(d: Path, name: str) -> str:
    return (d / name).read_text(errors="replace")
