"""The per-layer engine's rule for `models.WSConv2D`, registered beside the layer so that the
engine knows no model layer by name."""

from tfdp_prune import models
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import registry
from tfdp_prune.layer_rules import windowed


class WSConv2DRule(windowed.ConvRule):
  """Conv2D's rule through the weight standardization: the convolution uses the standardized
  kernel, and per-example gradients w.r.t. it are mapped to the raw (trained) kernel by a
  per-example vector-Jacobian product."""

  layer_classes = (models.WSConv2D,)

  def convolved_kernel(self, layer, kernel):
    return layer.standardized_kernel(kernel)

  def to_variable_grads(self, layer, kernel_grads):
    kernel = tf.convert_to_tensor(layer.kernel)

    def vjp(cotangent):
      with tf.GradientTape() as tape:
        tape.watch(kernel)
        standardized = layer.standardized_kernel(kernel)
      return tape.gradient(standardized, kernel, output_gradients=cotangent)

    return tf.vectorized_map(vjp, kernel_grads)

  def ghost_kernel_norms(self, call, batch, patches, g_rows, per_channel):
    """Per output channel o, with n = window size, s = the standardized kernel column, sigma^2 =
    var + epsilon and d = the gradient w.r.t. s: the raw kernel's gradient is
    (d - mean(d) 1 - mean(d * s) s) / sigma. 1 and s are orthogonal and |s|^2 = n var / sigma^2,
    so its squared norm is (|d|^2 - (1.d)^2 / n - (s.d)^2 (2 - var / sigma^2) / n) / sigma^2.
    1.d and s.d come without forming d: from the patches' sums and from the captured output
    (the convolution with s), each against the output gradients; combined in float64."""
    layer = call.layer
    kernel = tf.cast(tf.convert_to_tensor(layer.kernel), tf.float64)
    window = kernel.shape[:-1].num_elements()
    _, variance = tf.nn.moments(kernel, axes=[0, 1, 2])
    sigma2 = variance + layer.epsilon
    z = call.outputs - layer.bias if layer.use_bias else call.outputs  # = conv(a, s)
    z_rows = tf.reshape(z, tf.shape(g_rows))
    ones_d = tf.reduce_sum(tf.reduce_sum(patches, axis=2, keepdims=True) * g_rows, axis=1)
    s_d = tf.reduce_sum(z_rows * g_rows, axis=1)
    per_channel, ones_d, s_d = (tf.cast(t, tf.float64) for t in (per_channel, ones_d, s_d))
    projected = (per_channel - tf.square(ones_d) / window
                 - tf.square(s_d) * (2 - variance / sigma2) / window)
    # Rounding may leave a tiny negative where the projection removes (almost) everything.
    return tf.reduce_sum(tf.maximum(projected, 0.0) / sigma2, axis=1)


for _layer_class in WSConv2DRule.layer_classes:
  registry.register_layer_rule(_layer_class, WSConv2DRule())
