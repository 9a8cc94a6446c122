"""Public tuning: the simulated run's noise matches the private run's, no private example is
read, and the chosen values are the run's and its metadata's."""

import dataclasses
import json
import os

import numpy as np
import pytest

from tfdp_prune import data as data_lib
from tfdp_prune import export as export_lib
from tfdp_prune import training
from tfdp_prune import tune_space
from tfdp_prune import tuning
from tfdp_prune.metadata import PrivacyMetadata
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

# Short simulated and real runs: a fixed sigma (no calibration), RDP, one pre-training epoch.
SHORT = dict(steps=15, epochs=None, public_epochs=1, verbose=0, accountant="rdp",
             export_dir=None)


class _Untouchable:
  """A private part that has a size and refuses every read (indexing, iteration, numpy)."""

  def __init__(self, size):
    self._size = size

  def __len__(self):
    return self._size

  def _refuse(self, *args, **kwargs):
    raise AssertionError("a private example was read")

  __getitem__ = __iter__ = __array__ = _refuse

  def __getattr__(self, name):  # .shape, .dtype, __array_interface__, ...
    raise AssertionError(f"the private part was read (.{name})")


@pytest.fixture(scope="module")
def digits():
  return data_lib.load()


@pytest.fixture
def small_grid(monkeypatch):
  """Stage 1: the given learning rate and 0.3 at clip 1; stage 2: the given sparsity and 0.5."""
  monkeypatch.setattr(tuning, "LEARNING_RATES", (0.3,))
  monkeypatch.setattr(tuning, "CLIP_NORMS", (1.0,))
  monkeypatch.setattr(tuning, "SPARSITIES", (0.5,))


@pytest.mark.parametrize("sigma, batch, public_batch, clip",
                         [(1.1, 100, 63, 1.0), (0.7, 4096, 50, 0.1), (3.0, 79.85, 12, 2.5)])
def test_the_simulated_noise_on_the_averaged_gradient_is_the_private_runs(sigma, batch,
                                                                         public_batch, clip):
  public_sigma = tuning.matched_noise_multiplier(sigma, batch, public_batch)
  assert public_sigma * clip / public_batch == pytest.approx(sigma * clip / batch, rel=1e-12)


def test_the_public_batch_is_at_most_half_of_public_train_and_the_private_batch():
  assert tuning.public_batch_size(100, 126) == 63
  assert tuning.public_batch_size(20, 126) == 20
  assert tuning.public_batch_size(100, 1) == 1


def test_the_public_split_is_stratified_disjoint_and_fixed_by_the_seed(digits):
  train, validation = tuning.split_public(digits.public, seed=0)
  again, _ = tuning.split_public(digits.public, seed=0)
  other, _ = tuning.split_public(digits.public, seed=1)
  assert len(train[1]) + len(validation[1]) == len(digits.public[1]) == 180
  assert len(validation[1]) == round(tuning.VALIDATION_FRACTION * 180)
  assert np.array_equal(train[0], again[0]) and not np.array_equal(train[0], other[0])
  assert set(np.unique(validation[1])) == set(range(10))  # every class in both parts
  rows = {row.tobytes() for row in train[0]}
  assert not any(row.tobytes() in rows for row in validation[0])
  with pytest.raises(ConfigError, match="at least 10 public examples"):
    tuning.split_public((digits.public[0][:20], digits.public[1][:20]), seed=0)


def test_the_size_only_plan_is_the_real_runs(digits):
  config = TrainConfig(**dict(SHORT, steps=None, epochs=2.0), epsilon=3.0)
  plan, batch = training.plan_for_size(config, digits.info.num_private)
  real = training.plan_privacy(config, training.make_sampler(config, digits.private))
  assert (plan.steps, plan.noise_multiplier, plan.spec) == (real.steps, real.noise_multiplier,
                                                            real.spec)
  assert batch == pytest.approx(100.0)


def test_tuning_and_its_plan_never_read_a_private_example(digits, small_grid):
  n = digits.info.num_private
  splits = dataclasses.replace(digits, private=(_Untouchable(n), _Untouchable(n)))
  with pytest.raises(AssertionError, match="private"):  # the guard itself can fail
    np.asarray(splits.private[0])
  result = training.tune_on_public(TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0),
                                   splits)
  assert len(result.candidates) == 3  # (0.5 | 0.3) x clip 1, then sparsity 0.5
  assert result.record()["private_data_read"] is False
  assert result.record()["grid"] == {"learning_rate": [0.5, 0.3], "l2_norm_clip": [1.0],
                                     "sparsity": [0.8, 0.5]}
  assert result.simulation.noise_multiplier == pytest.approx(1.0 * 63 / 100)


@pytest.mark.slow  # 15 s: a tuning over real trainings
def test_a_wrecking_learning_rate_is_replaced_and_the_choice_is_the_runs(digits, small_grid,
                                                                         tmp_path, monkeypatch):
  # Pre-trained for 20 epochs, the model is good before DP training (about 0.8), so the margin
  # between a rate that keeps it (0.3: 0.72-0.80 in repeated runs) and one that wrecks it
  # (1e4: 0.26-0.43) stands out of the simulations' noise.
  config = TrainConfig(**dict(SHORT, public_epochs=20), epsilon=None, noise_multiplier=1.0,
                       learning_rate=1e4, tune="public", checkpoint_dir=str(tmp_path))
  result = training.train(config, splits=digits)
  tuned = result.metadata.tuning
  scores = {c["learning_rate"]: c["public_validation_accuracy"]
            for c in tuned["candidates"] if "learning_rate" in c}
  # 1e4 wrecks the model, 0.3 does not (the simulations draw their noise from OS entropy, so
  # the scores vary from run to run; the margin between them does not).
  assert scores[1e4] + 0.2 < scores[0.3]
  assert tuned["chosen"]["learning_rate"] == 0.3
  assert tuned["given"]["learning_rate"] == 1e4
  assert float(result.model.optimizer.learning_rate.numpy()) == pytest.approx(0.3)
  assert result.model.optimizer.l2_norm_clip == tuned["chosen"]["l2_norm_clip"]
  assert result.metadata.l2_norm_clip == tuned["chosen"]["l2_norm_clip"]
  assert result.metadata.mask_sparsity_per_variable["dense/kernel"] == pytest.approx(
      tuned["chosen"]["sparsity"], abs=1e-3)
  assert result.test_accuracy > 0.5
  assert PrivacyMetadata.from_json(result.metadata.to_json()) == result.metadata
  assert "tuning (public; no private data read)" in training.summary(result.metadata, None, None)
  # A resumption reuses the recorded choice: tuning again could choose otherwise.
  monkeypatch.setattr(training, "tune_on_public", lambda *args: pytest.fail("tuned again"))
  resumed, record = training._tune(config, digits)
  assert record == tuned and resumed.learning_rate == 0.3
  exported = training.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  assert export_lib.read_metadata(exported).tuning == tuned


@pytest.mark.slow  # 11 s: a tuned run, then an export
def test_a_refused_tuned_run_leaves_no_tuning_record_for_a_later_export(digits, small_grid,
                                                                        tmp_path):
  """--tune=public pointed at the checkpoints of an untuned run is refused by the run record;
  no tuning.json may be left behind for `export_checkpoint` to attach to that run's export."""
  untuned = TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0,
                        checkpoint_dir=str(tmp_path))
  training.train(untuned, splits=digits)
  with pytest.raises(ConfigError):
    training.train(dataclasses.replace(untuned, tune="public"), splits=digits)
  assert not os.path.exists(tmp_path / training.TUNING_RECORD)
  exported = training.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  assert export_lib.read_metadata(exported).tuning is None


# ---- --tune_space: the length and the masks ----------------------------------------------------

# A calibrated run (the length is tuned at a fixed epsilon): RDP, one private epoch (14 steps).
CALIBRATED = dict(SHORT, steps=None, epochs=1.0, epsilon=4.0)


class _Recorder:
  """A `simulate` that runs nothing: it records each (config, simulation) it gets and scores a
  candidate by `score(config)`."""

  def __init__(self, score):
    self.score = score
    self.calls = []

  def __call__(self, config, train_part, validation, simulation):
    self.calls.append((config, simulation))
    return self.score(config)


def test_tuning_the_length_never_reads_a_private_example(digits, monkeypatch):
  n = digits.info.num_private
  splits = dataclasses.replace(digits, private=(_Untouchable(n), _Untouchable(n)))
  monkeypatch.setattr(training, "simulate_on_public", _Recorder(lambda config: 0.5))
  config = TrainConfig(**CALIBRATED, tune="public", tune_space="epochs,learning_rate")
  result = training.tune_on_public(config, splits)
  assert result.record()["grid"]["epochs"] == [1.0, 0.5, 2.0]
  assert [s["epochs"] for s in result.record()["simulations"]] == [1.0, 0.5, 2.0]
  assert result.record()["private_data_read"] is False


def test_each_length_is_simulated_with_its_own_plan_and_the_chosen_one_is_the_runs(
    digits, monkeypatch):
  # The longest candidate scores best: the real run must then train 2 epochs with the sigma
  # calibrated to the target for 2 epochs, and spend no more than the target.
  recorder = _Recorder(lambda config: config.epochs / 10)
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  config = TrainConfig(**CALIBRATED, tune="public", tune_space="epochs")
  result = training.train(config, splits=digits)
  seen = {}
  for candidate, simulation in recorder.calls:
    plan, batch = training.plan_for_size(candidate, digits.info.num_private)
    assert simulation.steps == plan.steps
    assert simulation.private_noise_multiplier == plan.noise_multiplier
    assert simulation.noise_multiplier == pytest.approx(tuning.matched_noise_multiplier(
        plan.noise_multiplier, batch, simulation.batch_size))
    seen[candidate.epochs] = (simulation.steps, simulation.private_noise_multiplier)
  assert sorted(seen) == [0.5, 1.0, 2.0]
  # Another length, another calibration: more steps need more noise for the same epsilon.
  assert seen[0.5][0] < seen[1.0][0] < seen[2.0][0]
  assert seen[0.5][1] < seen[1.0][1] < seen[2.0][1]
  tuned = result.metadata.tuning
  assert tuned["chosen"] == {"epochs": 2.0} and tuned["given"] == {"epochs": 1.0}
  assert [s["epochs"] for s in tuned["simulations"]] == [1.0, 0.5, 2.0]
  assert (result.metadata.steps, result.metadata.noise_multiplier) == seen[2.0]
  assert result.metadata.epsilon <= config.epsilon


def test_a_run_given_in_steps_tunes_its_steps(digits, monkeypatch):
  recorder = _Recorder(lambda config: -config.steps)  # the shortest wins
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  config = TrainConfig(**dict(CALIBRATED, epochs=None, steps=10), tune="public",
                       tune_space="epochs")
  result = training.tune_on_public(config, digits)
  assert [c.steps for c, _ in recorder.calls] == [10, 5, 20]
  assert [s.steps for _, s in recorder.calls] == [10, 5, 20]
  assert result.chosen == {"steps": 5} and result.config.steps == 5


def _masks_of(config):
  return (config.mode, config.effective_rule, config.effective_frozen_value)


def test_each_mask_candidate_is_simulated_as_it_is_and_the_chosen_one_is_the_runs(
    digits, monkeypatch):
  chosen = ("select", "public_gradient", None)
  recorder = _Recorder(lambda config: float(_masks_of(config) == chosen))
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  config = TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0, tune="public",
                       tune_space="masks", sparsity=0.9)
  result = training.train(config, splits=digits)
  tried = [_masks_of(candidate) for candidate, _ in recorder.calls]
  assert tried == [("freeze", "magnitude", "zero"), ("none", None, None),
                   ("freeze", "magnitude", "keep"), ("select", "magnitude", None), chosen]
  # The masked candidates keep the given sparsity; the dense one has none.
  assert [c.effective_sparsity for c, _ in recorder.calls] == [0.9, 0.0, 0.9, 0.9, 0.9]
  tuned = result.metadata.tuning
  assert tuned["chosen"] == {"mode": "select", "rule": "public_gradient", "frozen_value": None,
                             "select_every": 10, "sparsity": 0.9}
  assert tuned["grid"]["masks"][-1] == {"mode": "select", "rule": "public_gradient",
                                        "frozen_value": None}
  assert result.metadata.mask_mode == "select"
  assert result.metadata.mask_rule["name"] == "public_gradient"
  assert result.metadata.mask_rule["select_every"] == 10
  assert "mode select, rule public_gradient" in training.summary(result.metadata, None, None)


def test_a_mask_candidate_the_config_refuses_is_never_tried(digits, monkeypatch):
  monkeypatch.setattr(tuning, "MASKS", tuning.MASKS + (
      ("select", "magnitude", "keep"),  # --frozen_value applies to --mode=freeze only
      ("freeze", "no_such_rule", "zero")))
  config = TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0, tune="public",
                       tune_space="masks", mode="select")
  points = [tuple(p.values()) for p in tuning.mask_candidates(config)]
  assert points == [("select", "magnitude", None), ("none", None, None),
                    ("freeze", "magnitude", "zero"), ("freeze", "magnitude", "keep"),
                    ("select", "public_gradient", None)]
  recorder = _Recorder(lambda config: 0.5)
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  result = training.tune_on_public(config, digits)
  assert [_masks_of(c) for c, _ in recorder.calls] == points
  assert result.chosen["mode"] == "select"  # a tie keeps the given masks
  left_out = result.record()["left_out"]  # the record says what was not tried, and why
  assert [(p["mode"], p["rule"], p["frozen_value"]) for p in left_out] == [
      ("select", "magnitude", "keep"), ("freeze", "no_such_rule", "zero")]
  assert "--frozen_value applies to --mode=freeze only" in left_out[0]["why"]
  assert "no_such_rule" in left_out[1]["why"]


def test_a_mask_candidate_records_the_sparsity_and_period_it_was_simulated_at(digits,
                                                                              monkeypatch):
  # From a dense run, a masked candidate is simulated at the default sparsity and
  # select_every: its record must say so, not only its mode, rule and frozen value.
  monkeypatch.setattr(tuning, "MASKS", (("freeze", "magnitude", "zero"),
                                        ("select", "magnitude", None)))
  recorder = _Recorder(lambda config: 0.5)
  config = TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0, tune="public",
                       tune_space="masks", mode="none")
  result = tuning.tune(config, digits.public, plan=_stub_plan(lambda c: c.steps),
                       num_classes=10, simulate=recorder)
  assert [(c.effective_sparsity, c.effective_select_every) for c, _ in recorder.calls] == [
      (0.0, None), (0.8, None), (0.8, 10)]
  assert [{k: v for k, v in c.items() if k != "public_validation_accuracy"}
          for c in result.record()["candidates"]] == [
      {"mode": "none", "rule": None, "frozen_value": None, "select_every": None,
       "sparsity": None},
      {"mode": "freeze", "rule": "magnitude", "frozen_value": "zero", "select_every": None,
       "sparsity": 0.8},
      {"mode": "select", "rule": "magnitude", "frozen_value": None, "select_every": 10,
       "sparsity": 0.8}]
  assert result.record()["left_out"] == []


def test_the_dense_choice_clears_the_mask_settings_and_skips_the_sparsity_stage(digits,
                                                                                monkeypatch):
  recorder = _Recorder(lambda config: float(config.mode == "none"))
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  config = TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0, tune="public",
                       tune_space="masks,sparsity", mode="select", select_every=3)
  result = training.tune_on_public(config, digits)
  assert len(recorder.calls) == len(tuning.mask_candidates(config))  # no sparsity stage
  assert result.chosen == {"mode": "none", "rule": None, "frozen_value": None,
                           "select_every": None, "sparsity": None}
  assert dataclasses.replace(config, **result.chosen) == result.config
  assert "sparsity" not in result.record()["grid"]


def test_the_stages_run_in_order_each_from_the_best_so_far(digits, monkeypatch, small_grid):
  monkeypatch.setattr(tuning, "MASKS", (("none", None, None),))
  recorder = _Recorder(lambda config: config.learning_rate == 0.3 and config.mode == "freeze")
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  config = TrainConfig(**CALIBRATED, tune="public",
                       tune_space="learning_rate,l2_norm_clip,masks,sparsity,epochs")
  result = training.tune_on_public(config, digits)
  tried = [(c.learning_rate, c.mode, c.effective_sparsity, c.epochs)
           for c, _ in recorder.calls]
  assert tried == [(0.5, "freeze", 0.8, 1.0), (0.3, "freeze", 0.8, 1.0),  # lr x clip
                   (0.3, "none", 0.0, 1.0),  # masks (the given ones were scored)
                   (0.3, "freeze", 0.5, 1.0),  # sparsity
                   (0.3, "freeze", 0.8, 0.5), (0.3, "freeze", 0.8, 2.0)]  # length
  assert result.chosen["learning_rate"] == 0.3 and result.chosen["epochs"] == 1.0
  assert result.record()["space"] == ["learning_rate", "l2_norm_clip", "masks", "sparsity",
                                      "epochs"]


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_the_record_round_trips_and_an_older_record_still_reads_back(digits, tmp_path,
                                                                     monkeypatch):
  # Not the given masks nor the given length: a resumption that kept either would differ.
  recorder = _Recorder(lambda config: (config.mode == "select") + (config.epochs == 0.5))
  monkeypatch.setattr(training, "simulate_on_public", recorder)
  config = TrainConfig(**CALIBRATED, tune="public", tune_space="masks,epochs",
                       checkpoint_dir=str(tmp_path))
  result = training.train(config, splits=digits)
  tuned = result.metadata.tuning
  assert PrivacyMetadata.from_json(result.metadata.to_json()) == result.metadata
  assert tuned["space"] == ["masks", "epochs"]
  assert tuned["chosen"]["epochs"] == 0.5 and tuned["chosen"]["mode"] == "select"
  monkeypatch.setattr(training, "tune_on_public", lambda *args: pytest.fail("tuned again"))
  resumed, record = training._tune(config, digits)  # the record in checkpoint_dir
  assert record == tuned and resumed.mode == "select" and resumed.epochs == 0.5
  again = training.train(config, splits=digits)  # the run record accepts the resumption
  assert again.resumed_from == result.metadata.steps
  assert (again.metadata.steps, again.metadata.noise_multiplier) == (
      result.metadata.steps, result.metadata.noise_multiplier)
  exported = training.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  assert export_lib.read_metadata(exported).tuning == tuned
  # A record written before --tune_space (no "space", "simulations" nor "left_out") reads back
  # as before.
  older = {key: value for key, value in tuned.items()
           if key not in ("space", "simulations", "left_out")}
  older.update(chosen={"learning_rate": 0.3, "l2_norm_clip": 1.0, "sparsity": 0.8},
               candidates=[{"learning_rate": 0.3, "l2_norm_clip": 1.0,
                            "public_validation_accuracy": 0.75}])
  assert tuning.record_summary(older).startswith(
      "tuning (public; no private data read): learning_rate 0.3, l2_norm_clip 1, sparsity 0.8;")
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / training.TUNING_RECORD).write_text(json.dumps(older))
  resumed, record = training._tune(
      TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0, tune="public",
                  checkpoint_dir=str(tmp_path / "old")), digits)
  assert record == older and (resumed.learning_rate, resumed.sparsity) == (0.3, 0.8)


def _stub_plan(steps_of):
  """A `plan` that runs no calibration: `steps_of(config)` steps at sigma 1, B 100; a
  ConfigError where `steps_of` raises it."""

  def plan(config):
    return tuning.PrivatePlan(steps=steps_of(config), noise_multiplier=1.0,
                              expected_batch_size=100.0)

  return plan


def _refuse_long(config):
  if config.epochs > 1:
    raise ConfigError("no noise multiplier reaches --epsilon=4.0 for 28 steps")
  return int(14 * config.epochs)


def test_a_length_that_cannot_be_planned_is_left_out_and_never_simulated(digits):
  recorder = _Recorder(lambda config: config.epochs)
  config = TrainConfig(**CALIBRATED, tune="public", tune_space="epochs")
  result = tuning.tune(config, digits.public, plan=_stub_plan(_refuse_long), num_classes=10,
                       simulate=recorder)
  assert [c.epochs for c, _ in recorder.calls] == [1.0, 0.5]
  record = result.record()
  assert record["grid"] == {"epochs": [1.0, 0.5]}
  assert [s["epochs"] for s in record["simulations"]] == [1.0, 0.5]
  assert record["left_out"] == [
      {"epochs": 2.0, "why": "no noise multiplier reaches --epsilon=4.0 for 28 steps"}]
  assert result.chosen == {"epochs": 1.0}


def test_a_given_length_that_cannot_be_planned_is_refused(digits):
  recorder = _Recorder(lambda config: 0.5)
  config = TrainConfig(**dict(CALIBRATED, epochs=2.0), tune="public", tune_space="epochs")
  with pytest.raises(ConfigError, match="no noise multiplier reaches"):
    tuning.tune(config, digits.public, plan=_stub_plan(_refuse_long), num_classes=10,
                simulate=recorder)
  assert not recorder.calls


def test_lengths_that_plan_the_same_steps_are_simulated_once(digits):
  recorder = _Recorder(lambda config: 0.5)
  config = TrainConfig(**CALIBRATED, tune="public", tune_space="epochs")
  # 0.5 and 1 epoch both plan one step (a small private part): the given 1 is kept.
  result = tuning.tune(config, digits.public,
                       plan=_stub_plan(lambda c: max(1, int(c.epochs))), num_classes=10,
                       simulate=recorder)
  assert [(c.epochs, s.steps) for c, s in recorder.calls] == [(1.0, 1), (2.0, 2)]
  record = result.record()
  assert record["grid"] == {"epochs": [1.0, 2.0]}
  assert [(s["epochs"], s["steps"]) for s in record["simulations"]] == [(1.0, 1), (2.0, 2)]
  assert record["left_out"] == [{"epochs": 0.5, "why": "plans the same 1 steps as epochs 1"}]


def test_a_run_given_in_steps_keeps_its_steps_in_the_simulations_record(digits):
  config = TrainConfig(**dict(CALIBRATED, epochs=None, steps=10), tune="public",
                       tune_space="epochs")
  result = tuning.tune(config, digits.public, plan=_stub_plan(lambda c: c.steps),
                       num_classes=10, simulate=_Recorder(lambda config: 0.5))
  assert [s["steps"] for s in result.record()["simulations"]] == [10, 5, 20]


def test_the_stages_tune_the_names_of_tune_space_in_its_order():
  assert tuple(name for names, _ in tuning.STAGES for name in names) == tune_space.NAMES
