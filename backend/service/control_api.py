"""The managers' API on the control socket: register, update, remove and list VMs.

Theory of operation: the control socket is a line protocol (daemon.py): one
request line, one JSON reply line.  These requests are ``vm-register JSON``,
``vm-update JSON``, ``vm-remove JSON`` and ``vm-list``, JSON being an object
``{"name": ..., "vcpus": N, "class": ..., "floor": N, "ceiling": N}`` (only
``name`` is required).  Who may ask is decided by the control socket's
permissions (owner-only, or a group the configuration names): there is no
other authentication.  Every change is written to the registry file before it
is acknowledged, and applied at once to a connected VM (its limits and class
change in place; a vCPU count cannot change under a running QEMU).
"""

from __future__ import annotations

import json
from typing import Any

from .config import ServiceConfig
from .registry import Registry, RegistryError, validate_registration
from .shared_socket import SharedSocket

__all__ = ["ControlApi", "COMMANDS"]

COMMANDS = ("vm-register", "vm-update", "vm-remove", "vm-list")


class ControlApi:
    def __init__(self, config: ServiceConfig, registry: Registry, shared: SharedSocket | None) -> None:
        self.config = config
        self.registry = registry
        self.shared = shared

    def handles(self, line: str) -> bool:
        return line.strip().split(" ", 1)[0] in COMMANDS

    def handle(self, line: str) -> dict[str, Any]:
        cmd, _, body = line.strip().partition(" ")
        try:
            if cmd == "vm-list":
                return self.list()
            if self.shared is None:
                raise RegistryError("no [service] shared_socket is configured: registrations would apply to nothing")
            try:
                req = json.loads(body) if body.strip() else {}
            except json.JSONDecodeError as exc:
                raise RegistryError(f"the request is not JSON: {exc}") from None
            if cmd == "vm-register":
                return self.register(req)
            if cmd == "vm-update":
                return self.update(req)
            return self.remove(req)
        except RegistryError as exc:
            return {"ok": False, "error": str(exc)}

    def _classes(self) -> set[str]:
        return set(self.config.classes)

    def register(self, req: Any) -> dict[str, Any]:
        reg = validate_registration(req, self._classes())
        if reg.name in self.config.vms:
            raise RegistryError(f"name: {reg.name!r} is a [vm.NAME] section of the configuration (its own socket)")
        if reg.name in self.registry.vms:
            raise RegistryError(f"name: {reg.name!r} is registered already (vm-update changes it)")
        self._check_vcpus(reg.name, reg.vcpus)
        self.registry.put(reg)
        return {"ok": True, "vm": reg.as_dict(), "applied": self._apply(reg.name)}

    def update(self, req: Any) -> dict[str, Any]:
        name = req.get("name") if isinstance(req, dict) else None
        base = self.registry.vms.get(name) if isinstance(name, str) else None
        if base is None:
            raise RegistryError(f"name: {name!r} is not registered (vm-register adds it)")
        reg = validate_registration(req, self._classes(), base)
        if reg.vcpus != base.vcpus:
            self._check_vcpus(reg.name, reg.vcpus)
        self.registry.put(reg)
        return {"ok": True, "vm": reg.as_dict(), "applied": self._apply(reg.name)}

    def remove(self, req: Any) -> dict[str, Any]:
        name = req.get("name") if isinstance(req, dict) else None
        if not isinstance(name, str) or self.registry.remove(name) is None:
            raise RegistryError(f"name: {name!r} is not registered")
        return {"ok": True, "applied": self._apply(name)}

    def list(self) -> dict[str, Any]:
        connected = self.shared.describe() if self.shared is not None else {}
        names = sorted(set(self.registry.vms) | set(connected))
        vms = [{"name": n, "registered": self.registry.vms[n].as_dict() if n in self.registry.vms else None,
                "connected": connected.get(n)} for n in names]
        return {"ok": True, "shared_socket": self.config.shared_socket, "admit": self.config.admit, "vms": vms}

    def _check_vcpus(self, name: str, vcpus: int | None) -> None:
        pv = self.shared.peers.get(name) if self.shared is not None else None
        if vcpus is not None and pv is not None and pv.identity.vcpus != vcpus:
            raise RegistryError(f"vcpus: VM {name!r} is running with {pv.identity.vcpus} vCPUs; "
                                f"its count cannot change while its QEMU runs")

    def _apply(self, name: str) -> str:
        return self.shared.apply_registration(name) if self.shared is not None else "not connected"
