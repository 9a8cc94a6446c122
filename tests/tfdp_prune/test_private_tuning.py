"""private_tuning and --tune=private: the draws come from OS entropy (not the seed), the best trial
by its noisy score is output, the export states the WHOLE search's epsilon and --inspect
recomputes it; what the search cannot account for is refused before any step."""

import dataclasses
import os

import numpy as np
import pytest

from tfdp_prune import private_tuning
from tfdp_prune import randomness
from tfdp_prune import training
from tfdp_prune import tuning_accounting
from tfdp_prune.export import inspection
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

TUNED = dict(steps=3, epochs=None, public_epochs=0, verbose=0, accountant="rdp", mode="none",
             tune="private", tune_candidates="learning_rate=0.1;learning_rate=0.5",
             tune_trials=2.0)


def fake_entropy(monkeypatch, word):
  monkeypatch.setattr(randomness, "os_entropy_words", lambda count: [word] + [0] * (count - 1))


@pytest.mark.parametrize("distribution", ["poisson", "geometric"])
def test_the_number_of_trials_comes_from_os_entropy_not_the_seed(monkeypatch, distribution):
  counts = {}
  for word in range(40):
    fake_entropy(monkeypatch, word)
    counts[word] = private_tuning.draw_trial_count(distribution, 2.0,
                                                   private_tuning.entropy_rng())
    fake_entropy(monkeypatch, word)  # the same entropy: the same K
    assert private_tuning.draw_trial_count(distribution, 2.0,
                                           private_tuning.entropy_rng()) == counts[word]
  # Nothing else (no seed) goes in: other entropy gives other K, for the same settings.
  assert len(set(counts.values())) > 1
  if distribution == "geometric":
    assert min(counts.values()) >= 1


def test_the_search_outputs_the_trial_with_the_best_noisy_score():
  rng = np.random.default_rng(0)
  candidates = ({"learning_rate": 0.1}, {"learning_rate": 0.5}, {"learning_rate": 1.0})
  ran = []
  outcome = private_tuning.search(
      candidates, 6, train_trial=lambda c: ran.append(c) or c["learning_rate"],
      score=lambda result: -abs(result - 0.5), rng=rng)
  assert outcome.trials_run == len(ran) == 6
  assert all(c in candidates for c in ran)
  assert outcome.best.result == max(ran, key=lambda r: -abs(r["learning_rate"] - 0.5))[
      "learning_rate"]
  assert private_tuning.search(candidates, 0, None, None, rng).best is None


def test_the_validation_part_is_held_out_example_by_example():
  x = np.arange(200, dtype=np.float32)[:, None]
  train_part, validation = private_tuning.split_validation((x, np.arange(200)), 0.25,
                                                           np.random.default_rng(1))
  assert not set(train_part[1]) & set(validation[1])
  assert sorted([*train_part[1], *validation[1]]) == list(range(200))
  assert 20 < len(validation[1]) < 80


@pytest.mark.parametrize("settings, message", [
    (dict(checkpoint_dir="/tmp/x"), "--checkpoint_dir"),
    (dict(checkpoint_dir="/tmp/a", carry_spend_from="/tmp/b"), "--checkpoint_dir"),
    (dict(accountant="pld"), "--accountant=rdp"),
    (dict(epsilon=None, noise_multiplier=0.0), "--noise_multiplier=0"),
    (dict(ema_decay=0.99), "--ema_decay"),
    (dict(tune_candidates=None), "--tune_candidates"),
    (dict(tune_candidates="batch_size=10"), "leave a trial's privacy unchanged"),
    (dict(tune_candidates="learning_rate=fast"), "Expected a number"),
    (dict(tune_trials=0.5), "--tune_trials >= 1"),
    (dict(tune="none"), "no effect without --tune=private"),
    (dict(insecure_mechanism_seed=3), "not the\s+independent runs|independent runs"),
])
def test_what_the_search_cannot_account_for_is_refused(settings, message):
  with pytest.raises(ConfigError, match=message):
    TrainConfig(**dict(TUNED, **settings))


def test_carry_spend_from_is_refused_with_its_own_directory(tmp_path):
  config = dict(TUNED, checkpoint_dir=None)
  with pytest.raises(ConfigError, match="carry_spend_from"):
    TrainConfig(**config, carry_spend_from=str(tmp_path))


def test_callbacks_are_refused_because_they_would_count_the_trials(monkeypatch):
  monkeypatch.setattr(private_tuning, "search", lambda *args, **kwargs: pytest.fail("trained"))
  with pytest.raises(ConfigError, match="refuses callbacks"):
    training.train(TrainConfig(**TUNED, export_dir=None), callbacks=[object()])


def test_the_score_is_the_count_plus_gaussian_noise_of_the_given_scale():
  rng = np.random.default_rng(0)
  scores = np.array([private_tuning.noisy_score(40, 5.0, rng) for _ in range(20000)])
  assert abs(scores.mean() - 40) < 0.2 and abs(scores.std() - 5.0) < 0.15


def test_the_search_scores_every_trial_through_the_noisy_score(monkeypatch):
  noised = []
  real = private_tuning.noisy_score
  monkeypatch.setattr(private_tuning, "draw_trial_count", lambda *args: 2)
  monkeypatch.setattr(private_tuning, "noisy_score",
                      lambda *args: noised.append(args) or real(*args))
  training.train(TrainConfig(**TUNED, epsilon=8.0, export_dir=None))
  assert len(noised) == 2 and all(args[1] == 5.0 for args in noised)


def test_no_trial_is_no_model_and_no_training(monkeypatch):
  monkeypatch.setattr(private_tuning, "draw_trial_count", lambda *args: 0)
  monkeypatch.setattr(private_tuning, "search", lambda *args, **kwargs: pytest.fail("trained"))
  with pytest.raises(private_tuning.EmptySearchError, match="K = 0"):
    training.train(TrainConfig(**TUNED, export_dir=None))


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
  monkeypatch = pytest.MonkeyPatch()
  monkeypatch.setattr(private_tuning, "draw_trial_count", lambda *args: 2)
  try:
    export_dir = str(tmp_path_factory.mktemp("tuned"))
    yield training.train(TrainConfig(**TUNED, epsilon=8.0, export_dir=export_dir))
  finally:
    monkeypatch.undo()


def test_the_export_states_the_whole_search_and_inspect_recomputes_it(tuned_run):
  metadata = tuned_run.metadata
  tuning = metadata.tuning
  spec = tuning_accounting.accounting.PrivacySpec.from_dict(tuning["trial_privacy_spec"])
  total = tuning_accounting.search_epsilon(spec, 5.0, "poisson", 2.0)
  assert metadata.epsilon == tuning["epsilon"] == total <= 8.0
  assert tuning["trial_epsilon"] < total and metadata.epsilon > spec.epsilon()
  assert tuning["selected_candidate"] in (0, 1)
  # K (2 here) is secret: the theorems cover the best trial's output with K hidden.
  assert not [key for key in tuning if "trials_run" in key or key == "trials"]
  assert "trial(s)" not in metadata.statement
  assert tuning["candidates"] == [{"learning_rate": 0.1}, {"learning_rate": 0.5}]
  assert "Theorem 6" in tuning["method"] and "WHOLE search" in metadata.statement
  # The trials trained with the calibrated sigma on the training part only.
  assert metadata.noise_multiplier == spec.noise_multiplier
  assert metadata.num_private_examples + tuning["num_validation_examples"] > 1000
  report = inspection.inspect_export(tuned_run.export_path)
  assert report.latest.metadata == metadata
  assert "the whole search's" in inspection.format_report(report)
  assert "the whole search's" in training.summary(metadata, None, None)
  with open(os.path.join(tuned_run.export_path, "model_card.md"), encoding="utf-8") as f:
    assert "whole private search's" in f.read()


def test_inspect_refuses_a_tuning_record_that_does_not_give_its_epsilon(tuned_run):
  edited = dataclasses.replace(tuned_run.metadata,
                               tuning=dict(tuned_run.metadata.tuning, mean_trials=1.5))
  with pytest.raises(inspection.ExportError, match="does not verify"):
    inspection.check_tuning("/export/1", edited)
  with pytest.raises(ValueError, match="search's total"):
    dataclasses.replace(tuned_run.metadata, epsilon=tuned_run.metadata.tuning["trial_epsilon"])


def test_inspect_export_recomputes_the_total(tuned_run, monkeypatch):
  # As if dp_accounting gave another total for the recorded search: --inspect must say so.
  monkeypatch.setattr(tuning_accounting, "verify",
                      lambda tuning: {"epsilon": tuning["epsilon"] / 2, "delta": 1e-5})
  with pytest.raises(inspection.ExportError, match="private search's record gives"):
    inspection.inspect_export(tuned_run.export_path)
