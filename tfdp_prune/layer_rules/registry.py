"""Which rule serves which layer class: the built-in rules, and those users register."""

from typing import Dict

from tfdp_prune.compat import keras
from tfdp_prune.layer_rules import base
from tfdp_prune.layer_rules import dense
from tfdp_prune.layer_rules import embedding
from tfdp_prune.layer_rules import generic
from tfdp_prune.layer_rules import normalization
from tfdp_prune.layer_rules import windowed

_BUILT_IN = (dense.DenseRule(), windowed.ConvRule(), windowed.DepthwiseConvRule(),
             embedding.EmbeddingRule(), normalization.ScaleAndShiftRule())

_rules: Dict[type, base.LayerRule] = {
    layer_class: rule for rule in _BUILT_IN for layer_class in rule.layer_classes}


def register_layer_rule(layer_class: type, rule: base.LayerRule) -> None:
  """Makes the per-layer engine compute the per-example gradients of `layer_class` with `rule`.

  The rule serves `layer_class` itself, not its subclasses: a subclass may compute something
  else with the same weights (WSConv2D is a Conv2D), and a rule that misses part of the
  computation under-counts the norm. Register each subclass that needs a rule; the others get
  the generic rule (that layer alone under `tf.vectorized_map`), which is exact for any layer.
  Registering a class again replaces its rule (built-in ones included).

  Example, a layer y = x * w with one weight per feature:

    class Scale(keras.layers.Layer):
      def build(self, input_shape):
        self.w = self.add_weight("w", shape=input_shape[-1:], initializer="ones")

      def call(self, inputs):
        return inputs * self.w

    class ScaleRule(tfdp_prune.LayerRule):
      def per_example_grads(self, call, g, batch):
        # dL/dw of example i: the sum over its rows (views) and positions of g * x.
        product = tf.reshape(g * call.inputs, tf.stack([batch, -1, tf.shape(g)[-1]]))
        return [tf.reduce_sum(product, axis=1)]

    tfdp_prune.register_layer_rule(Scale, ScaleRule())

  Args:
    layer_class: a subclass of `keras.layers.Layer`.
    rule: a `LayerRule`; its `per_example_grads` must be exact (check it against
      `VectorizedEngine`), or an example can move the model by more than the clip norm.

  Raises:
    TypeError: if `layer_class` is not a Keras layer class or `rule` not a `LayerRule`.
  """
  if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
    raise TypeError(f"Expected layer_class to be a subclass of keras.layers.Layer. Received: "
                    f"layer_class={layer_class!r}.")
  if not isinstance(rule, base.LayerRule):
    raise TypeError(f"Expected rule to be a tfdp_prune.LayerRule instance. Received: "
                    f"rule={rule!r}.")
  _rules[layer_class] = rule


def rule_for(layer) -> base.LayerRule:
  """The rule registered for the layer's exact class, or the generic rule."""
  return _rules.get(type(layer), generic.GENERIC)
