"""The prebuilt C data plane: cffi's out-of-line API mode, run by setuptools at build time.

``setup.py`` names ``ffibuilder`` in ``cffi_modules``, so ``pip install``,
``pip wheel`` and an editable install compile every C file of the data plane
(``cdefs.SOURCES``) with the generated binding into one extension module,
``vhost_user_cpufreq.backend.dataplane._vuc`` (``abi3``: CPython's limited
API, one build for 3.11 and later).  A production host then needs no
compiler; ``library.py`` loads the extension first.

Run by hand (``python backend/dataplane/build_ffi.py``) it builds the module
in place, as an editable install does.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import cffi

# Loaded by path: while the package is built it is not importable.
_spec = importlib.util.spec_from_file_location("_vuc_cdefs", Path(__file__).with_name("cdefs.py"))
assert _spec is not None and _spec.loader is not None
cdefs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cdefs)


def _rel(p: Path) -> str:
    # setuptools wants sources relative to setup.py's directory, the current one while it builds.
    return os.path.relpath(p)


ffibuilder = cffi.FFI()
ffibuilder.cdef(cdefs.CDEFS + cdefs.CDEFS_PREBUILT)
ffibuilder.set_source(
    cdefs.EXTENSION,
    cdefs.PREAMBLE_INCLUDES
    + f'const char *vuc_source_hash(void) {{ return "{cdefs.source_hash()}"; }}\n',
    sources=[_rel(p) for p in cdefs.SOURCES],
    include_dirs=[_rel(cdefs.HERE)],
    depends=[_rel(p) for p in cdefs.HEADERS],  # an edited header rebuilds it too (so does the hash above)
    extra_compile_args=list(cdefs.CFLAGS),
    extra_link_args=["-pthread"],
    libraries=list(cdefs.LIBS),
    py_limited_api=True,
)

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[2])
    ffibuilder.compile(verbose=True)
