"""dp_accounting's PLD epsilon of Poisson-sampled Gaussian steps, without its avoidable costs.

`epsilon(sigma, q, steps, delta, d)` returns the same number as dp_accounting's PLDAccountant,
with the one-step PLD built once; `PLDTooLargeError` before a hopeless computation starts.

Design: docs/sampling-and-accounting.md
"""

import functools
import math

from dp_accounting.pld import common
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.pld import privacy_loss_mechanism

# Above these sizes dp_accounting's PLD is refused: a one-step PLD is built by a Python loop
# (about 25 us a point: 2**22 points is 100 s); composing allocates several complex FFT buffers
# of the composed size (2**24 points: about 1 GB).
MAX_ONE_STEP_POINTS = 2**22
MAX_COMPOSED_POINTS = 2**24
_TAIL_MASS_TRUNCATION = 1e-15  # dp_accounting's default for self_compose and compose.


class PLDError(ValueError):
  """dp_accounting cannot compute the PLD of these settings (too large, or its own failure)."""


class PLDTooLargeError(PLDError):
  """The PLD of these settings is too large to compute here; use RDP or a coarser grid."""


def one_step_points(sigma: float, q: float, d: float) -> int:
  """Grid points of the one-step PLD (the larger of its remove and add parts), from the
  connect-the-dots bounds dp_accounting builds it on; nothing is built."""
  points = 0
  for adjacency in (privacy_loss_mechanism.AdjacencyType.REMOVE,
                    privacy_loss_mechanism.AdjacencyType.ADD):
    bounds = privacy_loss_mechanism.GaussianPrivacyLoss(
        sigma, sampling_prob=q, adjacency_type=adjacency).connect_dots_bounds()
    points = max(points, math.ceil(bounds.epsilon_upper / d)
                 - math.floor(bounds.epsilon_lower / d) + 1)
  return points


def composed_points(sigma: float, q: float, steps: int, d: float) -> int:
  """Grid points of the `steps`-fold composition (dp_accounting's own truncation bounds)."""
  sizes = []
  for pmf in _pmfs(_one_step(sigma, q, d)):
    probs = pmf.to_dense_pmf()._probs  # pylint: disable=protected-access
    low, high = common.compute_self_convolve_bounds(probs, steps, _TAIL_MASS_TRUNCATION)
    sizes.append(high - low + 1)
  return max(sizes)


def epsilon(sigma: float, q: float, steps: int, delta: float, d: float) -> float:
  """PLD epsilon of `steps` Poisson-sampled Gaussian steps (sigma > 0, q in (0, 1], steps >= 1).

  Raises:
    PLDTooLargeError: the one-step or the composed PLD exceeds the size limits.
  """
  check_one_step(sigma, q, d)
  points = steps * (one_step_points(sigma, q, d) - 1) + 1  # an upper bound, cheap
  if points > MAX_COMPOSED_POINTS:
    points = composed_points(sigma, q, steps, d)
  if points > MAX_COMPOSED_POINTS:
    raise PLDTooLargeError(
        f"Expected a PLD of at most {MAX_COMPOSED_POINTS} grid points. Received: {steps} steps "
        f"at noise_multiplier={sigma}, sampling_probability={q} need {points} points at "
        f"pld_discretization={d} (an epsilon far beyond any useful one). Fix: use "
        f"accountant='rdp', or pld_discretization >= {_coarser(d, points, MAX_COMPOSED_POINTS)}.")
  composed = _self_compose(_one_step(sigma, q, d), steps)
  # PLDAccountant starts from the identity PLD and composes the event's PLD into it.
  total = privacy_loss_distribution.identity(value_discretization_interval=d).compose(composed)
  return float(total.get_epsilon_for_delta(delta))


def check_one_step(sigma: float, q: float, d: float) -> None:
  """Raises PLDTooLargeError when the one-step PLD exceeds MAX_ONE_STEP_POINTS (q = 1: the
  plain Gaussian mechanism)."""
  points = one_step_points(sigma, q, d)
  if points > MAX_ONE_STEP_POINTS:
    raise PLDTooLargeError(
        f"Expected a one-step PLD of at most {MAX_ONE_STEP_POINTS} grid points. Received: "
        f"noise_multiplier={sigma}, sampling_probability={q} need {points} points at "
        f"pld_discretization={d}. Fix: use accountant='rdp', or pld_discretization >= "
        f"{_coarser(d, points, MAX_ONE_STEP_POINTS)}.")


def _coarser(d: float, points: int, limit: int) -> float:
  """A discretization (two significant digits, rounded up) that brings `points` under `limit`."""
  wanted = d * points / limit
  scale = 10.0**(math.floor(math.log10(wanted)) - 1)
  return math.ceil(wanted / scale) * scale


@functools.lru_cache(maxsize=8)
def _one_step(sigma: float, q: float, d: float) -> privacy_loss_distribution.PrivacyLossDistribution:
  """The one-step PLD exactly as PLDAccountant builds it for PoissonSampledDpEvent(q, Gaussian).

  Raises:
    PLDError: dp_accounting 0.4.3 fails on some settings (e.g. sigma 1/16, q 0.08, d 1e-2:
      "deltas are not in non-increasing order", a rounding effect at deltas near 1e-24).
  """
  try:
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=d, sampling_prob=q)
  except ValueError as error:
    raise PLDError(
        f"dp_accounting could not build the PLD of noise_multiplier={sigma}, "
        f"sampling_probability={q} at pld_discretization={d}: {error} Fix: use "
        "accountant='rdp', or another pld_discretization.") from error


def _pmfs(pld):
  """(remove,) for a symmetric PLD, else (remove, add)."""
  # pylint: disable=protected-access
  if pld._symmetric:
    return (pld._pmf_remove,)
  return (pld._pmf_remove, pld._pmf_add)


def _self_compose(pld, count: int):
  """`pld.self_compose(count)`, with dp_accounting's sparse-or-dense choice made by logarithms."""
  pmfs = [_pmf_self_compose(pmf, count) for pmf in _pmfs(pld)]
  return privacy_loss_distribution.PrivacyLossDistribution(*pmfs)


def _pmf_self_compose(pmf, count: int):
  if isinstance(pmf, pld_pmf.SparsePLDPmf) and count > 1 and _sparse_too_large(pmf.size, count):
    # SparsePLDPmf.self_compose: `if self.size**num_times > _MAX_PMF_SPARSE_SIZE:
    #   return self.to_dense_pmf().self_compose(num_times, tail_mass_truncation)`.
    return pmf.to_dense_pmf().self_compose(count, _TAIL_MASS_TRUNCATION)
  return pmf.self_compose(count, _TAIL_MASS_TRUNCATION)


def _sparse_too_large(size: int, count: int) -> bool:
  """`size ** count > _MAX_PMF_SPARSE_SIZE` without computing the power."""
  limit = pld_pmf._MAX_PMF_SPARSE_SIZE  # pylint: disable=protected-access
  if size <= 1:
    return size > limit
  if count * math.log(size) > math.log(limit) + 1:  # far above: no exact test needed
    return True
  return size**count > limit  # a small power here
