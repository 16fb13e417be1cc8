"""Argument checks shared by the light cone's public constructors. Each raises
``qckpt.InvalidInputError`` naming the argument and the value it got, so a bad
setting fails where it is made, not at the first event after its rollouts ran."""

from __future__ import annotations

import math

import qckpt


def check_int(name: str, value: object, low: int = 1, *, optional: bool = False) -> None:
    """``value`` is an ``int`` (not a bool) of at least ``low``, or None if ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer of at least {low}")
        raise qckpt.InvalidInputError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


def check_number(name: str, value: object, low: float = 0.0, high: float = math.inf, *, low_included: bool = False,
                 high_included: bool = True) -> None:  # fmt: skip
    """``value`` is a real number (not a bool) between ``low`` and ``high``, each end
    included or not; NaN never passes."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (low <= value if low_included else low < value) and (value <= high if high_included else value < high)
    )  # fmt: skip
    if not ok:
        if low == 0 and not low_included and high == math.inf:
            kind = "a positive number"
        elif high == math.inf:
            kind = f"a number {'of at least' if low_included else 'above'} {low:g}"
        else:
            kind = f"a number in {'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"
        raise qckpt.InvalidInputError(f"{name} must be {kind}, got {value!r}")
