"""The measures the QEMU and test-host tests judge by, on hand-made series.

They run in every environment: a wrong measure would make the real-QEMU and
test-host assertions pass or fail for the wrong reason."""

from __future__ import annotations

import pytest

from .test_linux_guest import ramp_into
from .testhost.duty import step_mean, step_share

#: a step function: 500 until t=1, 2800 until t=3, 1000 after
STEPS = [(1.0, 2800), (3.0, 1000)]


def test_step_mean_and_share_weigh_each_value_by_how_long_it_held() -> None:
    assert step_mean(STEPS, 0.0, 4.0, 500) == pytest.approx((500 + 2 * 2800 + 1000) / 4)
    assert step_share(STEPS, 0.0, 4.0, 500, 2240) == pytest.approx(0.5)
    assert step_share(STEPS, 0.0, 4.0, 500, 1000) == pytest.approx(0.75)
    assert step_share(STEPS, 0.0, 4.0, 500, 2801) == 0.0


def test_step_share_takes_the_value_in_force_at_the_window_start() -> None:
    # The change at t=1 precedes the window: 2800 holds from its start.
    assert step_share(STEPS, 2.0, 4.0, 500, 2240) == pytest.approx(0.5)
    assert step_share(STEPS, 1.5, 2.5, 500, 2240) == 1.0
    assert step_share([], 0.0, 1.0, 2800, 2240) == 1.0


def test_ramp_into_may_begin_before_the_window_but_must_end_inside_it() -> None:
    utils = [3, 0, 120, 400, 855, 1024, 1024, 700, 1024]
    # The window opens at 855: the rise began three records earlier.
    assert ramp_into(utils, 4, 1024) == [0, 120, 400, 855, 1024]
    # Opened on the plateau: the first top inside it has no rise before it.
    assert ramp_into(utils, 6, 1024) == [1024]
    assert ramp_into(utils, 7, 1024) == [700, 1024]
    assert ramp_into([0, 300, 600], 0, 1024) == []
