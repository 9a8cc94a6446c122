"""The stages of one DP step, in the order they run (DESIGN.md, "One training step"):

  1. per_example_clipped_sum  (train step)  masked, clipped, summed per-example gradients
  2. accumulate               (optimizer)   add them to this replica's logical-batch sums
  3. noisy_sum_at_end         (optimizer)   + N(0, (sigma C)^2 / R) on updated coordinates
  4. scale                    (optimizer)   / the expected (or actual) logical batch size,
                                            then all-reduce SUM over the R replicas
  5. masked apply             (optimizer)   the base optimizer's update
  6. keep_frozen              (optimizer)   frozen coordinates and slots put back bit for bit

Each stage is a small function of tensors (2 and the accumulator reset write variables);
`optimizer.DPOptimizerMixin.apply_clipped_sum` runs stages 2 to 6 in that order.
"""

import math
from typing import Optional, Sequence

from tfdp_prune import branching
from tfdp_prune import noise
from tfdp_prune.compat import tf


# ---- 1. per-example clipped sum -----------------------------------------------------------------

def per_example_clipped_sum(model, loss_fn, x, y, sample_weight: tf.Tensor,
                            variables: Sequence[tf.Variable], masks: Sequence[tf.Tensor],
                            settings):
  """The engine's clipped sum of one physical batch with the settings' clipping unit: the
  engine's `per_example.EngineOutput` (clipped sum, per-example losses, predictions).

  `settings` is a `dp_settings.DPSettings`. `num_microbatches` equal to the batch's number of
  rows is per-example clipping, and gets the engine's per-example path (the fast one): decided
  at trace time for a static batch size, by a `cond` on the rows otherwise. Real microbatches
  (several rows each) group consecutive rows, which only keeps examples apart in fixed-size
  batches without padding: a batch with padding rows (sample weight 0, e.g. Poisson-sampled) is
  refused when it runs, before any update.
  """
  microbatches = settings.num_microbatches

  def run(num_microbatches, weights=sample_weight):
    return settings.per_example_engine.clipped_sum(
        model, loss_fn, x, y, weights, variables, masks, settings.l2_norm_clip,
        num_microbatches)

  def grouped():
    no_padding = tf.debugging.Assert(tf.reduce_all(tf.not_equal(sample_weight, 0)), [
        f"num_microbatches={microbatches} groups consecutive rows into clipping units, and this "
        "batch has padding rows (sample weight 0), as Poisson-sampled batches do: one more "
        "example would shift every later row into another microbatch, which per-microbatch "
        "clipping does not bound. Use num_microbatches=None (per-example clipping), or feed "
        "fixed-size batches without padding."])
    with tf.control_dependencies([no_padding]):
      return run(microbatches, tf.identity(sample_weight))

  if not microbatches:
    return run(None)
  rows = tf.compat.dimension_value(tf.nest.flatten(x)[0].shape[0])
  if rows == microbatches:
    return run(None)  # one row per microbatch: per-example clipping
  if rows is None:
    return tf.cond(tf.equal(tf.shape(sample_weight)[0], microbatches), lambda: run(None),
                   grouped)
  return grouped()


# ---- 2. accumulate ------------------------------------------------------------------------------

def accumulate(accumulators: Sequence[tf.Variable], grads: Sequence[tf.Tensor],
               unit_count: tf.Variable, num_units) -> None:
  """Adds one physical batch's clipped sums to `accumulators`, and its clipping units (padding
  included) to `unit_count`: replica-local variables that sum over one logical batch."""
  for accumulator, grad in zip(accumulators, grads):
    accumulator.assign_add(grad)
  unit_count.assign_add(tf.cast(num_units, tf.float32))


def reset_at_end(at_end, accumulators: Sequence[tf.Variable],
                 accumulated: Sequence[tf.Tensor], unit_count: tf.Variable) -> None:
  """At a logical batch's end (`at_end`), zeroes the accumulators (whose values before this
  call are `accumulated`) and the unit count; otherwise leaves them as they are."""
  for accumulator, value in zip(accumulators, accumulated):
    accumulator.assign(tf.where(at_end, tf.zeros([], value.dtype), value))
  unit_count.assign(tf.where(at_end, 0.0, unit_count))


# ---- 3. noise -----------------------------------------------------------------------------------

def replica_noise_stddev(noise_multiplier: float, l2_norm_clip: float, num_replicas: int) -> float:
  """The std of the noise EACH of `num_replicas` replicas adds: sigma * C / sqrt(R), so that
  the independent draws, summed by the all-reduce, have std sigma * C (DESIGN.md rule 2)."""
  return noise_multiplier * l2_norm_clip / math.sqrt(num_replicas)


def noisy_sum_at_end(at_end, accumulated: Sequence[tf.Tensor], masks: Sequence[tf.Tensor],
                     stddev, generator: tf.random.Generator) -> list:
  """At a logical batch's end: `accumulated` + N(0, stddev^2) on the coordinates whose mask is
  1 (`noise.add_gaussian_noise`); before it: zeros, and the generator draws nothing. `at_end`:
  a boolean tensor, or True where every physical batch ends a logical batch."""
  # Zeros made outside the branch, where grappler folds them into one constant per shape; made
  # inside, each would be a constant of its own, allocated as long as the traced step exists.
  zeros = [tf.zeros_like(a) for a in accumulated]
  return branching.static_or_cond(
      at_end, lambda: noise.add_gaussian_noise(accumulated, masks, stddev, generator),
      lambda: zeros)


# ---- 4. scale -----------------------------------------------------------------------------------

def average_divisor(expected_batch_size: Optional[float], total_units=None) -> tf.Tensor:
  """What the noisy sum is divided by: `expected_batch_size` (Poisson sampling: a constant, so
  the divisor reveals nothing about the batch), else `total_units`, the logical batch's
  clipping units over all replicas; at least 1, since an empty batch is a valid (pure-noise)
  step."""
  if expected_batch_size is not None:
    return tf.constant(expected_batch_size, tf.float32)
  return tf.maximum(1.0, total_units)


def scale(grads: Sequence[tf.Tensor], divisor: tf.Tensor) -> list:
  """Each of `grads` divided by `divisor` (in the gradient's dtype)."""
  return [g / tf.cast(divisor, g.dtype) for g in grads]


# ---- 6. restore frozen --------------------------------------------------------------------------

def keep_frozen(updated: tf.Tensor, before: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """`updated` where the mask is 1 (trained), `before` where it is 0 (frozen), bit for bit."""
  return tf.where(mask > 0, updated, before)
