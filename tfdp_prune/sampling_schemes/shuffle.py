"""Shuffled fixed-size batches ("shuffle"): each pass a permutation cut into disjoint batches;
accounted as what it is, without amplification by sampling (NOT a Poisson guarantee).

Design: docs/sampling-and-accounting.md
"""

import math
from typing import Any, Dict, List, Optional

from dp_accounting import dp_event

from tfdp_prune import _validate
from tfdp_prune.compat import tf
from tfdp_prune.sampling_schemes import base


class ShuffleDraw(base.Draw):
  """Each pass a permutation drawn from (secret, pass), cut into N // batch_size disjoint
  batches (see `sampling.ShuffleSampler`)."""

  def __init__(self, batch_size: int):
    _validate.positive_int("batch_size", batch_size)
    self.scheme = SCHEME
    self._batch_size = batch_size

  def bind(self, num_examples: int, accumulation: int) -> None:
    if self._batch_size > num_examples:
      raise ValueError(f"Expected batch_size <= num_examples. Received: batch_size="
                       f"{self._batch_size}, num_examples={num_examples}.")
    super().bind(num_examples, accumulation)

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def expected_batch_size(self) -> float:
    return float(self._batch_size)

  @property
  def steps_per_epoch(self) -> int:
    return self._num_examples // self._batch_size

  def logical_capacity(self) -> int:
    return self._batch_size

  def config(self, common: Dict[str, Any]) -> Dict[str, Any]:
    return dict(batch_size=self._batch_size, **common)

  def spec_kwargs(self) -> Dict[str, Any]:
    return dict(sampling=SCHEME.name, batch_size=self._batch_size,
                num_examples=self._num_examples)

  def _pass_batches(self, epoch, secret):
    """The permutation of pass `epoch`, as [steps_per_epoch, batch_size] example indices."""
    uniform = base.step_uniform(secret, epoch, self._num_examples)
    permutation = tf.argsort(uniform, stable=True)
    used = self.steps_per_epoch * self._batch_size
    return tf.reshape(tf.cast(permutation[:used], tf.int64),
                      [self.steps_per_epoch, self._batch_size])

  def _pad(self, batch):
    extra = self.physical_batch_size * self._accumulation - self._batch_size
    return tf.concat([batch, tf.fill([extra], tf.constant(self._num_examples, tf.int64))], 0)

  def padded_indices(self, step, secret):
    per_pass = self.steps_per_epoch
    return self._pad(self._pass_batches(step // per_pass, secret)[step % per_pass])

  def logical_indices_dataset(self, start_step, secret):
    per_pass = self.steps_per_epoch
    passes = tf.data.Dataset.counter(start_step // per_pass, dtype=tf.int64)
    batches = passes.flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(self._pass_batches(epoch, secret)))
    return batches.skip(start_step % per_pass).map(self._pad)


class ShuffleScheme(base.SamplingScheme):
  """Shuffled fixed batches of b from n: `SelfComposedDpEvent(GaussianDpEvent(sigma / 2),
  passes)` under replace-one adjacency (sensitivity 2C, one Gaussian per pass, no
  amplification claimed)."""

  name = "shuffle"
  flag_help = "shuffle (fixed batches, reported without amplification)"
  adjacency = base.REPLACE_ONE
  pld_steps_compose = False
  draw_class = ShuffleDraw

  def validate(self, spec) -> None:
    if spec.overflow_probability != 0:
      raise ValueError(
          "Expected overflow_probability=0 with sampling='shuffle' (fixed batches never "
          f"overflow). Received: overflow_probability={spec.overflow_probability!r}.")
    if spec.sampling_probability is not None:
      raise ValueError(
          "Expected sampling_probability=None with sampling='shuffle': shuffled fixed-size "
          "batches have no sampling probability and get no Poisson amplification; pass "
          f"batch_size and num_examples. Received: "
          f"sampling_probability={spec.sampling_probability!r}.")
    _validate.positive_int("batch_size", spec.batch_size)
    _validate.positive_int("num_examples", spec.num_examples)
    if spec.batch_size > spec.num_examples:
      raise ValueError(
          f"Expected batch_size <= num_examples. Received: batch_size={spec.batch_size}, "
          f"num_examples={spec.num_examples}.")

  def passes(self, spec) -> Optional[int]:
    """ceil(steps / floor(n / b))."""
    return -(-spec.steps // (spec.num_examples // spec.batch_size))

  def dp_event(self, spec) -> dp_event.DpEvent:
    # Replace-one: sensitivity 2C, one Gaussian per pass, no amplification claimed.
    return dp_event.SelfComposedDpEvent(
        event=dp_event.GaussianDpEvent(spec.noise_multiplier / 2), count=spec.passes)

  def pld_step(self, spec):
    """One Gaussian of std sigma / 2 / sqrt(passes) for all the passes."""
    return spec.noise_multiplier / 2 / math.sqrt(spec.passes), 1.0

  def statement(self, spec, common: str) -> str:
    return (f"NOT a Poisson guarantee: tfdp_prune's ShuffleSampler (each pass a permutation cut "
            f"into disjoint batches of {spec.batch_size} of the {spec.num_examples} examples, "
            f"the remainder left out), no amplification by sampling claimed. Example-level DP "
            f"under replace-one adjacency, counting {spec.passes} passes; {common}. Not valid for "
            "other batching (e.g. repeat() before batch(), which can put one example twice in "
            "a batch).")

  def rate_text(self, spec) -> str:
    return f" of batches of {spec.batch_size} from {spec.num_examples} examples"

  def describe_spec(self, spec) -> str:
    return f"shuffled batches of {spec.batch_size} from N={spec.num_examples}"

  def describe_sampler(self, sampler) -> str:
    return f"shuffled batches of {sampler.draw.batch_size} from N={sampler.num_examples}"

  def padding_rows(self, sampler) -> Optional[int]:
    """Only when the accumulation steps do not divide the batch size."""
    return (sampler.physical_batch_size * sampler.gradient_accumulation_steps
            - sampler.draw.batch_size)

  def microbatch_problems(self, num_microbatches, sampler, padding) -> List[str]:
    if padding:
      return [f"num_microbatches={num_microbatches} groups rows of batches with {padding} "
              f"padding row(s) per logical batch (batch_size={sampler.draw.batch_size} is not a "
              f"multiple of gradient_accumulation_steps={sampler.gradient_accumulation_steps}). "
              "Use num_microbatches=None, or a batch size that the accumulation steps divide."]
    return []

  def spec_and_optimizer_problems(self, spec, optimizer, num_examples,
                                  check_microbatches) -> List[str]:
    expected = optimizer.expected_batch_size
    if expected is not None and not math.isclose(expected, spec.batch_size, rel_tol=1e-9):
      return [f"the optimizer divides by expected_batch_size={expected:g}, the budget accounts "
              f"for shuffled batches of {spec.batch_size}. Pass "
              f"expected_batch_size={spec.batch_size}."]
    return []

  def sampler_and_spec_problems(self, sampler, spec) -> List[str]:
    if (sampler.draw.batch_size, sampler.num_examples) != (spec.batch_size, spec.num_examples):
      return [f"the sampler draws batches of {sampler.draw.batch_size} from "
              f"{sampler.num_examples} examples, the budget accounts for {spec.batch_size} from "
              f"{spec.num_examples}. Build the spec with `sampler.privacy_spec(...)`."]
    return []

  def make_sampler_arguments(self, sampling_probability, batch_size, extra) -> Dict[str, Any]:
    if sampling_probability is not None or extra:
      raise ValueError("Expected only batch_size with sampling='shuffle'. Received: "
                       f"sampling_probability={sampling_probability!r}, {extra}.")
    return dict(batch_size=batch_size)

  def sampler_arguments(self, batch_size: int, num_examples: int) -> Dict[str, Any]:
    return dict(batch_size=batch_size)


SCHEME = ShuffleScheme()
