import numpy as np
import pytest

import tfdp_prune
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T


class _RecordWeights(keras.callbacks.Callback):
  def on_train_batch_end(self, batch, logs=None):
    self.history.append(T.weights(self.model))

  def on_train_begin(self, logs=None):
    self.history = [T.weights(self.model)]


def _model(**kwargs):
  return T.dp_model(T.dense_model(seed=1), noise_multiplier=1.0, momentum=0.9,
                    **kwargs)


def test_public_data_with_nan_or_no_examples_is_refused():
  x = np.ones((8, 4), np.float32)
  y = np.zeros(8, np.int32)
  x[2, 1] = np.nan
  with pytest.raises(ValueError, match="finite public inputs.*1 of the 8.*ParameterFreezing"):
    tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5), public_data=(x, y))
  with pytest.raises(ValueError, match="non-empty public part"):
    tfdp_prune.ParameterSelection(tfdp_prune.MagnitudeRule(0.5), select_every=1,
                                  public_data=(x[:0], y[:0]))


def test_freeze_zero_prunes_and_pruned_coordinates_stay_exactly_zero():
  x, y = T.dense_data(n=80)
  model = _model()
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.8), frozen_value="zero")
  record = _RecordWeights()
  history = model.fit(x, y, batch_size=8, callbacks=[freezing, record], verbose=0)
  kernels = [i for i, v in enumerate(model.trainable_variables) if "kernel" in v.name]
  for i, mask in zip(kernels, freezing.masks):
    assert mask.mean() == pytest.approx(0.2, abs=0.01)
    for weights in record.history[1:]:  # after every step
      np.testing.assert_array_equal(weights[i][~mask], 0.0)
    assert np.all(record.history[-1][i][mask] != record.history[1][i][mask])
  assert history.history["mask_sparsity"][0] == pytest.approx(
      sum((~m).sum() for m in freezing.masks) / sum(v.size for v in record.history[0]))


def test_freeze_keep_leaves_frozen_coordinates_at_their_value():
  x, y = T.dense_data(n=80)
  model = _model(weight_decay=0.1)
  start = T.weights(model)
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(0.5, seed=2),
                                          frozen_value="keep")
  model.fit(x, y, batch_size=8, callbacks=[freezing], verbose=0)
  kernels = [i for i, v in enumerate(model.trainable_variables) if "kernel" in v.name]
  for i, mask in zip(kernels, freezing.masks):
    np.testing.assert_array_equal(T.weights(model)[i][~mask], start[i][~mask])
    assert np.all(T.weights(model)[i][mask] != start[i][mask])


def test_public_pretraining_and_public_gradients_never_read_private_data():
  x, y = T.dense_data(n=64)
  public = T.dense_data(n=32, seed=5)
  private = T.GuardedPrivateData(x, y, batch_size=8)
  model = _model()
  freezing = tfdp_prune.ParameterFreezing(
      tfdp_prune.PublicGradientRule(0.5, times_weight=True), public_data=public, public_epochs=2)
  freezing.on_train_begin = private.forbid(freezing.on_train_begin)
  model.fit(private.dataset, callbacks=[freezing], verbose=0)
  assert model.optimizer.iterations.numpy() >= 8  # the private data was trained on, by fit

  private.forbidden = True  # sanity: the guard does fire
  with pytest.raises(Exception, match="private data read"):
    next(iter(private.dataset))


def test_public_pretraining_trains_on_the_public_data():
  public = T.dense_data(n=64, seed=7)
  model = _model()
  loss = lambda: float(tf.reduce_mean(model.loss(public[1], model(public[0]))))
  before = loss()
  tfdp_prune.freezing.pretrain_on_public_data(model, public, epochs=5, learning_rate=0.5,
                                              batch_size=16)
  assert loss() < before - 0.1


def test_reused_across_fits_and_driven_by_a_hand_written_loop():
  x, y = T.dense_data(n=32)
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5))
  for seed in (1, 2):  # the same instance on two models, one fit each
    model = T.dp_model(T.dense_model(seed=seed), noise_multiplier=0.5)
    model.fit(x, y, batch_size=8, callbacks=[freezing], verbose=0)
    assert freezing.masked_variables[0] is model.trainable_variables[0]
    assert np.all(model.trainable_variables[0].numpy()[~freezing.masks[0]] == 0)

  model = T.dp_model(T.dense_model(seed=3), noise_multiplier=0.5)
  freezing.set_model(model)
  freezing.on_train_begin()
  for start in range(0, 32, 8):
    model.train_on_batch(x[start:start + 8], y[start:start + 8])
  logs = {}
  freezing.on_epoch_end(0, logs)
  assert model.optimizer.iterations.numpy() == 4
  assert np.all(model.trainable_variables[0].numpy()[~freezing.masks[0]] == 0)
  assert logs["mask_sparsity/" + model.trainable_variables[0].name.split(":")[0]] == 0.5


def test_config_round_trip_and_bad_arguments():
  freezing = tfdp_prune.ParameterFreezing(
      tfdp_prune.MagnitudeRule(0.9, "global"), frozen_value="keep", public_epochs=3,
      public_data=T.dense_data(n=8), maskable=tfdp_prune.MaskableSpec(exclude_patterns=["x"]))
  config = freezing.get_config()
  restored = tfdp_prune.ParameterFreezing.from_config(config, public_data=T.dense_data(n=8))
  assert restored.get_config() == config
  with pytest.raises(ValueError, match="frozen_value"):
    tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5), frozen_value="random")
  with pytest.raises(ValueError, match="needs public_data"):
    tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5), public_epochs=1)
  with pytest.raises(ValueError, match="public_gradient rule needs public_data"):
    tfdp_prune.ParameterFreezing(tfdp_prune.PublicGradientRule(0.5))
  with pytest.raises(ValueError, match="Expected rule to be a MaskRule"):
    tfdp_prune.ParameterFreezing("magnitude")


def test_mask_sparsity_reaches_tensorboard(tmp_path):
  x, y = T.dense_data(n=16)
  model = _model()
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5))
  board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
  model.fit(x, y, batch_size=8, callbacks=[freezing, board], verbose=0)
  tags = set()
  for path in tmp_path.glob("train/events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(value.tag for value in event.summary.value)
  assert "epoch_mask_sparsity" in tags
