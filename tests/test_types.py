"""The type check: mypy over protocol/, backend/ and the guest driver model, as pyproject.toml's
[tool.mypy] sets it (strict on protocol/ and the device interface, checked bodies elsewhere).

mypy reads the packages through .typecheck/, symlinks that give the top-level folders their
installed names; the second test keeps those links in step with setuptools' package-dir.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "vhost_user_cpufreq"


def test_the_package_type_checks() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        print(r.stdout, r.stderr, sep="\n")  # kept in pytest's captured output as well as the assertion
    assert r.returncode == 0, f"mypy exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "Success" in r.stdout, r.stdout


def test_the_checked_packages_are_the_installed_ones() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = cfg["tool"]["setuptools"]["package-dir"]
    # the import packages directly under vhost_user_cpufreq, and the folders they come from
    tops = {name: folder for name, folder in package_dir.items() if name.count(".") == 1}
    assert sorted(cfg["tool"]["mypy"]["packages"]) == sorted(tops)
    links = ROOT / cfg["tool"]["mypy"]["mypy_path"] / PKG
    for name, folder in tops.items():
        link = links / name.split(".")[1]
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), (link, folder)
