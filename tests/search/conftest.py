"""Fixtures of the search tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Every search test module runs on tiny models: one intra-op thread (see tests/conftest.py)."""
    yield
