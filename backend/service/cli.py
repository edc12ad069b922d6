"""Command line: ``vhost-user-cpufreq serve | demo | check | status | simulate``.

``serve`` follows the vhost-user spec's "Backend program conventions":
``--socket-path`` (listen there), ``--fd`` (an inherited listening socket),
``--print-capabilities`` (JSON on stdout, then exit).  With ``--config`` it
serves every VM in the file; SIGHUP reloads the file, SIGTERM stops after
giving every vCPU thread back its original affinity and clamps.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from typing import Sequence

from vhost_user_cpufreq.protocol.cpufreq import DEFAULT_DEVICE_ID

from . import systemd
from .check import run_checks
from .config import ConfigError, ServiceConfig, VmSettings, load_config
from ..sim.args import add_arguments as _simulate_arguments
from .vm_cli import add_vm_parser, run_vm

__all__ = ["main", "build_parser"]

DEFAULT_CONTROL_SOCKET = "/run/vhost-user-cpufreq/control.sock"
_SERVE_CONVENTIONS = {"--print-capabilities", "--socket-path", "--fd"}


class _JournalFormatter(logging.Formatter):
    """Under systemd, prefix each line with its syslog priority (<3> error ... <7> debug) for journald."""

    PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIO.get(record.levelno, 6)}>{super().format(record)}"


class _HelpFormatter(argparse.HelpFormatter):
    """Append an option's default to its help, when it has one worth saying (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, logging.INFO - 10 * verbose))


def _config_from_args(args: argparse.Namespace) -> ServiceConfig:
    if args.config:
        cfg = load_config(args.config)
    else:
        if not (args.socket_path or args.fd is not None):
            raise ConfigError("serve needs --config FILE, --socket-path PATH or --fd N")
        vcpus = args.vcpus
        if vcpus is None:
            # The backend-program conventions let a VMM start us with --socket-path alone; serve,
            # but never silently describe fewer vCPUs than the VM may have.
            vcpus = 1
            logging.getLogger("vhost_user_cpufreq").warning(
                "no --vcpus given: the device describes 1 vCPU for VM %r; give --vcpus N (QEMU's -smp)", args.name)
        vm = VmSettings(args.name, args.socket_path or f"/dev/fd/{args.fd}", vcpus, qmp=args.qmp,
                        clamp="thread" if args.qmp or args.clamp else "none")
        cfg = ServiceConfig(vms={vm.name: vm}, control_socket=args.control_socket, source="command line")
    if args.nominal_khz:
        cfg = dataclasses.replace(cfg, nominal_khz=args.nominal_khz)
    if args.sysfs_root:
        cfg = dataclasses.replace(cfg, sysfs_root=args.sysfs_root)
    return cfg


def _serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    if args.print_capabilities:
        print(json.dumps({"type": "cpufreq", "virtio-id": DEFAULT_DEVICE_ID, "features": []}))
        return 0
    try:
        cfg = _config_from_args(args)
    except ConfigError as exc:
        print(f"vhost-user-cpufreq: {exc}", file=sys.stderr)
        return 2
    from .fdstore import FdStore, from_store

    # Sockets of socket units by VM name; what systemd's fd store kept (service/fdstore.py) by its own names.
    rest, stored, taken, keeper = from_store(systemd.listen_fds_raw(), FdStore(), set(cfg.vms),
                                            shared=cfg.shared_socket is not None)
    inherited = {**{name: socket.socket(fileno=fd) for name, fd in rest}, **stored}
    if args.fd is not None:
        inherited[args.name] = socket.socket(fileno=args.fd)

    if args.take_over:
        from .handover import take_over

        taken = take_over(args.take_over, keeps_store=keeper.store.enabled)
        if taken is None:
            print(f"vhost-user-cpufreq: the service on {args.take_over} did not hand over; it serves on",
                  file=sys.stderr)
            return 1
        for index, (vm, serial, names, record_fd) in taken.stores.items():
            keeper.adopt(vm, record_fd, serial, names, taken.sessions[index][1])
        if keeper.store.enabled:
            systemd.notify(f"MAINPID={os.getpid()}")  # the unit's main process is this one now

    async def run() -> int:
        daemon = Daemon(cfg, config_path=args.config)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        started = asyncio.Event()

        async def reload() -> None:
            await started.wait()  # a SIGHUP during start applies once start is done
            await daemon.reload_from_signal()

        # Before start: READY=1 goes out inside start(), and systemd may signal right after it.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
        if keeper.store.enabled:
            keeper.install(daemon.service)
        try:
            await daemon.start(inherited, taken)
        except (OSError, ValueError, ConfigError) as exc:
            print(f"vhost-user-cpufreq: cannot start: {exc}", file=sys.stderr)
            await daemon.stop()
            return 1
        if keeper.store.enabled:
            keeper.started(daemon.service)
        started.set()
        await stop.wait()
        if keeper.store.enabled:
            # Stop or restart: every VM stays connected through the store, served again by the next start.
            keeper.park()
            logging.shutdown()
            os._exit(0)
        await daemon.stop()
        return 0

    return asyncio.run(run())


def _check(args: argparse.Namespace) -> int:
    findings = run_checks(args.sysfs_root, args.nominal_khz)
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.name:<12} {f.state:<9} {f.detail}")
    return 1 if any(f.state == "degraded" for f in findings) else 0


def _status(args: argparse.Namespace) -> int:
    from .daemon import query_status

    path = args.control_socket
    if args.config:
        path = load_config(args.config).control_socket or path
    try:
        st = query_status(path)
    except OSError as exc:
        print(f"vhost-user-cpufreq: cannot reach the service at {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"pid {st['pid']}, up {st['uptime_seconds']:.0f} s")
    for k, v in st["degraded"].items():
        if v:
            print(f"  degraded {k}: {v}")
    for name, vm in st["vms"].items():
        state = f"connected (QEMU pid {vm['peer_pid']})" if vm["connected"] else "waiting for QEMU"
        print(f"VM {name}: {state}, socket {vm['socket']}, config generation {vm['config_generation']}")
        pin = vm.get("pinning") or {}
        if pin.get("mode"):
            print(f"  pinning {pin['mode']}" + (f" ({pin['note']})" if pin.get("note") else ""))
        for d, dom in enumerate(vm["domains"]):
            print(f"  domain {d}: {dom['cur_khz'] / 1000:.0f} MHz of {dom['max_khz'] / 1000:.0f}, "
                  f"capacity {dom['capacity']}")
        for c in vm["vcpus"]:
            where = f"pCPU {c['pcpu']}" if c["pcpu"] is not None else f"CPUs {c.get('cpus')} (not pinned)"
            if c.get("pin_applied") is False:
                where += " (the kernel refused the pin: see pins_failed_total and the log)"
            cap = c.get("uclamp_max") or 1024
            print(f"  vCPU {c['vcpu']}: {where}, thread {c['thread']}, util {c['util']}, "
                  f"uclamp_min {c['uclamp_min']}" + (f", uclamp_max {cap} (power cap)" if cap < 1024 else ""))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=8.0, help="seconds to run")
    p.add_argument("--vcpus", type=int, default=4, help="guest vCPUs, 1-8")
    p.add_argument("--seed", type=int, default=1, help="seed of the guest's bursty workload")
    p.add_argument("--refresh", type=float, default=0.5, help="seconds between screen updates")
    p.add_argument("--plain", action="store_true",
                   help="print one block per update instead of redrawing the screen (the default when "
                        "stdout is not a terminal)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every option with its help and, where it has one, its default."""
    # Every option says what it does and, through the formatter, its default.
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(prog="vhost-user-cpufreq", description="vhost-user cpufreq device back-end",
                                formatter_class=fmt)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging: -v adds debug lines (and, for check, the probes' own log lines)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,serve,check,status,simulate,vm}")

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="the back-end and a modelled guest over a real socket (no QEMU, no root)")
    _demo_arguments(d)

    s = sub.add_parser("serve", formatter_class=fmt, help="serve VMs (from --config, or one VM from flags)")
    s.add_argument("--config", help="TOML configuration file (see README, 'Run the service')")
    s.add_argument("--socket-path", help="listen for one VM's front-end on this unix socket")
    s.add_argument("--fd", type=int, help="an inherited, listening unix socket for one VM")
    s.add_argument("--print-capabilities", action="store_true", help="print the back-end's capabilities as JSON")
    s.add_argument("--name", default="vm0", help="VM name with --socket-path/--fd")
    s.add_argument("--vcpus", type=int, default=None,
                   help="that VM's vCPUs, as QEMU's -smp; without it the device describes 1 vCPU, and says so")
    s.add_argument("--qmp", help="QMP socket of that VM's QEMU (vCPU thread discovery)")
    s.add_argument("--clamp", action="store_true", help="pin and clamp vCPU threads found in /proc")
    s.add_argument("--control-socket", default=None,
                   help="status socket; from flags there is none unless given")
    s.add_argument("--nominal-khz", type=int,
                   help="frequency to report on hosts without cpufreq (default: /proc/cpuinfo's)")
    s.add_argument("--sysfs-root", help="read CPUs from this sysfs root (default: the configuration's, or /sys)")
    s.add_argument("--take-over", metavar="CONTROL_SOCKET",
                   help="take every VM and live session over from the service on this control socket, "
                        "without the front-ends noticing (upgrade, restart)")

    c = sub.add_parser("check", formatter_class=fmt,
                       help="probe what this host supports; exit 1 if serving would be degraded")
    c.add_argument("--json", action="store_true", help="the findings as a JSON list, nothing else on stdout")
    c.add_argument("--sysfs-root", default="/sys", help="read CPUs from this sysfs root")
    c.add_argument("--nominal-khz", type=int,
                   help="frequency to report on hosts without cpufreq (default: /proc/cpuinfo's)")

    sim = sub.add_parser("simulate", formatter_class=fmt,
                         help="what the device buys: guest workloads on a modelled DVFS host, four ways")
    _simulate_arguments(sim)

    st = sub.add_parser("status", formatter_class=fmt, help="ask the running service")
    st.add_argument("--control-socket", default=DEFAULT_CONTROL_SOCKET, help="the service's control socket")
    st.add_argument("--config", help="take the control socket from this configuration file")
    st.add_argument("--json", action="store_true", help="the whole status as JSON")
    add_vm_parser(sub, fmt, DEFAULT_CONTROL_SOCKET)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()

    argv = list(sys.argv[1:] if argv is None else argv)
    # The vhost-user spec's back-end conventions run `BINARY --print-capabilities` or
    # `BINARY --socket-path=...`/`--fd=N` with no subcommand: those mean serve.
    if argv and argv[0].startswith("--") and argv[0].split("=")[0] in _SERVE_CONVENTIONS:
        argv.insert(0, "serve")
    args = p.parse_args(argv)
    # check prints every finding itself; the probes' own warnings would repeat them on stderr.
    quieter = {"demo": 1, "check": 2}.get(args.command, 0)
    _setup_logging(args.verbose - quieter)
    if args.command == "demo":
        from . import demo  # late: the demo loads the guest model, which serve must not

        return demo.main(args)
    if args.command == "simulate":
        from ..sim import cli as sim_cli  # late: serving never loads the simulator

        return sim_cli.main(args)
    if args.command == "check":
        return _check(args)
    if args.command == "status":
        return _status(args)
    if args.command == "vm":
        return run_vm(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
