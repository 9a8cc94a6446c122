"""The per-layer per-example engine: one forward and one backward pass, then each example's
masked gradient norm and the clipped sum, layer by layer, from what the passes captured.

During the forward pass every layer with trainable weights records its input `a` and its
pre-activation output `z` (the layer's `call` is replaced for the duration of the pass). One
backward pass of the weighted loss sum gives `g = dL/dz` for every record; since no layer mixes
examples (`model_checks`), row i of `g` is example i's own output gradient. Per layer:

  Dense on vectors   per-example kernel gradient a_i g_i^T (rank one, never materialized):
                     masked squared norm (a_i^2)^T M (g_i^2); clipped sum A^T diag(c) G, one
                     matmul (the "book-keeping" of Bu et al. 2023).
  Dense on sequences, Conv1D/Conv2D (strides, padding, dilation), WSConv2D,
  DepthwiseConv2D, augmult views
                     small kernels over few positions: per-example gradients for the whole
                     batch from input patches x output gradients, masked, normed and summed
                     with the clip factors (WSConv2D: a per-example vector-Jacobian product
                     through the standardization). Otherwise the norms come one example at a
                     time (`tf.map_fn`) from the layer's own weight-gradient op, masked and
                     reduced to a number at once (memory: a few kernels, never batch x
                     kernel), and the clipped sum from the same op once for the whole batch,
                     each row's output gradient scaled by its clip factor.
  Embedding          per-example rows summed per token id (segment sums), masked by row.
  GroupNormalization, LayerNormalization over the last axis
                     y = xhat * gamma + beta per channel: per-example sums of g * xhat and of g
                     over positions, xhat = dy/dgamma (one forward-mode product for the batch).
  biases             per-example sums of g over positions.
  anything else      (custom layers, normalizations over other axes) the layer alone is re-run
                     per example inside `tf.vectorized_map`, with its captured input and output
                     gradient: the vectorized path for that layer only, logged once so users
                     know.

A variable reached by several captured calls (a layer called k times, a model nested twice,
weights tied between layers) has, per example, the SUM of the gradients of its calls: those
calls are one group, whose per-example gradients are formed for each call and added before the
norm is taken (several calls of one Embedding: one segment sum over all their tokens). Summing
per-call norms instead would let an example reach sqrt(k) * C.

Norms of all groups add up to each example's global squared norm (in float64: the rank-one
shortcut squares inputs and output gradients, which underflow in float32 at extreme scales);
the clip factor c_i = min(1, C / norm_i) then weighs each example in every layer's sum. Examples
with weight 0 (padding), examples whose norm is not finite, and examples with an Embedding id
outside [0, vocabulary) are excluded exactly as in `clipping`: their rows are replaced by zeros
before any product, so a NaN never reaches the sum, and an id is never charged to another
example.

Variables are checked at trace time, from the variables each pass reads: a trainable variable
read outside the calls that own it (a tied weight used directly by another layer, a layer
called with several tensor inputs) makes the engine fall back to `VectorizedEngine` for the
whole batch (logged once), as do microbatches and regularization losses. A trainable variable
that the forward pass never reads gets an exact zero. Wrapper layers (`TimeDistributed`,
`Bidirectional`) are captured as one layer, with the per-layer vectorized rule.
"""

import contextlib
import dataclasses
from typing import Any, Dict, List, Optional

from absl import logging

from tfdp_prune import augmult
from tfdp_prune import clipping
from tfdp_prune import models
from tfdp_prune import per_example
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

DENSE, CONV, DEPTHWISE, EMBEDDING, SCALE_SHIFT, GENERIC = (
    "dense", "conv", "depthwise", "embedding", "scale_shift", "generic")
_NORMALIZATIONS = (keras.layers.GroupNormalization, keras.layers.LayerNormalization)
_reported = set()


@dataclasses.dataclass
class _Record:
  """One call of one layer during the forward pass."""
  layer: Any
  kind: str
  inputs: tf.Tensor
  outputs: tf.Tensor  # z: what the output gradient is taken with respect to
  call_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  reads: frozenset = frozenset()  # keys of the trainable variables the call read


class PerLayerEngine(per_example.PerExampleEngine):
  """Per-example norms and clipped sums from per-layer pieces (see the module docstring)."""

  def clipped_sum(self, model, loss_fn, x, y, sample_weight, variables, masks, l2_norm_clip,
                  num_microbatches=None):
    vectorized_args = (model, loss_fn, x, y, sample_weight, variables, masks, l2_norm_clip,
                       num_microbatches)  # the whole-batch fallback's
    reason = _unsupported_reason(model, num_microbatches)
    if reason is not None:
      return _whole_batch_fallback(f"model:{reason}", reason, vectorized_args)
    views = augmult.has_views(model, x)
    batch = tf.shape(sample_weight)[0]
    num_views = tf.shape(x)[1] if views else 1
    rows_x, rows_y, row_weight = _rows(x, y, sample_weight, views)
    records: List[_Record] = []
    with tf.GradientTape() as tape:
      with _capturing(model, records) as outside:
        predictions = model(rows_x, training=True)
      row_losses = loss_fn(rows_y, predictions) * tf.cast(row_weight, predictions.dtype)
      total = tf.reduce_sum(row_losses)
    reason = _uncovered_reason(records, variables, _keys(outside.watched_variables()),
                               tf.nest.flatten(rows_x)[0].shape[0])
    if reason is not None:
      return _whole_batch_fallback(reason, reason, vectorized_args)
    _check_record_rows(records, tf.shape(tf.nest.flatten(rows_x)[0])[0])
    output_grads = tape.gradient(total, [r.outputs for r in records],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
    mask_of = {_key(v): m for v, m in zip(variables, masks)}
    wanted = {_key(v) for v in variables}
    pieces = [_group_pieces([records[i] for i in group], [output_grads[i] for i in group],
                            batch, views, mask_of, wanted)
              for group in _groups_sharing_variables(records, wanted)]
    pieces = [p for p in pieces if p.variables]
    # float64: a squared norm beyond float32's range is kept (a float32 norm above 3.4e38
    # becomes inf and the example is dropped, never under-clipped).
    squared = tf.add_n([tf.cast(p.squared_norms, tf.float64) for p in pieces]
                       + [tf.zeros(tf.shape(sample_weight)[:1], tf.float64)])
    norms = tf.cast(tf.sqrt(squared), tf.float32)
    factors, kept, num_non_finite = clipping.clip_weights(norms, sample_weight, l2_norm_clip)
    sums = {}
    for piece in pieces:  # every wanted variable is in one piece at most (one group)
      for variable, summed in zip(piece.variables, piece.clipped_sum(factors, kept)):
        sums[_key(variable)] = summed
    # A variable the forward pass never reads has a zero gradient.
    grads = [sums[_key(v)] if _key(v) in sums else tf.zeros_like(v) for v in variables]
    clipped = clipping.ClippedSum(grads, batch, num_non_finite,
                                  clipping.dropped_units(kept, sample_weight))
    # Rows carry weight w / K: an example's loss, the mean over its views, is their sum.
    losses = tf.reduce_sum(tf.reshape(row_losses, [batch, num_views]), axis=1)
    if views:
      predictions = tf.nest.map_structure(
          lambda t: tf.reshape(t, tf.concat([[batch, num_views], tf.shape(t)[1:]], 0))[:, 0],
          predictions)
    return per_example.EngineOutput(clipped, losses, predictions)


def _whole_batch_fallback(key, reason, vectorized_args):
  _report_once(key, "PerLayerEngine: %s; using the vectorized engine for the whole batch.",
               reason)
  return per_example.VectorizedEngine().clipped_sum(*vectorized_args)


# ---- variables: which calls reach them --------------------------------------------------------

def _key(variable):
  """A variable's identity (the variable under a mixed-precision AutoCastVariable)."""
  return getattr(variable, "_variable", variable).ref()


def _keys(variables) -> frozenset:
  return frozenset(_key(v) for v in variables)


def _uncovered_reason(records, variables, read_outside, static_rows) -> Optional[str]:
  """Why the captured calls do not account for every use of the trainable variables, or None.

  A variable read outside the captured calls (`read_outside`), or read by a captured call that
  does not own it, has uses whose per-example gradients the records cannot give."""
  escaped = set(read_outside)
  for record in records:
    escaped |= record.reads - _keys(_record_variables(record))
  names = [v.name for v in variables if _key(v) in escaped]
  if names:
    return (f"variables {names} are used outside the layer calls that own them (tied weights, "
            "or a layer called with several tensor inputs)")
  for record in records:
    rows = record.inputs.shape[0] if record.inputs.shape.rank else None
    if static_rows is not None and rows is not None and rows != static_rows:
      return (f"layer {record.layer.name} sees {rows} rows where the model sees {static_rows} "
              "(a wrapper folds other axes into the batch)")
  return None


def _check_record_rows(records, rows):
  """Every captured call must see one row per model row; a layer that folds other axes into
  the batch would mix examples in its rows (static shapes are checked in _uncovered_reason)."""
  for record in records:
    tf.debugging.assert_equal(
        tf.shape(record.inputs)[0], rows,
        message=f"PerLayerEngine: layer {record.layer.name} is called on a batch with another "
        "number of rows than the model's; use per_example_engine='vectorized'.")


def _groups_sharing_variables(records, wanted) -> List[List[int]]:
  """Record indices grouped so that records sharing a wanted variable are in one group."""
  parent = list(range(len(records)))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  first_user = {}
  for i, record in enumerate(records):
    for key in _keys(_record_variables(record)) & wanted:
      if key in first_user:
        parent[root(i)] = root(first_user[key])
      else:
        first_user[key] = i
  groups = {}
  for i in range(len(records)):
    groups.setdefault(root(i), []).append(i)
  return list(groups.values())


# ---- capture ------------------------------------------------------------------------------------

def _unsupported_reason(model, num_microbatches) -> Optional[str]:
  if num_microbatches:
    return "num_microbatches is set (clipping units are groups of examples)"
  if model.losses:
    return "the model has regularization losses (added to every example's loss)"
  return None


def _rows(x, y, sample_weight, views):
  """One row per view: x [B, K, ...] -> [B*K, ...], y and weights repeated, weights / K (the
  loss of an example is the mean of its views' losses)."""
  if not views:
    return x, y, sample_weight
  num_views = tf.shape(x)[1]
  rows_x = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
  rows_y = tf.nest.map_structure(lambda t: tf.repeat(t, num_views, axis=0), y)
  weight = tf.repeat(sample_weight, num_views) / tf.cast(num_views, sample_weight.dtype)
  return rows_x, rows_y, weight


def _captured_layers(model):
  """The layers whose calls are recorded: leaves with trainable weights, and wrappers
  (TimeDistributed, Bidirectional) as a whole; never a layer inside another captured one."""
  candidates = [m for m in model.submodules
                if isinstance(m, keras.layers.Layer) and not isinstance(m, keras.Model)
                and m.trainable_weights
                and (isinstance(m, keras.layers.Wrapper) or not _has_weighted_sublayers(m))]
  inside = {id(s) for c in candidates for s in c.submodules}
  return [c for c in candidates if id(c) not in inside]


def _has_weighted_sublayers(layer):
  return any(isinstance(m, keras.layers.Layer) and m.trainable_weights
             for m in layer.submodules if m is not layer)


@contextlib.contextmanager
def _capturing(model, records):
  """Replaces `call` of every captured layer by a recording one, for the forward pass. Yields a
  tape that sees the trainable variables read OUTSIDE the recorded calls (each recorded call
  pauses it and notes its own reads)."""
  outside = tf.GradientTape(watch_accessed_variables=True)
  patched = []
  try:
    for layer in _captured_layers(model):
      patched.append((layer, layer.__dict__.get("call")))
      layer.call = _recording_call(layer, records, outside)
    with outside:
      yield outside
  finally:
    for layer, original in patched:
      if original is None:
        del layer.call
      else:
        layer.call = original


def _recording_call(layer, records, outside):
  original = type(layer).call.__get__(layer)
  kind = _kind(layer)

  def call(inputs, *args, **kwargs):
    if args or not isinstance(inputs, tf.Tensor) or any(
        isinstance(v, tf.Tensor) for v in kwargs.values()):
      _report_once(f"args:{layer.name}", "PerLayerEngine: layer %s is called with more than "
                   "one tensor; its variables are not captured.", layer.name)
      return original(inputs, *args, **kwargs)  # its reads are seen by `outside`
    with outside.stop_recording(), tf.GradientTape() as own:
      if kind not in (SCALE_SHIFT, GENERIC):
        outputs, record = _specialized_call(layer, kind, inputs)
      else:
        outputs = original(inputs, **kwargs)
        record_kind = (SCALE_SHIFT if kind == SCALE_SHIFT
                       and _last_axis_only(layer, inputs.shape.rank) else GENERIC)
        if record_kind == GENERIC:
          _report_once(f"generic:{type(layer).__name__}", "PerLayerEngine: no per-layer rule "
                       "for %s (as configured); its per-example gradients use "
                       "tf.vectorized_map over that layer only.", type(layer).__name__)
        record = _Record(layer, record_kind, inputs, outputs, kwargs)
    records.append(dataclasses.replace(record, reads=_keys(own.watched_variables())))
    return outputs

  return call


def _kind(layer) -> str:
  if type(layer) is keras.layers.Dense:
    return DENSE
  windowed = (getattr(layer, "data_format", None) == "channels_last"
              and getattr(layer, "padding", None) in ("valid", "same"))
  if (type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D, models.WSConv2D) and windowed
      and layer.groups == 1):
    return CONV
  if type(layer) is keras.layers.DepthwiseConv2D and windowed:
    return DEPTHWISE
  if type(layer) is keras.layers.Embedding and not layer.sparse:
    return EMBEDDING
  if type(layer) in _NORMALIZATIONS:
    return SCALE_SHIFT
  return GENERIC


def _last_axis_only(layer, rank) -> bool:
  """Whether the normalization's gamma/beta index the last axis only (one entry per channel)."""
  if isinstance(layer, keras.layers.GroupNormalization):
    return layer.axis in (-1, rank - 1)
  axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
  return [a % rank for a in axes] == [rank - 1]


def _specialized_call(layer, kind, inputs):
  """The layer's own computation, and its record (with the pre-activation output)."""
  if kind == EMBEDDING:
    ids = tf.cast(inputs, tf.int32) if inputs.dtype not in (tf.int32, tf.int64) else inputs
    outputs = tf.nn.embedding_lookup(layer.embeddings, ids)
    if outputs.dtype != layer.compute_dtype:
      outputs = tf.cast(outputs, layer.compute_dtype)
    return outputs, _Record(layer, kind, ids, outputs)
  a = tf.cast(inputs, layer.compute_dtype) if inputs.dtype != layer.compute_dtype else inputs
  z = _pre_activation(layer, kind, a)
  outputs = layer.activation(z) if layer.activation is not None else z
  return outputs, _Record(layer, kind, a, z)


def _pre_activation(layer, kind, a):
  """Dense, Conv and DepthwiseConv2D before their activation (WSConv2D: standardized kernel)."""
  if kind == DENSE:
    rank = a.shape.rank
    z = (tf.matmul(a, layer.kernel) if rank == 2
         else tf.tensordot(a, layer.kernel, [[rank - 1], [0]]))
  elif kind == DEPTHWISE:
    z = keras.backend.depthwise_conv2d(a, layer.depthwise_kernel, strides=layer.strides,
                                       padding=layer.padding,
                                       dilation_rate=layer.dilation_rate)
  else:  # Conv1D/Conv2D's own op, given the (for WSConv2D: standardized) kernel
    kernel = layer.kernel
    if isinstance(layer, models.WSConv2D):
      kernel = layer.standardized_kernel(kernel)
    z = keras.layers.Conv2D.convolution_op(layer, a, kernel)
  return tf.nn.bias_add(z, layer.bias) if layer.use_bias else z


def _record_variables(record) -> list:
  layer = record.layer
  if record.kind == EMBEDDING:
    return [layer.embeddings]
  if record.kind in (DENSE, CONV):
    return [layer.kernel] + ([layer.bias] if layer.use_bias else [])
  if record.kind == DEPTHWISE:
    return [layer.depthwise_kernel] + ([layer.bias] if layer.use_bias else [])
  return list(layer.trainable_weights)


# ---- per-layer pieces ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Pieces:
  """One record's contribution: per-example squared norms [B] and a function giving the
  clipped sums of its variables from the clip factors."""
  variables: list
  squared_norms: tf.Tensor
  clipped_sum: Any  # (factors [B], kept [B] bool) -> list of sums, one per variable


def _group_pieces(records, output_grads, batch, views, mask_of, wanted) -> _Pieces:
  """The pieces of records that share variables: per-example gradients of every call, added
  per variable BEFORE the norm (an example's gradient is the sum over all its uses)."""
  if len(records) == 1:
    return _layer_pieces(records[0], output_grads[0], batch, views, mask_of, wanted)
  if all(r.kind == EMBEDDING for r in records):  # one table: one segment sum over all tokens
    merged, merged_g = _merged_embedding_calls(records, output_grads, batch)
    return _layer_pieces(merged, merged_g, batch, views, mask_of, wanted)
  order, summed = [], {}
  for record, g in zip(records, output_grads):
    variables = [v for v in _record_variables(record) if _key(v) in wanted]
    masks = [tf.cast(mask_of[_key(v)], g.dtype) for v in variables]
    grads = _select(record, _per_example_grads(record, g, batch), variables, masks)
    for variable, grad in zip(variables, grads):
      key = _key(variable)
      if key not in summed:
        order.append(variable)
        summed[key] = grad
      else:
        summed[key] = summed[key] + grad
  return _from_per_example(order, [summed[_key(v)] for v in order], batch)


def _merged_embedding_calls(records, output_grads, batch):
  """Several calls of one Embedding as one call on all their tokens, per example."""
  ids = tf.concat([tf.reshape(r.inputs, tf.stack([batch, -1])) for r in records], axis=1)
  grads = tf.concat([tf.reshape(g, tf.stack([batch, -1, tf.shape(g)[-1]]))
                     for g in output_grads], axis=1)
  return _Record(records[0].layer, EMBEDDING, ids, grads), grads


def _per_example_grads(record, g, batch) -> list:
  """Materialized per-example gradients [B, ...] of all the record's variables (the path of a
  record whose variables other records also reach)."""
  if record.kind in (DENSE, CONV, DEPTHWISE):
    return _materialized(record, g, batch)
  if record.kind == EMBEDDING:
    return [_embedding_per_example(record, g, batch)]
  if record.kind == SCALE_SHIFT:
    return _scale_and_shift(record, g, batch)
  return _generic(record, g, batch)


def _layer_pieces(record, g, batch, views, mask_of, wanted) -> _Pieces:
  variables = [v for v in _record_variables(record) if _key(v) in wanted]
  if not variables:
    return _Pieces([], None, None)
  masks = [tf.cast(mask_of[_key(v)], g.dtype) for v in variables]
  if record.kind == DENSE and record.inputs.shape.rank == 2 and not views:
    return _dense_rank_one(record, g, variables, masks)
  if record.kind == EMBEDDING:
    return _embedding(record, g, batch, variables, masks)
  if record.kind in (DENSE, CONV, DEPTHWISE):
    return _windowed(record, g, batch, variables, masks)
  per_example = (_scale_and_shift(record, g, batch) if record.kind == SCALE_SHIFT
                 else _generic(record, g, batch))
  return _from_per_example(variables, _select(record, per_example, variables, masks), batch)


def _select(record, grads, variables, masks):
  """The masked per-example gradients of `variables`, from those of all the record's."""
  by_key = {_key(v): grad for v, grad in zip(_record_variables(record), grads)}
  return [by_key[_key(v)] * m for v, m in zip(variables, masks)]


def _from_per_example(variables, grads, batch) -> _Pieces:
  """Pieces from materialized masked per-example gradients [B, ...], one per variable."""
  squared = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(t), [batch, -1]), axis=1)
                      for t in grads])
  return _Pieces(variables, squared,
                 lambda factors, kept: [clipping.weighted_batch_sum(t, kept, factors)
                                        for t in grads])


def _dense_rank_one(record, g, variables, masks) -> _Pieces:
  """Dense on vectors: example i's kernel gradient is the outer product a_i g_i^T."""
  a = record.inputs
  layer = record.layer
  mask_by_key = {_key(v): m for v, m in zip(variables, masks)}
  wants_kernel = _key(layer.kernel) in mask_by_key
  wants_bias = layer.use_bias and _key(layer.bias) in mask_by_key
  squared = _rank_one_squared_norms(
      a, g, mask_by_key[_key(layer.kernel)] if wants_kernel else None,
      mask_by_key[_key(layer.bias)] if wants_bias else None)

  def clipped_sum(factors, kept):
    rows = tf.expand_dims(kept, 1)
    weighted_g = tf.where(rows, g, tf.zeros_like(g)) * tf.cast(tf.expand_dims(factors, 1),
                                                               g.dtype)
    sums = []
    if wants_kernel:
      clean_a = tf.where(rows, a, tf.zeros_like(a))
      sums.append(tf.matmul(clean_a, weighted_g, transpose_a=True)
                  * mask_by_key[_key(layer.kernel)])
    if wants_bias:
      sums.append(tf.reduce_sum(weighted_g, axis=0) * mask_by_key[_key(layer.bias)])
    return sums

  ordered = ([layer.kernel] if wants_kernel else []) + ([layer.bias] if wants_bias else [])
  return _Pieces(ordered, squared, clipped_sum)


def _rank_one_squared_norms(a, g, kernel_mask, bias_mask):
  """sum_jk M_jk a_ij^2 g_ik^2 (+ sum_k m_k g_ik^2 for the bias), in float64: squares of
  float32 values (inputs of 1e-19, output gradients of 1e19) underflow or overflow in float32,
  and a norm that underflows to 0 would leave the example unclipped."""
  a, g = tf.cast(a, tf.float64), tf.cast(g, tf.float64)
  g_squared = tf.square(g)
  squared = tf.zeros(tf.shape(g)[:1], tf.float64)
  if kernel_mask is not None:
    squared += tf.reduce_sum(
        tf.matmul(tf.square(a), tf.cast(kernel_mask, tf.float64)) * g_squared, axis=1)
  if bias_mask is not None:
    squared += tf.reduce_sum(g_squared * tf.cast(bias_mask, tf.float64), axis=1)
  return squared


def _windowed(record, g, batch, variables, masks) -> _Pieces:
  """Dense on sequences or views, Conv1D/Conv2D/WSConv2D, DepthwiseConv2D: per-example
  gradients of small kernels over few positions are formed for the whole batch at once;
  otherwise one example at a time (see the module docstring)."""
  if _batched_is_cheaper(record):
    return _from_per_example(
        variables, _select(record, _materialized(record, g, batch), variables, masks), batch)
  return _one_example_at_a_time(record, g, batch, variables, masks)


# Measured on CPU (2 cores, tf 2.21): the batched product of input patches wins only for small
# kernels over few positions (the MNIST tutorial CNN); elsewhere the per-example loop of the
# layer's own weight-gradient op is 1.4-3x faster and needs no batch x kernel memory.
_BATCHED_MAX_POSITIONS = 255
_BATCHED_MAX_KERNEL = 16384


def _batched_is_cheaper(record) -> bool:
  positions = record.outputs.shape[1:-1].num_elements()
  kernel = _record_variables(record)[0].shape.num_elements()
  return positions is not None and positions <= _BATCHED_MAX_POSITIONS and (
      kernel <= _BATCHED_MAX_KERNEL)


def _one_example_at_a_time(record, g, batch, variables, masks) -> _Pieces:
  """Norms: one example at a time (`tf.map_fn`), the layer's own weight-gradient op on that
  example's input and output gradient (through WSConv2D's standardization), masked and reduced
  to a number at once, so memory holds a few kernels, never batch x kernel. Clipped sum: the
  same op once for the batch, each row's output gradient scaled by its clip factor (the
  gradient is linear in g, and masks are elementwise, so they commute with it).
  """
  layer, kind = record.layer, record.kind
  example_inputs = _per_example_rows_any(record.inputs, batch)
  example_grads = _per_example_rows_any(g, batch)

  def masked_grads(inputs, output_grads):
    with tf.GradientTape() as tape:
      z = _pre_activation(layer, kind, inputs)
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
    return masked_grads(_zero_rows(record.inputs, row_kept), scaled_g)

  return _Pieces(variables, squared, clipped_sum)


def _zero_rows(t, row_kept):
  shape = tf.concat([tf.shape(row_kept), tf.ones([tf.rank(t) - 1], tf.int32)], axis=0)
  return tf.where(tf.reshape(row_kept, shape), t, tf.zeros_like(t))


def _scale_rows(t, row_factors):
  shape = tf.concat([tf.shape(row_factors), tf.ones([tf.rank(t) - 1], tf.int32)], axis=0)
  return t * tf.reshape(row_factors, shape)


def _per_example_rows(t, batch):
  """[B*K, ..., d] -> [B, K*..., d]: every position of every view of an example in one axis."""
  return tf.reshape(t, tf.stack([batch, -1, tf.shape(t)[-1]]))


def _materialized(record, g, batch) -> list:
  """Per-example kernel (and bias) gradients of Dense on sequences or views, of Conv1D/Conv2D
  (input patches x output gradients) and of DepthwiseConv2D (the same, per channel)."""
  layer = record.layer
  g_rows = _per_example_rows(g, batch)
  if record.kind == DENSE:
    kernel = layer.kernel
    kernel_grads = tf.einsum("bpi,bpo->bio", _per_example_rows(record.inputs, batch), g_rows)
  elif record.kind == CONV:
    kernel = layer.kernel
    kernel_grads = tf.einsum("bpi,bpo->bio", _patches(layer, record.inputs, batch), g_rows)
  else:  # depthwise: output channel c * multiplier + m reads input channel c only
    kernel = layer.depthwise_kernel
    channels = tf.shape(kernel)[2]
    patches = _patches(layer, record.inputs, batch)
    patches = tf.reshape(patches, tf.stack([batch, tf.shape(patches)[1], -1, channels]))
    per_channel = tf.reshape(g_rows, tf.stack([batch, tf.shape(g_rows)[1], channels, -1]))
    kernel_grads = tf.einsum("bpkc,bpcm->bkcm", patches, per_channel)
  kernel_grads = tf.reshape(kernel_grads, tf.concat([[batch], tf.shape(kernel)], 0))
  if isinstance(layer, models.WSConv2D):
    kernel_grads = _through_standardization(layer, kernel_grads)
  grads = [kernel_grads]
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
  return _per_example_rows(patches, batch)


def _through_standardization(layer, grads_wrt_standardized):
  """Maps per-example gradients w.r.t. the standardized kernel to the raw kernel (VJP)."""
  kernel = tf.convert_to_tensor(layer.kernel)

  def vjp(cotangent):
    with tf.GradientTape() as tape:
      tape.watch(kernel)
      standardized = layer.standardized_kernel(kernel)
    return tape.gradient(standardized, kernel, output_gradients=cotangent)

  return tf.vectorized_map(vjp, grads_wrt_standardized)


def _embedding_pairs(record, g, batch):
  """Per (example, token id) pair that occurs: the summed output gradients [pairs, d], and the
  pair's example and id. An id outside [0, vocabulary) is charged to its own example as NaN
  (the example is then dropped and counted), never to another example's key."""
  table = record.layer.embeddings
  vocabulary = tf.shape(table, out_type=tf.int64)[0]
  ids = tf.reshape(tf.cast(record.inputs, tf.int64), tf.stack([tf.cast(batch, tf.int64), -1]))
  positions = tf.shape(ids, out_type=tf.int64)[1]
  example = tf.repeat(tf.range(tf.cast(batch, tf.int64)), positions)
  flat_ids = tf.reshape(ids, [-1])
  valid = tf.logical_and(flat_ids >= 0, flat_ids < vocabulary)
  rows = tf.reshape(g, [-1, tf.shape(g)[-1]])
  rows = tf.where(tf.expand_dims(valid, 1), rows, tf.fill(tf.shape(rows),
                                                          tf.constant(float("nan"), g.dtype)))
  flat_ids = tf.where(valid, flat_ids, tf.zeros_like(flat_ids))
  pairs, pair_index = tf.unique(example * vocabulary + flat_ids)
  grads = tf.math.unsorted_segment_sum(rows, pair_index, tf.shape(pairs)[0])  # [pairs, d]
  return grads, pairs // vocabulary, pairs % vocabulary


def _embedding(record, g, batch, variables, masks) -> _Pieces:
  """Per-example embedding gradients: for each example, the output gradients of its positions
  summed per token id; only the (example, id) pairs that occur are formed."""
  vocabulary = tf.shape(record.layer.embeddings)[0]
  grads, pair_example, pair_row = _embedding_pairs(record, g, batch)
  masked = grads * tf.gather(masks[0], pair_row)
  squared = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(masked), axis=1),
                                         pair_example, batch)

  def clipped_sum(factors, kept):
    pair_kept = tf.gather(kept, pair_example)
    weights = tf.where(pair_kept, tf.cast(tf.gather(factors, pair_example), g.dtype), 0.0)
    clean = tf.where(tf.expand_dims(pair_kept, 1), masked, tf.zeros_like(masked))
    return [tf.math.unsorted_segment_sum(clean * tf.expand_dims(weights, 1), pair_row,
                                         vocabulary)]

  return _Pieces(variables, squared, clipped_sum)


def _embedding_per_example(record, g, batch):
  """The embedding table's per-example gradients [B, vocabulary, d], materialized."""
  table = record.layer.embeddings
  grads, pair_example, pair_row = _embedding_pairs(record, g, batch)
  vocabulary = tf.shape(table, out_type=tf.int64)[0]
  dense = tf.math.unsorted_segment_sum(grads, pair_example * vocabulary + pair_row,
                                       tf.cast(batch, tf.int64) * vocabulary)
  return tf.reshape(dense, tf.concat([[batch], tf.shape(table)], 0))


def _scale_and_shift(record, g, batch) -> list:
  """GroupNormalization/LayerNormalization over the last axis compute y = xhat * gamma + beta,
  one gamma and beta per channel: example i's gradients are the sums over its positions of
  g_i * xhat_i (gamma) and of g_i (beta). xhat = dy/dgamma along gamma = ones, one forward-mode
  product over the whole batch (the normalization never mixes examples)."""
  layer = record.layer
  original = type(layer).call.__get__(layer)
  channels = tf.shape(g)[-1]
  per_position = {}
  if layer.scale:
    with tf.autodiff.ForwardAccumulator(layer.gamma, tf.ones_like(layer.gamma)) as accumulator:
      outputs = original(record.inputs, **record.call_kwargs)
    per_position[_key(layer.gamma)] = g * accumulator.jvp(outputs)
  if layer.center:
    per_position[_key(layer.beta)] = g
  return [tf.reduce_sum(tf.reshape(per_position[_key(v)], tf.stack([batch, -1, channels])), axis=1)
          for v in layer.trainable_weights]


def _generic(record, g, batch) -> list:
  """The layer alone, re-run per example inside tf.vectorized_map, differentiated at its
  captured input with its captured output gradient."""
  layer = record.layer
  weights = list(layer.trainable_weights)
  original = type(layer).call.__get__(layer)
  inputs = _per_example_rows_any(record.inputs, batch)
  cotangents = _per_example_rows_any(g, batch)

  def one_example(args):
    a, cotangent = args
    with tf.GradientTape() as tape:
      outputs = original(a, **record.call_kwargs)
    return [tf.convert_to_tensor(t) for t in tape.gradient(
        outputs, weights, output_gradients=cotangent,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)]

  return tf.vectorized_map(one_example, (inputs, cotangents))


def _per_example_rows_any(t, batch):
  """[B*K, ...] -> [B, K, ...], K the views (1 without), trailing axes kept as they are."""
  return tf.reshape(t, tf.concat([[batch, -1], tf.shape(t)[1:]], 0))


def _report_once(key, message, *args):
  if key not in _reported:
    _reported.add(key)
    logging.warning(message, *args)
