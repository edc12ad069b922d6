"""Builds the C data plane into the package (the metadata is in pyproject.toml).

``cffi_modules`` compiles ``backend/dataplane/build_ffi.py``'s extension, so a
wheel or an install carries the data plane prebuilt.  ``VUC_BUILD_EXTENSION=0``
leaves it out: a pure wheel for a platform without a compiler, where the data
plane is built at run time if a compiler turns up, else runs in pure Python.
"""

import os

from setuptools import setup

if os.environ.get("VUC_BUILD_EXTENSION", "1").lower() in ("0", "no", "off", "false"):
    setup()
else:
    # abi3: the extension uses CPython's limited API (cffi's default), so one wheel serves 3.11+.
    setup(cffi_modules=["backend/dataplane/build_ffi.py:ffibuilder"],
          options={"bdist_wheel": {"py_limited_api": "cp311"}})
