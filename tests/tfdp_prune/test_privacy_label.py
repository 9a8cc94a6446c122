"""The label of hand-written DP training: `export_saved_model(model, base, budget=budget)`.

It must equal what `tfdp-train` records for the same run, and every inconsistency it can see is
refused before anything is written."""

import dataclasses

import pytest

import tfdp_prune
from tfdp_prune import checkpointing
from tfdp_prune import privacy_label
from tfdp_prune import randomness
from tfdp_prune import training
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.export import ExportError
from tfdp_prune.export import export_saved_model
from tfdp_prune.export import read_metadata
from tfdp_prune.train_config import TrainConfig
from tests.tfdp_prune import _testing

# A short tfdp-train run with a fixed noise multiplier: digits, freeze 80% (magnitude), Poisson.
_CONFIG = dict(steps=4, epochs=None, public_epochs=1, epsilon=None, noise_multiplier=1.0,
               verbose=0, export_dir=None)
# What tfdp-train knows and a hand-written fit does not tell the export (where the data came
# from, the test split, the seed; the comparison with the public-only model on held-out public
# data): the hand label leaves them unknown.
_DATA_SOURCE_FIELDS = ("dataset", "public_dataset", "public_split", "private_split",
                       "num_test_examples", "seed", "created", "public_guard")


def _hand_run_like_tfdp_train(config):
  """The run `training.train(config)` does, written by hand with the public API."""
  splits = training.load_data(config)
  keras.utils.set_random_seed(config.seed)
  model = training.build_model(config, (64,), 10)  # same architecture and variable names
  sampler = tfdp_prune.PoissonSampler(splits.private,
                                      sampling_probability=config.batch_size / len(
                                          splits.private[1]))
  model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(
      l2_norm_clip=config.l2_norm_clip, noise_multiplier=config.noise_multiplier,
      learning_rate=config.learning_rate, momentum=config.momentum,
      expected_batch_size=sampler.expected_batch_size), loss=_testing.per_example_loss())
  tfdp_prune.make_private(model)
  freezing = tfdp_prune.ParameterFreezing(
      tfdp_prune.MagnitudeRule(sparsity=0.8), public_data=splits.public,
      public_epochs=config.public_epochs, public_learning_rate=config.public_learning_rate)
  budget = tfdp_prune.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=config.noise_multiplier, steps=0,
                           delta=config.delta), sampler=sampler)
  model.fit(sampler.dataset(), steps_per_epoch=config.steps, epochs=1,
            callbacks=[freezing, budget], verbose=0)
  return model, budget


# End-to-end, 7-11 s: in the slow set (CI runs it), for a default run under 10 minutes.
@pytest.mark.slow
def test_the_label_equals_what_tfdp_train_records_for_the_same_run(tmp_path):
  config = TrainConfig(**_CONFIG)
  recorded = training.train(config).metadata
  model, budget = _hand_run_like_tfdp_train(config)
  label = read_metadata(export_saved_model(model, str(tmp_path / "export"), budget=budget))
  assert label.private and label.steps == 4 and label.mask_mode == "freeze"
  for name in recorded.__dataclass_fields__:
    if name not in _DATA_SOURCE_FIELDS:
      assert getattr(label, name) == getattr(recorded, name), name
  assert label.public_fingerprint is not None and label.num_public_examples == 180
  assert (label.dataset, label.seed, label.num_test_examples) == (None, None, 0)


# ---- small hand-written runs -------------------------------------------------------------------

_N = 64


def _data(seed=0):
  return _testing.dense_data(n=_N, seed=seed)


def _dp_model(sampler, noise_multiplier=1.0, **kwargs):
  model = _testing.dense_model()
  kwargs.setdefault("expected_batch_size", sampler.expected_batch_size)
  return _testing.dp_model(model, noise_multiplier=noise_multiplier, **kwargs)


def _run(*, callbacks=(), steps=2, sampler=None, model=None, budget=None, fit_budget=True,
         public=None, **sampler_kwargs):
  """A DP fit of a tiny model; returns (model, budget, sampler)."""
  sampler = sampler or tfdp_prune.PoissonSampler(_data(), sampling_probability=0.25,
                                                 **sampler_kwargs)
  model = model or _dp_model(sampler)
  budget = budget or tfdp_prune.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=1.0, steps=0, delta=1e-5), sampler=sampler)
  if callbacks == "freeze":
    callbacks = [tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(sparsity=0.5),
                                              public_data=public or _data(seed=1))]
  model.fit(sampler.dataset(), steps_per_epoch=steps, epochs=1, verbose=0,
            callbacks=list(callbacks) + ([budget] if fit_budget else []))
  return model, budget, sampler


def _refused(tmp_path, model, budget, *expected, **kwargs):
  """Asserts export_saved_model(..., budget=budget) is refused with all of `expected` in the
  message, and writes nothing."""
  target = tmp_path / "refused"
  with pytest.raises(ExportError) as error:
    export_saved_model(model, str(target), budget=budget, **kwargs)
  for text in expected:
    assert text in str(error.value)
  assert not target.exists()
  return str(error.value)


def test_selection_is_labelled_with_its_mode_rule_and_period(tmp_path):
  selection = tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(sparsity=0.75, seed=3),
                                            select_every=2)
  model, budget, _ = _run(callbacks=[selection], steps=3)
  label = read_metadata(export_saved_model(model, str(tmp_path / "e"), budget=budget))
  assert label.mask_mode == "select"
  assert label.mask_rule == {"name": "random", "sparsity": 0.75, "select_every": 2,
                             "config": {"sparsity": 0.75, "scope": "layer", "seed": 3}}
  kernels = {k: v for k, v in label.mask_sparsity_per_variable.items() if "kernel" in k}
  assert len(kernels) == 2 and all(v == pytest.approx(0.75, abs=0.02) for v in kernels.values())
  # Without public data nothing is fingerprinted.
  assert label.public_fingerprint is None and label.num_public_examples == 0
  assert label.epsilon == pytest.approx(budget.epsilon(), abs=0)
  assert label.steps == 3 and label.num_private_examples == _N


def test_no_masks_is_labelled_mask_mode_none(tmp_path):
  model, budget, _ = _run()
  label = read_metadata(export_saved_model(model, str(tmp_path / "e"), budget=budget))
  assert label.private and label.mask_mode == "none" and label.mask_rule is None
  assert label.mask_sparsity == 0


@pytest.mark.parametrize("seeded", ["sampler", "optimizer"])
def test_a_seeded_sampler_or_noise_labels_the_export_insecure(tmp_path, seeded):
  with pytest.warns(randomness.InsecureRandomnessWarning):
    sampler = tfdp_prune.PoissonSampler(
        _data(), sampling_probability=0.25,
        insecure_sampling_seed=7 if seeded == "sampler" else None)
    model = _dp_model(sampler, insecure_noise_seed=7 if seeded == "optimizer" else None)
  model, budget, _ = _run(sampler=sampler, model=model)
  label = read_metadata(export_saved_model(model, str(tmp_path / "e"), budget=budget))
  assert label.mechanism_randomness == randomness.INSECURE_SEED and label.insecure
  assert label.statement.startswith(privacy_label.INSECURE_STATEMENT)
  assert label.guarantee.startswith("INSECURE")


# ---- refusals (nothing written) ----------------------------------------------------------------

def test_budget_and_metadata_together_are_refused(tmp_path):
  model, budget, _ = _run()
  _refused(tmp_path, model, budget, "not both",
           metadata=tfdp_prune.metadata.non_private())


def test_a_model_without_a_dp_optimizer_is_not_labelled_private(tmp_path):
  _, budget, _ = _run()
  plain = _testing.dense_model()
  plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
  _refused(tmp_path, plain, budget, "DP optimizer", "without budget=")


def test_a_budget_without_its_sampler_is_refused(tmp_path):
  sampler = tfdp_prune.PoissonSampler(_data(), sampling_probability=0.25)
  budget = tfdp_prune.PrivacyBudget(sampler.privacy_spec(noise_multiplier=1.0, steps=0,
                                                         delta=1e-5), num_examples=_N)
  model, budget, _ = _run(sampler=sampler, budget=budget)
  _refused(tmp_path, model, budget, "sampler=sampler")


def test_a_ledger_of_zero_steps_is_refused_whether_or_not_the_optimizer_ran(tmp_path):
  model, budget, _ = _run(fit_budget=False)  # the budget was not in fit's callbacks
  assert int(model.optimizer.iterations.numpy()) == 2
  _refused(tmp_path, model, budget, "0 steps", "took 2 step(s)", "callbacks=[..., budget]")
  sampler = tfdp_prune.PoissonSampler(_data(), sampling_probability=0.25)
  untrained = _dp_model(sampler)
  fresh = tfdp_prune.PrivacyBudget(sampler.privacy_spec(noise_multiplier=1.0, steps=0,
                                                        delta=1e-5), sampler=sampler)
  _refused(tmp_path, untrained, fresh, "0 steps", "no DP step was taken")


def test_the_budget_of_another_model_is_refused(tmp_path):
  _, budget, sampler = _run()
  other, _, _ = _run(sampler=sampler)
  _refused(tmp_path, other, budget, "another model")


@pytest.mark.parametrize("attribute, value, expected", [
    ("noise_multiplier", 0.8, "noise_multiplier=0.8"),
    ("expected_batch_size", 20.0, "expected_batch_size=20"),
    ("gradient_accumulation_steps", 2, "each update would hold"),
])
def test_an_optimizer_that_disagrees_with_the_budget_or_sampler_is_refused(
    tmp_path, attribute, value, expected):
  model, budget, _ = _run()
  # Changed after the budget checked it at fit (the settings are one frozen DPSettings).
  model.optimizer.dp_settings = dataclasses.replace(model.optimizer.dp_settings,
                                                    **{attribute: value})
  _refused(tmp_path, model, budget, "must agree", expected)


def test_a_sampler_that_does_not_match_the_ledger_is_refused(tmp_path):
  model, budget, _ = _run()
  budget.sampler = tfdp_prune.PoissonSampler(_data(), sampling_probability=0.5)
  _refused(tmp_path, model, budget, "must agree", "q=0.5")


def test_masks_set_by_hand_have_no_rule_to_label_and_are_refused(tmp_path):
  model, budget, _ = _run()
  variables = model.trainable_variables
  model.optimizer.set_update_masks(variables, _testing.random_masks(variables))
  _refused(tmp_path, model, budget, "no such record", "ParameterFreezing")


def test_masks_changed_after_the_callback_set_them_are_refused(tmp_path):
  model, budget, _ = _run(callbacks="freeze")
  checkpoint = tf.train.Checkpoint(optimizer=model.optimizer)
  saved = checkpoint.write(str(tmp_path / "ckpt" / "c"))
  optimizer = model.optimizer
  # Another freezing sets other masks (and its record); a checkpoint then brings the old back.
  other = tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(sparsity=0.9))
  other.set_model(model)
  other.on_train_begin()
  checkpoint.read(saved).assert_consumed()
  assert optimizer.mask_provenance is not None
  _refused(tmp_path, model, budget, "changed after the callback set them")


def test_public_data_that_overlaps_the_private_data_is_refused(tmp_path):
  x, y = _data()
  model, budget, _ = _run(callbacks="freeze", public=(x[:5].copy(), y[:5].copy()))
  _refused(tmp_path, model, budget, "5 private example(s)", "disjoint")


def test_a_dp_model_exported_without_budget_is_non_private_and_says_how_to_label_it(
    tmp_path, caplog):
  model, _, _ = _run()
  label = read_metadata(export_saved_model(model, str(tmp_path / "e")))
  assert not label.private
  assert "pass budget=" in caplog.text



def test_a_carried_spend_restored_into_the_budget_is_named_in_the_label(tmp_path):
  """`model.fit` continuing an earlier run's spend (README: start_carried_ledger, then
  restore_latest with the budget): the label counts the old steps and names their ledger."""
  _, old_budget, sampler = _run(steps=3)
  carried = {"path": "/runs/old/privacy_ledger.jsonl", "sha256": "ab" * 32, "steps": 3}
  new_dir = str(tmp_path / "new")
  checkpointing.start_carried_ledger(new_dir, old_budget.get_state(), carried)
  model = _dp_model(sampler)
  budget = tfdp_prune.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=1.0, steps=0, delta=1e-5), sampler=sampler)
  assert tfdp_prune.restore_latest(new_dir, model, budget=budget, sampler=sampler) is None
  _run(model=model, budget=budget, sampler=sampler, steps=2)
  label = privacy_label.from_budget(model, budget)
  assert label.steps == 5
  assert "3 of these steps were spent by an earlier run" in label.statement
  assert carried["path"] in label.statement and carried["sha256"] in label.statement
