"""The statistics of a one-run privacy audit: from guesses made and correct to a lower bound on
epsilon (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

`p_value(m, r, v, epsilon, delta)` and `epsilon_lower_bound(...)`. Pure Python.

Design: docs/audit.md
"""

import math
from typing import List

from tfdp_prune import _validate

# Bisection: stop when the bracket is this narrow (epsilon is reported to ~1e-9).
_TOLERANCE = 1e-10
# No bound above this is searched for: q = 1 - 1e-87 there, far beyond any audit's power.
_MAX_EPSILON = 200.0


def log_binomial_pmf(r: int, epsilon: float) -> List[float]:
  """[log P[Binomial(r, q) = k] for k = 0..r], q = e^epsilon / (1 + e^epsilon)."""
  log_q = -math.log1p(math.exp(-epsilon))  # log of e^eps / (1 + e^eps), stable for large eps
  log_not_q = log_q - epsilon  # log of 1 / (1 + e^eps)
  log_r_factorial = math.lgamma(r + 1)
  return [log_r_factorial - math.lgamma(k + 1) - math.lgamma(r - k + 1)
          + k * log_q + (r - k) * log_not_q for k in range(r + 1)]


def log_sum_exp(values: List[float]) -> float:
  """log(sum(exp(values))) without overflow; -inf for an empty list."""
  if not values:
    return -math.inf
  largest = max(values)
  if largest == -math.inf:
    return -math.inf
  return largest + math.log(math.fsum(math.exp(x - largest) for x in values))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
  """The probability bound of the module docstring: how likely v or more correct guesses out of
  r are (m canaries) if training is (epsilon, delta)-DP."""
  _check_counts(m, r, v)
  _validate.non_negative("epsilon", epsilon)
  _check_delta(delta)
  log_pmf = log_binomial_pmf(r, epsilon)
  beta = math.exp(log_sum_exp(log_pmf[v:]))  # f(v)
  if delta == 0 or v == 0:
    return min(beta, 1.0)
  # alpha = max_i (f(v - i) - f(v)) / i = max_i P[v - i <= Binomial < v] / i.
  alpha, window = 0.0, 0.0
  for i in range(1, v + 1):
    window += math.exp(log_pmf[v - i])
    alpha = max(alpha, window / i)
  return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0,
                        confidence: float = 0.95) -> float:
  """The largest epsilon whose (epsilon, delta)-DP the guesses reject at `confidence`; 0 when
  they reject none (e.g. v <= r / 2).

  Invariant of the bisection: the p-value at the returned epsilon is <= 1 - confidence, so the
  bound is valid whether or not the p-value is monotone in epsilon (with delta > 0 it need not
  be); monotonicity only makes it the largest.
  """
  _validate.open_unit_interval("confidence", confidence)
  significance = 1.0 - confidence
  rejects = lambda epsilon: p_value(m, r, v, epsilon, delta) <= significance
  if not rejects(0.0):
    return 0.0
  low, high = 0.0, 1.0
  while rejects(high):
    if high >= _MAX_EPSILON:
      return _MAX_EPSILON
    low, high = high, min(2.0 * high, _MAX_EPSILON)
  while high - low > _TOLERANCE:
    middle = 0.5 * (low + high)
    if rejects(middle):
      low = middle
    else:
      high = middle
  return low


def _check_counts(m, r, v):
  for name, value in (("m", m), ("r", r), ("v", v)):
    _validate.non_negative_int(name, value)
  if not v <= r <= m:
    raise ValueError(f"Expected correct guesses <= guesses <= canaries (v <= r <= m). Received: "
                     f"m={m}, r={r}, v={v}.")


def _check_delta(delta):
  _validate.non_negative("delta", delta)
  if delta >= 1:
    raise ValueError(f"Expected delta in [0, 1). Received: delta={delta!r}.")
