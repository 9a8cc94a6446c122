"""The per-layer engine's rule for `models.WSConv2D`, registered beside the layer so that the
engine knows no model layer by name."""

from tfdp_prune import models
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import registry
from tfdp_prune.layer_rules import windowed


class WSConv2DRule(windowed.ConvRule):
  """Conv2D's rule through the weight standardization: the convolution uses the standardized
  kernel, and gradients with respect to it (per example, or summed) are mapped to the raw
  (trained) kernel by the standardization's transposed Jacobian (`standardization_vjp`)."""

  layer_classes = (models.WSConv2D,)

  def convolution(self, layer):
    standardized, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
    return standardized, standardization_vjp(standardized, inverse_std)

  def strategies(self, call):
    # No ghost norms: through the standardization they subtract the gradient's components
    # along the mean and the kernel from its Gram-matrix norm, and the rounding of that
    # difference could leave a norm below the true one (an under-clipped example); no bound
    # for it is derived here. Conv2D's ghost norms, in float64 with their rounding bound, stay.
    return tuple(s for s in super().strategies(call) if s != windowed.GHOST)


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
