"""Fixtures for the security suite: the story's arrangement with a third party."""

from __future__ import annotations

import pytest

from tisa_testing.world import World, make_world


@pytest.fixture
def world() -> World:
    """Seoul, Tokyo, Washington (relay) and Canberra (recipient), fixed keys."""
    return make_world(third_party=True)
