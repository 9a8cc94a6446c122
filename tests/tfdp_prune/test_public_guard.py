"""The public-only guard: a public validation part, the comparison, the export of the better
model, and how the metadata, the summary and the model card say which one was exported."""

import os

import numpy as np
import pytest

from tfdp_prune import freezing
from tfdp_prune import metadata as metadata_lib
from tfdp_prune import public_guard
from tfdp_prune import training
from tfdp_prune.compat import tf
from tfdp_prune.export import inspection
from tfdp_prune.export import serving_files
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig
from tests.export import _export_testing as E

# Digits (180 public examples: 36 held out), the MLP, RDP accounting, a few noisy steps.
_RUN = dict(steps=4, epochs=None, public_epochs=10, verbose=0, accountant="rdp", epsilon=None,
            noise_multiplier=1.0, mode="none")
# A learning rate that wrecks the DP model (the weights overflow): the public-only model wins.
_WRECKED = dict(_RUN, learning_rate=1e6)
# No pre-training (the public-only model is the untrained one) and mild noise: the DP model wins.
_USEFUL = dict(_RUN, public_epochs=0, steps=20, noise_multiplier=0.5)


def _arrays(n, width=3, offset=0):
  return (np.arange(offset, offset + n * width, dtype="float32").reshape(n, width),
          np.arange(n) % 2)


def test_the_split_holds_out_a_seeded_fraction_disjoint_from_the_rest():
  public = _arrays(180)
  train, validation = public_guard.split_public(public, 0.2, seed=0)
  assert len(validation[1]) == 36 and len(train[1]) == 144
  rows = {tuple(r) for r in public[0]}
  assert {tuple(r) for r in train[0]} | {tuple(r) for r in validation[0]} == rows
  assert not {tuple(r) for r in train[0]} & {tuple(r) for r in validation[0]}
  again = public_guard.split_public(public, 0.2, seed=0)[1]
  np.testing.assert_array_equal(again[0], validation[0])
  other = public_guard.split_public(public, 0.2, seed=1)[1]
  assert not np.array_equal(other[0], validation[0])
  assert public_guard.split_public(public, 0.0, seed=0) == (public, None)
  assert len(public_guard.split_public(_arrays(3), 0.01, seed=0)[1][1]) == 1  # at least one


def test_a_split_that_leaves_no_public_example_to_train_on_is_a_config_error():
  config = TrainConfig(public_validation_fraction=0.5, export_dir=None)
  with pytest.raises(ConfigError, match=r"--public_validation_fraction=0.5 of 1 public"):
    training.split_public(config, _arrays(1))
  with pytest.raises(ConfigError, match="--public_validation_fraction"):
    TrainConfig(public_validation_fraction=1.0)
  with pytest.raises(ConfigError, match="--export_choice"):
    TrainConfig(export_choice="public")


def test_ties_go_to_the_dp_model_and_export_choice_dp_always_exports_it():
  assert public_guard.choose(0.8, 0.9, "best") == "public_only"
  assert public_guard.choose(0.9, 0.9, "best") == "dp"
  assert public_guard.choose(0.95, 0.9, "best") == "dp"
  assert public_guard.choose(0.1, 0.9, "dp") == "dp"


def test_the_summary_says_plainly_that_the_dp_model_is_worse():
  guard = public_guard.record("best", 36, 0.81, 0.88)
  assert metadata_lib.describe_public_guard(guard) == (
      "The DP model (0.810) is worse than the public-only model (0.880) on 36 public validation "
      "examples; exported the public-only model.")
  forced = metadata_lib.describe_public_guard(public_guard.record("dp", 36, 0.81, 0.88))
  assert forced.endswith("exported the DP model (--export_choice=dp).")
  assert "at least as good as" in metadata_lib.describe_public_guard(public_guard.record("best", 36, .9, .9))


def _spy_public_data(monkeypatch):
  """Records the public arrays the pre-training and the mask callback receive."""
  seen = {}
  pretrain = freezing.pretrain_on_public_data
  make_mask_callback = training.make_mask_callback
  monkeypatch.setattr(freezing, "pretrain_on_public_data",
                      lambda model, public, *a, **k: seen.setdefault("pretrain", public)
                      and pretrain(model, public, *a, **k))
  monkeypatch.setattr(training, "make_mask_callback",
                      lambda config, public: seen.setdefault("masks", public)
                      and make_mask_callback(config, public))
  return seen


def test_the_public_validation_examples_are_not_used_for_pretraining_or_masks(monkeypatch):
  seen = _spy_public_data(monkeypatch)
  config = TrainConfig(**dict(_RUN, mode="freeze", public_epochs=1, steps=1), export_dir=None)
  splits = training.load_data(config)
  result = training.train(config, splits=splits)
  _, validation = public_guard.split_public(splits.public, 0.2, config.seed)
  held_out = {row.tobytes() for row in validation[0]}
  for part in ("pretrain", "masks"):
    x, _ = seen[part]
    assert len(x) == 144, part
    assert not held_out & {row.tobytes() for row in x}, part
  assert result.metadata.public_guard["num_public_validation_examples"] == 36
  assert result.metadata.num_public_examples == 180  # the whole public part is public data


def _predictions(export_path, x):
  loaded = tf.saved_model.load(export_path)
  return loaded.signatures["serving_default"](tf.constant(x))["probabilities"].numpy()


def _spy_public_only(monkeypatch):
  snapshots = []
  real = training.snapshot_public_only
  monkeypatch.setattr(training, "snapshot_public_only",
                      lambda *a: snapshots.append(real(*a)) or snapshots[-1])
  return snapshots


def test_a_wrecked_dp_model_exports_the_public_only_model_labelled_with_the_runs_epsilon(
    tmp_path, monkeypatch):
  snapshots = _spy_public_only(monkeypatch)
  result = training.train(TrainConfig(**_WRECKED, export_dir=str(tmp_path)))
  guard = result.metadata.public_guard
  assert guard["compared"] and guard["exported"] == "public_only"
  assert guard["export_choice"] == "best" and guard["num_public_validation_examples"] == 36
  assert guard["public_only_validation_accuracy"] > guard["dp_validation_accuracy"]
  assert guard["public_only_validation_accuracy"] > 0.5
  # Still the run's guarantee: post-processing of the DP release is not free of it.
  assert result.metadata.private and result.metadata.steps == 4
  spec = result.metadata.privacy_spec
  assert result.metadata.epsilon == pytest.approx(
      training.accounting.PrivacySpec.from_dict(spec).epsilon(), abs=1e-12)
  assert inspection.read_metadata(result.export_path) == result.metadata
  # The export serves the public-only weights; the result's model is still the DP model.
  x = np.random.default_rng(0).random((5, 64), dtype="float32")
  model = result.model
  dp_outputs = tf.nn.softmax(model(x)).numpy()
  model.set_weights(snapshots[0])
  np.testing.assert_allclose(_predictions(result.export_path, x),
                             tf.nn.softmax(model(x)).numpy(), atol=1e-6)
  assert not np.allclose(_predictions(result.export_path, x), dp_outputs, atol=1e-3)
  card = open(os.path.join(result.export_path, serving_files.MODEL_CARD_FILENAME)).read()
  assert "exported the public-only model" in card and "post-processing" in card
  report = inspection.format_report(inspection.inspect_export(result.export_path))
  assert "exported model: The DP model" in report and "exported the public-only model" in report
  summary = training.summary(result.metadata, result.test_accuracy, result.export_path)
  assert "is worse than the public-only model" in summary


def test_export_choice_dp_exports_the_wrecked_dp_model_and_says_so(tmp_path):
  result = training.train(TrainConfig(**_WRECKED, export_choice="dp", export_dir=str(tmp_path)))
  guard = result.metadata.public_guard
  assert guard["exported"] == "dp" and guard["export_choice"] == "dp"
  assert guard["public_only_validation_accuracy"] > guard["dp_validation_accuracy"]
  x = np.random.default_rng(0).random((5, 64), dtype="float32")
  np.testing.assert_allclose(_predictions(result.export_path, x),
                             tf.nn.softmax(result.model(x)).numpy(), atol=1e-6)
  assert "(--export_choice=dp)" in training.summary(result.metadata, None, None)


def test_a_better_dp_model_is_exported(tmp_path):
  result = training.train(TrainConfig(**_USEFUL, export_dir=str(tmp_path)))
  guard = result.metadata.public_guard
  assert guard["exported"] == "dp"
  assert guard["dp_validation_accuracy"] > guard["public_only_validation_accuracy"]
  x = np.random.default_rng(0).random((5, 64), dtype="float32")
  np.testing.assert_allclose(_predictions(result.export_path, x),
                             tf.nn.softmax(result.model(x)).numpy(), atol=1e-6)


def test_no_validation_part_means_no_comparison_and_no_field():
  result = training.train(TrainConfig(**dict(_RUN, steps=1), public_validation_fraction=0.0,
                                      export_dir=None))
  assert result.metadata.public_guard is None
  assert "public_guard" not in result.metadata.to_dict()
  assert "public-only" not in training.summary(result.metadata, None, None)


def test_a_resumed_run_compares_with_the_public_only_model_it_stored(tmp_path):
  checkpoints = str(tmp_path / "ckpt")
  common = dict(_WRECKED, export_dir=None, checkpoint_dir=checkpoints)
  first = training.train(TrainConfig(**dict(common, steps=2)))
  assert os.path.isfile(os.path.join(checkpoints, public_guard.SNAPSHOT_FILENAME))
  resumed = training.train(TrainConfig(**dict(common, steps=4)))
  assert resumed.resumed_from == 2
  before, after = first.metadata.public_guard, resumed.metadata.public_guard
  assert after["compared"] and after["exported"] == "public_only"
  assert (after["public_only_validation_accuracy"]
          == before["public_only_validation_accuracy"])


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_a_resume_without_the_stored_public_only_model_says_it_cannot_compare(tmp_path):
  checkpoints = str(tmp_path / "ckpt")
  common = dict(_WRECKED, export_dir=None, checkpoint_dir=checkpoints)
  training.train(TrainConfig(**dict(common, steps=2)))
  os.remove(os.path.join(checkpoints, public_guard.SNAPSHOT_FILENAME))  # an older release's
  resumed = training.train(TrainConfig(**dict(common, steps=4)))
  guard = resumed.metadata.public_guard
  assert not guard["compared"] and guard["exported"] == "dp"
  assert guard["public_only_validation_accuracy"] is None
  assert guard["dp_validation_accuracy"] is not None
  summary = training.summary(resumed.metadata, None, None)
  assert "No public-only comparison: the run resumed from a checkpoint" in summary
  assert "Exported the DP model." in summary


def test_metadata_without_the_field_reads_back_to_the_same_document_and_digest():
  old = E.private_metadata(created="2026-01-01T00:00:00+00:00").to_dict()
  assert "public_guard" not in old
  assert metadata_lib.PrivacyMetadata.from_dict(old).to_dict() == old
  guard = public_guard.record("best", 36, 0.81, 0.88)
  new = E.private_metadata(public_guard=guard)
  document = new.to_dict()
  assert document["public_guard"] == guard and document["digest"] != old["digest"]
  assert metadata_lib.PrivacyMetadata.from_json(new.to_json()) == new
  with pytest.raises(ValueError, match="digest"):
    metadata_lib.PrivacyMetadata.from_dict(dict(document, public_guard=dict(guard,
                                                                            exported="dp")))


def test_a_run_recorded_before_the_guard_resumes_only_without_a_validation_part():
  from tfdp_prune import run_record  # pylint: disable=g-import-not-at-top
  new_settings = ("public_validation_fraction", "frozen_value", "export_choice")
  old = {"config": {k: v for k, v in TrainConfig().to_dict().items() if k not in new_settings}}
  assert run_record._record_differences(old, {"config": TrainConfig().to_dict()}) == [
      "--public_validation_fraction: 0.0 there, 0.2 now"]
  for same in (TrainConfig(public_validation_fraction=0.0, export_choice="dp"),
               TrainConfig(public_validation_fraction=0.0, frozen_value="zero")):
    assert run_record._record_differences(old, {"config": same.to_dict()}) == []
