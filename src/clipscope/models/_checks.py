"""Argument checks shared by the model constructors."""

from __future__ import annotations

__all__ = ["check_positive_int", "check_probability"]


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 1; else raise TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_probability(value: object, name: str) -> float:
    """Return ``float(value)`` if it is a number in [0, 1); else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)
