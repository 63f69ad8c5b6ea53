"""Limits: every field must be a positive, finite number."""

from __future__ import annotations

import dataclasses

import pytest

from tisa.errors import UsageError
from tisa.limits import DEFAULT_LIMITS, Limits


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Limits)])
@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "10"])
def test_every_limit_refuses_nonsense(field: str, bad: object) -> None:
    with pytest.raises(UsageError, match=field):
        Limits(**{field: bad})  # type: ignore[arg-type]


def test_defaults_are_positive() -> None:
    for field in dataclasses.fields(Limits):
        assert getattr(DEFAULT_LIMITS, field.name) > 0


def test_max_header_cannot_exceed_the_protocol() -> None:
    from tisa.limits import MAX_HEADER

    assert Limits(max_header=MAX_HEADER // 2).max_header == MAX_HEADER // 2
    with pytest.raises(UsageError, match="max_header"):
        Limits(max_header=MAX_HEADER + 1)
