"""Model builders for DP training: per-example layers only, never BatchNormalization.

- `wide_resnet`: the WRN-d-k of De et al. 2022 ("Unlocking high-accuracy differentially private
  image classification through scale"): pre-activation basic blocks, weight-standardized
  convolutions (`WSConv2D`) and `GroupNormalization(groups)` where the original WRN has
  BatchNorm. WRN-16-4 is their CIFAR-10 model.
- `mnist_cnn`: TF Privacy's MNIST tutorial CNN (tutorials/mnist_dpsgd_tutorial_keras.py).
- `mlp`: a ReLU multilayer perceptron.

Every builder returns a plain tf_keras model (logits, no softmax) that passes
`model_checks.check_dp_model`.
"""

from typing import Sequence

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


@keras.saving.register_keras_serializable(package="tfdp_prune")
class WSConv2D(keras.layers.Conv2D):
  """Conv2D with weight standardization (Qiao et al. 2019, as used by De et al. 2022).

  Before each convolution the kernel (shape [h, w, in, out]) is standardized per output channel
  over (h, w, in): `(kernel - mean) / sqrt(var + epsilon)`, so every filter has mean 0 and
  standard deviation 1 (up to epsilon). The trained variable is the raw kernel; the gradient
  flows through the standardization. Takes every `Conv2D` argument plus `epsilon`.

  jax_privacy's WSConv2D is the "scaled" variant of NF-ResNets (divides by sqrt(fan_in * var),
  a learned per-channel gain, always a bias). Here the GroupNormalization that follows every
  convolution in `wide_resnet` provides the scale and offset instead.
  """

  def __init__(self, filters, kernel_size, *args, epsilon=1e-4, **kwargs):
    super().__init__(filters, kernel_size, *args, **kwargs)
    if not epsilon > 0:
      raise ValueError(f"Expected epsilon > 0. Received: epsilon={epsilon!r}.")
    self.epsilon = float(epsilon)

  def standardized_kernel(self, kernel=None):
    """The kernel the convolution uses: standardized per output channel."""
    return self.standardize(kernel)[0]

  def standardize(self, kernel=None):
    """(standardized kernel, 1 / sqrt(variance + epsilon) per output channel [1, 1, 1, out])."""
    kernel = self.kernel if kernel is None else kernel
    mean, variance = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
    inverse_std = tf.math.rsqrt(variance + tf.cast(self.epsilon, kernel.dtype))
    return (kernel - mean) * inverse_std, inverse_std

  def convolution_op(self, inputs, kernel):
    return super().convolution_op(inputs, self.standardized_kernel(kernel))

  def get_config(self):
    config = super().get_config()
    config["epsilon"] = self.epsilon
    return config


def wide_resnet(depth: int = 16, width: int = 4, num_classes: int = 10,
                input_shape=(32, 32, 3), groups: int = 16, *, use_bias: bool = False,
                name=None) -> keras.Model:
  """WRN-depth-width with weight-standardized convolutions and GroupNormalization(groups).

  (depth - 4) / 6 pre-activation basic blocks per stage; stages of 16*width, 32*width and
  64*width channels with strides 1, 2, 2; a 1x1 projection shortcut where the shape changes;
  then GroupNorm -> ReLU -> global average pooling -> Dense(num_classes) logits. Convolutions
  have no bias by default (each is followed by a GroupNorm, directly or after the residual
  sum), as in the original WRN, so WRN-16-4 has the original's 2,748,890 trainable parameters
  (GroupNorm's scale and offset replace BatchNorm's).

  Every channel count (16, and 16, 32, 64 times `width`) must be divisible by `groups`.
  """
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f"Expected depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...). "
                     f"Received: depth={depth!r}.")
  if width < 1:
    raise ValueError(f"Expected width >= 1. Received: width={width!r}.")
  widths = (16 * width, 32 * width, 64 * width)
  for channels in (16,) + widths:
    if channels % groups:
      raise ValueError(f"Expected groups to divide every channel count {(16,) + widths}. "
                       f"Received: groups={groups!r}; use a divisor of 16, e.g. 16 or 8.")
  blocks = (depth - 4) // 6

  def conv(x, filters, kernel_size, strides=1):
    return WSConv2D(filters, kernel_size, strides=strides, padding="same",
                    use_bias=use_bias)(x)

  def norm_relu(x):
    x = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5)(x)
    return keras.layers.Activation("relu")(x)

  inputs = keras.Input(shape=tuple(input_shape))
  x = conv(inputs, 16, 3)
  for channels, stage_stride in zip(widths, (1, 2, 2)):
    for block in range(blocks):
      stride = stage_stride if block == 0 else 1
      activated = norm_relu(x)
      if stride != 1 or x.shape[-1] != channels:
        shortcut = conv(activated, channels, 1, stride)
      else:
        shortcut = x
      out = conv(activated, channels, 3, stride)
      out = conv(norm_relu(out), channels, 3)
      x = keras.layers.Add()([out, shortcut])
  x = keras.layers.GlobalAveragePooling2D()(norm_relu(x))
  outputs = keras.layers.Dense(num_classes)(x)
  return keras.Model(inputs, outputs, name=name or f"wrn_{depth}_{width}")


def mnist_cnn_layers(num_classes: int = 10) -> list:
  """The layers of TF Privacy's MNIST tutorial CNN, without the input (fresh each call), for
  building it as another Sequential class (e.g. TF Privacy's DPSequential in the benchmarks)."""
  return [
      keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
      keras.layers.MaxPool2D(2, 1),
      keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
      keras.layers.MaxPool2D(2, 1),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation="relu"),
      keras.layers.Dense(num_classes),
  ]


def mnist_cnn(input_shape=(28, 28, 1), num_classes: int = 10) -> keras.Sequential:
  """TF Privacy's MNIST tutorial CNN: 26,010 parameters for 28x28x1 inputs and 10 classes."""
  return keras.Sequential([keras.Input(shape=tuple(input_shape))] + mnist_cnn_layers(num_classes),
                          name="mnist_cnn")


def mlp(input_dim: int, hidden: Sequence[int] = (128,), num_classes: int = 10) -> keras.Sequential:
  """Dense layers of `hidden` units with ReLU, then Dense(num_classes) logits."""
  layers = [keras.Input(shape=(input_dim,))]
  layers += [keras.layers.Dense(units, activation="relu") for units in hidden]
  layers.append(keras.layers.Dense(num_classes))
  return keras.Sequential(layers, name="mlp")
