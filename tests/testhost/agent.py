"""The test host's agent: runs commands for the tests, over a virtio-serial port.

Runs inside the test host (``vuc-agent.service``), with the test host's own
Python.  Requests and replies are JSON lines on ``/dev/virtio-ports/vuc.agent``:

    -> {"id": 3, "argv": ["uname", "-r"], "timeout": 30, "stdin": "", "env": {}}
    <- {"id": 3, "rc": 0, "stdout": "7.3.4+deb13-amd64\\n", "stderr": "", "timed_out": false}

A request ``{"id": 4, "clock": true}`` is answered at once with the test
host's ``CLOCK_MONOTONIC`` (``{"id": 4, "monotonic": 123.456}``), so the host
can relate the two machines' clocks (``TestHost.clock_offset``).

A command that outlives its timeout is killed (its whole process group) and
answered with ``timed_out`` true and rc -9.  What the host writes before the
port is open is lost, so the host pings (a request for ``true``) until one is
answered.  The agent runs one command at a time: the tests drive one test
host from one process.
"""

import json
import os
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/vuc.agent"


def run(req: dict) -> dict:
    try:
        p = subprocess.Popen(req["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, **req.get("env", {})}, start_new_session=True,
                             cwd=req.get("cwd") or "/")
    except OSError as exc:
        return {"rc": 127, "stdout": "", "stderr": f"agent: cannot run {req['argv'][0]}: {exc}\n", "timed_out": False}
    try:
        out, err = p.communicate(req.get("stdin", "").encode(), timeout=req.get("timeout", 60))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        timed_out = True
    return {"rc": p.returncode, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "timed_out": timed_out}


def write_all(port, data: bytes) -> None:  # type: ignore[no-untyped-def]
    # A virtio console port takes at most 32 KiB per write(): the rest must follow, or a long
    # reply loses its tail (and its newline) and the host waits for it forever.
    view = memoryview(data)
    while view:
        view = view[port.write(view):]


def main() -> None:
    with open(PORT, "r+b", buffering=0) as port:
        buf = b""
        while True:
            chunk = port.read(65536)
            if not chunk:
                time.sleep(0.1)  # the host side is not connected: the port reads as EOF until it is
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                if req.get("clock"):
                    reply = {"id": req.get("id"), "monotonic": time.monotonic()}
                else:
                    reply = {"id": req.get("id"), **run(req)}
                write_all(port, json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
