"""The dense rule: on vectors, example i's kernel gradient is the outer product a_i g_i^T, never
materialized (the "book-keeping" of Bu et al. 2023); on sequences or augmult views, the
windowed strategy (`windowed`)."""

from tfdp_prune import clipping
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base
from tfdp_prune.layer_rules import windowed


class DenseRule(windowed.WindowedRule):
  """Dense: masked squared norm (a_i^2)^T M (g_i^2); clipped sum A^T diag(c) G, one matmul."""

  layer_classes = (keras.layers.Dense,)

  def kernel_variable(self, layer):
    return layer.kernel

  def pre_activation(self, layer, a):
    rank = a.shape.rank
    z = (tf.matmul(a, layer.kernel) if rank == 2
         else tf.tensordot(a, layer.kernel, [[rank - 1], [0]]))
    return tf.nn.bias_add(z, layer.bias) if layer.use_bias else z

  def per_example_grads(self, call, g, batch):
    g_rows = base.positions_per_example(g, batch)
    # The inputs at each position are the windows of a 1-wide convolution: the same product.
    kernel_grads = windowed.patches_times_output_grads(
        base.positions_per_example(call.inputs, batch), g_rows, g.shape[1:-1].num_elements())
    grads = [kernel_grads]
    if call.layer.use_bias:
      grads.append(tf.reduce_sum(g_rows, axis=1))
    return grads

  def pieces(self, call, g, batch, views, variables, masks):
    if call.inputs.shape.rank == 2 and not views:
      return _rank_one(call, g, variables, masks)
    return super().pieces(call, g, batch, views, variables, masks)


def _rank_one(call, g, variables, masks) -> base.Pieces:
  a = call.inputs
  layer = call.layer
  mask_by_key = {base.variable_key(v): m for v, m in zip(variables, masks)}
  kernel_mask = mask_by_key.get(base.variable_key(layer.kernel))
  bias_mask = mask_by_key.get(base.variable_key(layer.bias)) if layer.use_bias else None
  # A fully frozen kernel (mask all 0) gets no per-example work; masks change without a
  # retrace, so this is decided when the step runs.
  kernel_trained = (tf.reduce_any(tf.not_equal(kernel_mask, 0)) if kernel_mask is not None
                    else None)
  if kernel_trained is None:
    squared = rank_one_squared_norms(a, g, None, bias_mask)
  else:
    squared = tf.cond(kernel_trained,
                      lambda: rank_one_squared_norms(a, g, kernel_mask, bias_mask),
                      lambda: rank_one_squared_norms(a, g, None, bias_mask))

  def clipped_sum(factors, kept):
    rows = tf.expand_dims(kept, 1)
    weighted_g = tf.where(rows, g, tf.zeros([], g.dtype)) * tf.cast(
        tf.expand_dims(factors, 1), g.dtype)
    sums = []
    if kernel_mask is not None:
      def kernel_sum():
        return _inputs_times_weighted_grads(a, weighted_g, rows, factors) * kernel_mask
      # Outside the branch: one folded constant per shape (docs/per-layer-engine.md).
      zeros = tf.zeros_like(kernel_mask)
      sums.append(tf.cond(kernel_trained, kernel_sum, lambda: zeros))
    if bias_mask is not None:
      sums.append(tf.reduce_sum(weighted_g, axis=0) * bias_mask)
    return sums

  ordered = (([layer.kernel] if kernel_mask is not None else [])
             + ([layer.bias] if bias_mask is not None else []))
  return base.Pieces(ordered, squared, clipped_sum)


def _inputs_times_weighted_grads(a, weighted_g, rows, factors):
  """A^T (clip-factor-weighted G, dropped rows of G already 0), a dropped row's input replaced
  by zeros only when the plain product is not finite (`clipping.replaced_when_needed`; the
  select over the inputs on every step sat at the end of the CNN's step)."""
  return clipping.replaced_when_needed(
      a, factors, lambda: tf.matmul(a, weighted_g, transpose_a=True),
      lambda: tf.matmul(tf.where(rows, a, tf.zeros([], a.dtype)), weighted_g, transpose_a=True))


def rank_one_squared_norms(a, g, kernel_mask, bias_mask):
  """sum_jk M_jk a_ij^2 g_ik^2 (+ sum_k m_k g_ik^2 for the bias), in float64: squares of
  float32 values (inputs of 1e-19, output gradients of 1e19) underflow or overflow in float32,
  and a norm that underflows to 0 would leave the example unclipped."""
  a, g = tf.cast(a, tf.float64), tf.cast(g, tf.float64)
  g_squared = tf.square(g)
  squared = tf.zeros(tf.shape(g)[:1], tf.float64)
  if kernel_mask is not None:
    squared += tf.reduce_sum(
        tf.matmul(tf.square(a), tf.cast(kernel_mask, tf.float64)) * g_squared, axis=1)
  if bias_mask is not None:
    squared += tf.reduce_sum(g_squared * tf.cast(bias_mask, tf.float64), axis=1)
  return squared
