import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import model_checks
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T


class StepCounter(keras.layers.Layer):
  """Counts its training calls: state written from a constant, not from the batch."""

  def build(self, input_shape):
    self.calls = self.add_weight("calls", shape=(), initializer="zeros", trainable=False)

  def call(self, inputs, training=None):
    if training:
      self.calls.assign_add(1.0)
    return inputs


class RowCounter(keras.layers.Layer):
  """Counts the rows it has seen in training: written from the batch SIZE only."""

  def build(self, input_shape):
    self.rows = self.add_weight("rows", shape=(), initializer="zeros", trainable=False)

  def call(self, inputs, training=None):
    if training:
      self.rows.assign_add(tf.cast(tf.shape(inputs)[0], tf.float32))
    return inputs


def _model(*middle):
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), *middle,
                           keras.layers.Dense(3)])


def test_sync_batch_normalization_is_refused_with_the_fix():
  model = _model(keras.layers.experimental.SyncBatchNormalization(name="sync_bn"))
  with pytest.raises(ValueError, match="'sync_bn'.*SyncBatchNormalization.*GroupNormalization"):
    tfdp_prune.make_private(model)


@pytest.mark.parametrize("layer", [keras.layers.BatchNormalization,
                                   keras.layers.experimental.SyncBatchNormalization])
def test_batch_normalization_variants_are_found_by_behaviour(layer):
  # The behaviour check alone (make_private also refuses these by class).
  model = _model(layer(name="bn"))
  spec = model_checks.declared_input_spec(model)
  with pytest.raises(ValueError, match=r"layer 'bn'.*'bn/moving_mean:0' from the values of the "
                                       r"batch.*GroupNormalization"):
    model_checks.check_no_state_written_from_batch(model, spec, fixed_batch_size=True)


def test_a_wrapped_batch_normalization_is_refused():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((5, 8)),
                            keras.layers.TimeDistributed(keras.layers.BatchNormalization(
                                name="inner_bn")),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  with pytest.raises(ValueError, match="'inner_bn'.*GroupNormalization"):
    tfdp_prune.make_private(model)


def test_a_custom_layer_writing_a_running_mean_of_its_inputs_is_refused():
  model = _model(T.RunningCenter(name="center"))
  before = [v.numpy().copy() for v in model.variables]
  with pytest.raises(ValueError, match=r"layer 'center' \(RunningCenter\) writes its "
                                       r"non-trainable variable 'center/running:0' from the "
                                       r"values of the batch.*GroupNormalization"):
    T.dp_model(model)
  for variable, value in zip(model.variables, before):  # the probes left no trace
    np.testing.assert_array_equal(variable.numpy(), value)


def test_a_subclassed_model_is_refused_before_its_first_step():
  x, y = T.dense_data(n=16)
  model = T.SubclassedWithRunningCenter()
  T.dp_model(model)  # no declared inputs: nothing to probe yet
  with pytest.raises(ValueError, match="layer 'center'.*from the values of the batch"):
    model.fit(x, y, batch_size=8, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 0
  np.testing.assert_array_equal(model.center.running.numpy(), 0.0)


def test_state_written_from_the_batch_size_is_refused_unless_batches_have_a_fixed_size():
  x, y = T.dense_data(n=20)
  model = T.dp_model(_model(RowCounter(name="rows")))  # accepted: the batch size is not known
  with pytest.raises(ValueError, match="'rows/rows:0' from the number of rows of the batch"):
    model.fit(x, y, batch_size=8, verbose=0)  # 8, 8, 4 rows: the graph's batch size is open
  fixed = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
  model.fit(fixed, verbose=0)  # a static batch size: the count says nothing about the data
  assert int(model.optimizer.iterations.numpy()) == 2


def test_state_written_from_constants_is_allowed():
  x, y = T.dense_data(n=16)
  model = T.dp_model(_model(StepCounter(name="counter")))
  model.fit(x, y, batch_size=8, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("layer", [
    lambda: keras.layers.GroupNormalization(groups=2),
    lambda: keras.layers.LayerNormalization(),
    lambda: keras.layers.Dropout(0.5),
])
def test_per_example_layers_are_accepted(layer):
  x, y = T.dense_data(n=16)
  model = T.dp_model(_model(layer()), noise_multiplier=1.0)
  model.fit(x, y, batch_size=8, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 2


def test_the_check_runs_once_per_input_signature(monkeypatch):
  model = _model()
  spec = model_checks.declared_input_spec(model)
  calls = []
  original = model.call
  monkeypatch.setattr(model, "call", lambda *a, **k: calls.append(1) or original(*a, **k))
  model_checks.check_no_state_written_from_batch(model, spec, fixed_batch_size=False)
  first = len(calls)
  model_checks.check_no_state_written_from_batch(model, spec, fixed_batch_size=False)
  assert first == 3 and len(calls) == first


@pytest.fixture
def global_policy():
  """Sets a global dtype policy for the test, and puts the previous one back."""
  previous = keras.mixed_precision.global_policy()
  yield keras.mixed_precision.set_global_policy
  keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_is_refused_before_the_first_step_with_the_fix(global_policy, policy):
  global_policy(policy)
  model = _model()
  model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0),
                loss=T.per_example_loss())
  with pytest.raises(ValueError, match=rf"computes in .*'{policy}'.*set_global_policy\('float32'\)"):
    tfdp_prune.make_private(model)


def test_one_half_precision_layer_in_a_float32_model_is_refused_by_name():
  model = _model(keras.layers.Dense(4, dtype="float16", name="half"))
  with pytest.raises(ValueError, match="Layer 'half' computes in float16"):
    model_checks.check_dp_model(model)


def test_a_float64_model_is_accepted():
  model = T.dp_model(keras.Sequential([keras.Input((8,), dtype="float64"),
                                       keras.layers.Dense(3, dtype="float64")]))
  x, y = T.dense_data(n=8)
  model.fit(x.astype("float64"), y, batch_size=8, verbose=0)
  assert model.trainable_variables[0].dtype == tf.float64


def test_a_loss_scale_optimizer_around_the_dp_optimizer_is_refused_before_any_update():
  model = _model()
  before = T.weights(model)
  model.compile(optimizer=keras.mixed_precision.LossScaleOptimizer(
      tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0)),
                loss=T.per_example_loss())
  tfdp_prune.make_private(model)
  x, y = T.dense_data(n=8)
  with pytest.raises(ValueError, match="wrapped in LossScaleOptimizer.*loss scale"):
    model.train_on_batch(x, y)
  for old, new in zip(before, T.weights(model)):
    np.testing.assert_array_equal(old, new)


class HalfWeight(keras.layers.Layer):
  """Scales its input by a weight kept in a 16-bit float (`weight_dtype`)."""

  def __init__(self, weight_dtype, **kwargs):
    super().__init__(**kwargs)
    self.weight_dtype = weight_dtype

  def build(self, input_shape):
    self.scale = self.add_weight("scale", shape=(), dtype=self.weight_dtype, initializer="ones")

  def call(self, inputs):
    return inputs * tf.cast(self.scale, inputs.dtype)


def test_a_half_precision_weight_is_refused_by_name():
  with pytest.raises(ValueError, match="Weight 'half_weight/scale:0' is bfloat16"):
    model_checks.check_dp_model(_model(HalfWeight("bfloat16", name="half_weight")))


def test_a_lazily_built_model_with_a_half_precision_weight_is_refused_at_its_first_step():
  model = T.dp_model(keras.Sequential([keras.layers.Dense(4),
                                       HalfWeight("float16", name="half_weight"),
                                       keras.layers.Dense(3)]))  # no input shape: unbuilt
  x, y = T.dense_data(n=8)
  with pytest.raises(ValueError, match="Weight 'half_weight/scale:0' is float16"):
    model.train_on_batch(x, y)
