"""A new run that keeps an old run's spend on record (`--carry_spend_from`)."""

import dataclasses
import os

import pytest

from tfdp_prune import accounting
from tfdp_prune import carried_spend
from tfdp_prune import checkpointing
from tfdp_prune import run_record
from tfdp_prune import training
from tfdp_prune import export as export_lib
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

SHORT = dict(steps=3, epochs=None, public_epochs=1, verbose=0, epsilon=None,
             noise_multiplier=1.0, export_dir=None)


def _truncate_every_checkpoint(directory):
  for name in os.listdir(directory):
    if name.startswith("ckpt-"):
      for file in os.listdir(os.path.join(directory, name)):
        with open(os.path.join(directory, name, file), "r+b") as f:
          f.truncate(3)


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
  """A 3-step run whose every checkpoint file is then truncated (its ledger is intact)."""
  old = str(tmp_path_factory.mktemp("old") / "ckpt")
  training.train(TrainConfig(**SHORT, checkpoint_dir=old))
  _truncate_every_checkpoint(old)
  return old


def test_a_damaged_run_names_the_flag_and_a_new_run_with_it_counts_the_old_steps(
    damaged_run, tmp_path):
  with pytest.raises(checkpointing.CheckpointError,
                     match=f"(?s)corrupt.*--carry_spend_from={damaged_run}"):
    training.train(TrainConfig(**SHORT, checkpoint_dir=damaged_run))
  new = str(tmp_path / "new")
  result = training.train(TrainConfig(**dict(SHORT, steps=2, export_dir=str(tmp_path / "export")),
                                      checkpoint_dir=new, carry_spend_from=damaged_run))
  spec = accounting.PrivacySpec.from_dict(result.metadata.privacy_spec)
  assert result.metadata.steps == 5 == spec.steps  # 3 carried + 2 new
  assert result.metadata.epsilon == spec.epsilon() == spec.with_steps(5).epsilon()
  assert result.metadata.epsilon > spec.with_steps(2).epsilon()
  ledger = str(os.path.join(damaged_run, checkpointing.LEDGER))
  assert "3 of these steps were spent by an earlier run" in result.metadata.statement
  assert os.path.abspath(ledger) in result.metadata.statement
  carried = checkpointing.read_carried(new)
  assert carried == {"path": os.path.abspath(ledger), "steps": 3,
                     "sha256": checkpointing.ledger_file_digest(damaged_run)}
  assert checkpointing.read_ledger(new)["state"]["steps"] == 5
  exported = export_lib.read_metadata(result.export_path)
  assert exported.steps == 5 and exported.epsilon == result.metadata.epsilon
  with open(os.path.join(result.export_path, "model_card.md"), encoding="utf-8") as f:
    assert "carried into this guarantee" in f.read()
  # tfdp-export of the new run says the same.
  path = training.export_checkpoint(new, str(tmp_path / "again"))
  again = export_lib.read_metadata(path)
  assert again.steps == 5 and "carried into this guarantee" in again.statement


def test_a_resumed_carrying_run_counts_the_old_steps_once(damaged_run, tmp_path):
  new = str(tmp_path / "new")
  config = TrainConfig(**dict(SHORT, steps=2), checkpoint_dir=new, carry_spend_from=damaged_run)
  training.train(config)
  resumed = training.train(dataclasses.replace(config, steps=4))
  assert resumed.resumed_from == 2 and resumed.metadata.steps == 7  # 3 + 4


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_a_target_epsilon_counts_the_carried_steps(tmp_path):
  """An old run at --epsilon stopped after 3 of its 6 steps; the new run with the same flags
  (so the same calibrated sigma) may train only the 3 steps the target has left."""
  # RDP: calibrating sigma for a target takes milliseconds, PLD seconds (the accountant is not
  # what this test is about).
  config = TrainConfig(**dict(SHORT, steps=6, noise_multiplier=None, epsilon=2.0,
                              accountant="rdp"), checkpoint_dir=str(tmp_path / "old"))
  training.train(config, callbacks=[training.StopAfterSteps(3)])
  assert checkpointing.read_ledger(config.checkpoint_dir)["state"]["steps"] == 3
  new = dataclasses.replace(config, checkpoint_dir=str(tmp_path / "new"),
                            carry_spend_from=config.checkpoint_dir)
  result = training.train(new)
  assert result.metadata.steps == 6 and len(result.history["loss"]) >= 1
  assert result.metadata.epsilon <= 2.0
  assert checkpointing.read_ledger(new.checkpoint_dir)["state"]["steps"] == 6
  # Nothing is left: a third run carrying the second's spend is refused before training.
  with pytest.raises(ConfigError, match="carries 6 logical steps.*allows 6 in all"):
    training.train(dataclasses.replace(new, checkpoint_dir=str(tmp_path / "third"),
                                       carry_spend_from=new.checkpoint_dir))
  # Another target calibrates another sigma: another mechanism, refused.
  with pytest.raises(ConfigError, match="noise_multiplier: .* there"):
    training.train(dataclasses.replace(new, checkpoint_dir=str(tmp_path / "fourth"),
                                       epsilon=4.0))


def test_another_mechanism_or_other_data_is_refused_before_anything_is_written(damaged_run,
                                                                              tmp_path):
  new = str(tmp_path / "new")
  for change, phrase in [(dict(noise_multiplier=2.0), "noise_multiplier: 1.0 there, 2.0 now"),
                         (dict(batch_size=50), "sampling_probability"),
                         (dict(sampling="shuffle"), "sampling: 'poisson' there"),
                         (dict(accountant="rdp"), "accountant: 'pld' there"),
                         (dict(delta=1e-6), "delta: 1e-05 there"),
                         (dict(private_split="train[10%:70%]"), "private_split"),
                         (dict(seed=1), "seed: 0 there, 1 now")]:
    with pytest.raises(ConfigError, match=f"(?s)composing different mechanisms is not "
                       f"supported.*{phrase}"):
      training.train(TrainConfig(**dict(SHORT, **change), checkpoint_dir=new,
                                 carry_spend_from=damaged_run))
    assert not os.path.exists(new)


def test_a_damaged_ledger_cannot_be_carried(damaged_run, tmp_path):
  old = str(tmp_path / "old")
  os.makedirs(old)
  with open(os.path.join(damaged_run, checkpointing.LEDGER), "rb") as f:
    lines = f.read().split(b"\n")
  with open(os.path.join(old, checkpointing.LEDGER), "wb") as f:
    f.write(lines[0].replace(b'"steps": 1', b'"steps": 0') + b"\n")
  with open(os.path.join(damaged_run, run_record.RUN_RECORD), "rb") as f:
    record = f.read()
  with open(os.path.join(old, run_record.RUN_RECORD), "wb") as f:
    f.write(record)
  with pytest.raises(checkpointing.CheckpointError,
                     match="(?s)corrupt at line 1.*cannot be carried.*backup"):
    training.train(TrainConfig(**SHORT, checkpoint_dir=str(tmp_path / "new"),
                               carry_spend_from=old))
  with pytest.raises(ConfigError, match="holds none"):
    training.train(TrainConfig(**SHORT, checkpoint_dir=str(tmp_path / "new"),
                               carry_spend_from=str(tmp_path)))


def test_the_flag_needs_a_new_checkpoint_dir():
  with pytest.raises(ConfigError, match="Expected --checkpoint_dir"):
    TrainConfig(**SHORT, carry_spend_from="/runs/old")
  with pytest.raises(ConfigError, match="to differ"):
    TrainConfig(**SHORT, carry_spend_from="/runs/old", checkpoint_dir="/runs/old/")


def test_mechanism_and_data_differences_are_pure():
  spec = accounting.PrivacySpec(noise_multiplier=1.0, steps=0, delta=1e-5,
                                sampling_probability=0.1)
  assert carried_spend.mechanism_differences(spec.with_steps(7), spec) == []
  assert carried_spend.mechanism_differences(
      dataclasses.replace(spec, pld_discretization=1e-3), spec) == [
          "pld_discretization: 0.001 there, 0.0001 now"]
  info = {"dataset": "mnist", "private_split": "train[2%:]", "num_private": 10, "seed": 0}
  assert carried_spend.data_differences(info, dict(info, seed=3)) == []  # TFDS: seed no matter
  digits = dict(info, dataset="digits")
  assert carried_spend.data_differences(digits, dict(digits, seed=3)) == [
      "seed: 0 there, 3 now"]
