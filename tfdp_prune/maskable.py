"""Which trainable variables an update mask applies to; all others are always trained."""

import dataclasses
import re
from typing import Tuple

from tfdp_prune.compat import keras

# Layers whose weight tensors (kernels, embeddings) are maskable by default. Biases and the
# scale/offset of normalization layers are few and always trained.
DEFAULT_LAYER_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
    keras.layers.Embedding,
)
_WEIGHT_TENSOR_NAMES = re.compile(r"(kernel|embeddings)(:\d+)?$")


@dataclasses.dataclass(frozen=True)
class MaskableSpec:
  """Selects the maskable variables of a model.

  By default: the kernels (and depthwise/pointwise kernels) and embeddings of the layers in
  DEFAULT_LAYER_TYPES. `layer_names`: only layers with these names (of any type) are
  considered, instead of the default types. `include_patterns` / `exclude_patterns`: regular
  expressions on variable names that add or remove variables (exclusion wins).
  """
  layer_names: Tuple[str, ...] = ()
  include_patterns: Tuple[str, ...] = ()
  exclude_patterns: Tuple[str, ...] = ()

  def __post_init__(self):
    for field in ("layer_names", "include_patterns", "exclude_patterns"):
      value = getattr(self, field)
      if isinstance(value, str):
        raise ValueError(f"Expected {field} to be a list of strings. Received the string "
                         f"{value!r}; wrap it in a list.")
      object.__setattr__(self, field, tuple(value))
    for pattern in self.include_patterns + self.exclude_patterns:
      try:
        re.compile(pattern)
      except re.error as error:
        raise ValueError(f"Invalid variable-name pattern {pattern!r}: {error}.") from None

  def variables(self, model: keras.Model) -> list:
    """The maskable variables of `model`, in `model.trainable_variables` order."""
    by_layer = set()
    for layer in _layers(model):
      chosen = (layer.name in self.layer_names if self.layer_names
                else isinstance(layer, DEFAULT_LAYER_TYPES))
      if chosen:
        by_layer.update(v.ref() for v in layer.trainable_weights
                        if _WEIGHT_TENSOR_NAMES.search(v.name))
    selected = []
    for variable in model.trainable_variables:
      name = variable.name
      keep = (variable.ref() in by_layer
              or any(re.search(p, name) for p in self.include_patterns))
      if keep and not any(re.search(p, name) for p in self.exclude_patterns):
        selected.append(variable)
    if self.layer_names:
      found = {layer.name for layer in _layers(model)}
      missing = sorted(set(self.layer_names) - found)
      if missing:
        raise ValueError(f"Layers {missing} named in layer_names are not in the model. Its "
                         f"layers: {sorted(found)}.")
    return selected

  def get_config(self) -> dict:
    return {k: list(v) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_config(cls, config):
    return cls(**config)


def _layers(model):
  return [m for m in model.submodules if isinstance(m, keras.layers.Layer)]
