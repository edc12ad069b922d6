"""The wheel carries the C data plane: built once with the package, run where there is no compiler.

``pip wheel .`` compiles the data plane into the extension module ``_vuc``
(setup.py, backend/dataplane/build_ffi.py).  The wheel is installed into a
fresh virtual environment and ``vhost-user-cpufreq check`` runs there with
no compiler reachable (PATH holds only the venv, ``CC=/bin/false``) and
empty cache directories: it must report the prebuilt C data plane, and
build nothing.  ``VUC_BUILD_EXTENSION=0`` gives the pure wheel instead,
which then runs the pure-Python data plane and says why.

Building needs a C compiler and Python's headers (Debian: python3-dev), and
the package's dependencies from the package index (pip's own configuration:
the registry, or a local mirror).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".hypothesis",
                               ".mypy_cache", ".pytest_cache", ".typecheck")


def _pip(*args: str, env: dict[str, str] | None = None, python: str = sys.executable,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """This checkout's wheel, with and without the extension, and a fresh venv to install them in."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        unavailable("VUC_REQUIRE_TOOLS", "no C compiler to build the wheel's extension")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        unavailable("VUC_REQUIRE_TOOLS", "no Python headers to build the wheel's extension (Debian: python3-dev)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: the build writes build/ and egg-info next to the sources
    shutil.copytree(ROOT, src, ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VUC_")}
    _pip("wheel", "-q", "--no-deps", "-w", str(tmp / "c"), str(src), env=env)
    _pip("wheel", "-q", "--no-deps", "-w", str(tmp / "pure"), str(src), env=dict(env, VUC_BUILD_EXTENSION="0"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip("install", "-q", str(next((tmp / "c").glob("*.whl"))), python=str(venv / "bin" / "python"))  # and its deps
    return {"c": next((tmp / "c").glob("*.whl")), "pure": next((tmp / "pure").glob("*.whl")), "venv": venv,
            "tmp": tmp}


def _check_without_a_compiler(venv: Path, home: Path) -> dict[str, dict[str, str]]:
    """``check --json`` from the venv with no compiler on PATH, CC=/bin/false and empty caches."""
    home.mkdir()
    path = str(venv / "bin")
    assert not (shutil.which("cc", path=path) or shutil.which("gcc", path=path))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VUC_") and k not in ("CACHE_DIRECTORY", "LD_PRELOAD", "PYTHONPATH")}
    env.update(PATH=path, CC="/bin/false", HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), TMPDIR=str(home))
    r = subprocess.run([str(venv / "bin" / "vhost-user-cpufreq"), "check", "--json"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=home)
    assert r.returncode in (0, 1), r.stderr  # 1: something (cpufreq, uclamp, ...) is degraded on this host
    found = {f["name"]: f for f in json.loads(r.stdout)}
    assert [p.name for p in home.rglob("dataplane-*")] == [], "a data plane was built at run time"
    return found


def test_the_wheel_carries_the_compiled_data_plane(built: dict[str, Path]) -> None:
    whl = built["c"]
    # abi3: CPython's limited API, one build for 3.11 and later.
    assert whl.name.endswith("-cp311-abi3-linux_" + os.uname().machine + ".whl"), whl.name
    names = zipfile.ZipFile(whl).namelist()
    assert "vhost_user_cpufreq/backend/dataplane/_vuc.abi3.so" in names, names
    # The sources too: the extension's source hash is checked against them when it loads.
    assert {"vhost_user_cpufreq/backend/dataplane/kick_lane.c", "vhost_user_cpufreq/backend/dataplane/slot.h",
            "vhost_user_cpufreq/backend/dataplane/cdefs.py"} <= set(names)


def test_the_wheel_runs_the_prebuilt_data_plane_where_there_is_no_compiler(built: dict[str, Path]) -> None:
    venv = built["venv"]
    _pip("install", "-q", "--force-reinstall", "--no-deps", str(built["c"]), python=str(venv / "bin" / "python"))
    found = _check_without_a_compiler(venv, built["tmp"] / "home-c")
    dp = found["dataplane"]
    assert dp["detail"].startswith(f"C, prebuilt extension ({venv}/lib/"), dp
    assert dp["detail"].split(")", 1)[0].endswith("/vhost_user_cpufreq/backend/dataplane/_vuc.abi3.so"), dp
    assert "C kick lane" in dp["detail"], dp
    # The guard comes with it: guest memory faults cost only the faulting session.
    assert "SIGBUS handler" in found["isolation"]["detail"], found["isolation"]


def test_the_pure_wheel_runs_the_python_data_plane_and_says_why(built: dict[str, Path]) -> None:
    whl = built["pure"]
    assert whl.name.endswith("-py3-none-any.whl"), whl.name
    assert not [n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".so")]
    venv = built["venv"]
    _pip("install", "-q", "--force-reinstall", "--no-deps", str(whl), python=str(venv / "bin" / "python"))
    found = _check_without_a_compiler(venv, built["tmp"] / "home-pure")
    dp = found["dataplane"]
    assert dp["state"] == "degraded", dp
    assert dp["detail"].startswith("pure Python (no prebuilt extension: "), dp
    assert "no run-time build: /bin/false failed" in dp["detail"], dp
    assert found["isolation"]["state"] == "degraded", found["isolation"]
