"""The embedding rule: per-example gradients of the table are the output gradients of the
example's positions summed per token id; only the (example, id) pairs that occur are formed."""

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base


class EmbeddingRule(base.LayerRule):
  """Embedding (not sparse): segment sums over token ids, masked by row. Several calls of one
  table are one call on all their tokens, so an example's rows add up before the norm."""

  layer_classes = (keras.layers.Embedding,)

  def applies(self, layer, inputs):
    return not layer.sparse

  def variables(self, layer):
    return [layer.embeddings]

  def capture(self, layer, original_call, inputs, kwargs):
    """The lookup itself, so that the recorded input is the ids."""
    ids = tf.cast(inputs, tf.int32) if inputs.dtype not in (tf.int32, tf.int64) else inputs
    outputs = tf.nn.embedding_lookup(layer.embeddings, ids)
    if outputs.dtype != layer.compute_dtype:
      outputs = tf.cast(outputs, layer.compute_dtype)
    return outputs, base.CapturedCall(layer, self, ids, outputs)

  def per_example_grads(self, call, g, batch):
    """The table's per-example gradients [B, vocabulary, d], materialized."""
    table = call.layer.embeddings
    grads, pair_example, pair_row = _pairs(call, g, batch)
    vocabulary = tf.shape(table, out_type=tf.int64)[0]
    dense = tf.math.unsorted_segment_sum(grads, pair_example * vocabulary + pair_row,
                                         tf.cast(batch, tf.int64) * vocabulary)
    return [tf.reshape(dense, tf.concat([[batch], tf.shape(table)], 0))]

  def pieces(self, call, g, batch, views, variables, masks):
    vocabulary = tf.shape(call.layer.embeddings)[0]
    grads, pair_example, pair_row = _pairs(call, g, batch)
    masked = grads * tf.gather(masks[0], pair_row)
    squared = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(masked), axis=1),
                                           pair_example, batch)

    def clipped_sum(factors, kept):
      pair_kept = tf.gather(kept, pair_example)
      weights = tf.where(pair_kept, tf.cast(tf.gather(factors, pair_example), g.dtype), 0.0)
      clean = tf.where(tf.expand_dims(pair_kept, 1), masked, tf.zeros([], masked.dtype))
      return [tf.math.unsorted_segment_sum(clean * tf.expand_dims(weights, 1), pair_row,
                                           vocabulary)]

    return base.Pieces(variables, squared, clipped_sum)

  def merge_calls(self, calls, output_grads, batch):
    """Several calls of one table as one call on all their tokens, per example."""
    ids = tf.concat([tf.reshape(c.inputs, tf.stack([batch, -1])) for c in calls], axis=1)
    grads = tf.concat([tf.reshape(g, tf.stack([batch, -1, tf.shape(g)[-1]]))
                       for g in output_grads], axis=1)
    return base.CapturedCall(calls[0].layer, self, ids, grads), grads


def _pairs(call, g, batch):
  """Per (example, token id) pair that occurs: the summed output gradients [pairs, d], and the
  pair's example and id. An id outside [0, vocabulary) is charged to its own example as NaN
  (the example is then dropped and counted), never to another example's key."""
  vocabulary = tf.shape(call.layer.embeddings, out_type=tf.int64)[0]
  ids = tf.reshape(tf.cast(call.inputs, tf.int64), tf.stack([tf.cast(batch, tf.int64), -1]))
  positions = tf.shape(ids, out_type=tf.int64)[1]
  example = tf.repeat(tf.range(tf.cast(batch, tf.int64)), positions)
  flat_ids = tf.reshape(ids, [-1])
  valid = tf.logical_and(flat_ids >= 0, flat_ids < vocabulary)
  rows = tf.reshape(g, [-1, tf.shape(g)[-1]])
  rows = tf.where(tf.expand_dims(valid, 1), rows,
                  tf.fill(tf.shape(rows), tf.constant(float("nan"), g.dtype)))
  flat_ids = tf.where(valid, flat_ids, tf.zeros_like(flat_ids))
  pairs, pair_index = tf.unique(example * vocabulary + flat_ids)
  grads = tf.math.unsorted_segment_sum(rows, pair_index, tf.shape(pairs)[0])  # [pairs, d]
  return grads, pairs // vocabulary, pairs % vocabulary
