"""Checks that a model can be trained with DP at all, before any step runs."""

from tfdp_prune.compat import ensure_tf_keras_model
from tfdp_prune.compat import keras

# Layers whose output for one example depends on the other examples of the batch: one example's
# gradient then leaks into every other example's, and per-example clipping bounds nothing.
_CROSS_EXAMPLE_LAYERS = (keras.layers.BatchNormalization,)


def check_dp_model(model) -> None:
  """Raises if `model` is not a tf_keras model or mixes examples across the batch."""
  ensure_tf_keras_model(model)
  for layer in model.submodules:
    if isinstance(layer, _CROSS_EXAMPLE_LAYERS):
      raise ValueError(
          f"Layer '{layer.name}' ({type(layer).__name__}) normalizes across the examples of a "
          "batch, so one example's gradient depends on all others and per-example clipping "
          "gives no privacy guarantee. Replace it with a per-example normalization, e.g. "
          "`keras.layers.GroupNormalization(groups=...)` or `keras.layers.LayerNormalization()`.")
