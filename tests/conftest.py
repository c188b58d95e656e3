"""Fixtures shared across the test tree."""

from __future__ import annotations

import pytest

from larimar.testing import single_thread


@pytest.fixture(scope="module")
def one_thread():
    """A whole test module on one torch thread (`larimar.testing.single_thread`); use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield
