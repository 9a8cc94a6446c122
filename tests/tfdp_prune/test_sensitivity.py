"""The DP step's sensitivity, end to end: with noise 0, SGD at learning rate 1 and one real row
in the batch, the update IS that example's contribution, and its norm must be at most C.

Checked over a zoo of models that exercise every per-layer rule and every way a variable can be
reached more than once (a layer called several times, a block reused, a nested model on two
inputs, one Embedding called twice, weights tied across layers), with augmult views and masks,
for both engines. Clipping binds in every case (the unclipped gradient is checked to be larger
than C), so an engine that under-counts a norm shows up as a contribution above C.
"""

import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import models
from tfdp_prune import per_layer
from tfdp_prune import ws_conv_rule
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import windowed
from tests.tfdp_prune import _testing as T

CLIP = 1e-3
ROWS = 4


class TiedOutput(keras.layers.Layer):
  """Logits from the transposed embedding table of another layer (weight tying)."""

  def __init__(self, embedding, **kwargs):
    super().__init__(**kwargs)
    self.embedding = embedding

  def call(self, inputs):
    return tf.matmul(inputs, self.embedding.embeddings, transpose_b=True)


class TiedKernel(keras.layers.Layer):
  """A leaf layer that holds another layer's (built) table as its own weight."""

  def __init__(self, embedding, **kwargs):
    super().__init__(**kwargs)
    self.table = embedding.embeddings  # tracked as this layer's trainable weight too

  def call(self, inputs):
    return tf.matmul(inputs, self.table, transpose_b=True)


def _halves(width):
  return (keras.layers.Lambda(lambda t: t[:, :width]),
          keras.layers.Lambda(lambda t: t[:, width:]))


def _dense_called_four_times():
  inputs = keras.Input((5,))
  shared = keras.layers.Dense(5, activation="tanh")
  hidden = keras.layers.Add()([shared(inputs) for _ in range(4)])
  return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _block_reused():
  inputs = keras.Input((5,))
  block = keras.layers.Dense(5, activation="tanh")
  return keras.Model(inputs, keras.layers.Dense(3)(block(block(block(inputs)))))


def _nested_model_on_two_inputs():
  inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="relu"),
                            keras.layers.Dense(4)])
  inputs = keras.Input((10,))
  first, second = _halves(5)
  joined = keras.layers.Concatenate()([inner(first(inputs)), inner(second(inputs))])
  return keras.Model(inputs, keras.layers.Dense(3)(joined))


def _siamese_conv():
  inputs = keras.Input((6, 6, 1))
  conv = keras.layers.Conv2D(3, 3, activation="relu")
  left = keras.layers.Lambda(lambda t: t[:, :, :4])(inputs)
  right = keras.layers.Lambda(lambda t: t[:, :, 2:])(inputs)
  joined = keras.layers.Concatenate()([keras.layers.Flatten()(conv(left)),
                                       keras.layers.Flatten()(conv(right))])
  return keras.Model(inputs, keras.layers.Dense(3)(joined))


def _embedding_called_twice():
  inputs = keras.Input((6,), dtype="int32")
  embedding = keras.layers.Embedding(11, 4)
  first, second = _halves(3)
  pooled = [keras.layers.GlobalAveragePooling1D()(embedding(part(inputs)))
            for part in (first, second)]
  return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Concatenate()(pooled)))


def _tied(output_layer):
  def build():
    inputs = keras.Input((6,), dtype="int32")
    embedding = keras.layers.Embedding(11, 4)
    pooled = keras.layers.GlobalAveragePooling1D()(embedding(inputs))
    return keras.Model(inputs, output_layer(embedding)(keras.layers.Dense(4)(pooled)))
  return build


def _sequential(layers, input_shape):
  return lambda: keras.Sequential([keras.Input(input_shape)] + layers())


# name -> (model builder, input shape per example, integer ids?, augmult views)
ZOO = {
    "dense": (_sequential(lambda: [keras.layers.Dense(8, activation="relu"),
                                   keras.layers.Dense(3)], (5,)), (5,), False, 0),
    "conv_group_norm_views": (_sequential(lambda: [
        models.WSConv2D(4, 3, padding="same"), keras.layers.GroupNormalization(2),
        keras.layers.Conv2D(3, 3, strides=2, activation="relu"),
        keras.layers.DepthwiseConv2D(2), keras.layers.Flatten(),
        keras.layers.LayerNormalization(), keras.layers.Dense(3)], (6, 6, 1)),
        (6, 6, 1), False, 3),
    "dense_on_sequences": (_sequential(lambda: [
        keras.layers.Conv1D(3, 2), keras.layers.Dense(4, activation="tanh"),
        keras.layers.TimeDistributed(keras.layers.Dense(2)), keras.layers.Flatten(),
        keras.layers.Dense(3)], (5, 2)), (5, 2), False, 0),
    "dense_called_four_times": (_dense_called_four_times, (5,), False, 0),
    "block_reused": (_block_reused, (5,), False, 0),
    "nested_model_on_two_inputs": (_nested_model_on_two_inputs, (10,), False, 0),
    "siamese_conv": (_siamese_conv, (6, 6, 1), False, 0),
    "embedding_called_twice": (_embedding_called_twice, (6,), True, 0),
    "tied_output_projection": (_tied(TiedOutput), (6,), True, 0),
    "tied_kernel_attribute": (_tied(TiedKernel), (6,), True, 0),
}


def _batch(input_shape, ids, views, seed):
  rng = np.random.default_rng(seed)
  shape = (ROWS,) + ((views,) if views else ()) + input_shape
  x = rng.integers(0, 11, shape).astype("int32") if ids else rng.normal(
      size=shape).astype("float32")
  return x, rng.integers(0, 3, ROWS).astype("int32")


def _contributions(name, engine, masked=(False, True), seed=0):
  """{m: (the one real row's update, one array per variable; norm of its unclipped masked
  gradient)} for each m in `masked` (False: all-1 masks; True: half the coordinates trained):
  one model and one traced step, the weights restored and the masks set before each (whether
  masks are all 1 is read when the step runs)."""
  build, input_shape, ids, views = ZOO[name]
  keras.utils.set_random_seed(seed)
  model = build()
  optimizer = tfdp_prune.DPKerasSGDOptimizer(
      l2_norm_clip=CLIP, noise_multiplier=0.0, learning_rate=1.0, expected_batch_size=1.0,
      per_example_engine=engine)
  model.compile(optimizer, T.per_example_loss())
  tfdp_prune.make_private(model)
  variables = model.trainable_variables
  optimizer.build(variables)
  x, y = _batch(input_shape, ids, views, seed)
  initial = model.get_weights()
  contributions = {}
  for half in masked:
    model.set_weights(initial)
    masks = T.random_masks(variables, keep=0.5 if half else 1.0, seed=seed)
    optimizer.set_update_masks(variables, masks)
    with tf.GradientTape() as tape:  # the real row's own gradient (mean over views)
      first = x[0] if views else x[:1]
      loss = tf.reduce_mean(T.per_example_loss()(np.repeat(y[:1], max(views, 1)),
                                                 model(first, training=True)))
    unclipped = np.sqrt(sum(np.sum((tf.convert_to_tensor(g).numpy() * m) ** 2)
                            for g, m in zip(tape.gradient(loss, variables), masks)))
    before = T.weights(model)
    model.train_on_batch(x, y, sample_weight=np.array([1] + [0] * (ROWS - 1), "float32"))
    contributions[half] = (
        [a.astype(np.float64) - b for a, b in zip(T.weights(model), before)], unclipped)
  return contributions


def _norm(arrays):
  return np.sqrt(sum(np.sum(a ** 2) for a in arrays))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_one_example_moves_the_model_by_at_most_the_clip_norm(name):
  by_engine = {engine: _contributions(name, engine) for engine in ("vectorized", "per_layer")}
  for masked in (False, True):
    updates = {}
    for engine, contributions in by_engine.items():
      updates[engine], unclipped = contributions[masked]
      assert unclipped > 3 * CLIP, "clipping must bind for the test to mean anything"
      # Clipping binds, so the update has norm C (up to float32 rounding), never more.
      ratio = _norm(updates[engine]) / CLIP
      assert 1 - 1e-2 <= ratio <= 1 + 1e-3, (name, engine, masked, ratio)
    for want, got in zip(updates["vectorized"], updates["per_layer"]):  # every use counted
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * CLIP)


def test_shared_layers_take_the_per_layer_path(monkeypatch):
  """Shared and twice-called layers are handled by the per-layer engine itself (grouped),
  not by the whole-batch fallback; only tying by a direct read outside the owner falls back."""
  fallbacks = []
  monkeypatch.setattr(per_layer, "_whole_batch_fallback",
                      lambda key, reason, args: fallbacks.append(reason) or
                      tfdp_prune.VectorizedEngine().clipped_sum(*args))
  for name in ("dense_called_four_times", "nested_model_on_two_inputs", "siamese_conv",
               "embedding_called_twice", "tied_kernel_attribute"):
    _contributions(name, "per_layer", masked=(True,))
    assert not fallbacks, (name, fallbacks)
  _contributions("tied_output_projection", "per_layer", masked=(True,))
  assert fallbacks and "used outside the layer calls that own them" in fallbacks[0]


@pytest.mark.parametrize("input_scale", [1e-19, 1e19])
def test_rank_one_norm_does_not_underflow(input_scale):
  """Inputs of 1e-19 and output gradients of 1e19 (and the reverse): their squares underflow
  in float32, and a norm of 0 would leave the example unclipped (measured 14.4 C before)."""
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, use_bias=False)])
  scaled_loss = lambda y, p: (1 / input_scale) * T.per_example_loss()(y, p)
  x = tf.constant(np.full((2, 4), input_scale, "float32"))
  variables = model.trainable_variables
  out = per_layer.PerLayerEngine().clipped_sum(
      model, scaled_loss, x, tf.constant([0, 1]), tf.constant([1.0, 0.0]), variables,
      [tf.ones_like(v) for v in variables], CLIP)
  assert int(out.clipped.num_non_finite) == 0
  norm = np.sqrt(sum(np.sum(g.numpy().astype(np.float64) ** 2) for g in out.clipped.grads))
  np.testing.assert_allclose(norm, CLIP, rtol=1e-3)  # clipped to C: neither more nor 0


def test_embedding_ids_outside_the_vocabulary_are_never_charged_to_another_example():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  variables = model.trainable_variables
  masks = [tf.ones_like(v) for v in variables]
  y = tf.constant([0, 1, 2])
  weights = tf.constant([1.0, 1.0, 1.0])
  clean = np.array([[1, 2, 3], [0, 1, 1], [4, 4, 0]], "int32")
  bad = clean.copy()
  bad[0, 2] = 5 + 1  # example 0's id 6 would be key 1*5 + 1 of example 1 if taken as is
  loss_fn = T.per_example_loss()
  step = tf.function(per_layer.PerLayerEngine().clipped_sum, jit_compile=True)  # traced once
  run = lambda ids, w: step(model, loss_fn, tf.constant(ids), y, w, variables, masks, 10.0)
  # Under XLA the lookup does not raise (as on GPU): the engine drops the example.
  got = run(bad, weights)
  assert int(got.clipped.num_non_finite) == 1
  want = run(clean, tf.constant([0.0, 1.0, 1.0]))  # the others alone
  for a, b in zip(got.clipped.grads, want.clipped.grads):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
  with pytest.raises(tf.errors.InvalidArgumentError):  # on CPU without XLA: an error
    per_layer.PerLayerEngine().clipped_sum(model, T.per_example_loss(), tf.constant(bad), y,
                                           weights, variables, masks, 10.0)


def test_a_variable_the_forward_pass_never_reads_gets_zero_without_a_fallback(monkeypatch):
  monkeypatch.setattr(per_layer, "_whole_batch_fallback",
                      lambda *args: pytest.fail("the whole-batch fallback ran"))
  keras.utils.set_random_seed(0)
  unused = keras.layers.Dense(2)
  unused.build((None, 5))
  inputs = keras.Input((5,))
  model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
  model.unused = unused  # tracked: its weights are trainable variables of the model
  variables = model.trainable_variables
  assert len(variables) == 4
  x, y = T.dense_data(n=4, inputs=5)
  out = per_layer.PerLayerEngine().clipped_sum(
      model, T.per_example_loss(), tf.constant(x), tf.constant(y), tf.ones([4]), variables,
      [tf.ones_like(v) for v in variables], 0.5)
  reference = tfdp_prune.VectorizedEngine().clipped_sum(
      model, T.per_example_loss(), tf.constant(x), tf.constant(y), tf.ones([4]), variables,
      [tf.ones_like(v) for v in variables], 0.5)
  for a, b in zip(out.clipped.grads, reference.clipped.grads):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


# (input channels, image size, whether materialized gradients are reused for the sum): the
# per-example loop with the batch-wide projections (window 576 > 16 positions), the loop
# forming J^T c_i itself (window 18 < 784 positions), and a small layer whose materialized
# gradients would not be kept for the sum (as for a batch too large for them).
_WS_PATHS = {"loop_projections": (64, 6, True), "loop_vjp": (2, 30, True),
             "materialized_not_reused": (2, 8, False)}


@pytest.mark.parametrize("path", sorted(_WS_PATHS))
def test_ws_conv_example_nearly_constant_over_the_window_moves_the_model_by_at_most_c(
    path, monkeypatch):
  """An input nearly constant over every window: its gradient with respect to the
  standardized kernel is almost all along the mean, which the map to the trained kernel
  removes. Summed first and mapped after (the loop's sum, or the weight-gradient op's), the
  float32 rounding of that removal was in the sum but in no example's norm: one example moved
  the model by up to 1.34 C (loop, projections), 1.002 C (loop) and 1.004-1.4 C (op's sum)."""
  in_channels, size, reused = _WS_PATHS[path]
  if not reused:
    monkeypatch.setattr(windowed, "materialized_grads_reused", lambda call, kernel: False)
  projections = []  # the path taken: the loop's batch-wide projections, or not
  real_projections = ws_conv_rule._projections
  monkeypatch.setattr(ws_conv_rule, "_projections",
                      lambda *args: projections.append(1) or real_projections(*args))
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((size, size, in_channels)),
                            models.WSConv2D(32, 3, use_bias=False), keras.layers.Flatten(),
                            keras.layers.Dense(3)])
  variables = model.trainable_variables
  step = tf.function(lambda x, masks: per_layer.PerLayerEngine().clipped_sum(
      model, T.per_example_loss(), x, tf.constant([0, 1, 2, 0]), tf.constant([1.0, 0, 0, 0]),
      variables, masks, 1.0).clipped.grads)
  rng = np.random.default_rng(0)
  for keep in (1.0, 0.5):
    masks = [tf.constant(m, tf.float32) for m in T.random_masks(variables, keep)]
    for scale in (1e4, 1e7, 1e10):
      for _ in range(2):
        x = rng.normal(size=(4, size, size, in_channels))
        x[0] = scale * (1 + 1e-6 * rng.normal(size=x[0].shape))
        update = [g.numpy().astype(np.float64) for g in step(tf.constant(x, tf.float32), masks)]
        assert _norm(update) <= 1 + 1e-5, (path, keep, scale, _norm(update))
  assert bool(projections) == (path == "loop_projections")
