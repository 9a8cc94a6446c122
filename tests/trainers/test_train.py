"""`tfdp-train`: flags map onto the config, bad flags fail before training, the job runs."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from tfdp_prune import freezing
from tfdp_prune import train_config
from tfdp_prune import training
from tfdp_prune.trainers import train
from tests.tfdp_prune._testing import write_image_folder
from tests.trainers._console_testing import run_in_process
from tests.trainers._console_testing import unindented_lines

_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _binary(name):
  """The installed console script (`pip install -e .` puts it beside the interpreter)."""
  path = os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    pytest.fail(f"{path} is missing: install the package with `pip install -e .`.")
  return path


@pytest.fixture
def parsed_flags():
  def parse(*argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tfdp-train", *argv])
    return train.given_overrides()
  yield parse
  flags.FLAGS.unparse_flags()


def test_only_given_flags_override_the_config(parsed_flags):
  assert parsed_flags() == {}
  assert parsed_flags("--sparsity=0.5", "--mode=select", "--export_dir=") == {
      "sparsity": 0.5, "mode": "select", "export_dir": None}


def test_every_config_setting_has_a_flag():
  settings = {f.name for f in dataclasses.fields(train_config.TrainConfig)}
  assert settings == {name for name, _, _ in train._FLAG_SPECS}


@pytest.mark.parametrize("argv, flag", [
    (["--mode=none", "--sparsity=0.5"], "--sparsity"),
    (["--epsilon=2", "--noise_multiplier=1"], "--noise_multiplier"),
    (["--batch_size=100", "--physical_batch_size=30"], "--physical_batch_size"),
    (["--dataset=no_such_dataset_xyz"], "--dataset"),
    (["--rule=largest"], "--rule"),
])
def test_invalid_flags_fail_before_training_and_name_the_flag(argv, flag, tmp_path, monkeypatch,
                                                              capsys):
  # In-process, as the console script runs it (`train.run_main`); test_bad_inputs runs the
  # installed binary once to prove that path prints such a message too.
  def fail(*args, **kwargs):
    raise AssertionError("an invalid flag reached training or export")
  monkeypatch.setattr(training, "_fit", fail)
  monkeypatch.setattr(freezing, "pretrain_on_public_data", fail)
  monkeypatch.setattr(training.export_lib, "export_saved_model", fail)
  monkeypatch.chdir(tmp_path)
  code, message, out = run_in_process(train.run_main, argv, monkeypatch, capsys)
  assert code not in (0, None), message
  unindented = unindented_lines(message)
  assert flag in unindented, message[-2000:]
  assert "Epoch" not in out and not os.path.exists(tmp_path / "tfdp_export")


def _run_and_check(argv, cwd, export_dir):
  result = subprocess.run([_binary("tfdp-train"), *argv], capture_output=True, text=True,
                          timeout=900, env=_ENV, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  epsilon = float(re.search(r"epsilon = ([0-9.]+), delta = 1e-05", result.stdout).group(1))
  accuracy = float(re.search(r"test accuracy: ([0-9.]+)", result.stdout).group(1))
  assert re.search(r"exported: .*1$", result.stdout, re.M)
  with open(os.path.join(export_dir, "1", "assets.extra", "privacy_metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["private"] is True and metadata["epsilon"] == pytest.approx(epsilon, abs=1e-3)
  assert metadata["mask_mode"] == "freeze"
  return epsilon, accuracy


def test_tfdp_train_shortened_default_job(tmp_path):
  """The no-flag path (digits, pre-training, freezing, Poisson, epsilon 8, export), shortened."""
  epsilon, accuracy = _run_and_check(["--steps=20", "--public_epochs=2"], tmp_path,
                                     tmp_path / "tfdp_export")
  assert epsilon <= 8.0 and accuracy > 0.2


@pytest.mark.slow
def test_tfdp_train_without_flags(tmp_path):
  """The README's main job, exactly: no flags."""
  epsilon, accuracy = _run_and_check([], tmp_path, tmp_path / "tfdp_export")
  assert 7.0 < epsilon <= 8.0 and accuracy > 0.85


@pytest.mark.slow  # 45 s; test_training's test_train_reads_a_folder_of_class_folders... is fast
def test_tfdp_train_on_a_folder_of_png_class_folders(tmp_path):
  """The user's own images: class folders of PNGs in, a SavedModel with its metadata out."""
  write_image_folder(tmp_path / "scans", classes=("healthy", "sick"), per_class=40,
                     size=(16, 16))
  export_dir = tmp_path / "models"
  epsilon, _ = _run_and_check(
      [f"--dataset={tmp_path}/scans", "--model=mnist_cnn", "--steps=4", "--public_epochs=1",
       "--batch_size=16", f"--export_dir={export_dir}"], tmp_path, export_dir)
  assert epsilon <= 8.0
  with open(export_dir / "1" / "assets.extra" / "privacy_metadata.json") as f:
    metadata = json.load(f)
  assert metadata["dataset"] == f"{tmp_path}/scans"
  assert (metadata["num_public_examples"], metadata["num_private_examples"],
          metadata["num_test_examples"]) == (8, 56, 16)
  result = subprocess.run(
      [sys.executable, "-c", "import sys, numpy as np, tensorflow as tf; "
       "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']; "
       "print(sorted(list(v.shape) for v in f(tf.zeros([2, 16, 16, 1])).values())[-1])",
       str(export_dir / "1")], capture_output=True, text=True, timeout=300, env=_ENV)
  assert result.stdout.strip().splitlines()[-1] == "[2, 2]", result.stderr[-2000:]
