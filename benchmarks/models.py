"""Models used by the benchmarks: TF Privacy's MNIST tutorial CNN and WRN-16-4 as De et al. train
it (GroupNorm, weight-standardized convolutions).

Both builders take the tf_keras model class to instantiate, so the same architecture can be built
as a plain Keras model or as TF Privacy's `DPSequential` / `DPModel`.
"""

import tf_keras as keras

from tfdp_prune import models as tfdp_models


def cnn_layers():
  """TF Privacy's MNIST tutorial CNN (tutorials/mnist_dpsgd_tutorial_keras.py)."""
  return [keras.layers.InputLayer(input_shape=(28, 28, 1))] + tfdp_models.mnist_cnn_layers()


def build_cnn(sequential_cls=keras.Sequential, **kwargs):
  return sequential_cls(layers=cnn_layers(), **kwargs)


def _gn(x, groups):
  return keras.layers.GroupNormalization(groups=groups, epsilon=1e-5)(x)


def _conv(width, kernel_size, strides=1):
  return tfdp_models.WSConv2D(width, kernel_size, strides=strides, padding="same", use_bias=False)


def _basic_block(x, width, stride, groups):
  """Pre-activation basic block: GN-ReLU-conv3x3-GN-ReLU-conv3x3, 1x1 projection shortcut when
  the shape changes (as in the standard WRN)."""
  in_width = x.shape[-1]
  out = keras.layers.Activation("relu")(_gn(x, groups))
  if stride != 1 or in_width != width:
    shortcut = _conv(width, 1, strides=stride)(out)
  else:
    shortcut = x
  out = _conv(width, 3, strides=stride)(out)
  out = keras.layers.Activation("relu")(_gn(out, groups))
  out = _conv(width, 3, strides=1)(out)
  return keras.layers.Add()([out, shortcut])


def build_wrn(depth=16, width_factor=4, num_classes=10, groups=16, input_shape=(32, 32, 3),
              model_cls=keras.Model, **kwargs):
  """WRN-depth-width_factor with GroupNormalization(groups) instead of BatchNorm and
  weight-standardized convolutions (`tfdp_prune.models.WSConv2D`), as in De et al. 2022.

  depth 16 -> (16 - 4) / 6 = 2 basic blocks per group; widths 16k, 32k, 64k; strides 1, 2, 2.
  """
  blocks = (depth - 4) // 6
  inputs = keras.Input(shape=input_shape)
  x = _conv(16, 3)(inputs)
  for width, stride in zip((16 * width_factor, 32 * width_factor, 64 * width_factor), (1, 2, 2)):
    for i in range(blocks):
      x = _basic_block(x, width, stride if i == 0 else 1, groups)
  x = keras.layers.Activation("relu")(_gn(x, groups))
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(num_classes)(x)
  return model_cls(inputs=inputs, outputs=outputs, **kwargs)
