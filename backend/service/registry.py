"""VMs a manager registered through the control API, kept on disk across restarts.

Theory of operation: a registration says what a VM on the shared socket is
before (or while) it runs: its vCPU count (checked against QEMU's ``-smp``),
its policy class, and floor/ceiling overriding the class's.  The registry is
one JSON file in the state directory, replaced atomically (write, fsync,
rename) on every change, so a crash leaves the old or the new file, never
half of one.  A file that cannot be read back stops the start with its path:
a manager's registrations are never dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from .config import ConfigError

__all__ = ["Registration", "Registry", "RegistryError", "validate_registration"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$")
_FIELDS = ("name", "vcpus", "vm_class", "floor", "ceiling", "cgroup")


class RegistryError(ValueError):
    """A registration request is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    vcpus: int | None = None  # None: take QEMU's -smp
    vm_class: str | None = None  # None: the first class that matches
    floor: int | None = None  # None: the class's
    ceiling: int | None = None
    #: a glob the QEMU process's cgroup must match (e.g. libvirt's machine scope of that very domain):
    #: the name alone is the peer's claim, its cgroup is set by whoever started it
    cgroup: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """As requests and the registry file spell it ("class", not "vm_class"); unset fields left out."""
        return {("class" if k == "vm_class" else k): v for k, v in asdict(self).items() if v is not None}


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RegistryError(f"{key}: must be an integer {lo}..{hi}, got {v!r}")
    return v


def validate_registration(d: Any, classes: set[str], base: Registration | None = None) -> Registration:
    """A Registration from a request's JSON object (``base``: the one an update starts from)."""
    if not isinstance(d, dict):
        raise RegistryError("the request must be a JSON object")
    unknown = set(d) - set(_FIELDS) - {"class"}
    if unknown:
        raise RegistryError(f"{sorted(unknown)[0]}: unknown field (known: name, vcpus, class, floor, ceiling, "
                            "cgroup)")
    name = d.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(f"name: must be 1-127 of [A-Za-z0-9._-] (as QEMU's -name), got {name!r}")
    cls = d.get("class", d.get("vm_class"))
    if cls is not None and (not isinstance(cls, str) or cls not in classes):
        raise RegistryError(f"class: {cls!r} is not a configured class (have: {', '.join(sorted(classes)) or 'none'})")
    cgroup = d.get("cgroup")
    if cgroup is not None and (not isinstance(cgroup, str) or not cgroup.startswith("/")):
        raise RegistryError(f"cgroup: must be a glob of an absolute cgroup path, got {cgroup!r}")
    fields: dict[str, Any] = {"vcpus": _int(d, "vcpus", 1, 4096), "vm_class": cls,
                              "floor": _int(d, "floor", 0, 1024), "ceiling": _int(d, "ceiling", 0, 1024),
                              "cgroup": cgroup}
    if base is not None:
        # An update changes the fields it names and keeps the others.
        fields = {k: v for k, v in fields.items() if k in d or (k == "vm_class" and "class" in d)}
        reg = replace(base, **fields)
    else:
        reg = Registration(name, **fields)
    if reg.floor is not None and reg.ceiling is not None and reg.floor > reg.ceiling:
        raise RegistryError(f"floor: {reg.floor} is above ceiling {reg.ceiling}")
    return reg


class Registry:
    """Registrations by VM name; persisted to ``STATE_DIR/registry.json`` when a state dir is given."""

    def __init__(self, state_dir: str | None) -> None:
        self.path = os.path.join(state_dir, "registry.json") if state_dir else None
        self.vms: dict[str, Registration] = {}

    def load(self, classes: set[str]) -> None:
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("vms"), list):
                raise RegistryError('expected {"vms": [...]}')
            # A class removed from the configuration since: the registration stays, matched by rules instead.
            vms = [validate_registration({k: v for k, v in d.items() if not (k == "class" and v not in classes)},
                                         classes) for d in data["vms"]]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot load the registered VMs: {exc}") from None
        self.vms = {r.name: r for r in vms}

    def put(self, reg: Registration) -> None:
        self._save({**self.vms, reg.name: reg})

    def remove(self, name: str) -> Registration | None:
        reg = self.vms.get(name)
        if reg is not None:
            self._save({n: r for n, r in self.vms.items() if n != name})
        return reg

    def _save(self, vms: dict[str, Registration]) -> None:
        """On disk first, then in memory: a request that cannot be kept is refused and changes nothing."""
        if self.path is not None:
            tmp = f"{self.path}.tmp"
            body = {"vms": [r.as_dict() for r in sorted(vms.values(), key=lambda r: r.name)]}
            try:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(body, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.path)
            except OSError as exc:
                raise RegistryError(f"cannot keep the registrations in {self.path}: {exc.strerror or exc}") from None
        self.vms = vms
