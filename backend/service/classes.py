"""Policy classes: what a VM on the shared socket gets, chosen by what it is.

Theory of operation: a VM that connects to the shared socket has no
``[vm.NAME]`` section.  It gets the first ``[class.NAME]`` (in file order)
whose ``match_name`` glob matches its QEMU ``-name`` and whose
``match_cgroup`` glob matches its cgroup (a class with neither matches every
VM: the default, put it last).  A manager's registration (control API) may
name a class outright and override its floor and ceiling.  A VM no class
matches is refused (``no-class``).

Example::

    [class.latency]
    match_name = "db-*"
    pinning = "auto"
    floor = 256

    [class.libvirt]
    match_cgroup = "/machine.slice/machine-qemu*"
    pinning = "keep"

    [class.default]
    ceiling = 768
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from ..policy.engine import VmLimits
from ..policy.placement import PINNING_MODES

__all__ = ["VmClass", "CLASS_KEYS", "parse_classes", "match_class"]

CLASS_KEYS = {"match_name", "match_cgroup", "pinning", "floor", "ceiling", "clamp", "cgroup", "shared_page"}


@dataclass(frozen=True, slots=True)
class VmClass:
    name: str
    match_name: str | None = None
    match_cgroup: str | None = None
    pinning: str = "auto"  # a mode only: an explicit pCPU list cannot fit VMs of any size
    limits: VmLimits = VmLimits()
    clamp: str = "thread"
    cgroup: str | None = None
    shared_page: bool = False

    def matches(self, vm_name: str, cgroup: str) -> bool:
        if self.match_name is not None and not fnmatch.fnmatchcase(vm_name, self.match_name):
            return False
        if self.match_cgroup is not None and not fnmatch.fnmatchcase(cgroup, self.match_cgroup):
            return False
        return True


def match_class(classes: dict[str, VmClass], vm_name: str, cgroup: str) -> VmClass | None:
    """The first class (in file order) that matches, or None."""
    return next((c for c in classes.values() if c.matches(vm_name, cgroup)), None)


def parse_classes(table: Any, fail: Callable[[str, str], Exception], get: Callable[..., Any],
                  cgroup_ok: Callable[[str], bool]) -> dict[str, VmClass]:
    """``[class.NAME]`` tables; ``fail(key, why)`` and ``get`` are config.py's reader's."""
    if not isinstance(table, dict):
        raise fail("class", "must be tables [class.NAME]")
    out: dict[str, VmClass] = {}
    for name, t in table.items():
        cp = f"class.{name}."
        if not isinstance(t, dict):
            raise fail(f"class.{name}", "must be a table")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise fail(f"class.{name}", "class names use letters, digits, '-' and '_' only")
        for k in t:
            if k not in CLASS_KEYS:
                raise fail(cp + k, "unknown key")
        glob = "a glob pattern (fnmatch: *, ?, [...])"
        floor = get(t, cp, "floor", int, 0, lambda v: 0 <= v <= 1024, "an integer 0..1024")
        ceiling = get(t, cp, "ceiling", int, 1024, lambda v: 0 <= v <= 1024, "an integer 0..1024")
        if floor > ceiling:
            raise fail(cp + "floor", f"{floor} is above ceiling {ceiling}")
        clamp = get(t, cp, "clamp", str, "thread", lambda v: v in ("thread", "cgroup", "none"),
                    '"thread", "cgroup" or "none"')
        cgroup = get(t, cp, "cgroup", str, None, lambda v: v.startswith("{qemu}/") and cgroup_ok(v),
                     '"{qemu}/NAME": threaded cgroups under each QEMU process\'s own (see [vm.NAME].cgroup)')
        if clamp == "cgroup" and cgroup is None:
            raise fail(cp + "cgroup", 'is required with clamp = "cgroup"')
        out[name] = VmClass(
            name,
            get(t, cp, "match_name", str, None, bool, glob),
            get(t, cp, "match_cgroup", str, None, bool, glob),
            get(t, cp, "pinning", str, "auto", lambda v: v in PINNING_MODES, f"one of {', '.join(PINNING_MODES)}"),
            VmLimits(floor, ceiling), clamp, cgroup,
            get(t, cp, "shared_page", bool, False, None, "true or false"),
        )
    return out
