"""The C data plane under AddressSanitizer and UndefinedBehaviorSanitizer, fed hostile input.

The fuzz campaign (tests/fuzz/campaign.py, with ``--lane``: the fuzzed and
guest VMs on the kick lane, the witness VM on the event loop's C drain), the
C-against-Python differential tests of ``test_ring_drain.py``,
``test_kick_lane.py`` and ``test_twins.py``, and the fault test that truncates guest RAM under a
ring on the lane run in child processes with the library built by
``VUC_SANITIZE=address,undefined`` (``library.build_library``; ``VUC_PREBUILT=0``
keeps the prebuilt extension out).  A child
passes only if it exits 0 and its stderr holds no sanitizer report.  The
child must have loaded that very library, next to the ASan runtime: the
campaign prints the data plane it chose and the shared objects it mapped.
Two controls first show that in this environment a real out-of-bounds read
and a real signed overflow in the library do reach stderr and end the child.

The environment a sanitized library needs in an unsanitized Python
(Debian bookworm, gcc 12):

* ``LD_PRELOAD`` of gcc's ``libasan.so``: ASan must come first in the
  process; ``libubsan`` comes in as the library's own dependency;
* ``detect_leaks=0``: CPython frees little at exit, and LeakSanitizer would
  report that, not the data plane;
* ``handle_sigbus=0``, ``allow_user_segv_handler=1``: ASan installs a SIGBUS
  handler of its own unless told not to, and keeps it if it does not let user
  handlers in; either would turn guest RAM truncated under the lane (which
  the project's SIGBUS guard catches and survives, docs/hostile-input.md)
  into a crash report.  gcc 12's runtime lets user handlers in by default;
  both are set so the guard stays in charge whatever a runtime's defaults.
  The fault test that truncates guest RAM under the lane runs with the
  differential tests to show it;
* ``halt_on_error=1`` and ``-fno-sanitize-recover=all``: the first report
  ends the child with a non-zero status;
* ``PYTHONMALLOC=malloc`` for the differential tests and the controls: the
  buffers Python hands the C (guest memory as bytearrays, small cffi arrays
  such as the per-vCPU states) come from malloc, with redzones, not from
  pymalloc's arenas, where ASan sees no object boundaries.  The campaign
  keeps pymalloc: its guest memory is mapped memfds either way, and malloc
  halves the cases it runs (62 against 126 a second on the 2-core CI machine).

Without gcc or its sanitizer runtimes the tests skip with the reason; CI
(``VUC_REQUIRE_SANITIZERS=1``) makes them mandatory.  ``VUC_SANITIZED_SECONDS``
sets the campaign's length (60 by default).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
SANITIZERS = "address,undefined"
SECONDS = float(os.environ.get("VUC_SANITIZED_SECONDS", "60"))
SEED = 20261204
#: What ASan and UBSan print for a finding; none may appear in a clean child's stderr.
REPORT_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: ")


def _runtime(cc: str, name: str) -> str | None:
    try:
        out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None  # else gcc echoes the bare name


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sanitized library (built here) and the environment a child process loads it with."""
    cc = os.environ.get("CC") or shutil.which("gcc")
    if not cc:
        unavailable("VUC_REQUIRE_SANITIZERS", "no gcc to build the sanitized C data plane")
    asan = _runtime(cc, "libasan.so")
    if asan is None or _runtime(cc, "libubsan.so") is None:
        unavailable("VUC_REQUIRE_SANITIZERS", f"{cc} does not run or has no libasan/libubsan "
                    "(Debian: libgcc-12-dev)")
    from vhost_user_cpufreq.backend.dataplane import cdrain

    mp = pytest.MonkeyPatch()
    mp.setenv("VUC_SANITIZE", SANITIZERS)
    try:
        lib = cdrain.build_library(cc)
    except RuntimeError as exc:
        unavailable("VUC_REQUIRE_SANITIZERS", f"cannot build the sanitized C data plane: {exc}")
    finally:
        mp.undo()
    env = dict(os.environ)
    env.update(
        VUC_SANITIZE=SANITIZERS,
        VUC_DATAPLANE="c",  # no silent fall-back to the Python reference
        VUC_PREBUILT="0",  # the sanitized run-time build, not the (unsanitized) prebuilt extension
        VUC_KICK_LANE="1",
        LD_PRELOAD=asan,
        ASAN_OPTIONS="detect_leaks=0:handle_sigbus=0:allow_user_segv_handler=1:halt_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        PYTHONFAULTHANDLER="1",
    )
    return {"lib": lib, "env": env}


def _run(env: dict[str, str], args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _reports(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(m in line for m in REPORT_MARKS)]


# A drain whose one region claims 64 KiB of guest RAM while its host buffer holds 4 KiB (from
# malloc, with ASan's redzones), and a descriptor just past those 4 KiB: the C reads a redzone.
_OVERREAD = """
import sys
from vhost_user_cpufreq.backend.dataplane.cdrain import ffi, build_library
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.requests import ENTRY
lib = ffi.dlopen(str(build_library()))
host = ffi.new("uint8_t[]", 4096)
region = ffi.new("vuc_region *", {"gpa": 0, "size": 1 << 16, "host": host})
desc = ffi.new("uint64_t[]", 8)
ffi.memmove(ffi.cast("uint8_t *", desc), (4096).to_bytes(8, "little") + (16).to_bytes(4, "little") + bytes(4), 16)
avail = ffi.new("uint16_t[]", 8)
avail[1] = 1
used = ffi.new("uint32_t[]", 16)
q = ffi.new("vuc_queue *")
q.desc, q.avail, q.used = ffi.cast("uint8_t *", desc), avail, ffi.cast("uint8_t *", used)
q.size, q.max_chain_bytes, q.max_indirect, q.regions, q.nregions = 4, 1 << 20, 0, region, 1
res = ffi.new("vuc_result *")
lib.vuc_drain(q, 0, 4, 4, 0, ffi.new("uint8_t[]", ENTRY.size * 5),
              ffi.new("uint8_t[]", abi.RECORD_SIZE * (4 + abi.MAX_RECORDS_PER_BATCH)),
              ffi.new("uint32_t[]", 4 + abi.MAX_RECORDS_PER_BATCH),
              ffi.new("uint8_t[]", abi.BATCH_HEADER_SIZE + abi.RECORD_SIZE * abi.MAX_RECORDS_PER_BATCH), res)
print("the over-read went unnoticed")
"""

# A placement for vCPU INT32_MAX: vuc_engine_configure's index size (top + 1) overflows.
_OVERFLOW = """
from vhost_user_cpufreq.backend.dataplane.cdrain import ffi, build_library
lib = ffi.dlopen(str(build_library()))
p = ffi.new("vuc_placement[]", [{"vcpu": 2**31 - 1, "pcpu_cap": 1024, "vcpu_cap": 1024, "max_khz": 1}])
lib.vuc_engine_configure(lib.vuc_engine_new(), 1, p, 0, 1024, 0, 0.0, 1.0, 1.0)
print("the overflow went unnoticed")
"""


@pytest.mark.parametrize("control, mark", [(_OVERREAD, "ERROR: AddressSanitizer: heap-buffer-overflow"),
                                           (_OVERFLOW, "runtime error: signed integer overflow")],
                         ids=["asan-heap-overread", "ubsan-signed-overflow"])
def test_a_bug_in_the_sanitized_library_is_reported_and_ends_the_process(sanitized: dict[str, Any], control: str,
                                                                          mark: str) -> None:
    # The control for the runs below: with this environment a finding reaches stderr and fails the child.
    res = _run(dict(sanitized["env"], PYTHONMALLOC="malloc"), ["-c", control], timeout=120)
    assert res.returncode != 0 and "unnoticed" not in res.stdout, (res.returncode, res.stdout, res.stderr[-2000:])
    assert mark in res.stderr, res.stderr[-3000:]


def test_the_fuzz_campaign_finds_nothing_in_the_sanitized_data_plane(sanitized: dict[str, Any],
                                                                     record_property: Any) -> None:
    t0 = time.monotonic()
    res = _run(sanitized["env"], ["-m", "tests.fuzz.campaign", "--seconds", str(SECONDS), "--seed", str(SEED),
                                  "--lane"], timeout=SECONDS + 240)
    took = time.monotonic() - t0
    out, err = res.stdout, res.stderr
    assert not _reports(err), "sanitizer reports:\n" + err[-6000:]
    assert res.returncode == 0, f"campaign exit {res.returncode}\n{out[-4000:]}\n{err[-4000:]}"
    # The child ran the sanitized build, with the ASan runtime, and no other data plane.
    lib = str(sanitized["lib"])
    assert f"data plane: C, built at run time in {sanitized['lib'].parent} ({sanitized['lib'].name})" in out, out[:500]
    mapped = next(line for line in out.splitlines() if line.startswith("mapped: "))
    objects = mapped.removeprefix("mapped: ").split(", ")
    assert lib in objects and any("/libasan.so" in o for o in objects), mapped
    assert [o for o in objects if "/dataplane-" in o or "/_vuc" in o] == [lib], mapped
    # It served hostile front-ends and hostile guests, the guests' rings on the kick lane.
    m = re.search(r"(\d+) cases \(stream (\d+), guest (\d+) of which torn (\d+), on the kick lane (\d+)\)", out)
    assert m, out[:1000]
    total, stream, guest, torn, lane = map(int, m.groups())
    bindings = dict(re.findall(r"(\w+) (\d+)", out.split("by VM: ", 1)[1].splitlines()[0]))
    assert stream > 0 and torn > 0 and guest == lane > 0, m.group(0)
    assert int(bindings.get("fuzz", 0)) > 0 and int(bindings.get("guest", 0)) > 0, bindings
    summary = (f"sanitized campaign: {total} cases ({stream} front-end streams, {guest} guest cases on the kick "
               f"lane, {torn} torn), 0 sanitizer reports, {took:.0f} s")
    record_property("sanitized_campaign", summary)
    print(summary)


def test_the_differential_and_sigbus_tests_pass_on_the_sanitized_data_plane(sanitized: dict[str, Any]) -> None:
    # The C drain and the lane against the Python reference, on generated hostile rings, and
    # the lane surviving guest RAM truncated under it (SIGBUS) with the ASan runtime loaded.
    env = dict(sanitized["env"], PYTHONMALLOC="malloc")  # the examples each test runs in CI, unless set
    res = _run(env, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ring_drain.py",
                     "tests/test_kick_lane.py", "tests/test_twins.py", "tests/test_faults.py::"
                     "test_guest_ram_shrunk_under_a_ring_on_the_kick_lane_closes_only_that_session"], timeout=900)
    assert not _reports(res.stderr + res.stdout), "sanitizer reports:\n" + (res.stderr + res.stdout)[-6000:]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert re.search(r"\d+ passed", res.stdout), res.stdout[-1000:]
