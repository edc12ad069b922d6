"""The folders' contract: protocol/ is sans-IO, and data flows one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IO_MODULES = {"asyncio", "socket", "select", "selectors", "mmap", "subprocess", "os", "signal", "threading"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").glob("*.py")), ids=lambda p: p.name)
def test_protocol_modules_do_no_io(path: Path) -> None:
    bad = {n for n in _imports(path) if n.split(".")[0] in IO_MODULES}
    assert not bad, f"{path.name} imports {sorted(bad)}: protocol/ is bytes in, objects out"


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").glob("*.py")), ids=lambda p: p.name)
def test_protocol_does_not_reach_up_into_backend_or_guest(path: Path) -> None:
    up = {n for n in _imports(path) if n.startswith(("vhost_user_cpufreq.backend", "vhost_user_cpufreq.guest"))}
    assert not up


@pytest.mark.parametrize("path", sorted((ROOT / "backend").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_service_does_not_depend_on_the_guest_model(path: Path) -> None:
    if path.name == "demo.py":  # the demo runs a modelled guest by design
        return
    assert not {n for n in _imports(path) if n.startswith("vhost_user_cpufreq.guest")}
