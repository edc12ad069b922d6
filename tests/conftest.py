"""Shared fixtures: QEMU for ``@pytest.mark.qemu`` tests, and the ``root`` marker.

A test marked ``qemu`` is skipped, with the reason, when no QEMU >= 10.2 with
``vhost-user-test-device`` is found (tests/qemu/fixture.py:find_qemu), and
fails instead when ``VUC_REQUIRE_QEMU=1`` (CI).  A test marked ``root`` is
skipped unless running as root, and fails instead when ``VUC_REQUIRE_ROOT=1``.
"""

from __future__ import annotations

import os
from typing import AsyncIterator

import pytest

from .helpers import unavailable
from .qemu.fixture import QemuInstall, QemuLab, QemuUnavailable, describe_skip, find_qemu


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
