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

  def strategies(self, call):
    # No ghost norms: through the standardization they subtract terms computed from the
    # layer's float32 output, whose rounding could leave a norm below the true one (an
    # under-clipped example). Conv2D's ghost norms, in float64 with their rounding bound, stay.
    return tuple(s for s in super().strategies(call) if s != windowed.GHOST)


for _layer_class in WSConv2DRule.layer_classes:
  registry.register_layer_rule(_layer_class, WSConv2DRule())
