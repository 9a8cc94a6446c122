"""Per-example gradient engines: the seam between "how per-example gradients are obtained" and
the DP aggregation around it.

An engine maps one physical batch to the sum of its masked, clipped per-example gradients
(`clipping.ClippedSum`), plus the per-example losses and predictions Keras needs for its metrics.
The reference engine below materializes every example's gradient with `tf.vectorized_map`; a
faster engine (per-layer norms, ghost clipping) implements the same `clipped_sum` signature.
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


def _per_layer_engine():
  # Imported on use: per_layer builds on this module (it falls back to VectorizedEngine).
  from tfdp_prune import per_layer  # pylint: disable=g-import-not-at-top
  return per_layer.PerLayerEngine


_ENGINES = {"vectorized": lambda: VectorizedEngine, "per_layer": _per_layer_engine}


def get(engine) -> PerExampleEngine:
  """An engine instance from an instance, a name, or a `get_config`-style dict."""
  if isinstance(engine, PerExampleEngine):
    return engine
  if isinstance(engine, dict) and engine.get("name") in _ENGINES:
    return _ENGINES[engine["name"]]()(**engine.get("config", {}))
  if isinstance(engine, str) and engine in _ENGINES:
    return _ENGINES[engine]()()
  raise ValueError(f"Expected per_example_engine to be one of {sorted(_ENGINES)} or a "
                   f"PerExampleEngine. Received: per_example_engine={engine!r}.")


def serialize(engine: PerExampleEngine) -> dict:
  for name, engine_class in _ENGINES.items():
    if type(engine) is engine_class():
      return {"name": name, "config": engine.get_config()}
  raise ValueError(f"Cannot serialize per-example engine {type(engine).__name__}: expected one "
                   f"of {sorted(_ENGINES)}.")
