"""``vhost-user-cpufreq vm register|update|remove|list``: the control API from a shell (control_api.py).

Each subcommand sends one request line on the control socket and prints the
reply; the exit status is 0 when the service accepted it, 1 when it refused
(the reason on stderr), 2 when the service cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_vm_parser", "run_vm"]


def add_vm_parser(sub: Any, fmt: type[argparse.HelpFormatter], default_control: str) -> None:
    v = sub.add_parser("vm", formatter_class=fmt,
                       help="register, update, remove or list the VMs of the shared socket (control API)")
    v.add_argument("--control-socket", default=default_control, help="the service's control socket")
    v.add_argument("--json", action="store_true", help="print the service's JSON reply as it is")
    ops = v.add_subparsers(dest="vm_op", required=True, metavar="{register,update,remove,list}", help="the request")
    for op, text in (("register", "tell the service about a VM before or while it runs"),
                     ("update", "change a registered VM (applied at once if it is connected)")):
        p = ops.add_parser(op, formatter_class=fmt, help=text)
        p.add_argument("name", help="the VM's name, as QEMU's -name")
        p.add_argument("--vcpus", type=int, help="its vCPU count (QEMU's -smp must match)")
        p.add_argument("--class", dest="vm_class", help="the [class.NAME] it gets (default: the first that matches)")
        p.add_argument("--floor", type=int, help="util clamp floor 0..1024 (default: the class's)")
        p.add_argument("--ceiling", type=int, help="util clamp ceiling 0..1024 (default: the class's)")
        p.add_argument("--cgroup", help="a glob the QEMU process's cgroup must match (e.g. its libvirt scope)")
    r = ops.add_parser("remove", formatter_class=fmt, help="forget a registration")
    r.add_argument("name", help="the VM's name")
    ops.add_parser("list", formatter_class=fmt, help="registered and connected VMs")


def run_vm(args: argparse.Namespace) -> int:
    from .daemon import query_status

    if args.vm_op == "list":
        line = "vm-list"
    else:
        req: dict[str, Any] = {"name": args.name}
        for key, attr in (("vcpus", "vcpus"), ("class", "vm_class"), ("floor", "floor"), ("ceiling", "ceiling"),
                          ("cgroup", "cgroup")):
            if getattr(args, attr, None) is not None:
                req[key] = getattr(args, attr)
        line = f"vm-{args.vm_op} {json.dumps(req)}"
    try:
        reply = query_status(args.control_socket, line)
    except OSError as exc:
        print(f"vhost-user-cpufreq: cannot reach the service at {args.control_socket}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"vhost-user-cpufreq: refused: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.vm_op == "list":
        print(f"shared socket {reply.get('shared_socket')}, admit {reply.get('admit')}")
        for vm in reply["vms"]:
            reg, con = vm["registered"], vm["connected"]
            state = (f"connected (QEMU pid {con['pid']}, {con['vcpus']} vCPUs, class {con['class']}, "
                     f"floor {con['floor']}, ceiling {con['ceiling']})" if con else "not connected")
            print(f"VM {vm['name']}: {state}" + (f"; registered {json.dumps(reg)}" if reg else ""))
    else:
        print(f"{args.vm_op} {args.name}: {reply.get('applied', 'done')}")
    return 0
