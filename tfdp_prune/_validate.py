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


def non_negative_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"Expected {name} to be an integer >= 0. Received: {name}={value!r}.")


def probability(name: str, value) -> None:
  """A probability in (0, 1]."""
  if not _is_real(value) or not 0 < value <= 1:
    raise ValueError(f"Expected {name} in (0, 1]. Received: {name}={value!r}.")


def open_unit_interval(name: str, value) -> None:
  if not _is_real(value) or not 0 < value < 1:
    raise ValueError(f"Expected {name} in (0, 1). Received: {name}={value!r}.")


def fraction(name: str, value, meaning: str = "") -> None:
  """A number in [0, 1); `meaning` (e.g. " (the fraction frozen)") follows the interval."""
  if not _is_real(value) or not 0 <= value < 1:
    raise ValueError(f"Expected {name} in [0, 1){meaning}. Received: {name}={value!r}.")


def boolean(name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"Expected {name} to be True or False. Received: {name}={value!r}.")


def one_of(name: str, value, choices) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"Expected {name} in {list(choices)}. Received: {name}={value!r}.")


def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))
