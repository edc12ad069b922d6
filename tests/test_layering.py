"""The folders' contract: protocol/ is sans-IO, and imports go one way.

The package's import graph is read from the source (every import: module
level, inside functions, under ``TYPE_CHECKING``), so a lazy import cannot
hide an arrow that goes the wrong way.  The layers, bottom up: a module may
import its own layer and the layers below it, never one above.

    protocol                      wire formats, rings, device ABI (no I/O)
    backend (counters, defaults)  leaves every layer shares
    backend.policy                pure decisions, injected time
    backend.dataplane             the C plane that runs them, and the guards
    backend.vhost                 transport, session, guest memory, device interface
    backend.cpufreq               the device
    backend.host                  sysfs, threads, actuators, the policy shell
    backend.sim                   the simulator: the real engine and driver on a modelled host
    backend.service               wires everything; nothing below imports it

The guest model is the peer on the other side of ``protocol/``: it imports
the protocol and itself, never the back-end.  No import cycles anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "vhost_user_cpufreq"
IO_MODULES = {"asyncio", "socket", "select", "selectors", "mmap", "subprocess", "os", "signal", "threading"}
FOLDERS = {"protocol": f"{PKG}.protocol", "backend": f"{PKG}.backend", "guest-driver-model": f"{PKG}.guest"}
LAYERS = (
    f"{PKG}.protocol",
    f"{PKG}.backend",  # its root modules only: counters, defaults
    f"{PKG}.backend.policy",
    f"{PKG}.backend.dataplane",
    f"{PKG}.backend.vhost",
    f"{PKG}.backend.cpufreq",
    f"{PKG}.backend.host",
    f"{PKG}.backend.sim",
    f"{PKG}.backend.service",
)
#: the sanctioned crossings: the demo runs a modelled guest against the service, and the
#: simulator's device arm runs the real guest driver model against the real engine
GUEST_ALLOWED = {f"{PKG}.backend.service.demo", f"{PKG}.backend.sim.devicearm"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((pkg, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> set[str]:
    """Every name ``module`` imports, absolute, as written (modules or packages or third-party)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package_of(module).split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names.add(base)
            # ``from pkg import mod``: the arrow points at the module
            names |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return names


def _edges(module: str) -> set[str]:
    """The package's own modules ``module`` depends on (a package's ``__init__`` counts as a module)."""
    return {n for n in _imports(module) if n in MODULES and n != module}


def _layer(module: str) -> int:
    pkg = _package_of(module)
    return max((i for i, layer in enumerate(LAYERS) if pkg == layer or pkg.startswith(layer + ".")), default=-1)


PROTOCOL = sorted(m for m in MODULES if m.startswith(f"{PKG}.protocol"))
BACKEND = sorted(m for m in MODULES if m.startswith(f"{PKG}.backend"))
GUEST = sorted(m for m in MODULES if m.startswith(f"{PKG}.guest"))


@pytest.mark.parametrize("module", PROTOCOL)
def test_protocol_modules_do_no_io(module: str) -> None:
    bad = {n for n in _imports(module) if n.split(".")[0] in IO_MODULES}
    assert not bad, f"{module} imports {sorted(bad)}: protocol/ is bytes in, objects out"


@pytest.mark.parametrize("module", BACKEND)
def test_backend_imports_only_its_own_layer_and_those_below(module: str) -> None:
    mine = _layer(module)
    assert mine >= 0, f"{module} sits in no layer: add its package to LAYERS"
    up = {n for n in _edges(module) if n.startswith(f"{PKG}.backend") and _layer(n) > mine}
    assert not up, f"{module} (layer {LAYERS[mine]}) reaches up into {sorted(up)}"


@pytest.mark.parametrize("module", BACKEND)
def test_the_backend_does_not_depend_on_the_guest_model(module: str) -> None:
    if module in GUEST_ALLOWED:
        return
    assert not {n for n in _imports(module) if n.startswith(f"{PKG}.guest")}


@pytest.mark.parametrize("module", PROTOCOL)
def test_protocol_does_not_reach_up_into_backend_or_guest(module: str) -> None:
    assert not {n for n in _imports(module) if n.startswith((f"{PKG}.backend", f"{PKG}.guest"))}


@pytest.mark.parametrize("module", GUEST)
def test_the_guest_side_speaks_only_the_protocol(module: str) -> None:
    """Sharing code with the back-end would hide interop bugs: the guest model has its own."""
    assert not {n for n in _imports(module) if n.startswith(f"{PKG}.backend")}


def test_backend_root_holds_only_leaves() -> None:
    root = [m for m in BACKEND if _package_of(m) == f"{PKG}.backend"]
    assert {m.rpartition(".")[2] for m in root} <= {"backend", "counters", "defaults"}, root
    for m in root:
        assert not {n for n in _edges(m) if n.startswith(f"{PKG}.backend")}, f"{m} must stay a leaf"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the whole package: every one is a single module."""
    graph = {m: sorted(_edges(m)) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_table_covers_every_backend_package() -> None:
    packages = {_package_of(m) for m in BACKEND}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_serving_does_not_load_the_guest_model() -> None:
    """The CLI imports the demo (and through it the guest model) only for ``demo``."""
    code = ("import sys, vhost_user_cpufreq.backend.service.cli, vhost_user_cpufreq.backend.service.daemon\n"
            "print(sorted(m for m in sys.modules if m.startswith('vhost_user_cpufreq.guest') or m.endswith('.demo')\n"
            "             or (m.startswith('vhost_user_cpufreq.backend.sim.') and not m.endswith('.args'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
