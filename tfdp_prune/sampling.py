"""Batch sampling for DP training with `model.fit`: Poisson sampling, or shuffling as a choice.

`PoissonSampler` (fixed-shape padded batches, accounted as Poisson) and `ShuffleSampler`
(disjoint batches, accounted without amplification); `make_sampler` by name, for every scheme
of `sampling_schemes` (whose draws these samplers run). The sampling secret comes from OS
entropy and lives only in memory and checkpoints.

Design: docs/sampling-and-accounting.md
"""

import contextlib
import hashlib
from typing import Any, Dict, Optional

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import accounting
from tfdp_prune import randomness
from tfdp_prune.compat import tf
from tfdp_prune.sampling_schemes import base as schemes_base
from tfdp_prune.sampling_schemes import poisson
from tfdp_prune.sampling_schemes import registry as schemes
from tfdp_prune.sampling_schemes import shuffle
from tfdp_prune.sampling_schemes.base import step_uniform
from tfdp_prune.sampling_schemes.poisson import DEFAULT_OVERFLOW_PROBABILITY
from tfdp_prune.sampling_schemes.poisson import binomial_tail_bound
from tfdp_prune.sampling_schemes.poisson import poisson_batch_cap

__all__ = ["DEFAULT_OVERFLOW_PROBABILITY", "SAMPLINGS", "SECRET_WORDS", "PoissonSampler",
           "SamplerState", "SchemeSampler", "ShuffleSampler", "binomial_tail_bound",
           "make_sampler", "poisson_batch_cap", "step_uniform"]

SAMPLINGS = accounting.SAMPLINGS
SECRET_WORDS = 2  # the sampler's secret: 2 x 64 = 128 bits
_REMOVED = object()  # the default of the removed `seed` argument


class _Sampler:
  """What every sampler shares: the data in memory, the secret, the padded gather and the
  dataset. Which rows each logical step takes is its scheme's `Draw` (`sampling_schemes`)."""

  def __init__(self, data, draw: schemes_base.Draw, gradient_accumulation_steps,
               insecure_sampling_seed, strategy, seed):
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
    draw.bind(self._num_examples, self._accumulation)
    self._draw = draw

  @property
  def sampling(self) -> str:
    """The scheme's name ("poisson", "shuffle", ...), as in accounting.PrivacySpec."""
    return self._draw.scheme.name

  @property
  def scheme(self) -> schemes_base.SamplingScheme:
    return self._draw.scheme

  @property
  def draw(self) -> schemes_base.Draw:
    """The scheme's half of the sampler: which rows each logical step takes, its settings."""
    return self._draw

  @property
  def expected_batch_size(self) -> float:
    """The optimizer's `expected_batch_size` (padding is not counted)."""
    return self._draw.expected_batch_size

  @property
  def steps_per_epoch(self) -> int:
    """Logical steps per epoch (the scheme's convention)."""
    return self._draw.steps_per_epoch

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
    return self._draw.physical_batch_size

  @property
  def physical_steps_per_epoch(self) -> int:
    """Dataset elements per epoch: what to pass to `model.fit(steps_per_epoch=...)`."""
    return self.steps_per_epoch * self._accumulation

  def indices(self, step: int) -> np.ndarray:
    """The example indices (int64, ascending for Poisson) of logical step `step`."""
    _validate.non_negative_int("step", step)
    padded = self._draw.padded_indices(tf.constant(step, tf.int64),
                                       self._state.secret_tensor()).numpy()
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

    dataset = self._draw.logical_indices_dataset(start_step, secret).map(
        physical_batches).unbatch()
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

  def get_config(self) -> Dict[str, Any]:
    """The settings (not the data): `type(sampler).from_config(config, data)` rebuilds it."""
    common = dict(gradient_accumulation_steps=self._accumulation, num_examples=self._num_examples)
    return dict(**self._draw.config(common), **self._randomness_config())

  def privacy_spec(self, noise_multiplier: float, steps: int, delta: float,
                   accountant: str = "pld", **kwargs) -> accounting.PrivacySpec:
    """The `accounting.PrivacySpec` of `steps` LOGICAL steps of this sampler: the sampling
    settings come from the sampler, so the accounting cannot disagree with the sampling."""
    return accounting.PrivacySpec(noise_multiplier=noise_multiplier, steps=steps, delta=delta,
                                  accountant=accountant, **self._draw.spec_kwargs(), **kwargs)

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


def _initial_secret(insecure_seed):
  """Two 64-bit words: OS entropy, or (INSECURE) a SHA-256 of the seed."""
  if insecure_seed is None:
    return randomness.os_entropy_words(SECRET_WORDS)
  digest = hashlib.sha256(f"tfdp_prune.sampling:{insecure_seed}".encode()).digest()
  return [int.from_bytes(digest[8 * i:8 * i + 8], "little") for i in range(SECRET_WORDS)]


class PoissonSampler(_Sampler):
  """Poisson sampling with rate q, padded to a fixed physical shape (see the module docstring);
  `expected_batch_size` is q * N, `steps_per_epoch` by convention max(1, round(1 / q)).

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

  sampling = poisson.SCHEME.name

  def __init__(self, data, sampling_probability: float, *, gradient_accumulation_steps: int = 1,
               max_batch_size: Optional[int] = None,
               overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
               insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED):
    draw = poisson.PoissonDraw(sampling_probability, max_batch_size=max_batch_size,
                               overflow_probability=overflow_probability)
    super().__init__(data, draw, gradient_accumulation_steps, insecure_sampling_seed, strategy,
                     seed)

  @property
  def sampling_probability(self) -> float:
    return self._draw.sampling_probability

  @property
  def max_batch_size(self) -> int:
    """The largest logical batch the padded shape holds (K * physical_batch_size)."""
    return self._draw.max_batch_size

  @property
  def overflow_probability(self) -> float:
    """A rigorous bound on P(a draw exceeds `max_batch_size`) per logical step, for this data
    and for a neighbouring dataset with one more example (0 if no draw can exceed it)."""
    return self._draw.overflow_probability


class ShuffleSampler(_Sampler):
  """Shuffled fixed-size batches: each pass a fresh permutation drawn from (secret, pass), cut
  into `N // batch_size` disjoint batches (the remainder is left out of that pass). Accounted as
  shuffling (no Poisson amplification), for exactly this sampler (see the module docstring). A
  logical batch of `batch_size` examples is split into K physical batches of
  ceil(batch_size / K) rows; only when K does not divide batch_size is there padding (weight 0),
  at the end of the last physical batch. `insecure_sampling_seed`, `strategy` and the removed
  `seed` are as in `PoissonSampler`. `expected_batch_size` is batch_size, `steps_per_epoch`
  N // batch_size (logical steps per pass)."""

  sampling = shuffle.SCHEME.name

  def __init__(self, data, batch_size: int, *, gradient_accumulation_steps: int = 1,
               insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED):
    super().__init__(data, shuffle.ShuffleDraw(batch_size), gradient_accumulation_steps,
                     insecure_sampling_seed, strategy, seed)

  @property
  def batch_size(self) -> int:
    return self._draw.batch_size


class SchemeSampler(_Sampler):
  """The sampler of a registered scheme without a class of its own (`make_sampler` builds it):
  its settings are its `Draw`'s (`sampler.draw`).

  Args:
    data: as in `PoissonSampler`.
    sampling: the scheme's name (`sampling_schemes.registry.names()`).
    gradient_accumulation_steps, insecure_sampling_seed, strategy, seed: as in `PoissonSampler`.
    **settings: the keyword arguments of the scheme's `draw_class`.
  """

  def __init__(self, data, sampling: str, *, gradient_accumulation_steps: int = 1,
               insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED,
               **settings):
    _validate.one_of("sampling", sampling, schemes.names())
    super().__init__(data, schemes.get(sampling).draw_class(**settings),
                     gradient_accumulation_steps, insecure_sampling_seed, strategy, seed)

  def get_config(self) -> Dict[str, Any]:
    return dict(sampling=self.sampling, **super().get_config())


# The classes that `make_sampler` returns for the built-in schemes (part of the public API);
# any other registered scheme gets a `SchemeSampler`.
_CLASSES = {PoissonSampler.sampling: PoissonSampler, ShuffleSampler.sampling: ShuffleSampler}


def make_sampler(data, *, sampling: str, sampling_probability: Optional[float] = None,
                 batch_size: Optional[int] = None, gradient_accumulation_steps: int = 1,
                 insecure_sampling_seed: Optional[int] = None, strategy=None, seed=_REMOVED,
                 **poisson_kwargs) -> _Sampler:
  """The sampler of the scheme named `sampling`: `PoissonSampler` for sampling="poisson" (needs
  sampling_probability), `ShuffleSampler` for sampling="shuffle" (needs batch_size), a
  `SchemeSampler` for a registered scheme (the arguments it takes): the one switch between them,
  e.g. for a flag. `insecure_sampling_seed` and `strategy` are passed on (see `PoissonSampler`)."""
  if seed is not _REMOVED:
    raise randomness.removed_seed_error("make_sampler", "insecure_sampling_seed")
  common = dict(gradient_accumulation_steps=gradient_accumulation_steps,
                insecure_sampling_seed=insecure_sampling_seed, strategy=strategy)
  _validate.one_of("sampling", sampling, schemes.names())
  settings = schemes.get(sampling).make_sampler_arguments(sampling_probability, batch_size,
                                                          poisson_kwargs)
  if sampling in _CLASSES:
    return _CLASSES[sampling](data, **settings, **common)
  return SchemeSampler(data, sampling, **settings, **common)

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
