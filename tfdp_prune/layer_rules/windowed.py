"""The windowed rules: layers whose kernel slides over positions (Conv1D, Conv2D,
DepthwiseConv2D; Dense on sequences and augmult views builds on them), and the one choice of
how their per-example gradient norms are formed (`choose_strategy`): materialized for the whole
batch (input patches x output gradients), or one example at a time with the layer's own
weight-gradient op. A strategy that materializes the per-example kernel gradients for the
norms weights those same tensors into the clipped sum (one pass over B x kernel); the one
example at a time adds each example's, weighted by its clip factor, in the engine's loop
over examples (`ExampleLoop`); ghost norms never form them, and get the sum from the layer's
own weight-gradient op once for the batch, on output gradients scaled by the clip factors."""

import abc
import dataclasses

from tfdp_prune import branching
from tfdp_prune import clipping
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base
from tfdp_prune.layer_rules import calibration

# The fallback when costs cannot be measured (`calibration`), from one CPU (2 cores, tf 2.21):
# the batched product of input patches wins only for small kernels over few positions (the
# MNIST tutorial CNN); elsewhere the per-example loop of the layer's own weight-gradient op.
_BATCHED_MAX_POSITIONS = 255
_BATCHED_MAX_KERNEL = 16384
# Strategies that materialize batch x kernel (and batch x positions x window) are not
# candidates above this many bytes: memory, not speed, rules them out.
_MATERIALIZED_MAX_BYTES = 128 * 2**20
# Patches by a convolution with a one-hot kernel cost windows^2 per position: only small windows.
_IDENTITY_PATCHES_MAX_WINDOW = 256
_IDENTITY_PATCHES_BY_DEFAULT = 64  # the MNIST CNN's first conv (8 x 8 x 1): 2.7x faster

BATCHED = "batched"
IDENTITY_PATCHES = "identity_patches"
# Per-example kernel gradients by ONE depthwise weight-gradient op over the batch's rows taken
# as channels: no patches formed. For few input channels (each is a copy of the output
# gradients): the MNIST CNN's first conv (8 x 8 x 1, 14 x 14 positions).
ROWS_AS_CHANNELS = "rows_as_channels"
_ROWS_AS_CHANNELS_MAX_IN = 1
ONE_AT_A_TIME = "one_example_at_a_time"
GHOST = "ghost"  # unmasked kernels only: norms from patch and output-gradient Gram matrices
# The strategies whose norms come from materialized per-example kernel gradients.
MATERIALIZED = (BATCHED, IDENTITY_PATCHES, ROWS_AS_CHANNELS)
# Reused for the clipped sum, a layer's [B, *kernel] stays alive until every layer's norms are
# done, so all such layers are held at once: only small ones are kept (the MNIST CNN's are
# 0.25 and 8 MB); larger ones recompute the sum with the weight-gradient op.
_REUSED_MAX_BYTES = 16 * 2**20


def batched_is_cheaper(output_shape: tf.TensorShape, kernel_shape: tf.TensorShape) -> bool:
  """The fallback heuristic: whether to materialize the whole batch's per-example kernel
  gradients (output_shape: one call's output, [rows, positions..., channels]) rather than loop
  over examples."""
  positions = output_shape[1:-1].num_elements()
  kernel = kernel_shape.num_elements()
  return positions is not None and positions <= _BATCHED_MAX_POSITIONS and (
      kernel <= _BATCHED_MAX_KERNEL)


def choose_strategy(rule, call, exclude=()) -> str:
  """How `rule` forms the per-example norms of `call`: the fastest of its strategies (but
  `exclude`) as measured on this machine for these shapes (`calibration`), else
  `batched_is_cheaper`."""
  kernel = rule.kernel_variable(call.layer)
  candidates = tuple(s for s in rule.strategies(call) if s not in exclude)
  if call.inputs.shape.is_fully_defined() and call.outputs.shape.is_fully_defined():
    key = (type(rule).__name__, tuple(call.inputs.shape), tuple(call.outputs.shape),
           tuple(kernel.shape), _layer_signature(call.layer), tuple(exclude))
    choice = calibration.fastest(key, {s: _timed_norms(rule, call, s) for s in candidates})
    if choice is not None:
      return choice
  if not (batched_is_cheaper(call.outputs.shape, kernel.shape) and BATCHED in candidates):
    return GHOST if GHOST in candidates and _ghost_is_cheaper(call, kernel) else ONE_AT_A_TIME
  if ROWS_AS_CHANNELS in candidates:
    return ROWS_AS_CHANNELS
  # Patches of a few input channels: extract_patches is slow, a one-hot convolution is not.
  small_window = kernel.shape[:-1].num_elements() <= _IDENTITY_PATCHES_BY_DEFAULT
  return IDENTITY_PATCHES if small_window and IDENTITY_PATCHES in candidates else BATCHED


def _ghost_is_cheaper(call, kernel) -> bool:
  """Ghost norms cost positions^2 (window + out) per example, per-example gradients
  positions x window x out; ghost only where it needs under half the multiplications (the
  last WRN group: 8 x 8 positions, 3 x 3 x 256 x 256 kernels)."""
  positions = call.outputs.shape[1:-1].num_elements()
  window, out = kernel.shape[:-1].num_elements(), kernel.shape[-1]
  return positions is not None and 2 * positions * (window + out) < window * out


def _layer_signature(layer):
  return tuple(str(getattr(layer, name, None))
               for name in ("strides", "padding", "dilation_rate", "depth_multiplier"))


def _timed_norms(rule, call, strategy):
  """The strategy's norms on random data of the call's shapes, for `calibration`: a function
  that builds its data at its first (untimed) call, eagerly (`calibration` runs it so)."""
  layer = call.layer
  in_spec, out_spec = (call.inputs.shape, call.inputs.dtype), (call.outputs.shape,
                                                               call.outputs.dtype)
  built = []

  def run():
    if not built:
      variables = rule.variables(layer)
      masks = [tf.ones(v.shape, layer.compute_dtype) for v in variables]
      norms = tf.function(lambda a, g: rule.squared_norms(
          strategy, base.CapturedCall(layer, rule, a, g), g, in_spec[0][0], variables, masks))
      built.extend([norms, tf.random.normal(in_spec[0], dtype=in_spec[1]),
                    tf.random.normal(out_spec[0], dtype=out_spec[1])])
    norms, a, g = built
    return norms(a, g)

  return run


def materialized_grads_reused(call, kernel):
  """Whether a materialized strategy keeps the call's per-example kernel gradients [rows,
  *kernel] for the clipped sum (`_REUSED_MAX_BYTES`): a bool from a static batch size, or,
  when the batch size is known only as the step runs (`fit` on arrays or on a batched dataset
  traces [None, ...]), a boolean tensor decided then."""
  bytes_per_row = 4 * kernel.shape.num_elements()
  rows = call.inputs.shape[0]
  if rows is not None:
    return rows * bytes_per_row <= _REUSED_MAX_BYTES
  return tf.shape(call.inputs, out_type=tf.int64)[0] * bytes_per_row <= _REUSED_MAX_BYTES


def _materialized_bytes(call, kernel, window):
  """What a materialized strategy forms for the call: per-example kernel gradients and input
  windows. An unknown batch size counts as 0 rows here (`_materialized_fits` decides then)."""
  return (call.inputs.shape[0] or 0) * _materialized_bytes_per_row(call, kernel, window)


def _materialized_bytes_per_row(call, kernel, window):
  positions = call.outputs.shape[1:-1].num_elements() or 0
  return 4 * (kernel.shape.num_elements() + positions * window)


def _materialized_fits(call, kernel):
  """Whether a materialized strategy's tensors fit in `_MATERIALIZED_MAX_BYTES`: True with a
  static batch size (`strategies` offered it only then), else a boolean tensor decided when the
  step runs; where it is false, the per-example loop runs instead."""
  if call.inputs.shape[0] is not None:
    return True
  per_row = _materialized_bytes_per_row(call, kernel, kernel.shape[:-1].num_elements())
  return tf.shape(call.inputs, out_type=tf.int64)[0] * per_row <= _MATERIALIZED_MAX_BYTES


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

  def strategies(self, call) -> tuple:
    """The strategies `squared_norms` can use for this call (memory permitting)."""
    kernel = self.kernel_variable(call.layer)
    window = kernel.shape[:-1].num_elements()
    if _materialized_bytes(call, kernel, window) > _MATERIALIZED_MAX_BYTES:
      return (ONE_AT_A_TIME,)
    return (BATCHED, ONE_AT_A_TIME)

  def pieces(self, call, g, batch, views, variables, masks):
    """Norms by the chosen strategy; a kernel whose mask is all 0 (fully frozen) gets no
    per-example work at all, decided when the step runs (masks change without a retrace)."""
    strategy = choose_strategy(self, call)
    is_kernel, bias_only = self._kernel_and_bias(call, g, batch, variables, masks)
    if not any(is_kernel):
      return bias_only
    kernel_trained = tf.reduce_any(tf.not_equal(masks[is_kernel.index(True)], 0))
    kernel = self.kernel_variable(call.layer)
    if strategy == ONE_AT_A_TIME:  # the kernel's norms and sum in the engine's example loop
      index = is_kernel.index(True)
      loop = self._example_loop(call, g, batch, variables[index], masks[index])
      return dataclasses.replace(bias_only, loop=dataclasses.replace(loop,
                                                                      trained=kernel_trained))
    reused = strategy in MATERIALIZED and materialized_grads_reused(call, kernel)
    if reused is not False:
      return self._materialized_pieces(strategy, call, g, batch, variables, masks, is_kernel,
                                       kernel_trained, bias_only, reused,
                                       _materialized_fits(call, kernel))

    def trained_norms():
      if strategy != GHOST:
        return self.squared_norms(strategy, call, g, batch, variables, masks)
      # Ghost norms hold for unmasked gradients only: masked ones take the next best way.
      fallback = choose_strategy(self, call, exclude=(GHOST,))
      unmasked = tf.reduce_all(tf.stack([tf.reduce_all(tf.equal(m, 1)) for m in masks]))
      return tf.cond(unmasked,
                     lambda: self.squared_norms(GHOST, call, g, batch, variables, masks),
                     lambda: self.squared_norms(fallback, call, g, batch, variables, masks))

    squared = tf.cond(kernel_trained, trained_norms, lambda: bias_only.squared_norms)

    def clipped_sum(factors, kept):
      # Zeros for a branch are made outside it: grappler folds them into one constant per
      # shape, where each branch's own would stay allocated (docs/per-layer-engine.md).
      kernel_zeros = tf.zeros(kernel.shape, kernel.dtype)

      def frozen_kernel():
        sums = iter(bias_only.clipped_sum(factors, kept))
        return [kernel_zeros if k else next(sums) for k in is_kernel]
      return tf.cond(kernel_trained,
                     lambda: self._clipped_sum(call, g, batch, variables, masks, factors, kept),
                     frozen_kernel)

    return base.Pieces(variables, squared, clipped_sum)

  def _kernel_and_bias(self, call, g, batch, variables, masks):
    """(for each of `variables`, whether it is the kernel; the pieces of the others: the bias,
    from the output gradients)."""
    kernel_key = base.variable_key(self.kernel_variable(call.layer))
    is_kernel = [base.variable_key(v) == kernel_key for v in variables]
    others = [(v, m) for v, m, k in zip(variables, masks, is_kernel) if not k]
    return is_kernel, bias_pieces(g, batch, [v for v, _ in others], [m for _, m in others])

  def _materialized_pieces(self, strategy, call, g, batch, variables, masks, is_kernel,
                           kernel_trained, bias_only, reused=True, fits=True) -> base.Pieces:
    """The kernel's masked per-example gradients [B, *kernel], formed once (when the kernel is
    trained), give both its norms and its clipped sum: a weighted sum over B is far cheaper
    than a second weight-gradient op, and the sum is of exactly the tensors that were
    measured. `reused` (`materialized_grads_reused`) may be a boolean tensor, decided when the
    step runs: where it is false the tensors are dropped after the norms and the sum comes from
    the weight-gradient op. So may `fits` (`_materialized_fits`): where it is false, nothing is
    materialized (the norms one example at a time, the sum from the op). The other variables
    (the bias) come from `bias_only`."""
    index = is_kernel.index(True)
    kernel, kernel_mask = variables[index], masks[index]

    def no_kernel_grads():  # an empty batch of kernel gradients
      return tf.zeros(tf.concat([[0], tf.shape(kernel)], 0), g.dtype)

    def materialized():  # unmasked: the mask weighs the norms and masks the sum (not B copies)
      grads = self.per_example_grads(call, g, batch, **self._batched_options(strategy))
      kernel_grads = base.select(self, call, grads, [kernel], [None])[0]
      squared = clipping.masked_squared_norms(kernel_grads, kernel_mask)
      return squared, branching.static_or_cond(reused, lambda: kernel_grads, no_kernel_grads)

    def trained():
      return branching.static_or_cond(fits, materialized, lambda: (
          self._one_example_at_a_time(call, g, batch, [kernel], [kernel_mask]),
          no_kernel_grads()))

    def frozen():  # no per-example work
      return tf.zeros(tf.reshape(batch, [1]), g.dtype), no_kernel_grads()

    kernel_squared, kernel_grads = tf.cond(kernel_trained, trained, frozen)

    def trained_sum(factors, kept):
      reused_sum = lambda: clipping.weighted_batch_sum(kernel_grads, kept, factors) * kernel_mask
      return branching.static_or_cond(
          branching.both(fits, reused), reused_sum,
          lambda: self._clipped_sum(call, g, batch, [kernel], [kernel_mask], factors, kept)[0])

    def clipped_sum(factors, kept):
      zeros = tf.zeros(kernel.shape, g.dtype)  # outside the branch, as above
      kernel_sum = tf.cond(kernel_trained, lambda: trained_sum(factors, kept), lambda: zeros)
      others = iter(bias_only.clipped_sum(factors, kept))
      return [kernel_sum if k else next(others) for k in is_kernel]

    return base.Pieces(variables, kernel_squared + bias_only.squared_norms, clipped_sum)

  def squared_norms(self, strategy, call, g, batch, variables, masks) -> tf.Tensor:
    """[B] squared norms of the masked per-example gradients of `variables`."""
    if strategy == ONE_AT_A_TIME:
      return self._one_example_at_a_time(call, g, batch, variables, masks)
    if strategy == GHOST:  # callers check that every mask is all 1
      return self.ghost_squared_norms(call, g, batch, variables)
    grads = self.per_example_grads(call, g, batch, **self._batched_options(strategy))
    return base.from_per_example(variables, base.select(self, call, grads, variables, masks),
                                 batch).squared_norms

  def _batched_options(self, strategy) -> dict:
    del strategy
    return {}

  def _grads_function(self, layer, variables):
    """A function (inputs, output_grads) -> the gradients of `variables` for those rows (any
    number, summed over them) by the layer's own weight-gradient ops. What does not depend on
    the rows is computed here, once, and not in every step of a loop over examples."""

    def grads(inputs, output_grads):
      with tf.GradientTape() as tape:
        z = self.pre_activation(layer, inputs)
      return tape.gradient(z, variables, output_gradients=output_grads,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return grads

  def _one_example_at_a_time(self, call, g, batch, variables, masks) -> tf.Tensor:
    """[B] squared norms of the masked per-example gradients of `variables`, the kernel's from
    `_example_loop` (`tf.map_fn`: norms only, where no sum is wanted from the loop), the
    bias's from the output gradients."""
    is_kernel, bias_only = self._kernel_and_bias(call, g, batch, variables, masks)
    squared = bias_only.squared_norms
    if not any(is_kernel):
      return squared
    index = is_kernel.index(True)
    loop = self._example_loop(call, g, batch, variables[index], masks[index])
    return squared + tf.map_fn(lambda i: loop.example(i)[1], tf.range(batch),
                               fn_output_signature=g.dtype)

  def _example_loop(self, call, g, batch, kernel, mask) -> base.ExampleLoop:
    """The kernel's per-example gradients one example at a time, by the layer's own
    weight-gradient op on that example's input and output gradients, masked and measured at
    once: memory holds a few kernels, never batch x kernel. An example's rows are slices of the
    batch's tensors (a loop mapped over the tensors themselves would first copy both,
    activation-sized, into tensor lists: the WRN-16-4's peak, 70 MB more)."""
    grads_of, to_kernel_grads = self._convolved_gradient(call.layer)
    masked_gradient = self._example_gradient(call, g, batch, mask, to_kernel_grads)
    example_inputs = base.rows_per_example(call.inputs, batch)
    example_grads = base.rows_per_example(g, batch)

    def example(i):
      grad = masked_gradient(i, grads_of(example_inputs[i], example_grads[i]))
      # l2_loss (half the sum of squares) reads its input once and writes nothing.
      return [grad], 2.0 * tf.nn.l2_loss(grad)

    return base.ExampleLoop([kernel], example, [tf.zeros(kernel.shape, g.dtype)])

  def _convolved_gradient(self, layer):
    """(a function (inputs, output_grads) -> the gradient the layer's weight-gradient op gives
    for those rows; the linear map from it to the trained kernel's gradient). Here the
    kernel's own gradient."""
    grads_of = self._grads_function(layer, [self.kernel_variable(layer)])
    return (lambda inputs, output_grads: grads_of(inputs, output_grads)[0]), (lambda t: t)

  def _example_gradient(self, call, g, batch, mask, to_kernel_grads):
    """A function (i, c_i) -> example i's masked gradient of the trained kernel, from c_i, the
    gradient of `_convolved_gradient`: the tensor measured AND summed."""
    del call, g, batch
    return lambda i, grad: to_kernel_grads(grad) * mask

  def _clipped_sum(self, call, g, batch, variables, masks, factors, kept):
    """The layer's weight-gradient op once for the batch, each row's output gradient scaled
    by its clip factor (the gradient is linear in g, and masks are elementwise, so they
    commute with it)."""
    rows_per_example = tf.shape(g)[0] // batch  # augmult views
    row_kept = tf.repeat(kept, rows_per_example)
    row_factors = tf.repeat(tf.where(kept, tf.cast(factors, g.dtype), 0.0), rows_per_example)
    grads_of = self._grads_function(call.layer, variables)

    def replaced():  # 0 * NaN is NaN: a dropped row is replaced by zeros, not multiplied by 0
      return grads_of(_zero_rows(call.inputs, row_kept),
                      _scale_rows(_zero_rows(g, row_kept), row_factors))

    # As in `clipping.weighted_batch_sum`: only a dropped row can be non-finite (a kept example
    # has a finite norm), so the sum with dropped rows scaled by 0 is finite exactly when no
    # row needs replacing, and then equal to the replaced one. Replacing only then spares two
    # activation-sized copies per layer, all alive at once while the layers' sums wait.
    grads = grads_of(call.inputs, _scale_rows(g, row_factors))
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(grad)) for grad in grads])
    grads = tf.cond(finite, lambda: grads, replaced)
    return [grad * m for grad, m in zip(grads, masks)]


def bias_pieces(g, batch, variables, masks) -> base.Pieces:
  """Pieces of a windowed layer's bias alone (z = op(a, kernel) + bias): example i's gradient
  is the sum of its output gradients over its rows and positions."""
  if not variables:
    return base.Pieces([], tf.zeros(tf.reshape(batch, [1]), g.dtype), lambda factors, kept: [])
  grads = [tf.reduce_sum(base.positions_per_example(g, batch), axis=1) * variables_mask
           for variables_mask in masks]
  return base.from_per_example(variables, grads, batch)


def _zero_rows(t, row_kept):
  return tf.where(clipping.per_row(row_kept, t), t, tf.zeros([], t.dtype))


def _scale_rows(t, row_factors):
  return t * clipping.per_row(row_factors, t)


def _slides_channels_last(layer) -> bool:
  return (getattr(layer, "data_format", None) == "channels_last"
          and getattr(layer, "padding", None) in ("valid", "same"))


class ConvRule(WindowedRule):
  """Conv1D/Conv2D (strides, padding, dilation; channels last, one group): per-example kernel
  gradients are input patches x output gradients. A layer that convolves with a transformed
  kernel (WSConv2D) overrides `convolution`."""

  layer_classes = (keras.layers.Conv1D, keras.layers.Conv2D)

  def applies(self, layer, inputs):
    return _slides_channels_last(layer) and layer.groups == 1

  def kernel_variable(self, layer):
    return layer.kernel

  def convolution(self, layer):
    """The kernel the convolution uses (from the trained one, differentiably), and a function
    taking gradients with respect to it (any leading axes) to gradients with respect to the
    trained kernel: the transposed Jacobian, linear."""
    return tf.convert_to_tensor(layer.kernel), lambda kernel_grads: kernel_grads

  def pre_activation(self, layer, a):
    # The base convolution op (not the layer's, which may transform the kernel itself).
    z = keras.layers.Conv2D.convolution_op(layer, a, self.convolution(layer)[0])
    return tf.nn.bias_add(z, layer.bias) if layer.use_bias else z

  def _grads_function(self, layer, variables):
    """The weight-gradient op with respect to the kernel the convolution uses, formed once
    (for WSConv2D, not standardized again for every example), then mapped to the trained
    kernel; the bias's gradient is the sum of the output gradients."""
    convolved, to_variable_grads = self.convolution(layer)
    convolved_kernel_grads = weight_grad_function(layer, convolved)
    kernel_key = base.variable_key(layer.kernel)

    def kernel_grads(inputs, output_grads):
      return to_variable_grads(convolved_kernel_grads(inputs, output_grads))

    def bias_grads(output_grads):
      return tf.reduce_sum(tf.reshape(output_grads, [-1, tf.shape(output_grads)[-1]]), axis=0)

    def grads(inputs, output_grads):
      return [kernel_grads(inputs, output_grads) if base.variable_key(v) == kernel_key
              else bias_grads(output_grads) for v in variables]

    return grads

  def _convolved_gradient(self, layer):
    """The weight-gradient op with respect to the kernel the convolution uses (for WSConv2D
    the standardized one, formed once per step), and the map to the trained kernel."""
    convolved, to_variable_grads = self.convolution(layer)
    return weight_grad_function(layer, convolved), to_variable_grads

  def strategies(self, call):
    strategies = super().strategies(call)
    window = self.kernel_variable(call.layer).shape[:-1].num_elements()
    if BATCHED in strategies and window <= _IDENTITY_PATCHES_MAX_WINDOW:
      strategies += (IDENTITY_PATCHES,)
    if BATCHED in strategies and _rows_as_channels_apply(call):
      strategies += (ROWS_AS_CHANNELS,)
    rows = call.inputs.shape[0] or 0
    positions = call.outputs.shape[1:-1].num_elements() or 0
    gram_bytes = 4 * rows * (positions * window + positions**2)
    if gram_bytes <= _MATERIALIZED_MAX_BYTES and call.inputs.shape.rank == 4:
      strategies += (GHOST,)
    return strategies

  def ghost_squared_norms(self, call, g, batch, variables):
    """Unmasked norms without per-example gradients ("ghost norms", Goodfellow 2015; Li et
    al. 2022): ||P_i^T G_i||^2 per output channel o is g_o^T (P_i P_i^T) g_o, with P_i the
    input patches [T, window] and G_i the output gradients [T, out] of example i (T positions
    of all its views). Cheaper than forming P_i^T G_i when T^2 is small beside the kernel."""
    layer = call.layer
    # float64, and the rounding bound added: g^T (P P^T) g cancels (its terms have both signs),
    # so rounding could leave it BELOW the true norm, and an example would then be clipped to
    # more than the clip norm. An upper bound is safe (it can only clip more).
    patches = tf.cast(_patches(layer, call.inputs, batch), tf.float64)
    g_rows = tf.cast(base.positions_per_example(g, batch), tf.float64)
    per_channel = (ghost_per_channel(patches, g_rows)
                   + ghost_rounding_bound(patches, g_rows))  # [B, out]
    keys = {base.variable_key(v) for v in variables}
    squared = tf.zeros(tf.shape(per_channel)[:1], tf.float64)
    if base.variable_key(layer.kernel) in keys:
      squared += self.ghost_kernel_norms(call, batch, patches, g_rows, per_channel)
    if layer.use_bias and base.variable_key(layer.bias) in keys:
      # |sum of G over positions|, raised by its float64 rounding bound (gamma_T sum |G|).
      bias = (tf.abs(tf.reduce_sum(g_rows, axis=1))
              + 2.0 * float64_gamma(tf.shape(g_rows)[1]) * tf.reduce_sum(tf.abs(g_rows), axis=1))
      squared += tf.reduce_sum(tf.square(bias), axis=1)
    # Rounding to float32 (to nearest: relative error <= 2^-24) must not undo the bound.
    return tf.cast(squared * (1.0 + 2.0**-23), g.dtype)

  def ghost_kernel_norms(self, call, batch, patches, g_rows, per_channel):
    """[B] float64 squared kernel norms from the per-channel squared norms of the gradient
    w.r.t. the convolved kernel (`per_channel`, [B, out]); WSConv2D maps them through the
    standardization."""
    del call, batch, patches, g_rows
    return tf.reduce_sum(tf.cast(per_channel, tf.float64), axis=1)

  def _batched_options(self, strategy):
    return {"identity_patches": strategy == IDENTITY_PATCHES,
            "rows_as_channels": strategy == ROWS_AS_CHANNELS}

  def per_example_grads(self, call, g, batch, identity_patches=False, rows_as_channels=False):
    layer = call.layer
    g_rows = base.positions_per_example(g, batch)
    if rows_as_channels:
      kernel_grads = _rows_as_channels_grads(layer, call.inputs, g, batch)
    else:
      patches = (_identity_patches(layer, call.inputs, batch) if identity_patches
                 else _patches(layer, call.inputs, batch))
      kernel_grads = patches_times_output_grads(patches, g_rows, g.shape[1:-1].num_elements())
    kernel_grads = tf.reshape(kernel_grads, tf.concat([[batch], tf.shape(layer.kernel)], 0))
    grads = [self.convolution(layer)[1](kernel_grads)]
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


def weight_grad_function(layer, convolved):
  """A function (inputs, output_grads) -> the gradient with respect to `convolved`, the kernel
  the layer's convolution uses (formed once, outside any loop), by its own weight-gradient op."""

  def grads(inputs, output_grads):
    # A tensor of the loop body's own graph to watch, not `convolved` captured from outside.
    kernel = tf.identity(convolved)
    with tf.GradientTape() as tape:
      tape.watch(kernel)
      z = keras.layers.Conv2D.convolution_op(layer, inputs, kernel)
    return tape.gradient(z, kernel, output_gradients=output_grads)

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


def patches_times_output_grads(patches, g_rows, positions_per_view):
  """[B, window, out]: P_i^T G_i per example (patches [B, T, window], output gradients
  [B, T, out]; T is `positions_per_view` times the views, and may be unknown when traced).
  A batched matmul transposes its first operand as it goes, at a cost in proportion to that
  operand's size; so when the patches are larger than the output gradients and the product
  together, G_i^T P_i is formed and the product transposed (the MNIST CNN's
  first conv, 196 x 64 patches and 196 x 16 gradients: 10-12 -> 7-8 ms on 2 EPYC cores; its
  second, 25 x 256 and 25 x 32, keeps P^T G; benchmarks/README.md)."""
  window, out = patches.shape[-1], g_rows.shape[-1]
  if _transposing_the_gradients_is_cheaper(positions_per_view, window, out):
    return tf.transpose(tf.matmul(g_rows, patches, transpose_a=True), [0, 2, 1])
  return tf.matmul(patches, g_rows, transpose_a=True)


def _transposing_the_gradients_is_cheaper(positions, window, out) -> bool:
  """Entries transposed per example: T x window (the patches) against T x out + window x out
  (the gradients, then the product). With views T is a multiple of `positions`, which only
  favors the gradients' way more (window > out then); unknown sizes keep the patches' way."""
  if None in (positions, window, out):
    return False
  return positions * window > positions * out + window * out


def _rows_as_channels_apply(call) -> bool:
  """Whether `_rows_as_channels_grads` can form the call's per-example gradients: a 2-D
  convolution of float32 inputs with few channels, undilated (the depthwise op's CPU kernel
  takes no dilation)."""
  layer, inputs = call.layer, call.inputs
  return (inputs.shape.rank == 4 and inputs.dtype == tf.float32
          and inputs.shape[-1] is not None and inputs.shape[-1] <= _ROWS_AS_CHANNELS_MAX_IN
          and tuple(layer.dilation_rate) == (1, 1))


def _rows_as_channels_grads(layer, inputs, g, batch):
  """[B, h, w, in, out]: each example's kernel gradient (summed over its views' rows) by one
  depthwise weight-gradient op on the batch as a single image whose channels are (row, input
  channel): output channel (row, in, o) of a depthwise convolution with multiplier `out` reads
  only input channel (row, in), so its filter gradient for output gradients g[row, ..., o] is
  that row's kernel gradient at (in, o). The output gradients are repeated per input channel."""
  height, width, channels, out = layer.kernel.shape
  rows = tf.shape(inputs)[0]
  image = tf.reshape(tf.transpose(inputs, [1, 2, 0, 3]),
                     tf.stack([1, tf.shape(inputs)[1], tf.shape(inputs)[2], rows * channels]))
  grads = tf.transpose(g, [1, 2, 0, 3])  # [positions..., rows, out]
  if channels > 1:
    grads = tf.repeat(grads, channels, axis=2)
  grads = tf.reshape(grads, tf.stack([1, tf.shape(g)[1], tf.shape(g)[2], rows * channels * out]))
  filters = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(
      image, tf.stack([height, width, rows * channels, out]), grads,
      strides=[1, *layer.strides, 1], padding=layer.padding.upper())
  per_row = tf.transpose(tf.reshape(filters, tf.stack([height, width, rows, channels, out])),
                         [2, 0, 1, 3, 4])
  views = rows // batch
  return tf.reduce_sum(tf.reshape(per_row, tf.stack([batch, views, height * width * channels,
                                                     out])), axis=1)


def _identity_patches(layer, inputs, batch):
  """`_patches` by the layer's own convolution with a one-hot kernel [window..., in, window *
  in]: the same windows (padding, strides, dilation), often faster than `extract_patches` for
  small windows (few input channels)."""
  kernel = layer.kernel
  window = kernel.shape[:-1].num_elements()
  one_hot = tf.reshape(tf.eye(window, dtype=inputs.dtype), kernel.shape[:-1] + [window])
  return base.positions_per_example(keras.layers.Conv2D.convolution_op(layer, inputs, one_hot),
                                    batch)


def ghost_per_channel(patches, g_rows):
  """[B, out]: g_o^T (P_i P_i^T) g_o per example i and output channel o (patches P [B, T, window],
  output gradients G [B, T, out]): the squared norm of P_i^T G_i's column o."""
  gram = tf.matmul(patches, patches, transpose_b=True)  # [B, T, T]
  return tf.reduce_sum(tf.matmul(gram, g_rows) * g_rows, axis=1)


def ghost_rounding_bound(patches, g_rows):
  """[B, out]: a bound on the rounding error of `ghost_per_channel` in float64. Each of its
  three sums (over the window, then twice over the T positions) errs by at most gamma_n times
  the same sum over absolute values (Higham, Accuracy and Stability of Numerical Algorithms,
  3.1), so the error is at most gamma_(window + 2T) |g|^T (|P| |P|^T) |g|; that product has no
  cancellation, so computing it also in float64 is accurate to a relative gamma, covered by the
  factor 2."""
  terms = patches.shape[-1] + 2 * tf.shape(patches)[1]
  return 2.0 * float64_gamma(terms) * ghost_per_channel(tf.abs(patches), tf.abs(g_rows))


def float64_gamma(terms):
  """gamma_n = n u / (1 - n u), u = 2^-53: the relative bound on the rounding error of a float64
  sum of n terms, against the sum of their absolute values (Higham 3.1)."""
  n = tf.cast(terms, tf.float64)
  return n * 2.0**-53 / (1.0 - n * 2.0**-53)

