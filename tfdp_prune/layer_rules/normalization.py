"""The scale-and-shift rule: GroupNormalization and LayerNormalization over the last axis
compute y = xhat * gamma + beta, one gamma and beta per channel."""

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base


class ScaleAndShiftRule(base.LayerRule):
  """Example i's gradients are the sums over its positions of g_i * xhat_i (gamma) and of g_i
  (beta). xhat = dy/dgamma along gamma = ones: one forward-mode product over the whole batch
  (the normalization never mixes examples)."""

  layer_classes = (keras.layers.GroupNormalization, keras.layers.LayerNormalization)

  def applies(self, layer, inputs):
    """Only when gamma and beta index the last axis alone (one entry per channel)."""
    rank = inputs.shape.rank
    if isinstance(layer, keras.layers.GroupNormalization):
      return layer.axis in (-1, rank - 1)
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return [a % rank for a in axes] == [rank - 1]

  def per_example_grads(self, call, g, batch):
    layer = call.layer
    original = type(layer).call.__get__(layer)
    channels = tf.shape(g)[-1]
    per_position = {}
    if layer.scale:
      with tf.autodiff.ForwardAccumulator(layer.gamma,
                                          tf.ones_like(layer.gamma)) as accumulator:
        outputs = original(call.inputs, **call.call_kwargs)
      per_position[base.variable_key(layer.gamma)] = g * accumulator.jvp(outputs)
    if layer.center:
      per_position[base.variable_key(layer.beta)] = g
    return [tf.reduce_sum(tf.reshape(per_position[base.variable_key(v)],
                                     tf.stack([batch, -1, channels])), axis=1)
            for v in self.variables(layer)]
