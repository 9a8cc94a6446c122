"""Batch sampling for DP training with `model.fit`: Poisson sampling, or shuffling as a choice.

Poisson sampling (`PoissonSampler`, `sampling="poisson"`)
  At every LOGICAL step each of the N private examples joins the batch independently with
  probability q, so the batch size is Binomial(N, q) (0 is possible: an empty draw is a valid,
  pure-noise step). This is the sampling that `PrivacySpec(sampling="poisson",
  sampling_probability=q)` accounts for (DESIGN.md, rule 5). The optimizer must divide by the
  EXPECTED batch size q * N, not by the size drawn:
  `expected_batch_size=sampler.expected_batch_size`.

Fixed physical shape
  A graph compiled for one batch shape is reused for every step: each logical batch is padded to
  a fixed capacity of `gradient_accumulation_steps` (K) physical batches of
  `physical_batch_size` (B) rows. Real rows come first and have sample weight exactly 1; padding
  rows are all zeros (data-independent) with sample weight exactly 0, so they contribute exactly
  nothing (rule 6). A logical step is K consecutive dataset elements, which the optimizer
  accumulates into one update and one accounting step (rule 10).

The cap, and what happens above it (never a silent truncation)
  The capacity K * B must bound the drawn size. It is the smallest size m whose overflow
  probability P(Binomial(N + 1, q) > m) is below `overflow_probability` (default 1e-15 per step;
  N + 1 so that it also holds for a neighbouring dataset with one more example), from a rigorous
  upper bound on the binomial tail (geometric bound on the terms beyond m), then rounded up to a
  multiple of K. If a draw ever exceeds the capacity, reading the dataset raises
  `tf.errors.InvalidArgumentError` naming the step: no example is ever dropped, the batches are
  exactly Poisson for every step that ran. Stopping on that event still depends on the data
  (through the batch size), so strictly the guarantee of a run of T steps is
  (epsilon, delta + (1 + e^epsilon) * T * p), p = `sampler.overflow_probability` (at most the
  requested `overflow_probability`; it bounds the overflow for this data and for a neighbour):
  with the default, T = 10^4 and epsilon = 8, the extra term is below 3e-8. When the capacity
  exceeds N (small N or large q) no overflow is possible and `overflow_probability` is 0.
  The draw costs O(N) per logical step (one uniform number per example).

Epochs, steps and resuming
  By convention one epoch is `steps_per_epoch = max(1, round(1 / q))` logical steps (each
  example is then used about once per epoch on average), i.e.
  `physical_steps_per_epoch = K * steps_per_epoch` elements of the dataset, the number to pass to `model.fit(..., steps_per_epoch=...)`. `sampler.dataset()` is
  infinite on purpose: with `steps_per_epoch` Keras keeps one iterator across epochs. (A finite
  dataset of exactly one epoch would be re-iterated from its start every epoch, replaying the
  same draws, which the accounting assumes are fresh.)
  Every random choice is a stateless op keyed by (seed, logical step), so the sampler has no state
  but the step counter: `sampler.dataset(start_step=s)` yields exactly what the uninterrupted
  stream yields from logical step s on. To resume from a checkpoint taken between logical batches
  (e.g. at an epoch end), use `start_step=int(model.optimizer.iterations)`, which counts logical
  steps; from a checkpoint taken after p physical batches, `sampler.dataset(start_step=p //
  K).skip(p % K)`. Keep the seed, N and the settings (`get_config()`) with the checkpoint.

Shuffling (`ShuffleSampler`, `sampling="shuffle"`): an explicit choice, accounted as what it is
  Each pass over the data is a fresh permutation keyed by (seed, pass), cut into
  `N // batch_size` disjoint batches of exactly `batch_size` examples (the remainder of the pass is
  left out of that pass). Its `privacy_spec` is `sampling="shuffle"`: no amplification by
  sampling is claimed (see `accounting`).

Use
  sampler = tfdp_prune.sampling.PoissonSampler((x, y), sampling_probability=q, seed=0,
                                               gradient_accumulation_steps=K)
  optimizer = tfdp_prune.DPKerasSGDOptimizer(..., expected_batch_size=sampler.expected_batch_size,
                                             gradient_accumulation_steps=K)
  budget = tfdp_prune.PrivacyBudget(sampler.privacy_spec(noise_multiplier=..., steps=0,
                                                        delta=...), sampler=sampler)
  model.fit(sampler.dataset(), steps_per_epoch=sampler.physical_steps_per_epoch, epochs=E,
            callbacks=[budget])

What is checked (DESIGN.md rule 10): the budget built with `sampler=` refuses to start a fit
whose optimizer disagrees with the sampler (accumulation steps, expected batch size,
microbatches) or whose spec is not the sampler's (`agreement.check_agreement`). Nothing else ties
`sampler.dataset()` to the optimizer: training with a sampler but without a budget, call
`tfdp_prune.check_agreement(optimizer, sampler=sampler)` yourself; a budget without `sampler=`
compares only its spec with the optimizer (and logs a warning).

Data: a tuple (x, y) of arrays (or nests of arrays, e.g. a dict of inputs) with the same first
dimension N, or a finite `tf.data.Dataset` of single (x, y) examples, which is read once into
memory. This module imports nothing of tfdp_prune but `_validate`, `accounting` and `compat`.
"""

import math
import os
from typing import Any, Dict, Optional

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import accounting
from tfdp_prune.compat import tf

SAMPLINGS = accounting.SAMPLINGS
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


class _Sampler:
  """What both samplers share: the data in memory, the padded gather and the dataset."""

  sampling = None  # "poisson" or "shuffle", as in accounting.PrivacySpec

  def __init__(self, data, seed, gradient_accumulation_steps):
    _validate.positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    if seed is None:  # Drawn once and kept: the run stays reproducible from `get_config()`.
      seed = int.from_bytes(os.urandom(7), "little")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
        0 <= seed < 2**63):
      raise ValueError(f"Expected seed to be an integer in [0, 2**63) or None. Received: "
                       f"seed={seed!r}.")
    self._seed = int(seed)
    self._accumulation = gradient_accumulation_steps
    self._data = _to_tensors(data)
    self._num_examples = int(tf.shape(tf.nest.flatten(self._data)[0])[0])
    if self._num_examples < 1:
      raise ValueError("Expected at least one example. Received: 0 examples.")
    # One all-zero row after the last example: the padding row (index N), data-independent.
    self._padded_data = tf.nest.map_structure(
        lambda t: tf.concat([t, tf.zeros([1] + t.shape[1:].as_list(), t.dtype)], axis=0),
        self._data)

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def num_examples(self) -> int:
    return self._num_examples

  @property
  def gradient_accumulation_steps(self) -> int:
    return self._accumulation

  @property
  def physical_batch_size(self) -> int:
    """Rows of every dataset element (the static batch dimension)."""
    return -(-self._logical_capacity() // self._accumulation)

  @property
  def physical_steps_per_epoch(self) -> int:
    """Dataset elements per epoch: what to pass to `model.fit(steps_per_epoch=...)`."""
    return self.steps_per_epoch * self._accumulation

  def indices(self, step: int) -> np.ndarray:
    """The example indices (int64, ascending for Poisson) of logical step `step`."""
    _validate.non_negative_int("step", step)
    padded = self._padded_indices(tf.constant(step, tf.int64)).numpy()
    return padded[padded < self._num_examples]

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """The infinite stream of physical batches (x, y, sample_weight) from logical step
    `start_step` on: `gradient_accumulation_steps` elements per logical step, each of static
    batch size `physical_batch_size`; real rows have weight 1, padding rows weight 0."""
    _validate.non_negative_int("start_step", start_step)
    batch, accumulation = self.physical_batch_size, self._accumulation

    def physical_batches(indices):
      sample_weight = tf.cast(indices < self._num_examples, tf.float32)
      x, y = tf.nest.map_structure(lambda t: tf.gather(t, indices), self._padded_data)
      split = lambda t: tf.reshape(t, [accumulation, batch] + t.shape[1:].as_list())
      return tf.nest.map_structure(split, (x, y, sample_weight))

    dataset = self._logical_indices_dataset(start_step).map(physical_batches).unbatch()
    return dataset.prefetch(2)

  @classmethod
  def from_config(cls, config: Dict[str, Any], data):
    """Rebuilds a sampler from `get_config()` (the settings) and the same data."""
    config = dict(config)
    num_examples = config.pop("num_examples", None)
    sampler = cls(data, **config)
    if num_examples is not None and num_examples != sampler.num_examples:
      raise ValueError(f"Expected data with num_examples={num_examples} (the configured run). "
                       f"Received {sampler.num_examples} examples.")
    return sampler

  def privacy_spec(self, noise_multiplier: float, steps: int, delta: float,
                   accountant: str = "pld", **kwargs) -> accounting.PrivacySpec:
    """The `accounting.PrivacySpec` of `steps` LOGICAL steps of this sampler: the sampling
    settings come from the sampler, so the accounting cannot disagree with the sampling."""
    return accounting.PrivacySpec(noise_multiplier=noise_multiplier, steps=steps, delta=delta,
                                  accountant=accountant, **self._spec_kwargs(), **kwargs)

  def _padded_indices(self, step):
    """Logical step -> int64 indices of length K * B; index N is the padding row."""
    raise NotImplementedError

  def _logical_indices_dataset(self, start_step):
    return tf.data.Dataset.counter(start_step, dtype=tf.int64).map(self._padded_indices)

  def _logical_capacity(self) -> int:
    raise NotImplementedError

  def _spec_kwargs(self) -> Dict[str, Any]:
    raise NotImplementedError

  def _step_seed(self, step):
    return tf.stack([tf.constant(self._seed, tf.int64), tf.cast(step, tf.int64)])


class PoissonSampler(_Sampler):
  """Poisson sampling with rate q, padded to a fixed physical shape (see the module docstring).

  Args:
    data: (x, y) arrays or nests of arrays with N rows, or a finite tf.data.Dataset of (x, y).
    sampling_probability: q in (0, 1].
    seed: an integer in [0, 2**63); None draws one (kept in `seed` and `get_config()`).
    gradient_accumulation_steps: K, physical batches per logical batch (the optimizer's own).
    max_batch_size: the logical cap; None (default) derives it from `overflow_probability`. It
      is rounded up to a multiple of K (the capacity K * physical_batch_size).
    overflow_probability: the per-step probability bound for a draw above the cap, in (0, 1).
      A draw above the capacity raises; examples are never dropped.
  """

  sampling = "poisson"

  def __init__(self, data, sampling_probability: float, *, seed: Optional[int],
               gradient_accumulation_steps: int = 1, max_batch_size: Optional[int] = None,
               overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY):
    _validate.probability("sampling_probability", sampling_probability)
    _validate.open_unit_interval("overflow_probability", overflow_probability)
    if max_batch_size is not None:
      _validate.positive_int("max_batch_size", max_batch_size)
    super().__init__(data, seed, gradient_accumulation_steps)
    self._q = float(sampling_probability)
    self._requested_overflow = float(overflow_probability)
    self._max_batch_size = max_batch_size
    cap = (max_batch_size if max_batch_size is not None
           else poisson_batch_cap(self._num_examples + 1, self._q, overflow_probability))
    self._capacity = -(-cap // self._accumulation) * self._accumulation  # a multiple of K

  @property
  def sampling_probability(self) -> float:
    return self._q

  @property
  def expected_batch_size(self) -> float:
    """q * N: the optimizer's `expected_batch_size`."""
    return self._q * self._num_examples

  @property
  def max_batch_size(self) -> int:
    """The largest logical batch the padded shape holds (K * physical_batch_size)."""
    return self._capacity

  @property
  def overflow_probability(self) -> float:
    """A rigorous bound on P(a draw exceeds `max_batch_size`) per logical step, for this data
    and for a neighbouring dataset with one more example (0 if no draw can exceed it)."""
    return binomial_tail_bound(self._num_examples + 1, self._q, self._capacity)

  @property
  def steps_per_epoch(self) -> int:
    """Logical steps per epoch, by convention max(1, round(1 / q))."""
    return max(1, int(round(1.0 / self._q)))

  def get_config(self) -> Dict[str, Any]:
    """The settings (not the data): `PoissonSampler.from_config(config, data)` rebuilds it."""
    return dict(sampling_probability=self._q, seed=self._seed,
                gradient_accumulation_steps=self._accumulation,
                max_batch_size=self._max_batch_size,
                overflow_probability=self._requested_overflow,
                num_examples=self._num_examples)

  def _logical_capacity(self) -> int:
    return self._capacity

  def _spec_kwargs(self):
    return dict(sampling="poisson", sampling_probability=self._q)

  def _padded_indices(self, step):
    n, capacity = self._num_examples, self._capacity
    uniform = tf.random.stateless_uniform([n], seed=self._step_seed(step), dtype=tf.float64)
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


class ShuffleSampler(_Sampler):
  """Shuffled fixed-size batches: each pass a fresh permutation keyed by (seed, pass), cut into
  `N // batch_size` disjoint batches (the remainder is left out of that pass). Accounted as
  shuffling (no Poisson amplification). A logical batch of `batch_size` examples is split into K
  physical batches of ceil(batch_size / K) rows; only when K does not divide batch_size is there
  padding (weight 0), at the end of the last physical batch."""

  sampling = "shuffle"

  def __init__(self, data, batch_size: int, *, seed: Optional[int],
               gradient_accumulation_steps: int = 1):
    _validate.positive_int("batch_size", batch_size)
    super().__init__(data, seed, gradient_accumulation_steps)
    if batch_size > self._num_examples:
      raise ValueError(f"Expected batch_size <= num_examples. Received: batch_size={batch_size}, "
                       f"num_examples={self._num_examples}.")
    self._batch_size = batch_size

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def expected_batch_size(self) -> float:
    """The fixed batch size: the optimizer's `expected_batch_size` (padding is not counted)."""
    return float(self._batch_size)

  @property
  def steps_per_epoch(self) -> int:
    """Logical steps per pass: N // batch_size."""
    return self._num_examples // self._batch_size

  def get_config(self) -> Dict[str, Any]:
    return dict(batch_size=self._batch_size, seed=self._seed,
                gradient_accumulation_steps=self._accumulation,
                num_examples=self._num_examples)

  def _logical_capacity(self) -> int:
    return self._batch_size

  def _spec_kwargs(self):
    return dict(sampling="shuffle", batch_size=self._batch_size, num_examples=self._num_examples)

  def _pass_batches(self, epoch):
    """The permutation of pass `epoch`, as [steps_per_epoch, batch_size] example indices."""
    uniform = tf.random.stateless_uniform([self._num_examples], seed=self._step_seed(epoch),
                                          dtype=tf.float64)
    permutation = tf.argsort(uniform, stable=True)
    used = self.steps_per_epoch * self._batch_size
    return tf.reshape(tf.cast(permutation[:used], tf.int64),
                      [self.steps_per_epoch, self._batch_size])

  def _pad(self, batch):
    extra = self.physical_batch_size * self._accumulation - self._batch_size
    return tf.concat([batch, tf.fill([extra], tf.constant(self._num_examples, tf.int64))], 0)

  def _padded_indices(self, step):
    per_pass = self.steps_per_epoch
    return self._pad(self._pass_batches(step // per_pass)[step % per_pass])

  def _logical_indices_dataset(self, start_step):
    per_pass = self.steps_per_epoch
    passes = tf.data.Dataset.counter(start_step // per_pass, dtype=tf.int64)
    batches = passes.flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(self._pass_batches(epoch)))
    return batches.skip(start_step % per_pass).map(self._pad)


def make_sampler(data, *, sampling: str, seed: Optional[int],
                 sampling_probability: Optional[float] = None, batch_size: Optional[int] = None,
                 gradient_accumulation_steps: int = 1, **poisson_kwargs) -> _Sampler:
  """`PoissonSampler` for sampling="poisson" (needs sampling_probability), `ShuffleSampler` for
  sampling="shuffle" (needs batch_size): the one switch between them, e.g. for a flag."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"Expected sampling in {list(SAMPLINGS)}. Received: sampling={sampling!r}.")
  if sampling == "poisson":
    if batch_size is not None:
      raise ValueError("Expected batch_size=None with sampling='poisson' (pass "
                       f"sampling_probability=batch_size / N). Received: batch_size={batch_size}.")
    return PoissonSampler(data, sampling_probability, seed=seed,
                          gradient_accumulation_steps=gradient_accumulation_steps,
                          **poisson_kwargs)
  if sampling_probability is not None or poisson_kwargs:
    raise ValueError("Expected only batch_size with sampling='shuffle'. Received: "
                     f"sampling_probability={sampling_probability!r}, {poisson_kwargs}.")
  return ShuffleSampler(data, batch_size, seed=seed,
                        gradient_accumulation_steps=gradient_accumulation_steps)


def _to_tensors(data):
  """(x, y) with N rows each, as tensors; a tf.data.Dataset of single (x, y) is read once."""
  if isinstance(data, tf.data.Dataset):
    if data.cardinality() == tf.data.INFINITE_CARDINALITY:
      raise ValueError("Expected a finite tf.data.Dataset of single (x, y) examples. Received "
                       "an infinite one (remove `repeat()`).")
    data = data.batch(2**31 - 1).get_single_element()
  if not (isinstance(data, (tuple, list)) and len(data) == 2):
    raise ValueError("Expected data=(x, y) (arrays or nests of arrays with one row per example). "
                     f"Received: {type(data).__name__}"
                     f"{' of length ' + str(len(data)) if isinstance(data, (tuple, list)) else ''}"
                     ". Sample weights are the sampler's: it sets 1 on examples, 0 on padding.")
  tensors = tf.nest.map_structure(tf.convert_to_tensor, tuple(data))
  rows = {int(t.shape[0]) if t.shape.rank else None for t in tf.nest.flatten(tensors)}
  if len(rows) != 1 or None in rows:
    raise ValueError(f"Expected every array of (x, y) to have the same number of rows. Received "
                     f"row counts {sorted(r for r in rows if r is not None)} "
                     f"{'and a scalar' if None in rows else ''}.")
  return tensors
