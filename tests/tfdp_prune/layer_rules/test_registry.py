"""The layer-rule registry: lookup by exact class, and a user's rule for a custom layer checked
like the built-in ones (per-layer == vectorized clipped sums; one record moves the model by C)."""

import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import models
from tfdp_prune import per_example
from tfdp_prune import per_layer
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import dense
from tfdp_prune.layer_rules import generic
from tfdp_prune.layer_rules import registry
from tests.tfdp_prune import _testing as T

CLIP = 0.7


class Scale(keras.layers.Layer):
  """y = x * w, one weight per feature (the docstring's example of a custom layer)."""

  def build(self, input_shape):
    self.w = self.add_weight("w", shape=input_shape[-1:], initializer="random_normal")

  def call(self, inputs):
    return inputs * self.w


class ScaleRule(tfdp_prune.LayerRule):

  def per_example_grads(self, call, g, batch):
    # dL/dw of example i: the sum over its rows (views) and positions of g * x.
    product = tf.reshape(g * call.inputs, tf.stack([batch, -1, tf.shape(g)[-1]]))
    return [tf.reduce_sum(product, axis=1)]


class DoubledDense(keras.layers.Dense):
  """A Dense subclass that computes something else with the same weights."""

  def call(self, inputs):
    return 2.0 * super().call(inputs)


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
  """Registrations made by a test end with it."""
  monkeypatch.setattr(registry, "_rules", dict(registry._rules))  # pylint: disable=protected-access


def _must_not_run(*args, **kwargs):
  raise AssertionError("the generic rule ran")


def _model(layers, input_shape):
  keras.utils.set_random_seed(1)
  return keras.Sequential([keras.Input(input_shape)] + layers)


def _clipped_sums(engine, model, x, y, weights):
  loss_fn = T.per_example_loss()
  variables = model.trainable_variables
  masks = [tf.constant(m) for m in T.random_masks(variables, keep=0.6, seed=3)]
  return tf.function(engine.clipped_sum)(model, loss_fn, tf.constant(x), tf.constant(y),
                                         tf.constant(weights, tf.float32), variables, masks,
                                         CLIP)


def _assert_same_as_vectorized(model, x, y, weights):
  want = _clipped_sums(per_example.VectorizedEngine(), model, x, y, weights)
  got = _clipped_sums(per_layer.PerLayerEngine(), model, x, y, weights)
  for variable, a, b in zip(model.trainable_variables, got.clipped.grads, want.clipped.grads):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=variable.name)
  np.testing.assert_allclose(got.losses.numpy(), want.losses.numpy(), atol=1e-5)


def test_built_in_rules_serve_their_exact_classes_only():
  assert isinstance(registry.rule_for(keras.layers.Dense(2)), dense.DenseRule)
  assert isinstance(registry.rule_for(models.WSConv2D(2, 3)), tfdp_prune.WSConv2DRule)
  assert registry.rule_for(DoubledDense(2)) is generic.GENERIC
  assert registry.rule_for(Scale()) is generic.GENERIC


def test_a_subclass_that_changes_the_computation_gets_the_exact_generic_rule():
  """Served by Dense's rule, DoubledDense would lose its factor 2 (wrong outputs and norms)."""
  model = _model([DoubledDense(4, activation="tanh"), keras.layers.Dense(3)], (5,))
  rng = np.random.default_rng(0)
  _assert_same_as_vectorized(model, rng.normal(size=(6, 5)).astype("float32"),
                             rng.integers(0, 3, 6).astype("int32"), [1, 1, 0, 1, 1, 1])


@pytest.mark.parametrize("input_shape,views", [((5,), False), ((4, 5), False), ((5,), True)])
def test_custom_rule_gives_the_reference_clipped_sums(monkeypatch, input_shape, views):
  """On vectors, on sequences and with augmult views, with masks and a padding row."""
  tfdp_prune.register_layer_rule(Scale, ScaleRule())
  monkeypatch.setattr(generic.GenericRule, "per_example_grads", _must_not_run)
  model = _model([Scale(), keras.layers.Flatten(), keras.layers.Dense(3)], input_shape)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6,) + ((3,) if views else ()) + input_shape).astype("float32")
  _assert_same_as_vectorized(model, x, rng.integers(0, 3, 6).astype("int32"),
                             [1, 1, 0, 1, 2.5, 1])


def _one_record_update(engine):
  """The update of SGD(learning rate 1, noise 0) on a batch with one real row, and the norm of
  that row's unclipped gradient."""
  clip = 1e-3
  model = _model([Scale(), keras.layers.Dense(3)], (5,))
  optimizer = tfdp_prune.DPKerasSGDOptimizer(
      l2_norm_clip=clip, noise_multiplier=0.0, learning_rate=1.0, expected_batch_size=1.0,
      per_example_engine=engine)
  model.compile(optimizer, T.per_example_loss())
  tfdp_prune.make_private(model)
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(4, 5)).astype("float32"), rng.integers(0, 3, 4).astype("int32")
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(T.per_example_loss()(y[:1], model(x[:1], training=True)))
  unclipped = np.sqrt(sum(np.sum(g.numpy() ** 2)
                          for g in tape.gradient(loss, model.trainable_variables)))
  before = T.weights(model)
  model.train_on_batch(x, y, sample_weight=np.array([1, 0, 0, 0], "float32"))
  return [a.astype(np.float64) - b for a, b in zip(T.weights(model), before)], unclipped, clip


def test_custom_rule_one_record_moves_the_model_by_the_clip_norm(monkeypatch):
  tfdp_prune.register_layer_rule(Scale, ScaleRule())
  want, _, _ = _one_record_update("vectorized")
  monkeypatch.setattr(generic.GenericRule, "per_example_grads", _must_not_run)
  got, unclipped, clip = _one_record_update("per_layer")
  assert unclipped > 3 * clip, "clipping must bind for the test to mean anything"
  norm = np.sqrt(sum(np.sum(a ** 2) for a in got))
  assert 1 - 1e-2 <= norm / clip <= 1 + 1e-3, norm / clip
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * clip)


def test_registering_again_replaces_the_rule():
  first, second = ScaleRule(), ScaleRule()
  tfdp_prune.register_layer_rule(Scale, first)
  tfdp_prune.register_layer_rule(Scale, second)
  assert registry.rule_for(Scale()) is second


@pytest.mark.parametrize("layer_class,rule,message", [
    (Scale(), ScaleRule(), "layer_class"),
    (int, ScaleRule(), "layer_class"),
    (Scale, lambda call, g, batch: [], "rule"),
])
def test_registering_something_else_is_refused(layer_class, rule, message):
  with pytest.raises(TypeError, match=f"Expected {message}"):
    tfdp_prune.register_layer_rule(layer_class, rule)


class UnsummedScaleRule(tfdp_prune.LayerRule):
  """Forgets to sum over positions: [B, positions, d] where [B, d] is due."""

  def per_example_grads(self, call, g, batch):
    return [g * call.inputs]


def test_a_rule_with_gradients_of_the_wrong_shape_is_refused():
  tfdp_prune.register_layer_rule(Scale, UnsummedScaleRule())
  model = _model([Scale(), keras.layers.Flatten(), keras.layers.Dense(3)], (4, 5))
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"UnsummedScaleRule.per_example_grads to return shape"):
    _clipped_sums(per_layer.PerLayerEngine(), model, rng.normal(size=(6, 4, 5)).astype("float32"),
                  rng.integers(0, 3, 6).astype("int32"), [1] * 6)
