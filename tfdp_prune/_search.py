"""Searches on a monotone, expensive function (epsilon in the steps, or in the noise multiplier).

Pure functions of a `value` callable (epsilon >= 0; 0 and inf are ordinary values here, NaN
counts as above any target). Every point they return was evaluated; they only choose which
points to evaluate, so a guess (e.g. the answer of a cheaper accountant) makes them faster,
never different. Interpolation is regula falsi (Illinois) on log(value) against log(x), which
is nearly linear for epsilon; where a log is undefined (a value of 0 or inf, x = 0) it bisects.
"""

import math
from typing import Callable, Optional, Tuple


class NotFoundError(ValueError):
  """No point of the range meets the target."""


# Regula falsi steps that do not halve the bracket before a bisection is forced.
_SLOW_STEPS = 3


def log_gap(value: float, target: float) -> float:
  """log(value / target): -inf for a value of 0, +inf for inf or NaN (target > 0)."""
  if math.isnan(value) or value == math.inf:
    return math.inf
  if value <= 0:
    return -math.inf
  return math.log(value) - math.log(target)


def largest_within(value: Callable[[int], float], target: float, cap: int,
                   guess: Optional[int] = None) -> int:
  """The largest s in [0, cap] with value(s) <= target, for value nondecreasing, value(0) = 0.

  Returns s with value(s) <= target < value(s + 1), both evaluated (value(0) = 0 is not), or
  cap if value(cap) <= target. `guess` (an estimate of the answer) is evaluated first, then
  guess + 1 (or guess - 1): an exact guess costs two evaluations.
  """
  lo, e_lo, hi, e_hi = 0, 0.0, None, None
  below = None  # an evaluated point below lo with 0 < value <= target, for extrapolation
  probe = 1 if guess is None else min(cap, max(1, int(guess)))
  if guess is not None:
    e = value(probe)
    if e <= target:
      lo, e_lo = probe, e
      probe = lo + 1
    else:
      hi, e_hi = probe, e
  while hi is None:  # up from lo: find hi
    if lo >= cap:
      return cap
    e = value(probe)
    if not e <= target:
      hi, e_hi = probe, e
      break
    below, (lo, e_lo) = (lo, e_lo), (probe, e)
    probe = min(cap, _extrapolate_up(below, (lo, e_lo), target))
  if guess is not None and lo == 0 and hi > 1:  # the guess was above: down from it
    above, probe = None, hi - 1
    while probe > 0:
      e = value(probe)
      if e <= target:
        lo, e_lo = probe, e
        break
      above, (hi, e_hi) = (hi, e_hi), (probe, e)
      probe = _extrapolate_down((hi, e_hi), above, target)
  return _narrow_integer(value, target, (lo, e_lo), (hi, e_hi))


def smallest_fitting(value: Callable[[float], float], target: float, tol: float,
                     lowest: float, highest: float,
                     guess: Optional[float] = None) -> Tuple[Optional[float], float]:
  """For value nonincreasing in x > 0: (lo, hi) with value(lo) > target >= value(hi), both
  evaluated, lo < hi <= lo + tol, lowest <= lo and hi <= highest.

  Returns (None, lowest) when value(lowest) <= target already.

  Without `guess`, powers of two from 1 bracket the answer. With it, `guess` is evaluated first,
  then guess - tol (or guess + tol): an exact guess costs two evaluations.

  Raises:
    NotFoundError: value(highest) > target.
  """
  if guess is None:
    lo, e_lo, hi, e_hi = _powers_of_two_bracket(value, target, lowest, highest)
  else:
    lo, e_lo, hi, e_hi = _bracket_near(value, target, tol, lowest, highest, guess)
  if lo is None:
    return None, hi
  return _narrow_real(value, target, tol, (lo, e_lo), (hi, e_hi))


def _extrapolate_up(point_a, point_b, target) -> int:
  """Next probe above point_b (both below target): just past where the power law through the
  two points reaches the target, within (b, 16 b]; 2 b when no power law fits."""
  s_b = point_b[0]
  estimate = _power_law_root(point_a, point_b, target)
  if estimate is None:
    return max(s_b + 1, 2 * s_b)
  step = math.ceil(1.02 * (estimate - s_b)) + 1
  return int(min(16 * s_b, max(s_b + 1, s_b + step)))


def _extrapolate_down(point_a, point_b, target) -> int:
  """Next probe below point_a (both above target, a < b): as `_extrapolate_up`, mirrored, within
  [a / 16, a); a // 2 when no power law fits. May return 0 (value(0) = 0 is known)."""
  s_a = point_a[0]
  estimate = None if point_b is None else _power_law_root(point_a, point_b, target)
  if estimate is None:
    return s_a // 2
  step = math.ceil(1.02 * (s_a - estimate)) + 1
  return int(max(s_a // 16, min(s_a - 1, s_a - step)))


def _power_law_root(point_a, point_b, target) -> Optional[float]:
  """Where the line through two (x, value) points in log-log space meets target, if defined."""
  (x_a, e_a), (x_b, e_b) = point_a, point_b
  f_a, f_b = log_gap(e_a, target), log_gap(e_b, target)
  if x_a <= 0 or x_b <= 0 or not (math.isfinite(f_a) and math.isfinite(f_b)) or f_a == f_b:
    return None
  u_a, u_b = math.log(x_a), math.log(x_b)
  u = u_a - f_a * (u_b - u_a) / (f_b - f_a)
  return math.exp(min(u, 700.0))


def _narrow_integer(value, target, low, high) -> int:
  """Narrows value(lo) <= target < value(hi) to hi = lo + 1; returns lo."""
  (lo, e_lo), (hi, e_hi) = low, high
  kept_lo = kept_hi = 0  # how often each end survived in a row (Illinois' weights)
  slow = 0
  while hi - lo > 1:
    width = hi - lo
    estimate = None
    if slow < _SLOW_STEPS and lo > 0:
      estimate = _illinois(lo, e_lo, kept_lo, hi, e_hi, kept_hi, target)
    if estimate is None:
      probe, slow = (lo + hi) // 2, 0
    else:  # just past the estimate, so that the end that has not moved lately moves
      probe = math.ceil(estimate) if kept_hi > kept_lo else math.floor(estimate)
    probe = min(hi - 1, max(lo + 1, probe))
    e = value(probe)
    if e <= target:
      lo, e_lo, kept_lo, kept_hi = probe, e, 0, kept_hi + 1
    else:
      hi, e_hi, kept_lo, kept_hi = probe, e, kept_lo + 1, 0
    slow = 0 if hi - lo <= width / 2 else slow + 1
  return lo


def _narrow_real(value, target, tol, low, high):
  """Narrows value(lo) > target >= value(hi) (value nonincreasing) to hi - lo <= tol."""
  (lo, e_lo), (hi, e_hi) = low, high
  kept_lo = kept_hi = 0
  slow = 0
  while hi - lo > tol:
    width = hi - lo
    estimate = None
    if slow < _SLOW_STEPS:
      estimate = _illinois(lo, e_lo, kept_lo, hi, e_hi, kept_hi, target)
    if estimate is None:
      probe, slow = lo + (hi - lo) / 2, 0
    else:  # just past the estimate, so that the end that has not moved lately moves
      probe = estimate + (-0.4 * tol if kept_lo > kept_hi else 0.4 * tol)
    probe = min(hi - 0.25 * tol, max(lo + 0.25 * tol, probe))
    e = value(probe)
    if e <= target:
      hi, e_hi, kept_lo, kept_hi = probe, e, kept_lo + 1, 0
    else:
      lo, e_lo, kept_lo, kept_hi = probe, e, 0, kept_hi + 1
    slow = 0 if hi - lo <= width / 2 else slow + 1
  return lo, hi


def _illinois(x_lo, e_lo, kept_lo, x_hi, e_hi, kept_hi, target) -> Optional[float]:
  """Regula falsi on log(value) - log(target) over log(x), Illinois variant: an end kept twice
  in a row has its weight halved, so the bracket closes from both sides. None if undefined."""
  f_lo, f_hi = log_gap(e_lo, target), log_gap(e_hi, target)
  if x_lo <= 0 or not (math.isfinite(f_lo) and math.isfinite(f_hi)) or f_lo == f_hi:
    return None
  f_lo *= 0.5**max(0, kept_lo - 1)
  f_hi *= 0.5**max(0, kept_hi - 1)
  u_lo, u_hi = math.log(x_lo), math.log(x_hi)
  return math.exp(u_lo - f_lo * (u_hi - u_lo) / (f_hi - f_lo))


def _powers_of_two_bracket(value, target, lowest, highest):
  """(lo, e_lo, hi, e_hi): adjacent powers of two (or lowest/highest) around the answer."""
  x = min(highest, max(lowest, 1.0))
  e = value(x)
  if e <= target:
    hi, e_hi = x, e
    while hi > lowest:
      x = max(lowest, hi / 2)
      e = value(x)
      if not e <= target:
        return x, e, hi, e_hi
      hi, e_hi = x, e
    return None, None, hi, e_hi
  lo, e_lo = x, e
  while lo < highest:
    x = min(highest, lo * 2)
    e = value(x)
    if e <= target:
      return lo, e_lo, x, e
    lo, e_lo = x, e
  raise NotFoundError(f"Expected some x <= {highest} with value(x) <= {target}. Received: "
                      f"value({highest}) = {e_lo}.")


def _bracket_near(value, target, tol, lowest, highest, guess):
  """As `_powers_of_two_bracket`, from guess: steps of about tol, 4 tol, 16 tol, ..., at most a
  factor 2 a probe, or (once two points lie on the same side) just past where the power law
  through them meets the target, at most a factor 4 down or 16 up a probe (epsilon at a
  smaller x, a smaller noise multiplier, costs more)."""
  x = min(highest, max(lowest, guess))
  e = value(x)
  step, previous = 0.999 * tol, None  # a bracket of guess and guess -+ step is narrow enough
  if e <= target:
    hi, e_hi = x, e
    while hi > lowest:
      estimate = None if previous is None else _power_law_root(previous, (hi, e_hi), target)
      if estimate is not None and estimate < hi:
        x = max(hi / 4, estimate - 0.4 * tol - 0.01 * (hi - estimate))
      else:
        x = max(hi / 2, hi - step)
      x = max(lowest, x)
      e = value(x)
      if not e <= target:
        return x, e, hi, e_hi
      previous, (hi, e_hi), step = (hi, e_hi), (x, e), 4 * step
    return None, None, hi, e_hi
  lo, e_lo = x, e
  while lo < highest:
    estimate = None if previous is None else _power_law_root(previous, (lo, e_lo), target)
    if estimate is not None and estimate > lo:
      x = min(16 * lo, estimate + 0.4 * tol + 0.01 * (estimate - lo))
    else:
      x = min(2 * lo, lo + step)
    x = min(highest, x)
    e = value(x)
    if e <= target:
      return lo, e_lo, x, e
    previous, (lo, e_lo), step = (lo, e_lo), (x, e), 4 * step
  raise NotFoundError(f"Expected some x <= {highest} with value(x) <= {target}. Received: "
                      f"value({highest}) = {e_lo}.")
