"""Per-example gradient math: mask, norm, clip, sum. Pure functions of tensors.

A per-example gradient is a list with one tensor per variable, each with a leading batch axis.
Masks are one tensor per variable (1 = trained, 0 = frozen) without a batch axis.
"""

from typing import NamedTuple, Optional, Sequence

from tfdp_prune.compat import tf


class ClippedSum(NamedTuple):
  """The sum over examples of masked, clipped per-example gradients, and what it counted."""
  grads: list  # one tensor per variable, shaped like the variable
  num_units: tf.Tensor  # clipping units in the batch, padding included: examples or microbatches
  num_non_finite: tf.Tensor  # units with a non-zero weight whose gradient was not finite (int32)
  # [num_units] bool: the units counted in num_non_finite (dropped); None if not tracked.
  non_finite: Optional[tf.Tensor] = None


def apply_masks(per_example_grads: Sequence[tf.Tensor], masks: Sequence[tf.Tensor]) -> list:
  """Zeroes frozen coordinates of every example's gradient (masks broadcast over the batch)."""
  return [g * tf.cast(m, g.dtype) for g, m in zip(per_example_grads, masks)]


def per_example_global_norms(per_example_grads: Sequence[tf.Tensor]) -> tf.Tensor:
  """L2 norm of each example's gradient over all variables together: shape [batch]."""
  squares = [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
             for g in per_example_grads]
  return tf.sqrt(tf.add_n(squares))


def clip_factors(norms: tf.Tensor, l2_norm_clip) -> tf.Tensor:
  """Factor that scales each gradient to norm at most `l2_norm_clip` (1 when already below)."""
  # A zero norm gives clip / 0 = inf, and the factor 1.
  return tf.minimum(1.0, tf.cast(l2_norm_clip, norms.dtype) / norms)


def group_microbatches(per_example_grads: Sequence[tf.Tensor], sample_weight: tf.Tensor,
                       num_microbatches: int):
  """Averages the gradients of each of `num_microbatches` consecutive groups of examples (TF
  Privacy's microbatches): the group becomes the clipping unit. A group's weight is the sum of its
  examples' weights, so an all-padding group has weight 0."""
  message = (f"num_microbatches={num_microbatches} must divide the batch size; set "
             "num_microbatches=None (per-example clipping) or a batch size that it divides.")
  static_batch = sample_weight.shape[0]
  if static_batch is not None and static_batch % num_microbatches:
    raise ValueError(f"{message} Received batch size {static_batch}.")
  tf.debugging.assert_equal(tf.shape(sample_weight)[0] % num_microbatches, 0, message=message)
  grouped = lambda t: tf.reshape(t, tf.concat([[num_microbatches, -1], tf.shape(t)[1:]], 0))
  grads = [tf.reduce_mean(grouped(g), axis=1) for g in per_example_grads]
  return grads, tf.reduce_sum(grouped(sample_weight), axis=1)


def clipped_sum(per_example_grads: Sequence[tf.Tensor], masks: Sequence[tf.Tensor],
                l2_norm_clip, sample_weight: tf.Tensor, num_microbatches=None) -> ClippedSum:
  """Masks, clips and sums per-example (or per-microbatch) gradients.

  Clipping comes after masking, so each norm covers the updated coordinates only. Units with
  weight 0 (padding) and units whose masked gradient is not finite contribute exactly zero;
  the non-finite ones are counted.
  """
  if num_microbatches:
    per_example_grads, sample_weight = group_microbatches(
        per_example_grads, sample_weight, num_microbatches)
  masked = apply_masks(per_example_grads, masks)
  factors, kept, num_non_finite = clip_weights(per_example_global_norms(masked), sample_weight,
                                               l2_norm_clip)
  sums = [weighted_batch_sum(g, kept, factors) for g in masked]
  return ClippedSum(sums, tf.shape(sample_weight)[0], num_non_finite,
                    dropped_units(kept, sample_weight))


def clip_weights(norms: tf.Tensor, sample_weight: tf.Tensor, l2_norm_clip):
  """What each unit's gradient is multiplied by in the clipped sum, from its masked norm.

  Returns (factors, kept, num_non_finite): `kept` excludes padding (weight 0) and non-finite
  norms, `factors` is the clip factor where kept and 0 elsewhere, and `num_non_finite` counts
  the real units that were dropped for a non-finite norm (int32)."""
  real = tf.not_equal(sample_weight, 0)
  finite = tf.math.is_finite(norms)
  kept = tf.logical_and(real, finite)
  factors = tf.where(kept, clip_factors(tf.where(finite, norms, 0.0), l2_norm_clip), 0.0)
  num_non_finite = tf.reduce_sum(tf.cast(tf.logical_and(real, tf.logical_not(finite)), tf.int32))
  return factors, kept, num_non_finite


def norms_of_squares(squared: tf.Tensor) -> tf.Tensor:
  """float32 norms from float64 squared norms: a squared norm beyond float32's range is kept (a
  float32 norm above 3.4e38 becomes inf and the example is dropped, never under-clipped)."""
  return tf.cast(tf.sqrt(squared), tf.float32)


def dropped_units(kept: tf.Tensor, sample_weight: tf.Tensor) -> tf.Tensor:
  """The real units (non-zero weight) that `clip_weights` did not keep: non-finite ones."""
  return tf.logical_and(tf.not_equal(sample_weight, 0), tf.logical_not(kept))


# Below this many elements, replacing dropped rows every step costs less than tracing a
# `tf.cond` that skips it (tests and small models trace far more often than they step).
REPLACE_WHEN_NEEDED_MIN_ELEMENTS = 2**16


def weighted_batch_sum(g: tf.Tensor, kept: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
  """sum_i factors_i * g_i over the examples that are kept; the others contribute exactly 0."""
  factors = tf.where(kept, tf.cast(factors, g.dtype), 0.0)
  return replaced_when_needed(
      g, factors, lambda: tf.tensordot(factors, g, axes=1),
      lambda: tf.tensordot(factors, tf.where(per_row(kept, g), g, 0.0), axes=1))


def replaced_when_needed(g: tf.Tensor, factors: tf.Tensor, plain, replaced) -> tf.Tensor:
  """A weighted sum over the rows of g (`factors` [B], 0 for dropped rows): `plain()` weighs
  every row as it is, `replaced()` with dropped rows replaced by zeros. 0 * NaN is NaN, so a
  dropped example's non-finite row must be replaced, not multiplied by 0. Only a dropped one can
  be non-finite (a kept one has a finite norm), so the plain sum is finite exactly when no
  example needs the replacement, and then equal to it (each dropped term is 0): for large g,
  replace only then (a select over g on every step costs more than the check)."""
  elements = _elements(g, factors)
  if elements is None or elements < REPLACE_WHEN_NEEDED_MIN_ELEMENTS:
    return replaced()
  total = plain()
  return tf.cond(tf.reduce_all(tf.math.is_finite(total)), lambda: total, replaced)


def _elements(g: tf.Tensor, factors: tf.Tensor):
  """g's number of elements, its rows counted from `factors` (one per row) where g's own are
  not static: a materialized strategy's per-example gradients come out of a `tf.cond` whose
  frozen branch has 0 rows, so their batch size is unknown while the factors' is not."""
  rows = g.shape[0] if g.shape[0] is not None else factors.shape[0]
  per_row = g.shape[1:].num_elements()
  return None if rows is None or per_row is None else rows * per_row


def masked_squared_norms(g: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
  """[B]: the squared norm of each example's gradient g_i [B, ...] times the mask (0/1, the
  variable's shape), without forming g_i * mask: sum_j g_ij^2 m_j, one matrix-vector product.
  A non-finite g_ij makes the norm non-finite even where m_j is 0 (inf * 0 is NaN), as the
  norm of g_i * mask would be; so does a finite g_ij whose square overflows (|g_ij| > 1.8e19)
  where m_j is 0, which the masked norm would ignore: that example is dropped (and counted),
  never under-clipped."""
  rows = tf.reshape(tf.square(g), tf.stack([tf.shape(g)[0], -1]))
  return tf.linalg.matvec(rows, tf.reshape(tf.cast(mask, g.dtype), [-1]))


def per_row(values: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
  """`values` [B] (one per row of t) reshaped to broadcast over t's rows [B, ...]."""
  return tf.reshape(values, tf.concat([tf.shape(values), tf.ones([tf.rank(t) - 1], tf.int32)],
                                      0))
