"""The windowed rules: layers whose kernel slides over positions (Conv1D, Conv2D,
DepthwiseConv2D; Dense on sequences and augmult views builds on them), and the one choice of
how their per-example gradients are formed: for the whole batch at once, or one example at a
time (`batched_is_cheaper`)."""

import abc

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base

# Measured on CPU (2 cores, tf 2.21): the batched product of input patches wins only for small
# kernels over few positions (the MNIST tutorial CNN); elsewhere the per-example loop of the
# layer's own weight-gradient op is 1.4-3x faster and needs no batch x kernel memory.
_BATCHED_MAX_POSITIONS = 255
_BATCHED_MAX_KERNEL = 16384


def batched_is_cheaper(output_shape: tf.TensorShape, kernel_shape: tf.TensorShape) -> bool:
  """Whether to materialize the whole batch's per-example kernel gradients (output_shape: one
  call's output, [rows, positions..., channels]) rather than loop over examples."""
  positions = output_shape[1:-1].num_elements()
  kernel = kernel_shape.num_elements()
  return positions is not None and positions <= _BATCHED_MAX_POSITIONS and (
      kernel <= _BATCHED_MAX_KERNEL)


class WindowedRule(base.LayerRule, abc.ABC):
  """A layer z = op(a, kernel) (+ bias), then its activation: the record holds the input `a`
  and the pre-activation `z`. Subclasses give `pre_activation` and the batched
  `per_example_grads`; the first of `variables` is the kernel."""

  def variables(self, layer):
    return [self.kernel_variable(layer)] + ([layer.bias] if layer.use_bias else [])

  @abc.abstractmethod
  def kernel_variable(self, layer) -> tf.Variable:
    """The trained kernel."""

  @abc.abstractmethod
  def pre_activation(self, layer, a) -> tf.Tensor:
    """z, the layer's output before its activation, from the variables (differentiable)."""

  def capture(self, layer, original_call, inputs, kwargs):
    """The layer's own computation, recording the pre-activation output."""
    a = tf.cast(inputs, layer.compute_dtype) if inputs.dtype != layer.compute_dtype else inputs
    z = self.pre_activation(layer, a)
    outputs = layer.activation(z) if layer.activation is not None else z
    return outputs, base.CapturedCall(layer, self, a, z)

  def pieces(self, call, g, batch, views, variables, masks):
    kernel = self.kernel_variable(call.layer)
    if batched_is_cheaper(call.outputs.shape, kernel.shape):
      return base.from_per_example(
          variables, base.select(self, call, self.per_example_grads(call, g, batch),
                                 variables, masks), batch)
    return self._one_example_at_a_time(call, g, batch, variables, masks)

  def _one_example_at_a_time(self, call, g, batch, variables, masks) -> base.Pieces:
    """Norms: one example at a time (`tf.map_fn`), the layer's own weight-gradient op on that
    example's input and output gradient, masked and reduced to a number at once, so memory
    holds a few kernels, never batch x kernel. Clipped sum: the same op once for the batch,
    each row's output gradient scaled by its clip factor (the gradient is linear in g, and
    masks are elementwise, so they commute with it)."""
    layer = call.layer
    example_inputs = base.rows_per_example(call.inputs, batch)
    example_grads = base.rows_per_example(g, batch)

    def masked_grads(inputs, output_grads):
      with tf.GradientTape() as tape:
        z = self.pre_activation(layer, inputs)
      grads = tape.gradient(z, variables, output_gradients=output_grads,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return [grad * m for grad, m in zip(grads, masks)]

    def squared_norm(example):
      return tf.add_n([tf.reduce_sum(tf.square(t)) for t in masked_grads(*example)])

    squared = tf.map_fn(squared_norm, (example_inputs, example_grads),
                        fn_output_signature=g.dtype)

    def clipped_sum(factors, kept):
      rows_per_example = tf.shape(g)[0] // batch  # augmult views
      row_kept = tf.repeat(kept, rows_per_example)
      row_factors = tf.repeat(tf.cast(factors, g.dtype), rows_per_example)
      # 0 * NaN is NaN: a dropped row is replaced by zeros, not multiplied by 0.
      scaled_g = _scale_rows(_zero_rows(g, row_kept), row_factors)
      return masked_grads(_zero_rows(call.inputs, row_kept), scaled_g)

    return base.Pieces(variables, squared, clipped_sum)


def _zero_rows(t, row_kept):
  shape = tf.concat([tf.shape(row_kept), tf.ones([tf.rank(t) - 1], tf.int32)], axis=0)
  return tf.where(tf.reshape(row_kept, shape), t, tf.zeros_like(t))


def _scale_rows(t, row_factors):
  shape = tf.concat([tf.shape(row_factors), tf.ones([tf.rank(t) - 1], tf.int32)], axis=0)
  return t * tf.reshape(row_factors, shape)


def _slides_channels_last(layer) -> bool:
  return (getattr(layer, "data_format", None) == "channels_last"
          and getattr(layer, "padding", None) in ("valid", "same"))


class ConvRule(WindowedRule):
  """Conv1D/Conv2D (strides, padding, dilation; channels last, one group): per-example kernel
  gradients are input patches x output gradients. A layer that convolves with a transformed
  kernel (WSConv2D) overrides `convolved_kernel` and `to_variable_grads`."""

  layer_classes = (keras.layers.Conv1D, keras.layers.Conv2D)

  def applies(self, layer, inputs):
    return _slides_channels_last(layer) and layer.groups == 1

  def kernel_variable(self, layer):
    return layer.kernel

  def convolved_kernel(self, layer, kernel):
    """The kernel the convolution uses, from the trained one."""
    return kernel

  def to_variable_grads(self, layer, kernel_grads):
    """Per-example gradients w.r.t. the convolved kernel -> w.r.t. the trained kernel."""
    del layer
    return kernel_grads

  def pre_activation(self, layer, a):
    # The base convolution op (not the layer's, which may transform the kernel itself).
    z = keras.layers.Conv2D.convolution_op(layer, a, self.convolved_kernel(layer, layer.kernel))
    return tf.nn.bias_add(z, layer.bias) if layer.use_bias else z

  def per_example_grads(self, call, g, batch):
    layer = call.layer
    g_rows = base.positions_per_example(g, batch)
    kernel_grads = tf.einsum("bpi,bpo->bio", _patches(layer, call.inputs, batch), g_rows)
    kernel_grads = tf.reshape(kernel_grads, tf.concat([[batch], tf.shape(layer.kernel)], 0))
    grads = [self.to_variable_grads(layer, kernel_grads)]
    if layer.use_bias:
      grads.append(tf.reduce_sum(g_rows, axis=1))
    return grads


class DepthwiseConvRule(WindowedRule):
  """DepthwiseConv2D: output channel c * multiplier + m reads input channel c only, so the
  per-example kernel gradients are input patches x output gradients per channel."""

  layer_classes = (keras.layers.DepthwiseConv2D,)

  def applies(self, layer, inputs):
    return _slides_channels_last(layer)

  def kernel_variable(self, layer):
    return layer.depthwise_kernel

  def pre_activation(self, layer, a):
    z = keras.backend.depthwise_conv2d(a, layer.depthwise_kernel, strides=layer.strides,
                                       padding=layer.padding,
                                       dilation_rate=layer.dilation_rate)
    return tf.nn.bias_add(z, layer.bias) if layer.use_bias else z

  def per_example_grads(self, call, g, batch):
    layer = call.layer
    kernel = layer.depthwise_kernel
    channels = tf.shape(kernel)[2]
    g_rows = base.positions_per_example(g, batch)
    patches = _patches(layer, call.inputs, batch)
    patches = tf.reshape(patches, tf.stack([batch, tf.shape(patches)[1], -1, channels]))
    per_channel = tf.reshape(g_rows, tf.stack([batch, tf.shape(g_rows)[1], channels, -1]))
    kernel_grads = tf.einsum("bpkc,bpcm->bkcm", patches, per_channel)
    grads = [tf.reshape(kernel_grads, tf.concat([[batch], tf.shape(kernel)], 0))]
    if layer.use_bias:
      grads.append(tf.reduce_sum(g_rows, axis=1))
    return grads


def _patches(layer, inputs, batch):
  """Input windows of a convolution, [B, positions of all views, window size * channels], in
  the kernel's (spatial..., input channel) order; Conv1D as a 1 x L image."""
  sizes, strides, rates = (list(layer.kernel_size), list(layer.strides),
                           list(layer.dilation_rate))
  if len(sizes) == 1:
    inputs = tf.expand_dims(inputs, 1)
    sizes, strides, rates = [1] + sizes, [1] + strides, [1] + rates
  patches = tf.image.extract_patches(inputs, sizes=[1, *sizes, 1], strides=[1, *strides, 1],
                                     rates=[1, *rates, 1], padding=layer.padding.upper())
  return base.positions_per_example(patches, batch)
