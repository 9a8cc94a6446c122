"""Batch sampling for DP training with `model.fit`: Poisson sampling, or shuffling as a choice.

`PoissonSampler` (fixed-shape padded batches, accounted as Poisson) and `ShuffleSampler`
(disjoint batches, accounted without amplification); `make_sampler` by name. The sampling
secret comes from OS entropy and lives only in memory and checkpoints.

Design: docs/sampling-and-accounting.md
"""

import contextlib
import hashlib
import math
from typing import Any, Dict, Optional

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import accounting
from tfdp_prune import randomness
from tfdp_prune.compat import tf

SAMPLINGS = accounting.SAMPLINGS
DEFAULT_OVERFLOW_PROBABILITY = 1e-15
SECRET_WORDS = 2  # the sampler's secret: 2 x 64 = 128 bits
_PHILOX = 1  # tf.random.Algorithm.PHILOX.value, for the raw stateless ops
_REMOVED = object()  # the default of the removed `seed` argument


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

  def __init__(self, data, gradient_accumulation_steps, insecure_sampling_seed, strategy, seed):
    if seed is not _REMOVED:
      raise randomness.removed_seed_error(type(self).__name__, "insecure_sampling_seed")
    _validate.positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    self._insecure_seed = randomness.check_insecure_seed("insecure_sampling_seed",
                                                         insecure_sampling_seed)
    if self._insecure_seed is not None:
      randomness.warn_insecure("the sampling of the batches", "insecure_sampling_seed",
                               stacklevel=4)
    self._accumulation = gradient_accumulation_steps
    self._data = _to_tensors(data)
    self._num_examples = int(tf.shape(tf.nest.flatten(self._data)[0])[0])
    if self._num_examples < 1:
      raise ValueError("Expected at least one example. Received: 0 examples.")
    # One all-zero row after the last example: the padding row (index N), data-independent.
    self._padded_data = tf.nest.map_structure(
        lambda t: tf.concat([t, tf.zeros([1] + t.shape[1:].as_list(), t.dtype)], axis=0),
        self._data)
    self._state = SamplerState(_initial_secret(self._insecure_seed), strategy)

  @property
  def mechanism_randomness(self) -> str:
    """Where the draws come from: "os_entropy", or "insecure_seed" (reproducible)."""
    return randomness.source(self._insecure_seed)

  @property
  def state(self) -> "SamplerState":
    """The trackable that holds the secret: checkpoint it with the run (`DPCheckpoint` does,
    `restore_latest` restores it) so that a resumed run continues the same draws. Never
    publish it."""
    return self._state

  @property
  def num_examples(self) -> int:
    return self._num_examples

  @property
  def data(self):
    """The private (x, y) the sampler draws from, as tensors (e.g. for an overlap check)."""
    return self._data

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
    padded = self._padded_indices(tf.constant(step, tf.int64), self._state.secret_tensor()).numpy()
    return padded[padded < self._num_examples]

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """The infinite stream of physical batches (x, y, sample_weight) from logical step
    `start_step` on: `gradient_accumulation_steps` elements per logical step, each of static
    batch size `physical_batch_size`; real rows have weight 1, padding rows weight 0."""
    _validate.non_negative_int("start_step", start_step)
    batch, accumulation = self.physical_batch_size, self._accumulation
    secret = self._state.secret_tensor()  # read now: a restored secret is in place by then

    def physical_batches(indices):
      sample_weight = tf.cast(indices < self._num_examples, tf.float32)
      x, y = tf.nest.map_structure(lambda t: tf.gather(t, indices), self._padded_data)
      split = lambda t: tf.reshape(t, [accumulation, batch] + t.shape[1:].as_list())
      return tf.nest.map_structure(split, (x, y, sample_weight))

    dataset = self._logical_indices_dataset(start_step, secret).map(physical_batches).unbatch()
    return dataset.prefetch(2)

  @classmethod
  def from_config(cls, config: Dict[str, Any], data, strategy=None):
    """Rebuilds a sampler from `get_config()` (the settings) and the same data. The secret is
    not part of the settings: a new one is drawn; `restore_latest` puts a checkpointed one
    back."""
    config = dict(config)
    num_examples = config.pop("num_examples", None)
    sampler = cls(data, **config, strategy=strategy)
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

  def _padded_indices(self, step, secret):
    """Logical step -> int64 indices of length K * B; index N is the padding row."""
    raise NotImplementedError

  def _logical_indices_dataset(self, start_step, secret):
    return tf.data.Dataset.counter(start_step, dtype=tf.int64).map(
        lambda step: self._padded_indices(step, secret))

  def _logical_capacity(self) -> int:
    raise NotImplementedError

  def _spec_kwargs(self) -> Dict[str, Any]:
    raise NotImplementedError

  def _randomness_config(self) -> Dict[str, Any]:
    return {"insecure_sampling_seed": self._insecure_seed}


class SamplerState(tf.Module):
  """A sampler's secret: 128 bits as a tf.Variable of two int64 words (`secret`).

  Created under `strategy.scope()` when a strategy is given (else in the current scope), so
  that under MultiWorkerMirroredStrategy the variable's initial value, hence the secret, is the
  chief's on every worker (the strategy broadcasts initial values at creation). Checkpointed as
  any trackable; `secret_tensor()` reads the current value (a restored one after a restore).
  """

  def __init__(self, words, strategy=None):
    super().__init__(name="sampler_state")
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
      self.secret = tf.Variable(np.array(words, dtype=np.uint64).view(np.int64),
                                trainable=False, name="sampler_secret")

  def secret_tensor(self) -> tf.Tensor:
    """The secret's current value as a constant int64 [2] tensor."""
    return tf.constant(self.secret.numpy())


def step_uniform(secret, step, size) -> tf.Tensor:
  """`size` float64 uniforms in [0, 1) for `step`, a pure function of (secret, step).

  Philox4x32-10 keyed by all 128 secret bits derives the step's own key and counter, which then
  key the draws (see the module docstring): (key_s, c_s) = Philox_{secret[0]}(s, secret[1]);
  uniforms = Philox_{key_s}(0.., c_s).
  """
  secret = tf.bitcast(tf.convert_to_tensor(secret, tf.int64), tf.uint64)
  step = tf.bitcast(tf.cast(step, tf.int64), tf.uint64)
  derived = tf.raw_ops.StatelessRandomUniformFullIntV2(
      shape=[2], key=secret[:1], counter=tf.stack([step, secret[1]]),
      alg=tf.constant(_PHILOX, tf.int32), dtype=tf.uint64)
  return tf.raw_ops.StatelessRandomUniformV2(
      shape=tf.reshape(tf.cast(size, tf.int64), [1]), key=derived[:1],
      counter=tf.stack([tf.constant(0, tf.uint64), derived[1]]),
      alg=tf.constant(_PHILOX, tf.int32), dtype=tf.float64)


def _initial_secret(insecure_seed):
  """Two 64-bit words: OS entropy, or (INSECURE) a SHA-256 of the seed."""
  if insecure_seed is None:
    return randomness.os_entropy_words(SECRET_WORDS)
  digest = hashlib.sha256(f"tfdp_prune.sampling:{insecure_seed}".encode()).digest()
  return [int.from_bytes(digest[8 * i:8 * i + 8], "little") for i in range(SECRET_WORDS)]


class PoissonSampler(_Sampler):
  """Poisson sampling with rate q, padded to a fixed physical shape (see the module docstring).

  Args:
    data: (x, y) arrays or nests of arrays with N rows, or a finite tf.data.Dataset of (x, y).
    sampling_probability: q in (0, 1].
    gradient_accumulation_steps: K, physical batches per logical batch (the optimizer's own).
    max_batch_size: the logical cap; None (default) derives it from `overflow_probability`. It
      is rounded up to a multiple of K (the capacity K * physical_batch_size). Any cap is
      allowed: its overflow bound goes into the reported delta (see the module docstring).
    overflow_probability: the per-step probability bound for a draw above the cap, in (0, 1).
      A draw above the capacity raises; examples are never dropped.
    insecure_sampling_seed: None (default): a 128-bit secret from OS entropy keys the draws.
      An integer derives it from that seed instead: reproducible, INSECURE; tests only.
    strategy: the tf.distribute strategy the run uses (None: the current one). Under
      MultiWorkerMirroredStrategy, pass it (or build the sampler in its scope), so that every
      worker draws the same batches.
    seed: removed (raises a TypeError that says what to use).
  """

  sampling = "poisson"

  def __init__(self, data, sampling_probability: float, *, gradient_accumulation_steps: int = 1,
               max_batch_size: Optional[int] = None,
               overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
               insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED):
    _validate.probability("sampling_probability", sampling_probability)
    _validate.open_unit_interval("overflow_probability", overflow_probability)
    if max_batch_size is not None:
      _validate.positive_int("max_batch_size", max_batch_size)
    super().__init__(data, gradient_accumulation_steps, insecure_sampling_seed, strategy, seed)
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
    return dict(sampling_probability=self._q,
                gradient_accumulation_steps=self._accumulation,
                max_batch_size=self._max_batch_size,
                overflow_probability=self._requested_overflow,
                num_examples=self._num_examples, **self._randomness_config())

  def _logical_capacity(self) -> int:
    return self._capacity

  def _spec_kwargs(self):
    return dict(sampling="poisson", sampling_probability=self._q,
                overflow_probability=self.overflow_probability)

  def _padded_indices(self, step, secret):
    n, capacity = self._num_examples, self._capacity
    uniform = step_uniform(secret, step, n)
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
  """Shuffled fixed-size batches: each pass a fresh permutation drawn from (secret, pass), cut
  into `N // batch_size` disjoint batches (the remainder is left out of that pass). Accounted as
  shuffling (no Poisson amplification), for exactly this sampler (see the module docstring). A
  logical batch of `batch_size` examples is split into K physical batches of
  ceil(batch_size / K) rows; only when K does not divide batch_size is there padding (weight 0),
  at the end of the last physical batch. `insecure_sampling_seed`, `strategy` and the removed
  `seed` are as in `PoissonSampler`."""

  sampling = "shuffle"

  def __init__(self, data, batch_size: int, *, gradient_accumulation_steps: int = 1,
               insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED):
    _validate.positive_int("batch_size", batch_size)
    super().__init__(data, gradient_accumulation_steps, insecure_sampling_seed, strategy, seed)
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
    return dict(batch_size=self._batch_size, gradient_accumulation_steps=self._accumulation,
                num_examples=self._num_examples, **self._randomness_config())

  def _logical_capacity(self) -> int:
    return self._batch_size

  def _spec_kwargs(self):
    return dict(sampling="shuffle", batch_size=self._batch_size, num_examples=self._num_examples)

  def _pass_batches(self, epoch, secret):
    """The permutation of pass `epoch`, as [steps_per_epoch, batch_size] example indices."""
    uniform = step_uniform(secret, epoch, self._num_examples)
    permutation = tf.argsort(uniform, stable=True)
    used = self.steps_per_epoch * self._batch_size
    return tf.reshape(tf.cast(permutation[:used], tf.int64),
                      [self.steps_per_epoch, self._batch_size])

  def _pad(self, batch):
    extra = self.physical_batch_size * self._accumulation - self._batch_size
    return tf.concat([batch, tf.fill([extra], tf.constant(self._num_examples, tf.int64))], 0)

  def _padded_indices(self, step, secret):
    per_pass = self.steps_per_epoch
    return self._pad(self._pass_batches(step // per_pass, secret)[step % per_pass])

  def _logical_indices_dataset(self, start_step, secret):
    per_pass = self.steps_per_epoch
    passes = tf.data.Dataset.counter(start_step // per_pass, dtype=tf.int64)
    batches = passes.flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(self._pass_batches(epoch, secret)))
    return batches.skip(start_step % per_pass).map(self._pad)


def make_sampler(data, *, sampling: str, sampling_probability: Optional[float] = None,
                 batch_size: Optional[int] = None, gradient_accumulation_steps: int = 1,
                 insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED,
                 **poisson_kwargs) -> _Sampler:
  """`PoissonSampler` for sampling="poisson" (needs sampling_probability), `ShuffleSampler` for
  sampling="shuffle" (needs batch_size): the one switch between them, e.g. for a flag.
  `insecure_sampling_seed` and `strategy` are passed on (see `PoissonSampler`)."""
  if seed is not _REMOVED:
    raise randomness.removed_seed_error("make_sampler", "insecure_sampling_seed")
  common = dict(gradient_accumulation_steps=gradient_accumulation_steps,
                insecure_sampling_seed=insecure_sampling_seed, strategy=strategy)
  _validate.one_of("sampling", sampling, SAMPLINGS)
  if sampling == "poisson":
    if batch_size is not None:
      raise ValueError("Expected batch_size=None with sampling='poisson' (pass "
                       f"sampling_probability=batch_size / N). Received: batch_size={batch_size}.")
    return PoissonSampler(data, sampling_probability, **common, **poisson_kwargs)
  if sampling_probability is not None or poisson_kwargs:
    raise ValueError("Expected only batch_size with sampling='shuffle'. Received: "
                     f"sampling_probability={sampling_probability!r}, {poisson_kwargs}.")
  return ShuffleSampler(data, batch_size, **common)


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
