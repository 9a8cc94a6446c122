"""The per-layer engine's rule for `models.WSConv2D`, registered beside the layer so that the
engine knows no model layer by name."""

from tfdp_prune import models
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base
from tfdp_prune.layer_rules import registry
from tfdp_prune.layer_rules import windowed


class WSConv2DRule(windowed.ConvRule):
  """Conv2D's rule through the weight standardization: the convolution uses the standardized
  kernel, and each example's gradient with respect to it is mapped to the raw (trained) kernel
  by the standardization's transposed Jacobian (`standardization_vjp`) before it is measured
  and summed."""

  layer_classes = (models.WSConv2D,)

  def convolution(self, layer):
    standardized, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
    return standardized, standardization_vjp(standardized, inverse_std)

  def strategies(self, call):
    # No ghost norms: through the standardization they subtract the gradient's components
    # along the mean and the kernel from its Gram-matrix norm, and the rounding of that
    # difference could leave a norm below the true one (an under-clipped example); no bound
    # for it is derived here. Conv2D's ghost norms, in float64 with their rounding bound, stay.
    # No clipped sum by the weight-gradient op either (a materialized strategy whose gradients
    # are not kept for the sum): it sums gradients with respect to the standardized kernel and
    # maps the sum, and a gradient's large component along the mean, which the map removes,
    # leaves float32 rounding in the mapped sum that no example's norm contains (one example
    # measured at 1.4 C). The per-example loop sums exactly the tensors it measures.
    kernel = self.kernel_variable(call.layer)
    reused = windowed.materialized_grads_reused(call, kernel) is True
    return tuple(s for s in super().strategies(call)
                 if s != windowed.GHOST and (reused or s not in windowed.MATERIALIZED))

  def _example_gradient(self, call, g, batch, mask, to_kernel_grads):
    """The per-example loop's masked gradients with the standardization's two per-channel
    reductions of each example's gradient c_i (with respect to the standardized kernel) formed
    for the whole batch at once (`_projections`) where that is cheaper: the loop forms
    J^T c_i = (c_i - mean_i - w_hat along_i) / s without them, masked and scaled by 1 / s per
    output channel in one kernel-sized factor: about half the kernel-sized passes per example
    of `standardization_vjp` then the mask."""
    if not _projections_are_cheaper(call):
      return super()._example_gradient(call, g, batch, mask, to_kernel_grads)
    standardized, inverse_std = call.layer.standardize(tf.convert_to_tensor(call.layer.kernel))
    means, along = _projections(call, g, batch, standardized)
    # The mask and 1/s per output channel in one kernel-sized factor, formed once.
    scaled_mask = mask * tf.reshape(inverse_std, [-1])
    return lambda i, grad: (grad - means[i] - standardized * along[i]) * scaled_mask


def _projections_are_cheaper(call) -> bool:
  """Whether `_projections` (a few passes over the batch's output-sized tensors) costs less
  than the two reductions it saves (kernel-sized passes per example): where the window (h w
  in) exceeds the positions per view. Measured on 2 EPYC cores (benchmarks/README.md), norms
  of 32 examples: WRN-16-4's 8x8 layers (window 2304) 63-75 -> 49-57 ms, its 16x16 ones
  (1152) 39-47 -> 36-40; its 32x32 ones (576) 37-43 -> 39-48, slower."""
  window = call.layer.kernel.shape[:-1].num_elements()
  positions = call.outputs.shape[1:-1].num_elements()
  return positions is not None and window > positions


def _projections(call, g, batch, standardized):
  """[B, out] each: the mean over the window of example i's gradient c_i with respect to the
  standardized kernel w_hat, and (w_hat . c_i) / n, per output channel, from the batch's
  tensors: c_i = sum over positions t of patch_t g_t, so its window sum is sum_t (the sum of
  patch_t) g_t (patch sums by a convolution with an all-1 kernel) and w_hat . c_i is
  sum_t (w_hat . patch_t) g_t, the layer's convolution (without bias) times g."""
  layer = call.layer
  entries = tf.cast(tf.reduce_prod(tf.shape(standardized)[:-1]), g.dtype)
  channel_sums = tf.reduce_sum(call.inputs, axis=-1, keepdims=True)
  all_ones = tf.ones(layer.kernel_size + (1, 1), call.inputs.dtype)
  patch_sums = keras.layers.Conv2D.convolution_op(layer, channel_sums, all_ones)
  # The record's output is the convolution plus the bias: formed again without it rather than
  # subtracted (a large bias would leave the difference with its rounding error).
  convolved = (keras.layers.Conv2D.convolution_op(layer, call.inputs, standardized)
               if layer.use_bias else call.outputs)
  g_rows = base.positions_per_example(g, batch)
  per_example = lambda t: tf.reduce_sum(base.positions_per_example(t, batch) * g_rows, axis=1)
  return per_example(patch_sums) / entries, per_example(convolved) / entries


def standardization_vjp(standardized, inverse_std):
  """The transposed Jacobian of w -> (w - mean) / s, s = sqrt(var + epsilon), per output
  channel over the n = h * w * in entries, as a function of a cotangent g [..., h, w, in, out]:
  J^T g = (g - mean(g) - w_hat (w_hat . g) / n) / s, with w_hat the standardized kernel.
  Closed form, applied to gradients with respect to the standardized kernel formed once: the
  per-example loop differentiating through `tf.nn.moments` for every example took about ten
  kernel-sized passes each (a third of the WRN's loop time in its last stage)."""
  entries = tf.cast(tf.reduce_prod(tf.shape(standardized)[:-1]), standardized.dtype)
  window_axes = [-4, -3, -2]

  def vjp(cotangent):
    centered = cotangent - tf.reduce_mean(cotangent, window_axes, keepdims=True)
    along_kernel = tf.reduce_sum(cotangent * standardized, window_axes, keepdims=True) / entries
    return (centered - standardized * along_kernel) * inverse_std

  return vjp


for _layer_class in WSConv2DRule.layer_classes:
  registry.register_layer_rule(_layer_class, WSConv2DRule())
