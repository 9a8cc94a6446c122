"""Poisson sampling ("poisson"): each example joins each logical batch with probability q; batches
padded to a fixed shape under a cap; accounted with amplification by sampling.

Design: docs/sampling-and-accounting.md
"""

import math
from typing import Any, Dict, List, Optional

from dp_accounting import dp_event

from tfdp_prune import _validate
from tfdp_prune.compat import tf
from tfdp_prune.sampling_schemes import base

DEFAULT_OVERFLOW_PROBABILITY = 1e-15


def binomial_tail_bound(num_examples: int, sampling_probability: float, size: int) -> float:
  """A rigorous upper bound on P(Binomial(num_examples, sampling_probability) > size).

  For size >= the mean, the terms beyond `size` shrink at least geometrically with the ratio of
  the first of them, r = (n - k) / (k + 1) * q / (1 - q) at k = size + 1, so the tail is at most
  pmf(size + 1) / (1 - r). Exact 0 when size >= n. Computed in log space (no overflow for large n).
  """
  n, q, k = num_examples, sampling_probability, size + 1
  if k > n:
    return 0.0
  if q >= 1.0:
    return 1.0
  ratio = (n - k) / (k + 1) * q / (1 - q)
  if k < n * q or ratio >= 1.0:
    return 1.0  # Below the mean: no useful bound, and none is needed.
  log_pmf = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
             + k * math.log(q) + (n - k) * math.log1p(-q))
  return min(1.0, math.exp(log_pmf) / (1.0 - ratio))


def poisson_batch_cap(num_examples: int, sampling_probability: float,
                      overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY) -> int:
  """The smallest size m with `binomial_tail_bound(N, q, m) < overflow_probability` (<= N)."""
  _validate.positive_int("num_examples", num_examples)
  _validate.probability("sampling_probability", sampling_probability)
  _validate.open_unit_interval("overflow_probability", overflow_probability)
  low, high = int(math.floor(num_examples * sampling_probability)), num_examples
  while low < high:  # The bound decreases in m above the mean; it is 0 at m = N.
    middle = (low + high) // 2
    if binomial_tail_bound(num_examples, sampling_probability, middle) < overflow_probability:
      high = middle
    else:
      low = middle + 1
  return low


class PoissonDraw(base.Draw):
  """Poisson draws at rate q, padded to a capacity (see `sampling.PoissonSampler`)."""

  def __init__(self, sampling_probability: float, *, max_batch_size: Optional[int] = None,
               overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY):
    _validate.probability("sampling_probability", sampling_probability)
    _validate.open_unit_interval("overflow_probability", overflow_probability)
    if max_batch_size is not None:
      _validate.positive_int("max_batch_size", max_batch_size)
    self.scheme = SCHEME
    self._q = float(sampling_probability)
    self._requested_overflow = float(overflow_probability)
    self._max_batch_size = max_batch_size

  def bind(self, num_examples: int, accumulation: int) -> None:
    super().bind(num_examples, accumulation)
    cap = (self._max_batch_size if self._max_batch_size is not None
           else poisson_batch_cap(num_examples + 1, self._q, self._requested_overflow))
    self._capacity = -(-cap // accumulation) * accumulation  # a multiple of K

  @property
  def sampling_probability(self) -> float:
    return self._q

  @property
  def expected_batch_size(self) -> float:
    return self._q * self._num_examples

  @property
  def max_batch_size(self) -> int:
    return self._capacity

  @property
  def overflow_probability(self) -> float:
    return binomial_tail_bound(self._num_examples + 1, self._q, self._capacity)

  @property
  def steps_per_epoch(self) -> int:
    return max(1, int(round(1.0 / self._q)))

  def logical_capacity(self) -> int:
    return self._capacity

  def config(self, common: Dict[str, Any]) -> Dict[str, Any]:
    return dict(sampling_probability=self._q,
                gradient_accumulation_steps=common["gradient_accumulation_steps"],
                max_batch_size=self._max_batch_size,
                overflow_probability=self._requested_overflow,
                num_examples=common["num_examples"])

  def spec_kwargs(self) -> Dict[str, Any]:
    return dict(sampling=SCHEME.name, sampling_probability=self._q,
                overflow_probability=self.overflow_probability)

  def padded_indices(self, step, secret):
    n, capacity = self._num_examples, self._capacity
    uniform = base.step_uniform(secret, step, n)
    chosen = tf.where(uniform < self._q)[:, 0]  # int64, ascending
    size = tf.shape(chosen, out_type=tf.int64)[0]
    message = (f"tfdp_prune Poisson sampler: a draw exceeds the capacity max_batch_size="
               f"{capacity} (bound on its probability: {self.overflow_probability:.3g} per "
               "step). Raised rather than dropping examples, which would change the privacy "
               "analysis; use a larger max_batch_size or a smaller overflow_probability.")
    check = tf.debugging.Assert(size <= capacity,
                                [message, "logical step:", step, "draw size:", size])
    with tf.control_dependencies([check]):
      padding = tf.fill([capacity - size], tf.constant(n, tf.int64))
    indices = tf.concat([chosen, padding], axis=0)
    return tf.ensure_shape(indices, [self.physical_batch_size * self._accumulation])


class PoissonScheme(base.SamplingScheme):
  """Poisson sampling with rate q: `SelfComposedDpEvent(PoissonSampledDpEvent(q,
  GaussianDpEvent(sigma)), steps)` under add-or-remove-one adjacency."""

  name = "poisson"
  flag_help = "poisson (amplified epsilon)"
  adjacency = base.ADD_OR_REMOVE_ONE
  pld_steps_compose = True  # as PLDAccountant computes it, and equal to it (see _pld)
  draw_class = PoissonDraw

  def validate(self, spec) -> None:
    _validate.probability("sampling_probability", spec.sampling_probability)
    for name in ("batch_size", "num_examples"):
      if getattr(spec, name) is not None:
        raise ValueError(
            f"Expected {name}=None with sampling='poisson' (pass sampling_probability="
            f"batch_size / num_examples instead). Received: {name}={getattr(spec, name)!r}.")

  def dp_event(self, spec) -> dp_event.DpEvent:
    one_step = dp_event.PoissonSampledDpEvent(
        sampling_probability=spec.sampling_probability,
        event=dp_event.GaussianDpEvent(spec.noise_multiplier))
    return dp_event.SelfComposedDpEvent(event=one_step, count=spec.steps)

  def pld_step(self, spec):
    return spec.noise_multiplier, spec.sampling_probability

  def statement(self, spec, common: str) -> str:
    overflow = ""
    if spec.overflow_probability > 0:
      overflow = (f" The delta of this guarantee is {spec.delta} + {spec.overflow_delta():.3g} "
                  f"= {spec.total_delta():.10g}: the second term, (1 + e^epsilon) * steps * "
                  f"{spec.overflow_probability:.3g}, covers a draw exceeding the sampler's "
                  "fixed-shape cap (the run would then stop).")
    return (f"Example-level DP under add-or-remove-one adjacency for Poisson sampling with "
            f"rate {spec.sampling_probability}, {common}.{overflow}")

  def rate_text(self, spec) -> str:
    return f" at rate {spec.sampling_probability:.3g}"

  def describe_spec(self, spec) -> str:
    return f"Poisson q={spec.sampling_probability:g}"

  def describe_sampler(self, sampler) -> str:
    return (f"Poisson q={sampler.draw.sampling_probability:g} over N={sampler.num_examples} "
            f"(expected logical batch {sampler.expected_batch_size:g})")

  def padding_rows(self, sampler) -> Optional[int]:
    return None  # Poisson batches always may have some

  def microbatch_problems(self, num_microbatches, sampler, padding) -> List[str]:
    return [f"num_microbatches={num_microbatches} groups rows of Poisson-sampled batches, "
            "whose number of examples varies (padding fills the rest): one more example shifts "
            "every later row into another microbatch, which per-microbatch clipping does not "
            "bound. Use num_microbatches=None (per-example clipping)."]

  def spec_and_optimizer_problems(self, spec, optimizer, num_examples,
                                  check_microbatches) -> List[str]:
    problems = []
    expected = optimizer.expected_batch_size
    if expected is None:
      problems.append(
          "the budget accounts for Poisson sampling, whose batches vary in size, but the "
          "optimizer divides by the rows of each batch (expected_batch_size=None). Pass "
          "expected_batch_size = q * N (`sampler.expected_batch_size`).")
    elif num_examples is not None and not math.isclose(
        expected, spec.sampling_probability * num_examples, rel_tol=1e-9):
      problems.append(
          f"the optimizer divides by expected_batch_size={expected:g}, the budget's Poisson "
          f"rate q={spec.sampling_probability:g} over N={num_examples} examples gives "
          f"{spec.sampling_probability * num_examples:g}.")
    if check_microbatches and optimizer.num_microbatches:
      problems.append(
          f"num_microbatches={optimizer.num_microbatches} with Poisson sampling: the number of "
          "examples in a batch varies, so microbatches do not keep one example's rows apart. Use "
          "num_microbatches=None (per-example clipping).")
    return problems

  def sampler_and_spec_problems(self, sampler, spec) -> List[str]:
    rate = sampler.draw.sampling_probability
    if not math.isclose(rate, spec.sampling_probability, rel_tol=1e-12):
      return [f"the sampler draws with q={rate:g}, the budget accounts "
              f"for q={spec.sampling_probability:g}. Build the spec with "
              "`sampler.privacy_spec(...)`."]
    return []

  def make_sampler_arguments(self, sampling_probability, batch_size, extra) -> Dict[str, Any]:
    if batch_size is not None:
      raise ValueError("Expected batch_size=None with sampling='poisson' (pass "
                       f"sampling_probability=batch_size / N). Received: batch_size={batch_size}.")
    return dict(sampling_probability=sampling_probability, **extra)

  def sampler_arguments(self, batch_size: int, num_examples: int) -> Dict[str, Any]:
    return dict(sampling_probability=batch_size / num_examples)


SCHEME = PoissonScheme()
