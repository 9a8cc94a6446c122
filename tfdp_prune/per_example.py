"""Per-example gradient engines: the seam between "how per-example gradients are obtained" and
the DP aggregation around it.

An engine maps one physical batch to the sum of its masked, clipped per-example gradients
(`clipping.ClippedSum`), plus the per-example losses and predictions Keras needs for its metrics.
The reference engine below materializes every example's gradient with `tf.vectorized_map`; a
faster engine (per-layer norms, ghost clipping) implements the same `clipped_sum` signature.
Engines by name: `engines`.
"""

import abc
from typing import Callable, NamedTuple, Sequence

from tfdp_prune import augmult
from tfdp_prune import clipping
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


class EngineOutput(NamedTuple):
  clipped: clipping.ClippedSum
  losses: tf.Tensor  # per-example loss, weighted, shape [batch]
  predictions: object  # the model's output for the batch (training mode)


class PerExampleEngine(abc.ABC):
  """Computes the clipped sum of per-example gradients for one batch."""

  @abc.abstractmethod
  def clipped_sum(self, model: keras.Model, loss_fn: Callable, x, y, sample_weight: tf.Tensor,
                  variables: Sequence[tf.Variable], masks: Sequence[tf.Tensor],
                  l2_norm_clip, num_microbatches=None) -> EngineOutput:
    """`loss_fn(y_true, y_pred)` returns one loss per example; `sample_weight` is [batch].
    With `num_microbatches`, the clipping unit is a microbatch (see `clipping.clipped_sum`)."""

  def get_config(self) -> dict:
    return {}


class VectorizedEngine(PerExampleEngine):
  """Every example's full gradient via `tf.vectorized_map` over single-example forward and
  backward passes: memory grows as batch x parameters, work as the batch (no Python loop).

  Augmentation multiplicity: when `x` is [batch, K, ...] for a model whose input is [batch, ...]
  (`augmult.has_views`), each example's loss is the mean over its K views, computed with one
  forward pass on the K views, before masking and clipping."""

  def clipped_sum(self, model, loss_fn, x, y, sample_weight, variables, masks, l2_norm_clip,
                  num_microbatches=None):
    views = augmult.has_views(model, x)

    def one_example(example):
      xi, yi, wi = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), example)
      if views:  # augmult: xi is [1, K, ...]; the K views are one example, one clipping unit
        xi = xi[0]
        yi = tf.repeat(yi, tf.shape(xi)[0], axis=0)
      with tf.GradientTape() as tape:
        prediction = model(xi, training=True)
        loss = tf.reduce_sum(loss_fn(yi, prediction) * tf.cast(wi, prediction.dtype))
        if views:  # the MEAN of the K views' losses: its gradient is the one clipped below
          loss /= tf.cast(tf.shape(xi)[0], loss.dtype)
        if model.losses:  # regularizers: added to every example's loss, as Keras does
          loss += tf.add_n(model.losses)
      grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      grads = [tf.convert_to_tensor(g) for g in grads]  # Embedding gives IndexedSlices
      # Metrics see the first (with views) or only prediction.
      return grads, loss, tf.nest.map_structure(lambda t: t[0], prediction)

    grads, losses, predictions = tf.vectorized_map(one_example, (x, y, sample_weight))
    clipped = clipping.clipped_sum(grads, masks, l2_norm_clip, sample_weight, num_microbatches)
    return EngineOutput(clipped, losses, predictions)
