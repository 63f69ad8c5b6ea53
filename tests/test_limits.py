"""Limits: every field must be a positive, finite number (or 0 where that turns a
feature off)."""

from __future__ import annotations

import dataclasses

import pytest

from tisa.errors import UsageError
from tisa.limits import DEFAULT_LIMITS, ZERO_MEANS_OFF, Limits


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Limits)])
@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "10"])
def test_every_limit_refuses_nonsense(field: str, bad: object) -> None:
    if bad == 0 and not isinstance(bad, bool) and field in ZERO_MEANS_OFF:
        assert getattr(Limits(**{field: bad}), field) == 0
        return
    with pytest.raises(UsageError, match=field):
        Limits(**{field: bad})  # type: ignore[arg-type]


def test_only_the_listed_limits_may_be_zero() -> None:
    assert {"prekey_pool"} == ZERO_MEANS_OFF
    assert Limits(prekey_pool=0).prekey_pool == 0
    with pytest.raises(UsageError, match="prekey_pool_recipients"):
        Limits(prekey_pool_recipients=0)


def test_defaults_are_positive() -> None:
    for field in dataclasses.fields(Limits):
        assert getattr(DEFAULT_LIMITS, field.name) > 0


def test_max_header_cannot_exceed_the_protocol() -> None:
    from tisa.limits import MAX_HEADER

    assert Limits(max_header=MAX_HEADER // 2).max_header == MAX_HEADER // 2
    with pytest.raises(UsageError, match="max_header"):
        Limits(max_header=MAX_HEADER + 1)
