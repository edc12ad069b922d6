"""Command line: ``vhost-user-cpufreq demo | serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Sequence

from . import demo
from .hostfreq import HostDomain, HostSnapshot, StaticSource
from .policy import RecordingPolicy
from .service import Service, VmConfig

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    """Serve one VM on ``--socket-path`` with a nominal host frequency (no cpufreq needed)."""
    snap = HostSnapshot((HostDomain(tuple(range(args.vcpus)), args.nominal_khz, args.nominal_khz, args.nominal_khz),),
                        nominal=True)

    async def run() -> None:
        service = Service(StaticSource(snap), RecordingPolicy())
        await service.add_vm(VmConfig(args.name, args.socket_path, (0,) * args.vcpus))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await service.close()

    asyncio.run(run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhost-user-cpufreq", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the back-end and a modelled guest over a real socket")
    demo.add_arguments(d)
    s = sub.add_parser("serve", help="serve one VM (full configuration comes with the service issue)")
    s.add_argument("--socket-path", required=True, help="unix socket QEMU's -chardev connects to")
    s.add_argument("--name", default="vm0")
    s.add_argument("--vcpus", type=int, default=1)
    s.add_argument("--nominal-khz", type=int, default=2000000)
    args = p.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return demo.main(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
