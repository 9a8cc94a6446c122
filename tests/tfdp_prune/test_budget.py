import dataclasses
import json
import logging
import warnings

import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import accounting
from tfdp_prune import budget as budget_lib
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T

SIGMA = 1.0
# RDP (fast) wherever the accountant is not the point. The Poisson rate is nominal: these tests
# check the callback's counting and stopping, not the sampling of model.fit's batches (the
# optimizer divides by q * 32 = 8, the logical batch of the 32-example data below).
SPEC = accounting.PrivacySpec(noise_multiplier=SIGMA, steps=0, delta=1e-5,
                              sampling_probability=0.25, accountant="rdp")
TARGET = 6.1  # between epsilon(7 steps) = 5.95 and epsilon(8 steps) = 6.25


def _epsilon(steps, spec=SPEC):
  return spec.with_steps(steps).epsilon()


def _expected_max_steps(target, spec=SPEC):
  """Independently of the callback: walk up one step at a time until the target is exceeded."""
  steps = 0
  while _epsilon(steps + 1, spec) <= target:
    steps += 1
    assert steps < 60, "too many steps for a walk"
  return steps


def _model(**kwargs):
  kwargs.setdefault("expected_batch_size", 8.0)
  return T.dp_model(T.dense_model(seed=1), noise_multiplier=SIGMA, **kwargs)


class _CountBatches(keras.callbacks.Callback):
  def on_train_begin(self, logs=None):
    self.batches = 0

  def on_train_batch_end(self, batch, logs=None):
    self.batches += 1


def test_stops_after_the_last_step_within_the_target_never_later():
  x, y = T.dense_data(n=32)  # 4 logical steps per epoch at batch 8
  expected = _expected_max_steps(TARGET)
  assert expected == 7  # mid-epoch: the stop happens between batches, not at an epoch end
  model = _model()
  budget = budget_lib.PrivacyBudget(SPEC, target_epsilon=TARGET)
  count = _CountBatches()
  history = model.fit(x, y, batch_size=8, epochs=5, callbacks=[budget, count], verbose=0)
  assert int(model.optimizer.iterations.numpy()) == expected
  assert count.batches == expected
  assert budget.steps == expected and budget.max_steps == expected and budget.exhausted
  assert budget.epsilon() == _epsilon(expected) <= TARGET
  assert _epsilon(expected + 1) > TARGET  # one more step would have exceeded the target
  assert history.history["epsilon"] == [_epsilon(4), _epsilon(7)]


def test_with_gradient_accumulation_counts_and_stops_at_logical_steps():
  x, y = T.dense_data(n=32)  # 8 physical batches of 4 = 4 logical batches per epoch
  model = _model(gradient_accumulation_steps=2)
  budget = budget_lib.PrivacyBudget(SPEC, target_epsilon=TARGET)
  count = _CountBatches()
  history = model.fit(x, y, batch_size=4, epochs=5, callbacks=[budget, count], verbose=0)
  expected = _expected_max_steps(TARGET)
  assert int(model.optimizer.iterations.numpy()) == expected == budget.steps
  assert count.batches == 2 * expected  # the last logical batch was completed, not split
  assert model.optimizer.at_logical_batch_start()
  assert history.history["epsilon"] == [_epsilon(4), _epsilon(expected)]


def test_epsilon_and_delta_in_history_every_epoch_and_on_demand():
  x, y = T.dense_data(n=32)
  model = _model()
  budget = budget_lib.PrivacyBudget(SPEC)
  assert budget.epsilon() == 0.0 and budget.max_steps is None and not budget.exhausted
  history = model.fit(x, y, batch_size=8, epochs=3, callbacks=[budget], verbose=0)
  assert history.history["epsilon"] == [_epsilon(4), _epsilon(8), _epsilon(12)]
  assert history.history["delta"] == [1e-5] * 3
  model.train_on_batch(x[:8], y[:8])  # on demand, after steps taken outside fit
  assert budget.epsilon() == _epsilon(int(model.optimizer.iterations.numpy())) == _epsilon(13)


def test_the_logged_delta_includes_the_sampler_overflow_term():
  """A sampler whose cap can be exceeded (p per step) adds (1 + e^eps) * T * p to delta: the
  logged delta is that of the guarantee, growing with the steps."""
  x, y = T.dense_data(n=32)
  model = _model()
  spec = dataclasses.replace(SPEC, overflow_probability=1e-6)
  budget = budget_lib.PrivacyBudget(spec)
  history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[budget], verbose=0)
  want = [spec.with_steps(s).total_delta() for s in (4, 8)]
  assert history.history["delta"] == want
  assert 1e-5 < want[0] < want[1] and budget.delta == want[1]


def test_a_second_fit_continues_the_budget_and_a_spent_budget_takes_no_step():
  x, y = T.dense_data(n=32)
  model = _model()
  budget = budget_lib.PrivacyBudget(SPEC, target_epsilon=TARGET)
  model.fit(x, y, batch_size=8, epochs=1, callbacks=[budget], verbose=0)
  history = model.fit(x, y, batch_size=8, epochs=5, callbacks=[budget], verbose=0)
  assert history.history["epsilon"] == [_epsilon(7)]  # 4 + 3 steps, not 4 + 7
  weights = T.weights(model)
  with pytest.raises(budget_lib.PrivacyBudgetExhaustedError, match="budget is spent"):
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[budget], verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 7
  for before, after in zip(weights, T.weights(model)):
    assert (before == after).all()
  # The same budget on another model (the same private data): still spent, never reset.
  with pytest.raises(budget_lib.PrivacyBudgetExhaustedError):
    _model().fit(x, y, batch_size=8, callbacks=[budget], verbose=0)


def test_resuming_continues_epsilon_from_a_restored_optimizer_or_ledger(tmp_path):
  x, y = T.dense_data(n=32)
  model = _model()
  first = budget_lib.PrivacyBudget(SPEC)
  model.fit(x, y, batch_size=8, epochs=2, callbacks=[first], verbose=0)
  path = tf.train.Checkpoint(optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
  state = json.loads(json.dumps(first.get_state()))

  # A restored optimizer (iterations 8) and a new budget without state: counts the 8 steps.
  resumed = _model()
  resumed.optimizer.build(resumed.trainable_variables)
  tf.train.Checkpoint(optimizer=resumed.optimizer).read(path).assert_existing_objects_matched()
  assert int(resumed.optimizer.iterations.numpy()) == 8
  history = resumed.fit(x, y, batch_size=8, callbacks=[budget_lib.PrivacyBudget(SPEC)],
                        verbose=0)
  assert history.history["epsilon"] == [_epsilon(12)]

  # A restored ledger and a fresh optimizer: continues from the ledger's 8 steps.
  second = budget_lib.PrivacyBudget(SPEC, target_epsilon=TARGET)  # allows 7 steps
  second.restore(state)
  with pytest.raises(budget_lib.PrivacyBudgetExhaustedError):
    _model().fit(x, y, batch_size=8, callbacks=[second], verbose=0)
  count = _CountBatches()
  third = budget_lib.PrivacyBudget(SPEC, target_epsilon=7.0)  # 7.0: up to 10 steps
  third.restore(state)
  _model().fit(x, y, batch_size=8, epochs=3, callbacks=[third, count], verbose=0)
  assert third.steps == _expected_max_steps(7.0) == 10 and count.batches == 2
  third.restore(state)  # an older state never lowers the spent budget
  assert third.steps == 10
  with pytest.raises(ValueError, match="Cannot resume"):
    budget_lib.PrivacyBudget(dataclasses.replace(SPEC, noise_multiplier=2.0)).restore(state)


def test_hand_written_loop_stops_and_refuses_the_exceeding_step():
  x, y = T.dense_data(n=32)
  model = _model()
  budget = budget_lib.PrivacyBudget(SPEC, target_epsilon=TARGET)
  budget.set_model(model)
  budget.on_train_begin()
  batches = 0
  for epoch in range(5):
    for start in range(0, 32, 8):
      budget.on_train_batch_begin(batches)
      model.train_on_batch(x[start:start + 8], y[start:start + 8])
      batches += 1
      budget.on_train_batch_end(batches)
      if model.stop_training:
        break
    if model.stop_training:
      break
  assert batches == int(model.optimizer.iterations.numpy()) == _expected_max_steps(TARGET)
  with pytest.raises(budget_lib.PrivacyBudgetExhaustedError):
    budget.on_train_batch_begin(batches)
  logs = {}
  budget.on_epoch_end(epoch, logs)
  assert logs == {"epsilon": _epsilon(7), "delta": 1e-5}


@pytest.mark.parametrize("spec", [
    SPEC,
    accounting.PrivacySpec(noise_multiplier=0.8, steps=0, delta=1e-5, sampling_probability=0.01,
                           accountant="rdp"),
    accounting.PrivacySpec(noise_multiplier=3.0, steps=0, delta=1e-5, sampling="shuffle",
                           batch_size=10, num_examples=40, accountant="rdp"),
])
@pytest.mark.parametrize("target", [0.5, 6.1])
def test_max_steps_is_the_last_step_count_within_the_target(spec, target):
  got = budget_lib.max_steps_within(spec, target)
  assert _epsilon(got, spec) <= target < _epsilon(got + 1, spec)
  if got < 40:
    assert got == _expected_max_steps(target, spec)


DIGITS_Q = 100 / 1258  # tfdp-train's default: batch 100 of the 1258 private digits


@pytest.mark.parametrize("sigma, target, want", [(0.1923, 8.0, 2), (1.0, 0.3, None)])
def test_max_steps_at_delta_0_1_where_the_first_step_costs_zero_epsilon(sigma, target, want):
  """`--delta=0.1 --steps=2`: epsilon after one step is exactly 0; the search took its log
  (math domain error)."""
  spec = accounting.PrivacySpec(noise_multiplier=sigma, steps=0, delta=0.1,
                                sampling_probability=DIGITS_Q, pld_discretization=1e-3)
  assert _epsilon(1, spec) == 0.0
  got = budget_lib.max_steps_within(spec, target)
  assert _epsilon(got, spec) <= target < _epsilon(got + 1, spec)
  assert got == _expected_max_steps(target, spec) == (want or got)


@pytest.mark.parametrize("sigma, q, target", [(0.9716, DIGITS_Q, 8.0), (5.0, 1e-4, 0.05)])
def test_pld_max_steps_is_the_last_step_count_within_the_target(sigma, q, target):
  """On the default PLD grid. The search is guided by coarser grids, whose answers differ (188
  instead of 189 on a 1e-2 grid for the first case; 1653 and 18781 on 1e-2 and 1e-3 grids
  instead of 188031 for the second, where one step's privacy loss spans a few grid points)."""
  spec = accounting.PrivacySpec(noise_multiplier=sigma, steps=0, delta=1e-5,
                                sampling_probability=q)
  got = budget_lib.max_steps_within(spec, target)
  epsilon = lambda steps: accounting.PrivacySpec(noise_multiplier=sigma, steps=steps, delta=1e-5,
                                                 sampling_probability=q).epsilon()
  assert epsilon(got) <= target < epsilon(got + 1)


def test_no_noise_allows_no_step():
  spec = accounting.PrivacySpec(noise_multiplier=0.0, steps=0, delta=1e-5,
                                sampling_probability=0.25, accountant="rdp")
  assert budget_lib.max_steps_within(spec, 100.0) == 0


def test_delta_at_least_one_over_n_warns():
  with pytest.warns(UserWarning, match=r"delta=0.001 >= 1/num_examples"):
    budget_lib.PrivacyBudget(dataclasses.replace(SPEC, delta=1e-3), num_examples=1000)
  shuffle = accounting.PrivacySpec(noise_multiplier=1.0, steps=0, delta=0.01, sampling="shuffle",
                                   batch_size=10, num_examples=100, accountant="rdp")
  with pytest.warns(UserWarning, match="1/num_examples"):
    budget_lib.PrivacyBudget(shuffle)  # n taken from the spec
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    budget_lib.PrivacyBudget(SPEC, num_examples=1000)  # 1e-5 < 1/1000


def test_epsilon_reaches_tensorboard(tmp_path):
  x, y = T.dense_data(n=16)
  board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
  _model().fit(x, y, batch_size=8, callbacks=[budget_lib.PrivacyBudget(SPEC), board], verbose=0)
  values = {}
  for path in tmp_path.glob("train/events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == "epoch_epsilon":
          values[value.tag] = float(tf.make_ndarray(value.tensor))
  assert values["epoch_epsilon"] == pytest.approx(_epsilon(2), rel=1e-6)


def test_config_round_trip():
  budget = budget_lib.PrivacyBudget(SPEC, target_epsilon=3.0, num_examples=1000,
                                    log_every_epoch=False)
  config = json.loads(json.dumps(budget.get_config()))
  restored = budget_lib.PrivacyBudget.from_config(config)
  assert restored.get_config() == budget.get_config()
  assert restored.spec == SPEC and restored.target_epsilon == 3.0
  sampler = tfdp_prune.PoissonSampler(T.dense_data(n=32), sampling_probability=0.25)
  with_sampler = budget_lib.PrivacyBudget.from_config(
      budget_lib.PrivacyBudget(SPEC, sampler=sampler).get_config(), sampler=sampler)
  assert with_sampler.sampler is sampler and with_sampler.num_examples == 32


# ---- the sampler, the optimizer and the budget agree (DESIGN.md rule 10) ------------------------

def test_a_sampler_that_the_optimizer_accumulates_differently_is_refused_before_any_step():
  # The case: one Poisson draw per physical batch, the optimizer sums 4 per update, so
  # each update would hold 4 draws while the ledger records one.
  x, y = T.dense_data(n=320)
  sampler = tfdp_prune.PoissonSampler((x, y), sampling_probability=0.1)
  model = _model(gradient_accumulation_steps=4, expected_batch_size=sampler.expected_batch_size)
  budget = budget_lib.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=SIGMA, steps=0, delta=1e-5, accountant="rdp"),
      sampler=sampler)
  before = T.weights(model)
  with pytest.raises(ValueError, match=r"the optimizer sums 4 into one noisy update"):
    model.fit(sampler.dataset(), steps_per_epoch=8, callbacks=[budget], verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 0
  for got, want in zip(T.weights(model), before):
    np.testing.assert_array_equal(got, want)
  agreeing = _model(gradient_accumulation_steps=1, expected_batch_size=sampler.expected_batch_size)
  agreeing.fit(sampler.dataset(), steps_per_epoch=4, callbacks=[budget], verbose=0)
  assert budget.steps == 4


def test_a_poisson_spec_and_an_optimizer_dividing_by_the_rows_are_refused():
  x, y = T.dense_data(n=32)
  with pytest.raises(ValueError, match="accounts for Poisson sampling.*expected_batch_size=None"):
    _model(expected_batch_size=None).fit(x, y, batch_size=8, verbose=0,
                                         callbacks=[budget_lib.PrivacyBudget(SPEC)])
  with pytest.raises(ValueError, match="q=0.25 over N=32 examples gives 8"):
    _model(expected_batch_size=16.0).fit(
        x, y, batch_size=8, verbose=0,
        callbacks=[budget_lib.PrivacyBudget(SPEC, num_examples=32)])


def test_without_a_sampler_a_warning_says_what_cannot_be_checked(caplog):
  x, y = T.dense_data(n=16)
  with caplog.at_level(logging.WARNING):
    _model().fit(x, y, batch_size=8, callbacks=[budget_lib.PrivacyBudget(SPEC)], verbose=0)
  assert "PrivacyBudget without sampler=" in caplog.text


def test_num_examples_that_is_not_the_samplers_is_refused():
  sampler = tfdp_prune.PoissonSampler(T.dense_data(n=32), sampling_probability=0.25)
  with pytest.raises(ValueError, match="to equal the sampler's num_examples=32"):
    budget_lib.PrivacyBudget(SPEC, num_examples=40, sampler=sampler)
  with pytest.raises(ValueError, match="Expected sampler to be"):
    budget_lib.PrivacyBudget(SPEC, sampler=object())


def test_log_every_epoch_false_keeps_the_logs_clean():
  x, y = T.dense_data(n=16)
  history = _model().fit(x, y, batch_size=8, verbose=0,
                         callbacks=[budget_lib.PrivacyBudget(SPEC, log_every_epoch=False)])
  assert "epsilon" not in history.history


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(spec=SPEC.with_steps(3)), "spec.steps=0"),
    (dict(spec={"noise_multiplier": 1.0}), "Expected spec to be a tfdp_prune.PrivacySpec"),
    (dict(spec=SPEC, target_epsilon=0.0), "target_epsilon > 0"),
    (dict(spec=SPEC, target_epsilon=float("inf")), "target_epsilon > 0"),
    (dict(spec=SPEC, num_examples=0), "num_examples to be an integer >= 1"),
    (dict(spec=SPEC, log_every_epoch="yes"), "log_every_epoch to be a bool"),
    (dict(spec=accounting.PrivacySpec(noise_multiplier=1.0, steps=0, delta=1e-5,
                                      sampling="shuffle", batch_size=10, num_examples=100),
          num_examples=50), "to equal spec.num_examples"),
])
def test_bad_arguments_are_clear_errors(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    budget_lib.PrivacyBudget(**kwargs)


def test_mismatched_optimizer_or_steps_per_execution_are_clear_errors():
  x, y = T.dense_data(n=16)
  other_sigma = T.dp_model(T.dense_model(seed=1), noise_multiplier=2.0)
  with pytest.raises(ValueError, match="noise_multiplier=2.0 differs"):
    other_sigma.fit(x, y, batch_size=8, callbacks=[budget_lib.PrivacyBudget(SPEC)], verbose=0)
  plain = T.dense_model()
  plain.compile(optimizer="sgd", loss=T.per_example_loss())
  with pytest.raises(ValueError, match="tfdp_prune DP optimizer"):
    plain.fit(x, y, batch_size=8, callbacks=[budget_lib.PrivacyBudget(SPEC)], verbose=0)
  model = T.dense_model()
  model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(1.0, SIGMA, learning_rate=0.1,
                                                         expected_batch_size=8.0),
                loss=T.per_example_loss(), steps_per_execution=2)
  tfdp_prune.make_private(model)
  with pytest.raises(ValueError, match="steps_per_execution=1"):
    model.fit(x, y, batch_size=8, verbose=0,
              callbacks=[budget_lib.PrivacyBudget(SPEC, target_epsilon=TARGET)])


# A PLD-like epsilon that dips (as FFT rounding can make dp_accounting's PLD value): it rises,
# falls by 0.05 between steps 5 and 6, then rises again. The true epsilon never falls.
_DIPPING = {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 4.95, 7: 5.02, 8: 5.2, 9: 6.0}


@pytest.fixture
def dipping_epsilon(monkeypatch):
  monkeypatch.setattr(accounting, "_epsilon", lambda spec: _DIPPING[min(spec.steps, 9)])


def test_the_ledgers_epsilon_never_decreases_where_the_pld_value_dips(dipping_epsilon):
  ledger = accounting.PrivacyLedger(SPEC)
  reported = []
  for _ in range(9):
    ledger.record_steps()
    reported.append(ledger.epsilon())
  assert SPEC.with_steps(6).epsilon() < SPEC.with_steps(5).epsilon()  # the value dips ...
  assert reported == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.02, 5.2, 6.0]  # ... the report does not
  assert reported == sorted(reported)
  # Every report is an upper bound of the PLD value at its own steps (so of the true epsilon).
  assert all(r >= _DIPPING[s] for s, r in enumerate(reported, 1))


def test_the_step_limit_is_within_the_target_and_a_reported_epsilon_above_it_stops(
    dipping_epsilon):
  target = 4.99  # PLD(5) = 5.0 > target >= PLD(6) = 4.95: two crossings
  limit = accounting.max_steps(SPEC, target, 100)
  assert _DIPPING[limit] <= target < _DIPPING[limit + 1]  # whichever crossing it found
  model = _model()
  budget = budget_lib.PrivacyBudget(SPEC, target_epsilon=target)
  budget.set_model(model)
  budget.on_train_begin()
  for _ in range(5):  # five steps, the epsilon after them reported (an epoch's log)
    model.optimizer.iterations.assign_add(1)
  assert budget.epsilon() == 5.0 > target
  assert budget.exhausted  # the report exceeded the target: no further step
  with pytest.raises(budget_lib.PrivacyBudgetExhaustedError):
    budget.on_train_batch_begin(0)
  model.optimizer.iterations.assign_add(1)
  assert budget.epsilon() == 5.0  # at step 6 the report keeps 5.0, not the PLD's 4.95
