"""The pytest plugin (entry point ``pytest11``): the `mock_upstream` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import MockUpstream

__all__ = ["mock_upstream"]


@pytest.fixture
def mock_upstream() -> Iterator[MockUpstream]:
    """A started `MockUpstream`, stopped after the test."""
    with MockUpstream() as upstream:
        yield upstream
