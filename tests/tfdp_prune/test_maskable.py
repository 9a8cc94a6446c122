import pytest

from tfdp_prune.compat import keras
from tfdp_prune.maskable import MaskableSpec


def _model():
  return keras.Sequential([
      keras.Input((8, 8, 3)),
      keras.layers.Conv2D(4, 3, name="conv"),
      keras.layers.DepthwiseConv2D(3, name="depthwise"),
      keras.layers.GroupNormalization(groups=2, name="norm"),
      keras.layers.Flatten(),
      keras.layers.Dense(5, name="dense"),
  ])


def _names(variables):
  return [v.name.split(":")[0] for v in variables]


def test_default_masks_kernels_and_never_biases_or_normalization():
  assert _names(MaskableSpec().variables(_model())) == [
      "conv/kernel", "depthwise/depthwise_kernel", "dense/kernel"]


def test_embeddings_are_maskable_by_default():
  model = keras.Sequential([keras.Input((3,)), keras.layers.Embedding(10, 4, name="emb")])
  assert _names(MaskableSpec().variables(model)) == ["emb/embeddings"]


def test_layers_by_name_and_patterns():
  model = _model()
  assert _names(MaskableSpec(layer_names=["dense"]).variables(model)) == ["dense/kernel"]
  assert _names(MaskableSpec(include_patterns=["bias"]).variables(model)) == [
      "conv/kernel", "conv/bias", "depthwise/depthwise_kernel", "depthwise/bias",
      "dense/kernel", "dense/bias"]
  assert _names(MaskableSpec(exclude_patterns=["^conv/"]).variables(model)) == [
      "depthwise/depthwise_kernel", "dense/kernel"]


def test_bad_specs_are_clear_errors():
  with pytest.raises(ValueError, match="list of strings"):
    MaskableSpec(layer_names="dense")
  with pytest.raises(ValueError, match="Invalid variable-name pattern"):
    MaskableSpec(include_patterns=["("])
  with pytest.raises(ValueError, match=r"\['nope'\] named in layer_names"):
    MaskableSpec(layer_names=["nope"]).variables(_model())


def test_config_round_trip():
  spec = MaskableSpec(layer_names=["a"], include_patterns=["b"], exclude_patterns=["c"])
  assert MaskableSpec.from_config(spec.get_config()) == spec
