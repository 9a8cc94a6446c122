import numpy as np
import pytest

import tfdp_prune
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.ema import ExponentialMovingAverage
from tests.tfdp_prune import _testing as T


class _RecordWeights(keras.callbacks.Callback):
  """The weights when the first batch begins, and after every batch."""

  def on_train_begin(self, logs=None):
    self.start, self.after_batch, self.iterations = None, [], []

  def on_train_batch_begin(self, batch, logs=None):
    if self.start is None:
      self.start = T.weights(self.model)

  def on_train_batch_end(self, batch, logs=None):
    self.after_batch.append(T.weights(self.model))
    self.iterations.append(int(self.model.optimizer.iterations.numpy()))


def _reference(start, steps, decay, use_warmup=True, start_step=0, first_t=0):
  """The EMA recomputed in float64 from the weights after each logical step."""
  average = [w.astype(np.float64) for w in start]
  for t, weights in enumerate(steps, start=first_t - start_step):
    mu = decay if t >= 0 else 0.0
    if use_warmup and t >= 0:
      mu = min(mu, (1.0 + t) / (10.0 + t))
    average = [a - (1.0 - mu) * (a - w) for a, w in zip(average, weights)]
  return average


def _assert_close(actual, expected):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=1e-5, atol=1e-6)


def _dp_model(seed=1, **kwargs):
  return T.dp_model(T.dense_model(seed=seed), noise_multiplier=0.5, learning_rate=0.5, **kwargs)


def test_average_matches_a_numpy_recomputation_through_warmup_and_decay():
  x, y = T.dense_data(n=96)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.5)  # warm-up (1+t)/(10+t) < 0.5 until t = 8
  record = _RecordWeights()
  model.fit(x, y, batch_size=8, callbacks=[ema, record], verbose=0)  # 12 logical steps
  assert ema.num_updates == 12
  _assert_close(ema.averages(), _reference(record.start, record.after_batch, decay=0.5))
  without_warmup = _reference(record.start, record.after_batch, decay=0.5, use_warmup=False)
  assert not np.allclose(ema.averages()[0], without_warmup[0], rtol=1e-3)


def test_start_step_follows_the_weights_until_then():
  x, y = T.dense_data(n=48)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.9, use_warmup=False, start_step=3)
  record = _RecordWeights()
  model.fit(x, y, batch_size=8, callbacks=[ema, record], verbose=0)  # 6 steps
  _assert_close(ema.averages(), _reference(record.start, record.after_batch, decay=0.9,
                                           use_warmup=False, start_step=3))
  ema_2 = ExponentialMovingAverage(decay=0.9, use_warmup=False, start_step=6)
  model.fit(x, y, batch_size=8, callbacks=[ema_2, record], verbose=0)
  np.testing.assert_array_equal(ema_2.averages()[0], T.weights(model)[0])  # a copy, so far


def test_gradient_accumulation_updates_once_per_logical_step():
  x, y = T.dense_data(n=64)
  model = _dp_model(gradient_accumulation_steps=2)
  ema = ExponentialMovingAverage(decay=0.9)
  record = _RecordWeights()
  model.fit(x, y, batch_size=8, callbacks=[ema, record], verbose=0)  # 8 batches, 4 steps
  assert record.iterations == [0, 1, 1, 2, 2, 3, 3, 4]
  assert ema.num_updates == 4
  logical_ends = record.after_batch[1::2]
  _assert_close(ema.averages(), _reference(record.start, logical_ends, decay=0.9))
  # Updating after every physical batch would give another average.
  every_batch = _reference(record.start, record.after_batch, decay=0.9)
  assert not np.allclose(ema.averages()[0], every_batch[0], rtol=1e-4)


def test_works_with_a_non_dp_optimizer():
  x, y = T.dense_data(n=32)
  model = T.dense_model(seed=2)
  model.compile(optimizer=keras.optimizers.SGD(0.5), loss=T.per_example_loss())
  ema = ExponentialMovingAverage(decay=0.9)
  record = _RecordWeights()
  model.fit(x, y, batch_size=8, callbacks=[ema, record], verbose=0)
  assert ema.num_updates == 4
  _assert_close(ema.averages(), _reference(record.start, record.after_batch, decay=0.9))


def test_averaged_weights_restores_the_raw_weights_bit_for_bit():
  x, y = T.dense_data(n=32)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.9)
  model.fit(x, y, batch_size=8, callbacks=[ema], verbose=0)
  raw = T.weights(model)
  raw_loss = model.evaluate(x, y, verbose=0)
  with ema.averaged_weights():
    for variable, average in zip(model.trainable_variables, ema.averages()):
      np.testing.assert_array_equal(variable.numpy(), average.numpy())
    assert model.evaluate(x, y, verbose=0) != raw_loss
  for now, before in zip(T.weights(model), raw):
    np.testing.assert_array_equal(now, before)
  with pytest.raises(ZeroDivisionError):
    with ema.averaged_weights():
      1 / 0  # pylint: disable=pointless-statement
  for now, before in zip(T.weights(model), raw):
    np.testing.assert_array_equal(now, before)

  ema.swap_in()
  with pytest.raises(RuntimeError, match="already swapped in"):
    ema.swap_in()
  ema.swap_out()
  with pytest.raises(RuntimeError, match="without swap_in"):
    ema.swap_out()
  ema.assign_to_model()
  for variable, average in zip(model.trainable_variables, ema.averages()):
    np.testing.assert_array_equal(variable.numpy(), average.numpy())


def test_pruned_coordinates_stay_exactly_zero_in_the_average():
  x, y = T.dense_data(n=48)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.9999)
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.8))
  model.fit(x, y, batch_size=8, callbacks=[ema, freezing], verbose=0)  # ema listed first
  mask = freezing.masks[0]
  average = ema.averages()[0].numpy()
  np.testing.assert_array_equal(average[~mask], 0.0)
  assert np.all(average[mask] != 0.0)


def test_reused_across_fits_continues_unless_reset_is_requested():
  x, y = T.dense_data(n=32)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.9)
  record = _RecordWeights()
  model.fit(x, y, batch_size=8, callbacks=[ema, record], verbose=0)
  first = [a.numpy().astype(np.float64) for a in ema.averages()]
  model.fit(x, y, batch_size=8, callbacks=[ema, record], verbose=0)
  assert ema.num_updates == 8
  _assert_close(ema.averages(), _reference(first, record.after_batch, decay=0.9, first_t=4))

  fresh = ExponentialMovingAverage(decay=0.9, reset_on_train_begin=True)
  for _ in range(2):
    model.fit(x, y, batch_size=8, callbacks=[fresh, record], verbose=0)
    assert fresh.num_updates == 4
    _assert_close(fresh.averages(), _reference(record.start, record.after_batch, decay=0.9))

  other = T.dp_model(T.dense_model(seed=1, hidden=5), noise_multiplier=0.5)
  with pytest.raises(ValueError, match="match the average"):
    other.fit(x, y, batch_size=8, callbacks=[ema], verbose=0)
  other.fit(x, y, batch_size=8, callbacks=[fresh], verbose=0)  # reset: a new average
  assert fresh.averages()[0].shape == other.trainable_variables[0].shape


def test_driven_by_a_hand_written_loop():
  x, y = T.dense_data(n=32)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.9)
  ema.set_model(model)
  ema.on_train_begin()
  start, steps = T.weights(model), []
  for i, begin in enumerate(range(0, 32, 8)):
    ema.on_train_batch_begin(i)
    model.train_on_batch(x[begin:begin + 8], y[begin:begin + 8])
    ema.on_train_batch_end(i)
    steps.append(T.weights(model))
  assert ema.num_updates == 4
  _assert_close(ema.averages(), _reference(start, steps, decay=0.9))


def test_state_round_trips_through_a_checkpoint(tmp_path):
  x, y = T.dense_data(n=32)
  model = _dp_model()
  ema = ExponentialMovingAverage(decay=0.9)
  model.fit(x, y, batch_size=8, callbacks=[ema], verbose=0)
  path = tf.train.Checkpoint(ema=ema.state).save(str(tmp_path / "ckpt"))

  restored_model = _dp_model(seed=7)
  restored_model.set_weights(model.get_weights())
  restored = ExponentialMovingAverage(decay=0.9)
  restored.build(restored_model)
  tf.train.Checkpoint(ema=restored.state).restore(path).assert_consumed()
  assert restored.num_updates == 4
  for a, b in zip(restored.averages(), ema.averages()):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Training continues the restored average (t = 4 next), it does not start a new one.
  record = _RecordWeights()
  restored_model.fit(x, y, batch_size=8, callbacks=[restored, record], verbose=0)
  assert restored.num_updates == 8
  _assert_close(restored.averages(), _reference([a.numpy() for a in ema.averages()],
                                                record.after_batch, decay=0.9, first_t=4))


def test_config_round_trip_and_bad_arguments():
  ema = ExponentialMovingAverage(decay=0.999, use_warmup=False, start_step=10,
                                 reset_on_train_begin=True)
  config = ema.get_config()
  assert ExponentialMovingAverage.from_config(config).get_config() == config
  assert config == {"decay": 0.999, "use_warmup": False, "start_step": 10,
                    "reset_on_train_begin": True}
  with pytest.raises(ValueError, match=r"decay in \[0, 1\)"):
    ExponentialMovingAverage(decay=1.0)
  with pytest.raises(ValueError, match="decay >= 0"):
    ExponentialMovingAverage(decay=-0.1)
  with pytest.raises(ValueError, match="start_step"):
    ExponentialMovingAverage(start_step=-1)
  with pytest.raises(ValueError, match="use_warmup"):
    ExponentialMovingAverage(use_warmup="yes")
  with pytest.raises(RuntimeError, match="no average yet"):
    ExponentialMovingAverage().swap_in()
