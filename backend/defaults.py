"""Defaults shared by the configuration file, the service, the session and the kick lane.

One place for each, so that a change of default reaches every layer that
falls back on it.
"""

from __future__ import annotations

import os

__all__ = ["KICK_BATCH_DELAY", "LANE_SLICE_US", "RUNTIME_DIR", "make_runtime_dir"]

#: Poll period of a busy ring, in seconds (SPEC 6.3): the longest a busy VM's buffer
#: waits without a kick.  0 means a kick for every buffer.
KICK_BATCH_DELAY = 0.004

#: The kick lane thread's scheduler slice, in microseconds: the kernel's shortest
#: (0.1 ms), still far above the few microseconds a kick costs the lane, so a kick
#: preempts a busy thread on the lane's CPU instead of waiting out its slice
#: (kick_lane.c, request_slice).  0 leaves the kernel's default slice.
LANE_SLICE_US = 100

#: The unit's RuntimeDirectory= (deploy/): sockets, control socket and state file by default.
RUNTIME_DIR = "/run/vhost-user-cpufreq"


def make_runtime_dir(path: str) -> None:
    """Make :data:`RUNTIME_DIR` if ``path`` is in it and it is missing: systemd makes it for the unit,
    nobody does for a service started by hand (README's ``serve --socket-path ...``).  Any other
    missing directory stays an error naming the path (a mistyped path is not silently made)."""
    if os.path.dirname(path) == RUNTIME_DIR and not os.path.isdir(RUNTIME_DIR):
        os.makedirs(RUNTIME_DIR, 0o755, exist_ok=True)
