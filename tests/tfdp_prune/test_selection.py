import numpy as np
import pytest

import tfdp_prune
from tfdp_prune.compat import keras
from tests.tfdp_prune import _testing as T


class _RecordSteps(keras.callbacks.Callback):
  """Weights before and after each step, and the masks in force during it."""

  def __init__(self, selection):
    super().__init__()
    self.selection = selection

  def on_train_begin(self, logs=None):
    self.steps = []

  def on_train_batch_begin(self, batch, logs=None):
    self._before = T.weights(self.model)
    self._masks = [m.copy() for m in self.selection.masks]

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append((self._before, T.weights(self.model), self._masks))


@pytest.mark.parametrize("select_every", [1, 5])
@pytest.mark.parametrize("rule", [tfdp_prune.MagnitudeRule(0.7),
                                  tfdp_prune.RandomRule(0.7, seed=4)])
def test_each_step_moves_only_the_coordinates_selected_for_it(select_every, rule):
  x, y = T.dense_data(n=80)
  model = T.dp_model(T.dense_model(seed=1), noise_multiplier=1.0, momentum=0.9)
  selection = tfdp_prune.ParameterSelection(rule, select_every=select_every)
  record = _RecordSteps(selection)  # after `selection`: it sees the mask chosen for the step
  model.fit(x, y, batch_size=8, callbacks=[selection, record], verbose=0)
  kernels = [i for i, v in enumerate(model.trainable_variables) if "kernel" in v.name]
  distinct = set()
  for before, after, masks in record.steps:
    for i, mask in zip(kernels, masks):
      np.testing.assert_array_equal(after[i][~mask], before[i][~mask])
      assert np.all(after[i][mask] != before[i][mask])
    distinct.add(tuple(np.concatenate([m.ravel() for m in masks])))
  assert selection._round == 10 // select_every  # a new mask every `select_every` steps
  if isinstance(rule, tfdp_prune.RandomRule):
    assert len(distinct) == 10 // select_every


def test_selection_waits_for_the_end_of_a_logical_batch():
  x, y = T.dense_data(n=64)
  model = T.dp_model(T.dense_model(seed=1), noise_multiplier=1.0,
                     gradient_accumulation_steps=4)
  selection = tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(0.5, seed=1))
  chosen = []
  original = selection._select
  selection._select = lambda r: (chosen.append(int(model.optimizer._micro_steps.numpy())),
                                 original(r))[1]
  model.fit(x, y, batch_size=8, callbacks=[selection], verbose=0)
  assert chosen == [0, 4]  # two logical steps of 4 physical batches: one selection each


def test_public_gradient_selection_never_reads_private_data():
  x, y = T.dense_data(n=48)
  private = T.GuardedPrivateData(x, y, batch_size=8)
  model = T.dp_model(T.dense_model(), noise_multiplier=1.0)
  selection = tfdp_prune.ParameterSelection(tfdp_prune.PublicGradientRule(0.5), select_every=2,
                                            public_data=T.dense_data(n=16, seed=3))
  selection.on_train_batch_begin = private.forbid(selection.on_train_batch_begin)
  model.fit(private.dataset, callbacks=[selection], verbose=0)
  assert model.optimizer.iterations.numpy() >= 6


def test_reused_across_fits_and_driven_by_a_hand_written_loop():
  x, y = T.dense_data(n=32)
  selection = tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(0.5, seed=1), select_every=2)
  model = T.dp_model(T.dense_model(), noise_multiplier=0.5)
  for _ in range(2):
    model.fit(x, y, batch_size=8, callbacks=[selection], verbose=0)
    assert selection._round == 2  # reset at train begin: rounds 0 and 1 in each fit

  selection.set_model(model)
  selection.on_train_begin()
  for step, start in enumerate(range(0, 32, 8)):
    selection.on_train_batch_begin(step)
    before, masks = T.weights(model)[0], selection.masks[0].copy()
    model.train_on_batch(x[start:start + 8], y[start:start + 8])
    np.testing.assert_array_equal(T.weights(model)[0][~masks], before[~masks])
  assert selection._round == 2


def test_config_round_trip_and_bad_arguments():
  selection = tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(0.3, "global", seed=9),
                                            select_every=7)
  config = selection.get_config()
  assert tfdp_prune.ParameterSelection.from_config(config).get_config() == config
  with pytest.raises(ValueError, match="select_every"):
    tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(0.3), select_every=0)
