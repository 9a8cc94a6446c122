import numpy as np
import pytest

from tfdp_prune import model_checks
from tfdp_prune import models
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


def _wrn_parameter_count(depth, width, num_classes, in_channels=3):
  """WRN-depth-width trainable parameters from the architecture, independently of Keras:
  bias-free convolutions, GroupNorm scale + offset (2 per channel), a Dense with bias."""
  conv = lambda k, c_in, c_out: k * k * c_in * c_out
  norm = lambda c: 2 * c
  total = conv(3, in_channels, 16)
  c_in = 16
  for c_out in (16 * width, 32 * width, 64 * width):
    for block in range((depth - 4) // 6):
      total += norm(c_in) + conv(3, c_in, c_out) + norm(c_out) + conv(3, c_out, c_out)
      stride = 2 if block == 0 and c_out != 16 * width else 1
      if stride != 1 or c_in != c_out:  # 1x1 projection shortcut
        total += conv(1, c_in, c_out)
      c_in = c_out
  return total + norm(c_in) + c_in * num_classes + num_classes


def test_wrn_16_4_has_the_standard_parameter_count_and_no_batch_norm():
  model = models.wide_resnet(depth=16, width=4, num_classes=10)
  trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  # 2,748,890: the published WRN-16-4 count (BatchNorm's gamma and beta become GroupNorm's).
  assert trainable == _wrn_parameter_count(16, 4, 10) == 2_748_890
  assert not model.non_trainable_variables  # no moving statistics anywhere
  layer_types = {type(layer) for layer in model.layers}
  assert not any(issubclass(t, keras.layers.BatchNormalization) for t in layer_types)
  assert {type(layer) for layer in model.layers
          if isinstance(layer, keras.layers.Conv2D)} == {models.WSConv2D}
  norms = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
  assert len(norms) == 13 and all(layer.groups == 16 for layer in norms)
  assert model.output_shape == (None, 10)


@pytest.mark.parametrize("depth,width", [(10, 1), (22, 2)])
def test_other_wrn_sizes_match_the_architecture(depth, width):
  model = models.wide_resnet(depth=depth, width=width, num_classes=7, input_shape=(8, 8, 1),
                             groups=8)
  assert model.count_params() == _wrn_parameter_count(depth, width, 7, in_channels=1)


def test_wrn_arguments_are_validated():
  with pytest.raises(ValueError, match="depth = 6n \\+ 4"):
    models.wide_resnet(depth=15)
  with pytest.raises(ValueError, match="groups to divide"):
    models.wide_resnet(depth=10, width=1, groups=12)


def test_ws_conv_equals_a_conv_with_the_kernel_standardized_in_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 7, 3)).astype("float32")
  layer = models.WSConv2D(5, 3, strides=2, padding="same", epsilon=1e-4)
  layer.build(x.shape)
  # A small kernel, so that epsilon's place (inside the square root) matters at atol 1e-5.
  kernel = rng.normal(loc=0.03, scale=0.05, size=(3, 3, 3, 5)).astype("float32")
  bias = rng.normal(size=5).astype("float32")
  layer.set_weights([kernel, bias])

  k = kernel.astype(np.float64)
  mean = k.mean(axis=(0, 1, 2), keepdims=True)
  std = np.sqrt(k.var(axis=(0, 1, 2), keepdims=True) + 1e-4)
  standardized = (k - mean) / std
  np.testing.assert_allclose(standardized.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
  np.testing.assert_allclose(standardized.std(axis=(0, 1, 2)), 1.0, atol=0.05)

  expected = tf.nn.conv2d(x, standardized.astype("float32"), strides=2, padding="SAME") + bias
  np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), atol=1e-5)
  # The raw kernel is the trained variable; a plain conv with it gives something else.
  raw = tf.nn.conv2d(x, kernel, strides=2, padding="SAME") + bias
  assert np.max(np.abs(layer(x).numpy() - raw.numpy())) > 1.0
  np.testing.assert_allclose(layer.standardized_kernel().numpy(), standardized, atol=1e-5)


def test_ws_conv_kernel_gradient_flows_through_the_standardization():
  layer = models.WSConv2D(2, 1, use_bias=False)
  x = tf.ones([1, 1, 1, 3])
  layer.build(x.shape)
  with tf.GradientTape() as tape:
    out = tf.reduce_sum(layer(x))
  grad = tape.gradient(out, layer.kernel).numpy()
  # With every input 1 the output is the sum of a zero-mean kernel: 0 whatever the kernel, so
  # the gradient is 0. A conv on the raw kernel would give gradient 1 everywhere.
  np.testing.assert_allclose(grad, 0.0, atol=1e-5)


@pytest.mark.parametrize("build,shape", [
    (lambda: models.wide_resnet(depth=10, width=1, input_shape=(8, 8, 3)), (2, 8, 8, 3)),
    (models.mnist_cnn, (2, 28, 28, 1)),
    (lambda: models.mlp(6, hidden=(5, 4), num_classes=3), (2, 6)),
])
def test_models_pass_the_dp_check_and_round_trip_through_keras_files(build, shape, tmp_path):
  keras.utils.set_random_seed(0)
  model = build()
  model_checks.check_dp_model(model)
  x = np.random.default_rng(0).normal(size=shape).astype("float32")

  clone = type(model).from_config(model.get_config())
  clone.set_weights(model.get_weights())
  np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), atol=1e-6)

  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)  # no custom_objects: WSConv2D is registered
  assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
  np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


def test_ws_conv_config_round_trip():
  layer = models.WSConv2D(4, 3, strides=2, padding="same", epsilon=1e-3, use_bias=False)
  config = layer.get_config()
  assert config["epsilon"] == 1e-3
  again = models.WSConv2D.from_config(config)
  assert again.get_config() == config
  assert keras.saving.get_registered_name(models.WSConv2D) == "tfdp_prune>WSConv2D"


def test_mnist_cnn_is_tf_privacys_tutorial_cnn_and_mlp_has_its_layers():
  cnn = models.mnist_cnn()
  assert cnn.count_params() == 26_010  # TF Privacy's mnist_dpsgd_tutorial_keras.py model
  assert [type(layer).__name__ for layer in cnn.layers] == [
      "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
  assert cnn.layers[2].output_shape == (None, 5, 5, 32)

  mlp = models.mlp(6, hidden=(5, 4), num_classes=3)
  assert [w.shape for w in mlp.get_weights()] == [(6, 5), (5,), (5, 4), (4,), (4, 3), (3,)]
  assert mlp.layers[0].activation is keras.activations.relu
  assert mlp.layers[-1].activation is keras.activations.linear
