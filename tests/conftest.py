"""Shared fixtures: QEMU for ``@pytest.mark.qemu`` tests, and the ``root`` marker.

A test marked ``qemu`` is skipped, with the reason, when no QEMU >= 10.2 with
``vhost-user-test-device`` is found (tests/qemu/fixture.py:find_qemu), and
fails instead when ``VUC_REQUIRE_QEMU=1`` (CI).  A test marked ``root`` is
skipped unless running as root, and fails instead when ``VUC_REQUIRE_ROOT=1``.
The ``testhost`` fixture boots the Linux test host once per session
(``VUC_REQUIRE_TESTHOST=1`` makes its absence a failure).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import pytest

from .helpers import unavailable
from .qemu.fixture import QemuInstall, QemuLab, QemuUnavailable, describe_skip, find_qemu

if TYPE_CHECKING:
    from .testhost.host import TestHost


def _qemu_or_skip() -> QemuInstall:
    try:
        return find_qemu()
    except QemuUnavailable as exc:
        unavailable("VUC_REQUIRE_QEMU", describe_skip(exc))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qemu") is not None:
        _qemu_or_skip()
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        if os.environ.get("VUC_REQUIRE_ROOT") == "1":
            pytest.fail("VUC_REQUIRE_ROOT=1 but the tests do not run as root", pytrace=False)
        pytest.skip("needs root")


@pytest.fixture(scope="session")
def qemu_install() -> QemuInstall:
    """The QEMU to run (skips, or fails under VUC_REQUIRE_QEMU=1, when there is none)."""
    return _qemu_or_skip()


@pytest.fixture
async def qemu_lab(qemu_install: QemuInstall) -> AsyncIterator[QemuLab]:
    """A back-end Service in the test's event loop plus helpers to start QEMUs against it.

    Everything (QEMUs, sockets, guest RAM files) is torn down after the test,
    whether it passed or not.
    """
    lab = QemuLab(qemu_install)
    try:
        yield lab
    finally:
        await lab.close()


_stale_lanes_named: set[int] = set()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Name a test that ends with a kick lane still serving a ring for an event loop that is closed.

    Such a lane's thread lives until the process exits, and later tests that count lanes or
    threads see it.  A warning (not a failure) names the test where it happened.
    """
    from vhost_user_cpufreq.backend.dataplane.lane import running_lanes

    stale = [lane for lane in running_lanes() if lane._loop.is_closed() and id(lane) not in _stale_lanes_named]
    if stale:
        _stale_lanes_named.update(id(lane) for lane in stale)  # named once, by the test that left it
        warnings.warn(f"{item.nodeid} left {len(stale)} kick lane(s) serving rings of a closed event loop "
                      f"({sum(len(lane.slots) for lane in stale)} ring(s))", pytest.PytestWarning, stacklevel=1)


@pytest.fixture(scope="session")
def testhost() -> Iterator["TestHost"]:
    """The Linux test host (tests/testhost/host.py), booted once per test session.

    Skips where it is not provisioned or cannot boot; fails instead under
    ``VUC_REQUIRE_TESTHOST=1`` (``.ci/run``), naming what is missing.
    """
    from .testhost.host import TestHost, TestHostError, provisioned
    from .testhost.outer import OuterBackend, build_module

    missing = provisioned()
    if missing:
        unavailable("VUC_REQUIRE_TESTHOST", f"no test host: {missing}")
    outer = None
    try:
        # Its cpufreq comes from our own driver, served by our service here (tests/testhost/outer.py).
        module = build_module()
        outer = OuterBackend()
        th = TestHost(module=module, qemu_args=outer.qemu_args())
        th.outer = outer  # type: ignore[attr-defined]
        th.start()
    except TestHostError as exc:
        if outer is not None:
            outer.close()
        unavailable("VUC_REQUIRE_TESTHOST", f"the test host did not come up: {exc}")
    try:
        yield th
    finally:
        th.close()
        outer.close()
