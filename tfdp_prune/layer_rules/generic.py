"""The generic rule: any layer, re-run alone per example inside `tf.vectorized_map` (the
vectorized path for that layer only). It serves every layer that no other rule serves."""

from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base


class GenericRule(base.LayerRule):
  """The layer's own `call`, differentiated per example at its captured input with its captured
  output gradient."""

  def per_example_grads(self, call, g, batch):
    weights = self.variables(call.layer)
    original = type(call.layer).call.__get__(call.layer)
    inputs = base.rows_per_example(call.inputs, batch)
    cotangents = base.rows_per_example(g, batch)

    def one_example(args):
      a, cotangent = args
      with tf.GradientTape() as tape:
        outputs = original(a, **call.call_kwargs)
      return [tf.convert_to_tensor(t) for t in tape.gradient(
          outputs, weights, output_gradients=cotangent,
          unconnected_gradients=tf.UnconnectedGradients.ZERO)]

    return tf.vectorized_map(one_example, (inputs, cotangents))


GENERIC = GenericRule()
