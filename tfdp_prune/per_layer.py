"""The per-layer per-example engine: one forward and one backward pass, then each example's
masked gradient norm and the clipped sum, layer by layer, from what the passes captured.

`PerLayerEngine` does the capture and the grouping of calls (a variable's calls are one
group); `layer_rules` holds how each kind of layer is handled.

Design: docs/per-layer-engine.md
"""

import contextlib
import dataclasses
from typing import List, Optional

from absl import logging

from tfdp_prune import augmult
from tfdp_prune import clipping
from tfdp_prune import example_loop
from tfdp_prune import layer_rules
from tfdp_prune import per_example
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules.base import CapturedCall
from tfdp_prune.layer_rules.base import variable_key as _key

_reported = set()


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
    records: List[CapturedCall] = []
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
    pieces = [p for p in pieces if p.variables or p.loop]
    # float64, so that a squared norm beyond float32's range is kept (`norms_of_squares`).
    squared = tf.add_n([tf.cast(p.squared_norms, tf.float64) for p in pieces if p.variables]
                       + [tf.zeros(tf.shape(sample_weight)[:1], tf.float64)])
    loops = [p.loop for p in pieces if p.loop]
    sums = {}
    if loops:  # their norms and their sums, in one loop over the examples
      squared, loop_sums = example_loop.norms_and_sums(loops, squared, sample_weight,
                                                       l2_norm_clip)
      for loop, summed in zip(loops, loop_sums):
        sums.update((_key(v), s) for v, s in zip(loop.variables, summed))
    factors, kept, num_non_finite = clipping.clip_weights(clipping.norms_of_squares(squared),
                                                          sample_weight, l2_norm_clip)
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

def _keys(variables) -> frozenset:
  return frozenset(_key(v) for v in variables)


def _uncovered_reason(records, variables, read_outside, static_rows) -> Optional[str]:
  """Why the captured calls do not account for every use of the trainable variables, or None.

  A variable read outside the captured calls (`read_outside`), or read by a captured call that
  does not own it, has uses whose per-example gradients the records cannot give."""
  escaped = set(read_outside)
  for record in records:
    escaped |= record.reads - _keys(record.rule.variables(record.layer))
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
    for key in _keys(record.rule.variables(record.layer)) & wanted:
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
  rule = layer_rules.rule_for(layer)

  def call(inputs, *args, **kwargs):
    if args or not isinstance(inputs, tf.Tensor) or any(
        isinstance(v, tf.Tensor) for v in kwargs.values()):
      _report_once(f"args:{layer.name}", "PerLayerEngine: layer %s is called with more than "
                   "one tensor; its variables are not captured.", layer.name)
      return original(inputs, *args, **kwargs)  # its reads are seen by `outside`
    with outside.stop_recording(), tf.GradientTape() as own:
      call_rule = rule if rule.applies(layer, inputs) else layer_rules.GENERIC
      if call_rule is layer_rules.GENERIC:
        _report_once(f"generic:{type(layer).__name__}", "PerLayerEngine: no per-layer rule "
                     "for %s (as configured); its per-example gradients use "
                     "tf.vectorized_map over that layer only.", type(layer).__name__)
      outputs, record = call_rule.capture(layer, original, inputs, kwargs)
    records.append(dataclasses.replace(record, reads=_keys(own.watched_variables())))
    return outputs

  return call


# ---- per-layer pieces ---------------------------------------------------------------------------

def _group_pieces(records, output_grads, batch, views, mask_of, wanted) -> layer_rules.Pieces:
  """The pieces of records that share variables: per-example gradients of every call, added
  per variable BEFORE the norm (an example's gradient is the sum over all its uses)."""
  if len(records) == 1:
    return _layer_pieces(records[0], output_grads[0], batch, views, mask_of, wanted)
  rule = records[0].rule
  merged = (rule.merge_calls(records, output_grads, batch)
            if all(r.rule is rule for r in records) else None)
  if merged is not None:  # e.g. one Embedding table: one segment sum over all tokens
    return _layer_pieces(*merged, batch, views, mask_of, wanted)
  order, summed = [], {}
  for record, g in zip(records, output_grads):
    variables = [v for v in record.rule.variables(record.layer) if _key(v) in wanted]
    masks = [tf.cast(mask_of[_key(v)], g.dtype) for v in variables]
    grads = layer_rules.select(record.rule, record,
                               record.rule.per_example_grads(record, g, batch), variables, masks)
    for variable, grad in zip(variables, grads):
      key = _key(variable)
      if key not in summed:
        order.append(variable)
        summed[key] = grad
      else:
        summed[key] = summed[key] + grad
  return layer_rules.from_per_example(order, [summed[_key(v)] for v in order], batch)


def _layer_pieces(record, g, batch, views, mask_of, wanted) -> layer_rules.Pieces:
  variables = [v for v in record.rule.variables(record.layer) if _key(v) in wanted]
  if not variables:
    return layer_rules.Pieces([], None, None)
  masks = [tf.cast(mask_of[_key(v)], g.dtype) for v in variables]
  return record.rule.pieces(record, g, batch, views, variables, masks)


def _report_once(key, message, *args):
  if key not in _reported:
    _reported.add(key)
    logging.warning(message, *args)
