"""Argument checks that raise actionable errors (never `assert`: `python -O` strips those)."""

import math
import numbers


def positive(name: str, value) -> None:
  if not _is_real(value) or not value > 0:
    raise ValueError(f"Expected {name} > 0 (a finite number). Received: {name}={value!r}.")


def non_negative(name: str, value) -> None:
  if not _is_real(value) or not value >= 0:
    raise ValueError(f"Expected {name} >= 0 (a finite number). Received: {name}={value!r}.")


def positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"Expected {name} to be an integer >= 1. Received: {name}={value!r}.")


def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))
