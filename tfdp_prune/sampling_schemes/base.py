"""What a sampling scheme is: `SamplingScheme` (its accounting, statement and agreement checks)
and `Draw` (which rows each logical step of its sampler takes).

Design: docs/sampling-and-accounting.md, "Adding a sampling scheme".
"""

from typing import Any, Dict, List, Optional, Tuple

from dp_accounting import dp_event

from tfdp_prune.compat import tf

# The neighbouring relations an epsilon can hold under (`PrivacySpec.adjacency`).
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"
ADJACENCIES = (ADD_OR_REMOVE_ONE, REPLACE_ONE)
_PHILOX = 1  # tf.random.Algorithm.PHILOX.value, for the raw stateless ops


class SamplingScheme:
  """One way of drawing logical batches, and everything that depends on it.

  A scheme is a stateless object: `PrivacySpec(sampling=<name>)` asks it for the validation of
  its fields, its adjacency, its DpEvent, its statement; `agreement` asks it what the optimizer
  and the sampler must agree on; `sampling.make_sampler(sampling=<name>)` asks it for the
  `Draw` of its sampler. Register one with `registry.register_sampling_scheme`.

  Attributes:
    name: the value of `PrivacySpec.sampling`, `TrainConfig.sampling` and `--sampling`.
    flag_help: a few words for `--sampling`'s help, starting with the name.
    adjacency: ADD_OR_REMOVE_ONE or REPLACE_ONE: the relation its epsilon holds under.
    pld_steps_compose: True when the run's PLD is the one-step PLD of `pld_step` composed
      `spec.steps` times, which `_pld.epsilon` computes without the PLD accountant (fast).
  """

  name: str = ""
  flag_help: str = ""
  adjacency: str = ADD_OR_REMOVE_ONE
  pld_steps_compose: bool = False

  # ---- accounting (PrivacySpec) -----------------------------------------------------------

  def validate(self, spec) -> None:
    """Raises ValueError if the scheme's fields of `spec` (sampling_probability, batch_size,
    num_examples, overflow_probability) are invalid for this scheme."""
    raise NotImplementedError

  def passes(self, spec) -> Optional[int]:
    """The passes over the data that the accounting counts, or None if it counts none."""
    return None

  def dp_event(self, spec) -> dp_event.DpEvent:
    """The dp_accounting event of `spec.steps` > 0 steps."""
    raise NotImplementedError

  def pld_step(self, spec) -> Tuple[float, float]:
    """(std, q): the Poisson-sampled Gaussian whose PLD the PLD accountant builds for `spec`
    (q = 1: no sampling); its size decides whether the PLD can be computed at all."""
    raise NotImplementedError

  def statement(self, spec, common: str) -> str:
    """One sentence saying what the epsilon means; `common` lists sigma, steps, delta and the
    accountant."""
    raise NotImplementedError

  def rate_text(self, spec) -> str:
    """The sampling's parameters for a message: " at rate 0.01", " of batches of ..."."""
    raise NotImplementedError

  def describe_spec(self, spec) -> str:
    """How `spec` draws its batches, for a disagreement message."""
    raise NotImplementedError

  # ---- agreement (sampler, optimizer, spec) -----------------------------------------------

  def describe_sampler(self, sampler) -> str:
    """How `sampler` (of this scheme) draws its batches, for a disagreement message."""
    raise NotImplementedError

  def padding_rows(self, sampler) -> Optional[int]:
    """Padding rows in every logical batch of `sampler`, or None if their number varies."""
    raise NotImplementedError

  def microbatch_problems(self, num_microbatches: int, sampler,
                          padding: Optional[int]) -> List[str]:
    """Why `num_microbatches` (not None, not one row each) cannot group `sampler`'s rows; []
    when the rows' grouping is fixed (then the physical batch size must still divide)."""
    raise NotImplementedError

  def spec_and_optimizer_problems(self, spec, optimizer, num_examples: Optional[int],
                                  check_microbatches: bool) -> List[str]:
    """What in `optimizer` (its expected batch size, its microbatches) disagrees with `spec`."""
    raise NotImplementedError

  def sampler_and_spec_problems(self, sampler, spec) -> List[str]:
    """What in `sampler` disagrees with `spec`; both are of this scheme."""
    raise NotImplementedError

  # ---- the sampler -------------------------------------------------------------------------

  draw_class: type  # its `Draw`, built from the sampler's settings (keyword arguments)

  def make_sampler_arguments(self, sampling_probability: Optional[float],
                             batch_size: Optional[int], extra: Dict[str, Any]) -> Dict[str, Any]:
    """The settings of its sampler from `sampling.make_sampler`'s arguments; raises ValueError
    for an argument the scheme does not take."""
    raise NotImplementedError

  def sampler_arguments(self, batch_size: int, num_examples: int) -> Dict[str, Any]:
    """`make_sampler`'s arguments for logical batches of (expected) size `batch_size` from
    `num_examples` examples (`tfdp-train --batch_size`)."""
    raise NotImplementedError


class Draw:
  """The scheme-specific half of a sampler: which rows each logical step takes.

  Built from the scheme's settings (validated then), bound once to the data (`bind`), then a
  pure function of (secret, logical step). The sampler (`sampling._Sampler`) holds the data, the
  secret and the dataset, and asks its draw.
  """

  scheme: SamplingScheme

  def bind(self, num_examples: int, accumulation: int) -> None:
    """Fixes the number of examples N and of physical batches per logical batch K."""
    self._num_examples = num_examples
    self._accumulation = accumulation

  @property
  def num_examples(self) -> int:
    return self._num_examples

  def logical_capacity(self) -> int:
    """The most rows a logical batch can hold (before rounding up to a multiple of K)."""
    raise NotImplementedError

  @property
  def physical_batch_size(self) -> int:
    return -(-self.logical_capacity() // self._accumulation)

  @property
  def expected_batch_size(self) -> float:
    raise NotImplementedError

  @property
  def steps_per_epoch(self) -> int:
    raise NotImplementedError

  def config(self, common: Dict[str, Any]) -> Dict[str, Any]:
    """The sampler's `get_config()` but its randomness: the draw's settings and `common`
    (gradient_accumulation_steps, num_examples), in the order the scheme lists them."""
    raise NotImplementedError

  def spec_kwargs(self) -> Dict[str, Any]:
    """The `PrivacySpec` fields of this draw (sampling and its parameters)."""
    raise NotImplementedError

  def padded_indices(self, step, secret) -> tf.Tensor:
    """Logical step -> int64 indices of length K * physical_batch_size; index N is padding."""
    raise NotImplementedError

  def logical_indices_dataset(self, start_step: int, secret) -> tf.data.Dataset:
    """The padded indices of every logical step from `start_step` on."""
    return tf.data.Dataset.counter(start_step, dtype=tf.int64).map(
        lambda step: self.padded_indices(step, secret))


def step_uniform(secret, step, size) -> tf.Tensor:
  """`size` float64 uniforms in [0, 1) for `step`, a pure function of (secret, step).

  Philox4x32-10 keyed by all 128 secret bits derives the step's own key and counter, which then
  key the draws (see docs/sampling-and-accounting.md, "The secret"):
  (key_s, c_s) = Philox_{secret[0]}(s, secret[1]); uniforms = Philox_{key_s}(0.., c_s).
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
