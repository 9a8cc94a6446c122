"""Two replicas (MirroredStrategy over the two logical CPUs of conftest.py) vs one.

TF Privacy 0.9.0 on two replicas gives about 2.8x the noise std and twice the gradient; both
tests below compare against the one-replica update, so either error fails them.
"""

import numpy as np
import pytest
from scipy import stats

from tfdp_prune.compat import keras
from tests.tfdp_prune import _testing as T


def _strategy(replicas):
  strategy = T.mirrored_strategy(replicas)  # shared by the session's tests
  if strategy is None:
    pytest.skip("needs two logical CPUs (tests/conftest.py)")
  return strategy


def _train(replicas, x, y, sample_weight=None, physical_batch=None, **optimizer_kwargs):
  """One logical step on (x, y); returns the change of each variable."""
  with _strategy(replicas).scope():
    model = T.dp_model(T.dense_model(seed=3, inputs=x.shape[1], hidden=64), **optimizer_kwargs)
  before = T.weights(model)
  model.fit(x, y, sample_weight=sample_weight, batch_size=physical_batch or len(y),
            shuffle=False, verbose=0)
  assert model.optimizer.iterations.numpy() == 1
  return [after - start for after, start in zip(T.weights(model), before)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_replicas_give_the_one_replica_update_without_noise(accumulation):
  x, y = T.dense_data(n=32 * accumulation, inputs=8)
  kwargs = dict(noise_multiplier=0.0, l2_norm_clip=0.1, gradient_accumulation_steps=accumulation,
                physical_batch=32)
  for got, want in zip(_train(2, x, y, **kwargs), _train(1, x, y, **kwargs)):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_two_replicas_give_the_one_replica_noise_std():
  # All padding: the update is pure noise, -lr * N(0, (sigma C)^2) / expected batch size.
  sigma, clip, batch, lr = 1.5, 0.5, 16, 1.0
  x = np.random.default_rng(0).normal(size=(batch, 128)).astype("float32")
  y = np.zeros(batch, "int32")
  expected = lr * sigma * clip / batch
  # Seeded (insecure) so that the KS tests' outcomes are deterministic.
  kwargs = dict(noise_multiplier=sigma, l2_norm_clip=clip, learning_rate=lr,
                insecure_noise_seed=1, expected_batch_size=float(batch))
  for replicas in (1, 2):
    update = np.concatenate([d.ravel() for d in _train(replicas, x, y, np.zeros(batch),
                                                       **kwargs)])
    assert stats.kstest(update, "norm", args=(0, expected)).pvalue > 1e-3, replicas
    for wrong in (expected * 2 / 3, expected * 3 / 2):
      assert stats.kstest(update, "norm", args=(0, wrong)).pvalue < 1e-6, (replicas, wrong)


def test_replicas_draw_independent_noise():
  # Each replica adds std sigma*C/sqrt(2). Independent draws sum to sigma*C; the same draw on
  # both replicas would sum to sqrt(2)*sigma*C. The generator's state is OS entropy (the
  # default), created in the strategy's scope: each replica must still get its own stream.
  sigma, batch = 1.0, 8
  x = np.random.default_rng(1).normal(size=(batch, 128)).astype("float32")
  update = _train(2, x, np.zeros(batch, "int32"), np.zeros(batch), noise_multiplier=sigma,
                  learning_rate=1.0)[0]
  assert update.size == 128 * 64  # the std estimate is within ~1% of its value
  np.testing.assert_allclose(np.std(update), sigma / batch, rtol=0.05)


def test_a_recompiled_trainable_subset_gives_the_one_replica_update():
  x, y = T.dense_data(n=32, inputs=8)
  updates = {}
  for replicas in (1, 2):
    with _strategy(replicas).scope():
      model = T.dp_model(T.dense_model(seed=3, hidden=8, classes=8), noise_multiplier=0.0,
                         l2_norm_clip=0.1)
      model.optimizer.build(model.trainable_variables)
      model.layers[0].trainable = False  # the state of the rest must follow its variables
      model.compile(optimizer=model.optimizer, loss=T.per_example_loss())
    before = [v.numpy().copy() for v in model.variables]
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    updates[replicas] = [v.numpy() - b for v, b in zip(model.variables, before)]
    np.testing.assert_array_equal(updates[replicas][0], 0.0)  # the frozen layer's kernel
  for got, want in zip(updates[2], updates[1]):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_state_written_from_the_batch_is_refused_under_two_replicas():
  x, y = T.dense_data(n=16, inputs=8)
  with _strategy(2).scope():
    model = T.dp_model(T.SubclassedWithRunningCenter())
  with pytest.raises(ValueError, match="layer 'center'.*from the values of the batch"):
    model.fit(x, y, batch_size=16, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 0
