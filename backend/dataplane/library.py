"""Where the C data plane comes from, in order: the prebuilt extension, a run-time build, none.

1. The prebuilt extension ``_vuc`` (cffi's API mode, compiled when the
   package was built: ``setup.py``, ``build_ffi.py``).  Skipped when
   ``VUC_PREBUILT=0`` (tests that need the run-time build), when
   ``VUC_SANITIZE`` asks for a sanitized build, and when it is stale: it
   carries the hash of the sources it was built from (``cdefs.source_hash``),
   and sources edited since (an editable install) are not what it runs.
2. A run-time build: the C files compiled with the system's C compiler into a
   shared library (no Python headers needed: cffi's ABI mode loads it), named
   after a hash of its source and flags, in the first writable cache directory
   of ``$VUC_CACHE_DIR``, ``$CACHE_DIRECTORY`` (systemd's
   ``CacheDirectory=``), ``$XDG_CACHE_HOME/vhost-user-cpufreq`` or
   ``~/.cache/vhost-user-cpufreq``.  A library already there is reused.
3. Neither: :func:`load` raises RuntimeError saying why, and the callers fall
   back (``cdrain.dataplane`` to the pure-Python drain, ``guard.guard`` to no
   guard).

The choice between 1 and 2 is made once, when this module is imported,
because the two need different ``ffi`` objects: cdata made by one cannot be
passed to the other's functions, and an API-mode ``ffi.dlopen`` would bind
the extension's own functions, not the library's.  Everything that makes
cdata for the data plane uses this module's :data:`ffi`.

Sanitizers (tests only): ``VUC_SANITIZE=address,undefined`` builds the
library with ``-fsanitize=address,undefined -fno-sanitize-recover=all`` (plus
``-g -O1 -fno-omit-frame-pointer``) under its own name (``dataplane-san-...``),
so it never replaces the normal build.  Loading it into an unsanitized Python
needs the runtime preloaded first; ``tests/test_sanitized_dataplane.py`` shows
the environment it takes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi
from vhost_user_cpufreq.protocol.requests import ENTRY, REASONS

from . import cdefs

__all__ = ["Library", "load", "build_library", "ffi", "prebuilt_status", "SOURCES"]

SOURCES = cdefs.SOURCES
_RUNTIME_CFLAGS = (*cdefs.CFLAGS, "-shared", "-fPIC", "-Werror")
_SANITIZE_FLAGS = ("-g", "-O1", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all")
_OFF = ("0", "no", "off", "false")


def _import_prebuilt() -> tuple[Any, str]:
    """The extension module, or None and why it is not used."""
    if os.environ.get("VUC_PREBUILT", "1").lower() in _OFF:
        return None, "prebuilt extension skipped: VUC_PREBUILT=0"
    if os.environ.get("VUC_SANITIZE", "").strip():
        return None, "prebuilt extension skipped: VUC_SANITIZE asks for a sanitized run-time build"
    try:
        from . import _vuc  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"no prebuilt extension: {exc}"
    built, now = _vuc.ffi.string(_vuc.lib.vuc_source_hash()).decode(), cdefs.source_hash()
    if built != now:
        return None, f"prebuilt extension {_vuc.__file__} is stale (built from sources {built}, these are {now})"
    return _vuc, ""


_prebuilt, _prebuilt_why = _import_prebuilt()
if _prebuilt is not None:
    ffi: Any = _prebuilt.ffi
else:
    ffi = cffi.FFI()
    ffi.cdef(cdefs.CDEFS)


def prebuilt_status() -> str:
    """Why the prebuilt extension is not in use ("" when it is)."""
    return _prebuilt_why


@dataclass(frozen=True)
class Library:
    """The loaded C data plane and where it came from."""

    lib: Any
    prebuilt: bool
    path: Path

    def describe(self) -> str:
        if self.prebuilt:
            return f"C, prebuilt extension ({self.path})"
        return f"C, built at run time in {self.path.parent} ({self.path.name})"


_loaded: Library | None = None


def load() -> Library:
    """The process's C data plane, loaded once.  Raises RuntimeError saying why there is none."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if _prebuilt is not None:
        lib, path, prebuilt = _prebuilt.lib, Path(_prebuilt.__file__), True
    else:
        try:
            path = build_library()
            lib = ffi.dlopen(str(path))
        except (RuntimeError, OSError) as exc:
            raise RuntimeError(f"{_prebuilt_why}; no run-time build: {exc}") from None
        prebuilt = False
    _check_abi(lib)
    _loaded = Library(lib, prebuilt, path)
    return _loaded


def _check_abi(lib: Any) -> None:
    want = ENTRY.size << 16 | ffi.sizeof("vuc_queue") << 8 | ffi.sizeof("vuc_region")
    if lib.vuc_abi_sizes() != want:
        raise RuntimeError(f"C data plane layout {lib.vuc_abi_sizes():#x} does not match {want:#x}")
    want = ffi.sizeof("vuc_slot") << 16 | ffi.sizeof("vuc_event") << 8 | ffi.sizeof("vuc_change")
    if lib.vuc_lane_abi() != want:
        raise RuntimeError(f"C kick lane layout {lib.vuc_lane_abi():#x} does not match {want:#x}")
    for code, name in enumerate(REASONS):
        got = lib.vuc_reason_name(code)
        if got == ffi.NULL or ffi.string(got).decode() != name:
            raise RuntimeError(f"C data plane reason {code} is not {name!r}")


# -- the run-time build ---------------------------------------------------------------------

def _cache_dirs() -> list[Path]:
    out = []
    for var in ("VUC_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            out.append(Path(os.environ[var].split(":")[0]))
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    out.append(Path(xdg) / "vhost-user-cpufreq")
    out.append(Path(tempfile.gettempdir()) / f"vhost-user-cpufreq-{os.getuid()}")
    return out


def _cflags() -> tuple[str, ...]:
    """The compiler flags, with ``VUC_SANITIZE``'s sanitizers after the defaults (the later -O wins)."""
    san = os.environ.get("VUC_SANITIZE", "").strip()
    if not san:
        return _RUNTIME_CFLAGS
    return (*_RUNTIME_CFLAGS, f"-fsanitize={san}", *_SANITIZE_FLAGS)


def _library_name() -> str:
    h = hashlib.sha256(cdefs.source_hash().encode())
    h.update(" ".join(_cflags()).encode() + platform.machine().encode())
    tag = "san-" if os.environ.get("VUC_SANITIZE", "").strip() else ""
    return f"dataplane-{tag}{h.hexdigest()[:16]}.so"


def build_library(compiler: str | None = None) -> Path:
    """The library for the current source: found in a cache directory or compiled into one.

    Raises RuntimeError naming what is missing.
    """
    name = _library_name()
    dirs = _cache_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) to build the C data plane")
    errors = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
            os.close(fd)
        except OSError as exc:
            errors.append(f"{d}: {exc.strerror}")
            continue
        try:
            libs = [f"-l{x}" for x in cdefs.LIBS]
            try:
                res = subprocess.run([cc, *_cflags(), "-I", str(cdefs.HERE), "-o", tmp, *map(str, SOURCES), *libs],
                                     capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"cannot run the C compiler {cc}: {exc}") from None
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed (exit {res.returncode}) building the C data plane: "
                                   f"{res.stderr.strip()[:2000]}")
            os.replace(tmp, d / name)  # atomic: concurrent builders each install a whole file
            return d / name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable cache directory for the C data plane: " + "; ".join(errors))
