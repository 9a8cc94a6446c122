"""The scale-and-shift rule: GroupNormalization and LayerNormalization over the last axis
compute y = xhat * gamma + beta, one gamma and beta per channel."""

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base


class ScaleAndShiftRule(base.LayerRule):
  """Example i's gradients are the sums over its positions of g_i * xhat_i (gamma) and of g_i
  (beta). xhat = dy/dgamma along gamma = ones: a forward-mode product over the whole batch
  (the normalization never mixes examples), formed in the forward pass itself (`capture`), so
  the normalization is not run a second time."""

  layer_classes = (keras.layers.GroupNormalization, keras.layers.LayerNormalization)

  def applies(self, layer, inputs):
    """Only when gamma and beta index the last axis alone (one entry per channel)."""
    rank = inputs.shape.rank
    if isinstance(layer, keras.layers.GroupNormalization):
      return layer.axis in (-1, rank - 1)
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return [a % rank for a in axes] == [rank - 1]

  def capture(self, layer, original_call, inputs, kwargs):
    if not layer.scale:
      return super().capture(layer, original_call, inputs, kwargs)
    outputs, normalized = _with_normalized(layer, original_call, inputs, kwargs)
    return outputs, base.CapturedCall(layer, self, inputs, outputs, kwargs,
                                      saved={_NORMALIZED: normalized})

  def per_example_grads(self, call, g, batch):
    layer = call.layer
    channels = tf.shape(g)[-1]
    per_position = {}
    if layer.scale:
      normalized = call.saved.get(_NORMALIZED)
      if normalized is None:
        _, normalized = _with_normalized(layer, type(layer).call.__get__(layer), call.inputs,
                                         call.call_kwargs)
      per_position[base.variable_key(layer.gamma)] = g * normalized
    if layer.center:
      per_position[base.variable_key(layer.beta)] = g
    return [tf.reduce_sum(tf.reshape(per_position[base.variable_key(v)],
                                     tf.stack([batch, -1, channels])), axis=1)
            for v in self.variables(layer)]


_NORMALIZED = "normalized"  # `CapturedCall.saved` key of xhat


def _with_normalized(layer, original_call, inputs, kwargs):
  """The layer's outputs and xhat, their derivative along gamma = ones, in one pass."""
  with tf.autodiff.ForwardAccumulator(layer.gamma, tf.ones_like(layer.gamma)) as accumulator:
    outputs = original_call(inputs, **kwargs)
  return outputs, accumulator.jvp(outputs)
