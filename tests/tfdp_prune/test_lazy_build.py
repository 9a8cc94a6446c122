"""Models declared without an input shape (TF Privacy's test model, `Sequential([Dense(1)])`):
built for the training data when `fit` starts, and trained exactly as a built model."""

import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import lazy_build
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T


def _layers():
  init = lambda seed: keras.initializers.GlorotUniform(seed=seed)
  return [keras.layers.Dense(16, activation="tanh", kernel_initializer=init(1)),
          keras.layers.Dense(3, kernel_initializer=init(2))]


def _model(declared_input: bool, engine: str):
  layers = ([keras.Input((8,))] if declared_input else []) + _layers()
  return T.dp_model(keras.Sequential(layers), per_example_engine=engine, l2_norm_clip=0.5,
                    noise_multiplier=1.0, insecure_noise_seed=7)


@pytest.mark.parametrize("engine", ["per_layer", "vectorized"])
def test_a_model_without_input_shape_trains_with_masks_exactly_as_a_built_one(engine):
  x, y = T.dense_data(n=32)
  results = []
  for declared_input in (True, False):
    model = _model(declared_input, engine)
    freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(sparsity=0.5, seed=3))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[freezing])
    # The optimizer's state (masks, accumulators, noise) is for the model's own variables.
    assert [v.ref() for v in model.optimizer.state_variables()] == [
        v.ref() for v in model.trainable_variables]
    for variable, mask in zip(freezing.masked_variables, freezing.masks):
      assert np.all(variable.numpy()[~mask] == 0)  # frozen at zero, untouched by the noise
    results.append(T.weights(model))
  built, lazily_built = results
  for got, want in zip(lazily_built, built):  # same clipping, same noise on the same coordinates
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("make_data", [
    lambda x, y: dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(8)),
    lambda x, y: dict(x=x, y=y, batch_size=8),
])
def test_fit_builds_the_model_before_callbacks_need_its_weights(make_data):
  x, y = T.dense_data(n=16)
  model = T.dp_model(keras.Sequential(_layers()))
  selection = tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(sparsity=0.5), select_every=1)
  model.fit(**make_data(x, y), verbose=0, callbacks=[selection])
  assert model.optimizer.iterations.numpy() == 2
  assert len(model.optimizer.state_variables()) == 4


def test_train_on_batch_builds_the_model_before_its_first_step_is_traced():
  x, y = T.dense_data(n=8)
  model = T.dp_model(keras.Sequential(_layers()))
  model.train_on_batch(x, y)
  model.train_on_batch(x, y)
  assert model.optimizer.iterations.numpy() == 2
  assert len(model.optimizer.state_variables()) == 4
  # Built inside the first trace, the model and the optimizer's variables would make
  # tf.function trace the step again.
  assert model.train_function.experimental_get_tracing_count() == 1


def test_a_mask_callback_on_a_model_without_weights_says_how_to_build_it():
  model = T.dp_model(keras.Sequential(_layers()))
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(sparsity=0.5))
  freezing.set_model(model)
  with pytest.raises(ValueError, match=r"has none yet.*keras.Input\(shape\).*model.build"):
    freezing.on_train_begin()


class _Batches(keras.utils.Sequence):

  def __init__(self, x, y):
    super().__init__()
    self.x, self.y = x, y

  def __len__(self):
    return 1

  def __getitem__(self, index):
    return self.x, self.y


def test_input_spec_of_each_kind_of_training_data():
  x, y = T.dense_data(n=4)
  want = tf.TensorSpec([None, 8], tf.float32)
  assert lazy_build.input_spec_of(x) == want
  assert lazy_build.input_spec_of(tf.data.Dataset.from_tensor_slices((x, y)).batch(2)) == want
  assert lazy_build.input_spec_of(tf.data.Dataset.from_tensor_slices(x).batch(2)) == want
  assert lazy_build.input_spec_of(_Batches(x, y)) == want
  assert lazy_build.input_spec_of({"a": x, "b": y}) == {
      "a": want, "b": tf.TensorSpec([None], tf.int32)}
  assert lazy_build.input_spec_of(iter([(x, y)])) is None  # read only by consuming it


def test_a_model_without_input_shape_is_built_in_its_distribution_strategy():
  if T.mirrored_strategy(2) is None:
    pytest.skip("needs two logical CPUs (tests/conftest.py)")
  x, y = T.dense_data(n=32)
  results = []
  for replicas, declared_input in ((1, True), (2, False)):
    with T.mirrored_strategy(replicas).scope():
      layers = ([keras.Input((8,))] if declared_input else []) + _layers()
      model = T.dp_model(keras.Sequential(layers), l2_norm_clip=0.5)
    freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(sparsity=0.5, seed=3))
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0, callbacks=[freezing])
    # Created by the strategy (mirrored), as `fit` would create them.
    assert all(isinstance(v, tf.distribute.DistributedValues) for v in model.trainable_variables)
    results.append(T.weights(model))
  for got, want in zip(*results):
    np.testing.assert_allclose(got, want, atol=1e-6)
