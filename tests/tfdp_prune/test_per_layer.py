"""PerLayerEngine == VectorizedEngine (the reference) for every supported layer type: clipped
sums, per-example losses and the non-finite count, with masks, padding weights, sequences,
augmult views and a non-finite example."""

import dataclasses
import hashlib

import numpy as np
import pytest

from tfdp_prune import clipping
from tfdp_prune import engines
from tfdp_prune import models
from tfdp_prune import per_example
from tfdp_prune import per_layer
from tfdp_prune import ws_conv_rule
from tfdp_prune.layer_rules import base
from tfdp_prune.layer_rules import calibration
from tfdp_prune.layer_rules import generic
from tfdp_prune.layer_rules import windowed
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T

CLIP = 0.7
_CHOOSE_STRATEGY = windowed.choose_strategy


@pytest.fixture
def windowed_strategy(request, monkeypatch):
  """Runs a test with one strategy for Dense on sequences, convolutions and views (a rule
  without the strategy, or a layer that excludes it, uses `batched`; `ghost` runs only where
  every mask is all 1). The test lists its strategies with `_strategies(...)`, and each listed
  strategy must be chosen for some layer of its model: a strategy that no layer takes would
  rerun `batched`, which costs time and proves nothing."""
  chosen = []

  def choose(rule, call, exclude=()):
    applies = request.param in rule.strategies(call) and request.param not in exclude
    chosen.append(applies)
    return request.param if applies else windowed.BATCHED

  monkeypatch.setattr(windowed, "choose_strategy", choose)
  yield request.param
  assert any(chosen), (f"no layer of this test's model takes the {request.param!r} strategy: "
                       "drop it from the test's _strategies(...)")


def _strategies(*names):
  """Runs the test once per strategy in `names` (see `windowed_strategy`)."""
  parametrize = pytest.mark.parametrize("windowed_strategy", names, indirect=True)
  return lambda test: pytest.mark.usefixtures("windowed_strategy")(parametrize(test))


_ALL = (windowed.BATCHED, windowed.ONE_AT_A_TIME, windowed.IDENTITY_PATCHES, windowed.GHOST)
_MASKED_CONV = _ALL[:3]  # ghost norms need an all-1 mask (and are never used for WSConv2D)
_SEQUENCES = _ALL[:2]  # Dense on sequences, depthwise convolutions, embeddings: no patches


def _layer_cases(cases, strategies):
  """(case, strategy) parameters for `cases` (layer configs) x `strategies`, with
  `windowed_strategy` indirect. The default run takes each case with the first strategy and
  one other, every strategy at least once; the rest of the cross product is marked slow (CI
  runs it)."""
  assert len(strategies) >= 2, strategies
  params = []
  for i, case in enumerate(cases):
    # The rotation starts at the second case so that the dilated cases take identity_patches.
    default = {strategies[0], strategies[1 + (i + 1) % (len(strategies) - 1)]}
    params += [pytest.param(case, strategy, id=f"{i}-{strategy}",
                            marks=() if strategy in default else pytest.mark.slow)
               for strategy in strategies]
  return params


def _model_cases(strategies_by_model):
  """(model name, strategy) parameters, `windowed_strategy` indirect. The default run takes
  every model once and every strategy once (each model with a strategy not taken yet, while
  there is one); the rest of the cross product is marked slow (CI runs it)."""
  names, default, taken = sorted(strategies_by_model), set(), set()
  for name in names:
    strategies = strategies_by_model[name]
    strategy = next((s for s in strategies if s not in taken), strategies[0])
    default.add((name, strategy))
    taken.add(strategy)
  for name in names:
    for strategy in strategies_by_model[name]:
      if strategy not in taken:
        default.add((name, strategy))
        taken.add(strategy)
  return [pytest.param(name, strategy, id=f"{name}-{strategy}",
                       marks=() if (name, strategy) in default else pytest.mark.slow)
          for name in names for strategy in strategies_by_model[name]]


@pytest.fixture(autouse=True)
def _single_strategy_tests_never_consult_it(request, monkeypatch):
  """Fails a test that consults the strategy without `_strategies` (or `calibrated`)."""
  if {"windowed_strategy", "calibrated"} & set(request.fixturenames):
    yield
    return
  calls = []
  monkeypatch.setattr(windowed, "choose_strategy",
                      lambda *args, **kwargs: calls.append(args) or _CHOOSE_STRATEGY(*args,
                                                                                 **kwargs))
  yield
  assert not calls, "this test's model consults the windowed strategy: give it _strategies(...)"


@pytest.fixture
def calibrated():
  """The strategy chosen by measuring (off by default), from a clean record."""
  before = calibration.enabled()
  calibration.clear()
  calibration.set_enabled(True)
  yield
  calibration.set_enabled(before)
  calibration.clear()


def _model(layers, input_shape, dtype="float32"):
  keras.utils.set_random_seed(1)
  return keras.Sequential([keras.Input(input_shape, dtype=dtype)] + layers)


_REFERENCES = {}  # _fingerprint(arguments) -> the reference engine's output for them


def _reference(*args):
  """The vectorized reference's `clipped_sum(*args)`, traced once for equal arguments: the
  strategies of one case build the same model (same seed) on the same batch, and the reference
  does not depend on the strategy. Keyed by content (`_fingerprint`): a miss recomputes."""
  key = _fingerprint(args)
  if key not in _REFERENCES:
    _REFERENCES[key] = tf.function(per_example.VectorizedEngine().clipped_sum)(*args)
  return _REFERENCES[key]


def _fingerprint(value, digest=None) -> str:
  """A digest of what `clipped_sum`'s arguments compute: a model's layer configs without their
  generated names and its weights, a loss's class and config, tensors' dtypes, shapes and
  values, other values' reprs."""
  digest = digest or hashlib.sha256()
  if isinstance(value, keras.Model):
    _fingerprint(_without_names(value.get_config()), digest)
    _fingerprint(value.weights, digest)
  elif isinstance(value, keras.losses.Loss):
    _fingerprint((type(value).__name__, value.get_config()), digest)
  elif isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)):
    array = np.asarray(value)
    digest.update(repr((array.dtype.str, array.shape)).encode())
    digest.update(array.tobytes())
  elif isinstance(value, (list, tuple)):
    digest.update(f"[{len(value)}".encode())
    for item in value:
      _fingerprint(item, digest)
  else:
    digest.update(repr(value).encode())
  return digest.hexdigest()


def _without_names(config):
  if isinstance(config, dict):
    return {k: _without_names(v) for k, v in sorted(config.items()) if k != "name"}
  if isinstance(config, (list, tuple)):
    return [_without_names(v) for v in config]
  return config


def _compare(model, x, y, weights=None, masks_keep=0.6, clip=CLIP, masks=None):
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  variables = model.trainable_variables
  masks = T.random_masks(variables, keep=masks_keep, seed=3) if masks is None else masks
  weights = np.ones(len(y), "float32") if weights is None else np.asarray(weights, "float32")
  args = (model, loss_fn, tf.constant(x), tf.constant(y), tf.constant(weights), variables,
          [tf.constant(m) for m in masks], clip)
  reference = _reference(*args)
  engine = per_layer.PerLayerEngine()
  result = tf.function(engine.clipped_sum)(*args)
  for variable, want, got in zip(variables, reference.clipped.grads, result.clipped.grads):
    # Sums scale with the clip norm: the tolerance too (a tiny clip must not hide an error).
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5 * min(1, clip),
                               err_msg=variable.name)
  np.testing.assert_allclose(result.losses.numpy(), reference.losses.numpy(), atol=1e-5)
  assert int(result.clipped.num_non_finite) == int(reference.clipped.num_non_finite)
  assert int(result.clipped.num_units) == int(reference.clipped.num_units)
  return result


def _images(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n,) + shape).astype("float32"), rng.integers(0, 3, n).astype("int32")


def test_dense_on_vectors_with_masks_and_padding():
  model = _model([keras.layers.Dense(7, activation="relu"), keras.layers.Dense(3)], (5,))
  x, y = _images(8, (5,))
  _compare(model, x, y, weights=[1, 1, 0, 1, 2.5, 1, 0, 1])


def test_dense_without_bias_and_a_tiny_clip_and_no_masks():
  model = _model([keras.layers.Dense(4, use_bias=False, activation="tanh"),
                  keras.layers.Dense(3)], (6,))
  x, y = _images(6, (6,))
  _compare(model, x, y, masks_keep=1.0, clip=1e-3)


@_strategies(*_SEQUENCES)
def test_dense_on_sequences():
  model = _model([keras.layers.Dense(4, activation="relu"), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (5, 6))
  x, y = _images(6, (5, 6))
  _compare(model, x, y, weights=[1, 0, 1, 1, 1, 1])


_CONV2D = [
    dict(filters=4, kernel_size=3, padding="same"),
    dict(filters=4, kernel_size=3, strides=2, padding="same"),
    dict(filters=3, kernel_size=(2, 3), strides=(2, 1), padding="valid"),
    dict(filters=3, kernel_size=3, dilation_rate=2, padding="same"),
    dict(filters=3, kernel_size=4, strides=2, padding="valid", use_bias=False),
]


@pytest.mark.parametrize("conv,windowed_strategy", _layer_cases(_CONV2D, _ALL),
                         indirect=["windowed_strategy"])
def test_conv2d(conv, windowed_strategy):
  del windowed_strategy  # the fixture sets the strategy
  model = _model([keras.layers.Conv2D(**conv, activation="relu"), keras.layers.MaxPool2D(2, 1),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (9, 9, 2))
  x, y = _images(5, (9, 9, 2))
  _compare(model, x, y, weights=[1, 1, 0, 1, 1])


# Convolutions of one input channel, as `rows_as_channels` takes them (with batched to compare).
_ONE_CHANNEL_CONV2D = [
    dict(filters=16, kernel_size=8, strides=2, padding="same"),  # the MNIST CNN's first conv
    dict(filters=3, kernel_size=(2, 3), strides=(2, 1), padding="valid", use_bias=False),
    dict(filters=4, kernel_size=3, padding="same"),
]


@pytest.mark.parametrize("conv", _ONE_CHANNEL_CONV2D)
@pytest.mark.parametrize("layer_class", [keras.layers.Conv2D, models.WSConv2D])
@_strategies(windowed.ROWS_AS_CHANNELS)
def test_one_input_channel_by_the_rows_as_channels_of_a_depthwise_op(conv, layer_class):
  """Per-example kernel gradients from one depthwise weight-gradient op over the batch's rows
  as channels, against the reference: strides, both paddings, WSConv2D's standardization,
  masks, two views per example, every example clipped (a tiny clip: the norms must be right)."""
  model = _model([layer_class(**conv, activation="relu"), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (10, 10, 1))
  x, y = _images(4, (2, 10, 10, 1))  # 4 examples, 2 views each
  _compare(model, x, y, weights=[1, 0, 1, 1], clip=1e-3)


@_strategies(windowed.ROWS_AS_CHANNELS)
def test_rows_as_channels_repeats_the_output_gradients_per_input_channel(monkeypatch):
  """With more input channels allowed, each row's output gradients are repeated per channel
  (channels (row, in) of the image, (row, in, o) of the depthwise output): the reference's sums."""
  monkeypatch.setattr(windowed, "_ROWS_AS_CHANNELS_MAX_IN", 3)
  model = _model([keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (9, 9, 3))
  x, y = _images(4, (2, 9, 9, 3))  # 4 examples, 2 views each
  _compare(model, x, y, weights=[1, 1, 0, 1], clip=1e-3)


def test_rows_as_channels_only_for_undilated_convolutions_of_one_input_channel():
  def strategies(layer, input_shape):
    x = tf.zeros(input_shape)
    layer.build(input_shape)
    call = base.CapturedCall(layer, windowed.ConvRule(), x, layer(x))
    return windowed.ConvRule().strategies(call)
  assert windowed.ROWS_AS_CHANNELS in strategies(keras.layers.Conv2D(16, 8, strides=2),
                                                 (4, 28, 28, 1))
  assert windowed.ROWS_AS_CHANNELS not in strategies(keras.layers.Conv2D(4, 3), (4, 9, 9, 2))
  assert windowed.ROWS_AS_CHANNELS not in strategies(
      keras.layers.Conv2D(4, 3, dilation_rate=2), (4, 9, 9, 1))


def _must_not_run(*args, **kwargs):
  raise AssertionError("the per-layer vectorized fallback ran")


@_strategies(*_MASKED_CONV)
def test_weight_standardized_conv_and_group_norm(monkeypatch):
  monkeypatch.setattr(generic.GenericRule, "per_example_grads", _must_not_run)  # GroupNorm has its own rule
  model = _model([models.WSConv2D(8, 3, padding="same", use_bias=False),
                  keras.layers.GroupNormalization(groups=4), keras.layers.Activation("relu"),
                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)], (6, 6, 3))
  x, y = _images(5, (6, 6, 3))
  _compare(model, x, y)


@pytest.mark.parametrize("depthwise", [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, strides=2, padding="valid", depth_multiplier=2),
    dict(kernel_size=2, dilation_rate=2, padding="same", use_bias=False),
])
@_strategies(*_SEQUENCES)
def test_depthwise_conv2d(depthwise):
  model = _model([keras.layers.DepthwiseConv2D(**depthwise, activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (7, 7, 3))
  x, y = _images(4, (7, 7, 3))
  _compare(model, x, y, weights=[1, 0, 1, 1])


_CONV1D = [
    dict(filters=4, kernel_size=3, padding="same"),
    dict(filters=3, kernel_size=2, strides=2, padding="valid"),
    dict(filters=3, kernel_size=3, dilation_rate=2, padding="same", use_bias=False),
]


@pytest.mark.parametrize("conv,windowed_strategy", _layer_cases(_CONV1D, _MASKED_CONV),
                         indirect=["windowed_strategy"])
def test_conv1d(conv, windowed_strategy):
  del windowed_strategy  # the fixture sets the strategy
  model = _model([keras.layers.Conv1D(**conv, activation="relu"), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (9, 2))
  x, y = _images(5, (9, 2))
  _compare(model, x, y, weights=[1, 1, 1, 0, 1])


def test_layer_norm_on_vectors(monkeypatch):
  _layer_norm_matches_the_reference(monkeypatch, (5,))


@_strategies(*_SEQUENCES)
def test_layer_norm_on_sequences(monkeypatch):
  _layer_norm_matches_the_reference(monkeypatch, (4, 5))


def _layer_norm_matches_the_reference(monkeypatch, input_shape):
  monkeypatch.setattr(generic.GenericRule, "per_example_grads", _must_not_run)
  model = _model([keras.layers.Dense(6), keras.layers.LayerNormalization(),
                  keras.layers.Flatten(), keras.layers.Dense(3)], input_shape)
  x, y = _images(4, input_shape)
  _compare(model, x, y, weights=[1, 0, 1, 1])


def test_normalization_over_other_axes_uses_the_per_layer_vectorized_path(caplog):
  model = _model([keras.layers.LayerNormalization(axis=1), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (4, 5))
  x, y = _images(4, (4, 5))
  per_layer._reported.clear()
  with caplog.at_level("WARNING"):
    _compare(model, x, y, weights=[1, 1, 0, 1])
  assert any("LayerNormalization" in r.getMessage() for r in caplog.records)


def test_other_layers_fall_back_per_layer_and_are_reported_once(caplog):
  model = _model([keras.layers.SeparableConv2D(3, 3, padding="same"), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (5, 5, 2))
  x, y = _images(4, (5, 5, 2))
  per_layer._reported.clear()
  with caplog.at_level("WARNING"):
    _compare(model, x, y)
    _compare(model, x, y)
  reports = [r for r in caplog.records if "SeparableConv2D" in r.getMessage()]
  assert len(reports) == 1, [r.getMessage() for r in caplog.records]


@_strategies(*_SEQUENCES)
def test_embedding_with_repeated_tokens():
  model = _model([keras.layers.Embedding(11, 4), keras.layers.Dense(5, activation="relu"),
                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)], (6,),
                 dtype="int32")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 11, (7, 6)).astype("int32")
  x[0] = 3  # one token repeated: its row sums six output gradients
  y = rng.integers(0, 3, 7).astype("int32")
  # Every example clipped, so the norms (not just the sums) must be right.
  _compare(model, x, y, weights=[1, 1, 1, 0, 1, 1, 1], clip=1e-4)


@_strategies(*_ALL)
def test_augmult_views_are_one_clipping_unit():
  model = _model([keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(4, activation="relu"),
                  keras.layers.Dense(3)], (6, 6, 1))
  x, y = _images(4, (3, 6, 6, 1))  # 4 examples, 3 views each
  _compare(model, x, y, weights=[1, 1, 0, 1])


def test_non_finite_example_is_dropped_and_counted():
  model = _model([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)], (5,))
  x, y = _images(5, (5,))
  x[2, 1] = np.inf
  result = _compare(model, x, y)
  assert int(result.clipped.num_non_finite) == 1
  assert all(np.all(np.isfinite(g.numpy())) for g in result.clipped.grads)


# 0: a dense kernel's sum replaces dropped rows' inputs only when the plain product is not finite.
@pytest.mark.parametrize("replace_when_needed_from",
                         [0, clipping.REPLACE_WHEN_NEEDED_MIN_ELEMENTS])
def test_dense_inputs_of_dropped_rows_never_reach_the_sum(monkeypatch, replace_when_needed_from):
  """A padding row (weight 0) with a NaN input and a kept example with an infinite one: the
  first adds exactly nothing (0 * NaN would be NaN), the second is dropped and counted."""
  monkeypatch.setattr(clipping, "REPLACE_WHEN_NEEDED_MIN_ELEMENTS", replace_when_needed_from)
  model = _model([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)], (5,))
  x, y = _images(5, (5,))
  weights = np.array([1, 1, 0, 1, 1], "float32")
  without = _compare(model, x, y, weights=weights * [1, 1, 1, 0, 1])  # example 3 left out
  x[2, 1] = np.nan
  x[3, 0] = np.inf
  result = _clipped_sum(per_layer.PerLayerEngine(), model, x, y, weights)
  assert int(result.clipped.num_non_finite) == 1
  for want, got in zip(without.clipped.grads, result.clipped.grads):
    assert np.all(np.isfinite(got.numpy()))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


_NON_FINITE_MODELS = {
    "conv2d": ([keras.layers.Conv2D(3, 3, padding="same", activation="relu")], (5, 5, 2)),
    "ws_conv_group_norm": ([models.WSConv2D(4, 3, padding="same"),
                            keras.layers.GroupNormalization(groups=2)], (5, 5, 2)),
    "depthwise": ([keras.layers.DepthwiseConv2D(3, padding="same")], (5, 5, 2)),
    "conv1d_layer_norm": ([keras.layers.Conv1D(3, 2), keras.layers.LayerNormalization()],
                          (6, 2)),
    "dense_sequences": ([keras.layers.Dense(3, activation="tanh")], (4, 3)),
}


# The strategies each model's layers take.
_NON_FINITE_STRATEGIES = {"conv2d": _ALL, "ws_conv_group_norm": _MASKED_CONV,
                          "depthwise": _SEQUENCES, "conv1d_layer_norm": _MASKED_CONV,
                          "dense_sequences": _SEQUENCES}


@pytest.mark.parametrize("name,windowed_strategy", _model_cases(_NON_FINITE_STRATEGIES),
                         indirect=["windowed_strategy"])
def test_non_finite_example_in_every_layer_kind(name, windowed_strategy):
  """The DP property, not where the NaN lands (its path through oneDNN differs by machine):
  the example is dropped and counted, and the sum is exactly that of the other examples."""
  del windowed_strategy  # the fixture sets the strategy
  layers, input_shape = _NON_FINITE_MODELS[name]
  model = _model(layers + [keras.layers.Flatten(), keras.layers.Dense(3)], input_shape)
  x, y = _images(5, input_shape)
  weights = np.array([1, 0, 1, 1, 1], "float32")
  without = _compare(model, x, y, weights=weights * [1, 1, 1, 0, 1])  # example 3 left out
  x[3].flat[0] = np.nan
  result = _clipped_sum(per_layer.PerLayerEngine(), model, x, y, weights)
  assert int(result.clipped.num_non_finite) == 1
  for want, got in zip(without.clipped.grads, result.clipped.grads):
    assert np.all(np.isfinite(got.numpy()))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def _clipped_sum(engine, model, x, y, weights, masks_keep=0.6, clip=CLIP, loss_fn=None):
  loss_fn = loss_fn or keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                   reduction="none")
  variables = model.trainable_variables
  masks = T.random_masks(variables, keep=masks_keep, seed=3)
  return tf.function(engine.clipped_sum)(
      model, loss_fn, tf.constant(x), tf.constant(y), tf.constant(weights, tf.float32),
      variables, [tf.constant(m) for m in masks], clip)


@_strategies(*_MASKED_CONV)
def test_augmult_views_through_group_norm(monkeypatch):
  monkeypatch.setattr(generic.GenericRule, "per_example_grads", _must_not_run)
  model = _model([models.WSConv2D(4, 3, padding="same"), keras.layers.GroupNormalization(2),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (5, 5, 1))
  x, y = _images(3, (2, 5, 5, 1))  # 3 examples, 2 views each
  _compare(model, x, y, weights=[1, 0, 1])


def test_clipping_is_after_masking_in_the_norm():
  """A coordinate that is frozen must not count in the norm: with a huge gradient only on a
  frozen coordinate, the clipped sum of the trained ones is unchanged by the clip."""
  model = _model([keras.layers.Dense(2, use_bias=False)], (3,))
  x = np.array([[1.0, 0.0, 1000.0]], "float32")
  y = np.array([0], "int32")
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  kernel = model.trainable_variables[0]
  mask = np.ones((3, 2), "float32")
  mask[2] = 0  # the row that multiplies the huge input is frozen
  out = per_layer.PerLayerEngine().clipped_sum(
      model, loss_fn, tf.constant(x), tf.constant(y), tf.ones([1]), [kernel],
      [tf.constant(mask)], 1e6)
  with tf.GradientTape() as tape:
    loss = loss_fn(y, model(x))
  np.testing.assert_allclose(out.clipped.grads[0].numpy(),
                             tape.gradient(loss, kernel).numpy() * mask, atol=1e-5)


def test_microbatches_fall_back_to_the_vectorized_engine():
  model = _model([keras.layers.Dense(3)], (4,))
  x, y = _images(4, (4,))
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  variables = model.trainable_variables
  masks = [tf.ones_like(v) for v in variables]
  args = (model, loss_fn, tf.constant(x), tf.constant(y), tf.ones([4]), variables, masks, CLIP, 2)
  want = per_example.VectorizedEngine().clipped_sum(*args).clipped.grads
  got = per_layer.PerLayerEngine().clipped_sum(*args).clipped.grads
  for a, b in zip(got, want):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_engine_by_name_and_serialization():
  engine = engines.get("per_layer")
  assert isinstance(engine, per_layer.PerLayerEngine)
  assert engines.serialize(engine) == {"name": "per_layer", "config": {}}
  assert isinstance(engines.get(engines.serialize(engine)), per_layer.PerLayerEngine)


_XLA_MODELS = {
    "image": ([keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
               keras.layers.GroupNormalization(2), models.WSConv2D(3, 3, strides=2),
               keras.layers.DepthwiseConv2D(2), keras.layers.Flatten(),
               keras.layers.Dense(3)], (8, 8, 1), "float32"),
    "text": ([keras.layers.Embedding(20, 4), keras.layers.Conv1D(3, 2),
              keras.layers.LayerNormalization(), keras.layers.Dense(4),
              keras.layers.Flatten(), keras.layers.Dense(3)], (5,), "int32"),
}


@pytest.mark.parametrize("name,windowed_strategy",
                         _model_cases({"image": _ALL, "text": _MASKED_CONV}),
                         indirect=["windowed_strategy"])
def test_engine_compiles_with_xla(name, windowed_strategy):
  """`jit_compile=True` must compile every rule (XLA raises on any op it cannot compile) and
  give the reference's clipped sums."""
  del windowed_strategy  # the fixture sets the strategy
  layers, input_shape, dtype = _XLA_MODELS[name]
  model = _model(layers, input_shape, dtype)
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 20, (6,) + input_shape) if dtype == "int32"
       else rng.normal(size=(6,) + input_shape)).astype(dtype)
  y = rng.integers(0, 3, 6).astype("int32")
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  variables = model.trainable_variables
  args = (model, loss_fn, tf.constant(x), tf.constant(y),
          tf.constant([1, 1, 0, 1, 1, 1], tf.float32), variables,
          [tf.constant(m) for m in T.random_masks(variables, keep=0.6, seed=3)], CLIP)
  want = _reference(*args).clipped.grads
  got = tf.function(per_layer.PerLayerEngine().clipped_sum, jit_compile=True)(*args)
  for variable, a, b in zip(variables, got.clipped.grads, want):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=variable.name)


# One batched and one ghost model; the other strategies compile in test_engine_compiles_with_xla.
# Both slow (14 s each here): the engine alone compiles with XLA in the default run.
@_strategies(pytest.param(windowed.BATCHED, marks=pytest.mark.slow),
             pytest.param(windowed.GHOST, marks=pytest.mark.slow))
def test_fit_with_jit_compile_matches_the_graph_step():
  """model.compile(jit_compile=True) trains the DP model under XLA (noise 0: the same steps)."""
  import tfdp_prune  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 6, 6, 1)).astype("float32")
  y = rng.integers(0, 3, 12).astype("int32")
  weights = []
  for jit in (False, True):
    model = _model([keras.layers.Conv2D(3, 3, activation="relu"),
                    keras.layers.GroupNormalization(3), keras.layers.Flatten(),
                    keras.layers.Dense(3)], (6, 6, 1))
    optimizer = tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=CLIP, noise_multiplier=0.0,
                                               learning_rate=0.5)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none"), jit_compile=jit)
    tfdp_prune.make_private(model)
    assert model._jit_compile is jit  # pylint: disable=protected-access
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    weights.append(model.get_weights())
  for a, b in zip(*weights):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fallback_heuristic_batches_only_small_kernels_over_few_positions():
  def shapes(layer, input_shape):
    layer.build(input_shape)
    return layer(tf.zeros(input_shape)).shape, layer.kernel.shape
  mnist_cnn_second_conv = shapes(keras.layers.Conv2D(32, 4, strides=2), (1, 14, 14, 16))
  wrn_first_conv = shapes(keras.layers.Conv2D(16, 3, padding="same"), (1, 32, 32, 3))
  wrn_last_group_conv = shapes(keras.layers.Conv2D(256, 3, padding="same"), (1, 8, 8, 256))
  assert windowed.batched_is_cheaper(*mnist_cnn_second_conv)
  assert not windowed.batched_is_cheaper(*wrn_first_conv)  # 1024 positions
  assert not windowed.batched_is_cheaper(*wrn_last_group_conv)  # a 590k-entry kernel


@pytest.mark.parametrize("positions,window,out,gradients_way", [
    (196, 64, 16, True),  # the MNIST CNN's first conv
    (25, 256, 32, False),  # its second
    (4, 4, 3, False),
    (None, 64, 16, False),  # positions unknown when traced
])
def test_per_example_products_either_way_round_equal_the_reference(positions, window, out,
                                                                   gradients_way):
  assert windowed._transposing_the_gradients_is_cheaper(positions, window, out) == gradients_way
  rng = np.random.default_rng(0)
  patches = rng.normal(size=(3, positions or 7, window)).astype(np.float32)
  g_rows = rng.normal(size=(3, positions or 7, out)).astype(np.float32)
  spec = lambda last: tf.TensorSpec([None, positions, last], tf.float32)
  products = tf.function(lambda p, g: windowed.patches_times_output_grads(p, g, positions),
                         input_signature=[spec(window), spec(out)])
  np.testing.assert_allclose(products(patches, g_rows), np.einsum("btk,bto->bko", patches, g_rows),
                             rtol=1e-5, atol=1e-4)


def _frozen_kernels(variables, frozen_names, keep=0.6):
  """Random masks, with every coordinate of the variables named in `frozen_names` frozen."""
  masks = T.random_masks(variables, keep=keep, seed=3)
  return [np.zeros_like(m) if any(n in v.name for n in frozen_names) else m
          for v, m in zip(variables, masks)]


@_strategies(*_ALL)
def test_fully_frozen_kernels_get_no_per_example_work_and_match_the_reference(monkeypatch):
  model = _model([keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                  keras.layers.Conv2D(3, 3, strides=2, activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(5, activation="relu"),
                  keras.layers.Dense(3)], (7, 7, 2))
  x, y = _images(6, (7, 7, 2))
  names = [v.name for v in model.trainable_variables]
  frozen = [n for n in names if "kernel" in n][1:3]  # the second conv's and the first dense's
  ran = []  # the layers whose per-example norms RAN (not just traced)

  def when_run(name, tensor):
    out = tf.py_function(lambda t: ran.append(name) or t, [tensor], tensor.dtype)
    out.set_shape(tensor.shape)
    return out

  original = windowed.WindowedRule.squared_norms
  monkeypatch.setattr(windowed.WindowedRule, "squared_norms", lambda self, *args: when_run(
      args[1].layer.name, original(self, *args)))
  # The materialized strategies form the kernel's per-example gradients instead.
  original_grads = windowed.ConvRule.per_example_grads

  def counted_grads(self, call, *args, **kwargs):
    grads = original_grads(self, call, *args, **kwargs)
    return [when_run(call.layer.name, grads[0])] + list(grads[1:])

  monkeypatch.setattr(windowed.ConvRule, "per_example_grads", counted_grads)
  # The per-example loop forms them one example at a time, in the engine's loop.
  original_loop = windowed.WindowedRule._example_loop

  def counted_loop(self, call, *args):
    loop = original_loop(self, call, *args)

    def example(i):
      terms, squared = loop.example(i)
      return terms, when_run(call.layer.name, squared)
    return dataclasses.replace(loop, example=example)

  monkeypatch.setattr(windowed.WindowedRule, "_example_loop", counted_loop)
  # A small clip: every example clipped, so the norms (not just the sums) must be right.
  result = _compare(model, x, y, weights=[1, 1, 0, 1, 1, 1], clip=1e-3,
                    masks=_frozen_kernels(model.trainable_variables, frozen))
  by_name = dict(zip(names, result.clipped.grads))
  for name in frozen:
    np.testing.assert_array_equal(by_name[name].numpy(), 0)
  assert set(ran) == {model.layers[0].name}  # norms and, for ghost's fallback, its grads


@_strategies(windowed.BATCHED, windowed.IDENTITY_PATCHES)
def test_frozen_kernels_and_a_non_finite_example_compile_with_xla_and_match_the_reference(
    monkeypatch):
  """Under `jit_compile=True`: the frozen branch (an empty batch of kernel gradients) of a
  materialized strategy, and the replacement of a dropped example's rows that a non-finite
  plain sum triggers, give the reference's clipped sums."""
  monkeypatch.setattr(clipping, "REPLACE_WHEN_NEEDED_MIN_ELEMENTS", 0)  # every sum: cond
  model = _model([keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                  keras.layers.Conv2D(3, 3, strides=2, activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (7, 7, 2))
  x, y = _images(6, (7, 7, 2))
  x[4, 2, 3, 1] = np.nan  # example 4: every gradient of it is NaN, so it is dropped
  variables = model.trainable_variables
  frozen = [v.name for v in variables if "kernel" in v.name][1]  # the second conv's
  masks = [tf.constant(m) for m in _frozen_kernels(variables, [frozen])]
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  args = (model, loss_fn, tf.constant(x), tf.constant(y),
          tf.constant([1, 1, 0, 1, 1, 1], tf.float32), variables, masks, 1e-3)
  want = _reference(*args).clipped
  got = tf.function(per_layer.PerLayerEngine().clipped_sum, jit_compile=True)(*args).clipped
  assert int(got.num_non_finite) == int(want.num_non_finite) == 1
  for variable, a, b in zip(variables, got.grads, want.grads):
    assert np.all(np.isfinite(a.numpy())), variable.name
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=variable.name)
    if variable.name == frozen:
      np.testing.assert_array_equal(a.numpy(), 0)


# The batch that runs is within both limits, beyond the reuse limit, beyond both.
@pytest.mark.parametrize("limits,reused_sums,loops", [
    ({}, 2, 0), ({"_REUSED_MAX_BYTES": 0}, 0, 0),
    ({"_REUSED_MAX_BYTES": 0, "_MATERIALIZED_MAX_BYTES": 0}, 0, 2)])
# identity_patches forms the patches another way and decides the reuse as batched does: slow.
@_strategies(windowed.BATCHED, pytest.param(windowed.IDENTITY_PATCHES, marks=pytest.mark.slow))
def test_a_batch_size_known_only_when_the_step_runs_decides_the_reuse_then(
    monkeypatch, limits, reused_sums, loops):
  """`fit` on arrays traces the step with batch size None: the materialized per-example kernel
  gradients are then kept for the clipped sum if the batch that runs is small enough
  (`_REUSED_MAX_BYTES`), else dropped after the norms (the sum from the weight-gradient op);
  beyond `_MATERIALIZED_MAX_BYTES` they are never formed (the per-example loop instead).
  Every way, the reference's clipped sums, for every example weighted, dropped or clipped."""
  for name, value in limits.items():
    monkeypatch.setattr(windowed, name, value)
  model = _model([keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                  keras.layers.Conv2D(3, 3, strides=2, activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (7, 7, 2))
  x, y = _images(6, (7, 7, 2))
  weights = np.array([1, 1, 0, 1, 1, 1], "float32")
  variables = model.trainable_variables
  masks = [tf.constant(m) for m in T.random_masks(variables, keep=0.6, seed=3)]
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  want = _reference(model, loss_fn, tf.constant(x), tf.constant(y), tf.constant(weights),
                    variables, masks, 1e-2).clipped
  reused = []  # conv kernels' [B, h, w, in, out] weighted into a clipped sum, as the step RUNS
  weighted_batch_sum = clipping.weighted_batch_sum

  def recorded(t, kept, factors):
    total = weighted_batch_sum(t, kept, factors)
    if t.shape.rank != 5:
      return total
    out = tf.py_function(lambda s: reused.append(1) or s, [total], total.dtype)
    out.set_shape(total.shape)
    return out

  monkeypatch.setattr(clipping, "weighted_batch_sum", recorded)
  looped = []  # conv layers whose norms were taken one example at a time, as the step RUNS
  one_example_at_a_time = windowed.WindowedRule._one_example_at_a_time

  def recorded_loop(self, *args):
    norms = one_example_at_a_time(self, *args)
    out = tf.py_function(lambda s: looped.append(1) or s, [norms], norms.dtype)
    out.set_shape(norms.shape)
    return out

  monkeypatch.setattr(windowed.WindowedRule, "_one_example_at_a_time", recorded_loop)
  step = tf.function(
      lambda x, y, w: per_layer.PerLayerEngine().clipped_sum(model, loss_fn, x, y, w, variables,
                                                            masks, 1e-2),
      input_signature=[tf.TensorSpec([None, 7, 7, 2]), tf.TensorSpec([None], tf.int32),
                       tf.TensorSpec([None])])
  got = step(x, y, weights).clipped
  for variable, a, b in zip(variables, got.grads, want.grads):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-7, err_msg=variable.name)
  assert (len(reused), len(looped)) == (reused_sums, loops)


def test_all_kernels_frozen_leaves_the_biases_trained():
  model = _model([keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3)], (5,))
  x, y = _images(8, (5,))
  masks = _frozen_kernels(model.trainable_variables, ["kernel"], keep=1.0)
  result = _compare(model, x, y, clip=1e-3, masks=masks)
  assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for v, g in
             zip(model.trainable_variables, result.clipped.grads) if "bias" in v.name)


def test_calibration_chooses_a_strategy_per_shape_and_records_it(calibrated):
  model = _model([keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                  keras.layers.Conv2D(3, 2, strides=2, activation="relu"),
                  keras.layers.Flatten(), keras.layers.Dense(3)], (8, 8, 2))
  x, y = _images(6, (8, 8, 2))
  _compare(model, x, y, weights=[1, 1, 0, 1, 1, 1])
  choices = calibration.choices()
  # One per conv shape, and one more (ghost excluded) where ghost won: masked kernels' fallback.
  assert len(choices) in (2, 3, 4), choices
  for record in choices.values():
    assert record["choice"] in record["ms"]
    assert set(record["ms"]) <= {windowed.BATCHED, windowed.ONE_AT_A_TIME,
                                 windowed.IDENTITY_PATCHES, windowed.GHOST}
    assert windowed.IDENTITY_PATCHES in record["ms"]


def test_calibration_times_gradients_also_while_a_function_is_traced(calibrated):
  # The engine calibrates while its step is traced; `tf.init_scope` would pause every gradient
  # tape there, and a per-example loop would be timed taking the gradient of nothing.
  variable = tf.Variable(3.0)
  gradients = []

  def with_gradient():
    with tf.GradientTape() as tape:
      y = variable * variable
    gradients.append(tape.gradient(y, variable))
    return gradients[-1]

  @tf.function
  def traced_step():
    calibration.fastest("gradient", {"with_gradient": with_gradient,
                                     "constant": lambda: tf.constant(0.0)})
    return tf.constant(0.0)

  traced_step()
  assert gradients and [None if g is None else float(g) for g in gradients] == [6.0] * len(
      gradients)


def test_without_calibration_the_heuristic_decides(calibrated):
  calibration.set_enabled(False)
  try:
    model = _model([keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                    keras.layers.Flatten(), keras.layers.Dense(3)], (6, 6, 1))
    x, y = _images(4, (6, 6, 1))
    _compare(model, x, y)
    assert calibration.choices() == {}
  finally:
    calibration.set_enabled(True)  # the fixture restores the default


_UNMASKED_CONV2D = [
    dict(filters=4, kernel_size=3, padding="same"),
    dict(filters=3, kernel_size=(2, 3), strides=(2, 1), padding="valid"),
    dict(filters=3, kernel_size=3, dilation_rate=2, padding="same", use_bias=False),
]


@pytest.mark.parametrize("conv_class,conv,windowed_strategy", [
    pytest.param(conv_class, *param.values, marks=param.marks,
                 id=f"{conv_class.__name__}-{param.id}")
    for conv_class, strategies in [(keras.layers.Conv2D, (windowed.GHOST,) + _MASKED_CONV),
                                   (models.WSConv2D, _MASKED_CONV)]
    for param in _layer_cases(_UNMASKED_CONV2D, strategies)], indirect=["windowed_strategy"])
def test_unmasked_conv2d_and_ws_conv2d(conv, conv_class, windowed_strategy):
  """Without masks (where ghost norms apply), every example clipped (a tiny clip norm), so the
  norms themselves must be right."""
  del windowed_strategy  # the fixture sets the strategy
  model = _model([conv_class(**conv, activation="relu"), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (7, 7, 2))
  x, y = _images(5, (7, 7, 2))
  _compare(model, x, y, weights=[1, 1, 0, 1, 1], masks_keep=1.0, clip=1e-3)


@_strategies(*_MASKED_CONV)
def test_unmasked_ws_conv2d_with_augmult_views():
  model = _model([models.WSConv2D(4, 3, padding="same", use_bias=False),
                  keras.layers.GroupNormalization(groups=2), keras.layers.Activation("relu"),
                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)], (6, 6, 2))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3, 6, 6, 2)).astype("float32")  # 3 views per example
  y = rng.integers(0, 3, 4).astype("int32")
  _compare(model, x, y, masks_keep=1.0, clip=1e-3)


@pytest.mark.parametrize("conv", [dict(padding="same"), dict(strides=2, dilation_rate=1),
                                  dict(padding="same", dilation_rate=2, use_bias=False)])
# The generic loop (False) runs by default in the other WSConv2D tests; here with CI's slow set.
@pytest.mark.parametrize("projections", [pytest.param(False, marks=pytest.mark.slow), True])
@_strategies(windowed.ONE_AT_A_TIME)
def test_ws_conv2d_loop_with_and_without_the_batch_wide_projections(monkeypatch, conv,
                                                                    projections):
  """WSConv2D's per-example loop both ways (`ws_conv_rule._projections_are_cheaper` decides by
  shape; forced here): masked, augmult views, every example clipped, and a bias far from 0,
  which must not enter the projection on the kernel (taken from the convolution without it)."""
  monkeypatch.setattr(ws_conv_rule, "_projections_are_cheaper", lambda call: projections)
  layer = models.WSConv2D(4, 3, **conv)
  model = _model([layer, keras.layers.Flatten(), keras.layers.Dense(3)], (7, 7, 2))
  if layer.use_bias:
    layer.bias.assign(np.linspace(-30.0, 30.0, 4).astype("float32"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 2, 7, 7, 2)).astype("float32")  # 2 views per example
  y = rng.integers(0, 3, 4).astype("int32")
  _compare(model, x, y, weights=[1, 1, 0, 1], clip=1e-3)


def test_ghost_norms_never_fall_below_the_true_norm_at_extreme_scales():
  """Ghost norms cancel (g^T P P^T g has terms of both signs): in float32 they gave 0 for an
  example whose activations (1e-21) and output gradients (1e21) underflow, and up to 2.2 times
  less than the true norm for near-constant images, so that example's clipped contribution
  exceeded the clip norm. In float64 with their rounding bound they are an upper bound, and a
  tight one. The true norms: exact sums of P_i^T G_i in extended precision."""
  from tfdp_prune.layer_rules import base  # pylint: disable=g-import-not-at-top
  from tfdp_prune.layer_rules import registry  # pylint: disable=g-import-not-at-top
  batch = 12
  layer = keras.layers.Conv2D(16, 3, padding="valid", use_bias=False)
  layer.build((None, 4, 4, 16))
  rule = registry.rule_for(layer)
  rng = np.random.default_rng(1)
  a = np.empty((batch, 4, 4, 16), "float32")
  g = np.empty((batch, 2, 2, 16), "float32")
  a[0], g[0] = rng.normal(size=(4, 4, 16)) * 1e-21, rng.normal(size=(2, 2, 16)) * 1e21
  for i in range(1, batch):  # near-constant images, output gradients summing to 0
    a[i] = 1e4 * (rng.normal(size=(1, 1, 16)) + 1e-4 * rng.normal(size=(4, 4, 16)))
    rows = rng.normal(size=(4, 16))
    g[i] = (rows - rows.mean(0)).reshape(2, 2, 16)
  call = base.CapturedCall(layer, rule, tf.constant(a), tf.constant(g))
  variables = rule.variables(layer)
  ghost = rule.squared_norms(windowed.GHOST, call, tf.constant(g), tf.constant(batch), variables,
                             [tf.ones(v.shape) for v in variables]).numpy().astype(np.float64)
  wide_a, wide_g = a.astype(np.longdouble), g.astype(np.longdouble)
  patches = np.stack([wide_a[:, r:r + 3, c:c + 3, :] for r in range(2) for c in range(2)], 1)
  exact = np.einsum("btijc,bto->bijco", patches, wide_g.reshape(batch, 4, 16))
  true = np.sum(np.square(exact), axis=(1, 2, 3, 4)).astype(np.float64)
  assert np.all(ghost >= true), (ghost / true).min()
  # Tight: the rounding bound is relative to the uncancelled sum, here 1e8 times the norm.
  np.testing.assert_allclose(ghost, true, rtol=1e-4)


@pytest.mark.parametrize("make_layer", [lambda: keras.layers.GroupNormalization(2),
                                        lambda: keras.layers.LayerNormalization(center=False)])
def test_normalization_record_without_its_saved_xhat_recomputes_it(make_layer):
  """The engine's capture saves xhat from the forward pass; a record made elsewhere (no saved
  tensors) gives the same per-example gradients by running the normalization again."""
  from tfdp_prune.layer_rules import base  # pylint: disable=g-import-not-at-top
  from tfdp_prune.layer_rules import registry  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(1.0, 2.0, size=(4, 3, 3, 4)), tf.float32)
  g = tf.constant(rng.normal(size=(4, 3, 3, 4)), tf.float32)
  layer = make_layer()
  layer(x)
  rule = registry.rule_for(layer)
  outputs, captured = rule.capture(layer, type(layer).call.__get__(layer), x, {})
  assert captured.saved
  bare = base.CapturedCall(layer, rule, x, outputs)
  for saved, recomputed in zip(rule.per_example_grads(captured, g, 4),
                               rule.per_example_grads(bare, g, 4)):
    np.testing.assert_allclose(saved.numpy(), recomputed.numpy(), rtol=1e-5, atol=1e-5)


@_strategies(*_ALL)
def test_a_kernel_mask_changed_after_tracing_is_read_at_run_time():
  """Whether a kernel is fully frozen (no per-example work) is decided each step from the mask's
  value: one traced step, its conv kernel's mask set to all zero, then to a single trained
  coordinate, then to zero again, clips like the reference each time (a tiny clip: every
  example clipped, so the norms must be right)."""
  model = _model([keras.layers.Conv2D(3, 3, activation="relu"), keras.layers.Flatten(),
                  keras.layers.Dense(3)], (6, 6, 2))
  x, y = _images(5, (6, 6, 2))
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
  variables = model.trainable_variables
  masks = [tf.Variable(np.ones(v.shape, "float32"), trainable=False) for v in variables]
  kernel = next(i for i, v in enumerate(variables) if "kernel" in v.name)
  single = np.zeros(variables[kernel].shape, "float32")
  single.flat[5] = 1.0
  step = tf.function(per_layer.PerLayerEngine().clipped_sum)
  reference = tf.function(per_example.VectorizedEngine().clipped_sum)
  args = (model, loss_fn, tf.constant(x), tf.constant(y), tf.ones(5), variables, masks, 1e-3)
  for value in (np.zeros_like(single), single, np.zeros_like(single)):
    masks[kernel].assign(value)
    got, want = step(*args), reference(*args)
    for variable, g, w in zip(variables, got.clipped.grads, want.clipped.grads):
      np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-8,
                                 err_msg=variable.name)
    assert bool(np.any(got.clipped.grads[kernel].numpy())) == bool(value.any())
  assert step.experimental_get_tracing_count() == 1
