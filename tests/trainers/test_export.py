"""`tfdp-export`: a checkpoint of `tfdp-train` becomes a served-ready export; --inspect checks it."""

import json
import os
import subprocess
import sys

import pytest

from tfdp_prune import training
from tfdp_prune.train_config import TrainConfig
from tests.trainers._console_testing import run_tfdp_export

_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("run") / "ckpt")
  training.train(TrainConfig(steps=4, epochs=None, public_epochs=1, verbose=0, export_dir=None,
                             epsilon=None, noise_multiplier=1.0, checkpoint_dir=directory))
  return directory


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_export_from_checkpoint_then_inspect(checkpoint_dir, tmp_path):
  export_dir = str(tmp_path / "models")
  export = [f"--checkpoint_dir={checkpoint_dir}", f"--export_dir={export_dir}"]
  result, inspected, again, replaced = run_tfdp_export(
      export, [f"--inspect={export_dir}"], export + ["--export_version=1"],
      export + ["--export_version=1", "--overwrite"])
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(export_dir, "1", "assets.extra", "privacy_metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["steps"] == 4 and metadata["private"] is True
  assert inspected.returncode == 0, inspected.stderr[-3000:]
  assert f"{metadata['epsilon']:.4g}" in inspected.stdout
  assert "serving_default" in inspected.stdout and "privacy_metadata" in inspected.stdout
  # The same version again is refused without --overwrite, and replaced with it.
  assert again.returncode != 0 and "overwrite" in again.stderr
  assert "Traceback" not in again.stderr
  assert replaced.returncode == 0, replaced.stderr[-3000:]


def test_inspect_of_a_forged_epsilon_fails_and_prints_no_label(tmp_path):
  """The operator's view of issue 14: epsilon edited in the JSON file, digest recomputed."""
  from tfdp_prune import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  from tfdp_prune.export import export_saved_model  # pylint: disable=g-import-not-at-top
  from tests.export import _export_testing as E  # pylint: disable=g-import-not-at-top
  path = export_saved_model(E.tiny_model(), str(tmp_path / "models"), E.private_metadata())
  filename = os.path.join(path, "assets.extra", "privacy_metadata.json")
  with open(filename) as f:
    document = json.load(f)
  document["epsilon"] = 0.5
  document["digest"] = metadata_lib.document_digest(document)
  with open(filename, "w") as f:
    json.dump(document, f)
  result, = run_tfdp_export([f"--inspect={tmp_path / 'models'}"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "differs between its copies" in result.stderr
  assert "epsilon: assets.extra/privacy_metadata.json says 0.5" in result.stderr
  assert "0.5, " not in result.stdout and "-DP" not in result.stdout


_BUGGY_EXPORT = """
import sys
from tfdp_prune import training
from tfdp_prune.trainers import export
def buggy_export(*args, **kwargs):
  raise ValueError("a genuine bug")
training.export_checkpoint = buggy_export
sys.argv = ["tfdp-export", *sys.argv[1:]]
export.run_main()
"""


def _run_buggy_export_main(*argv):
  """`tfdp-export`'s console entry point in a process of its own, as the interpreter runs it,
  with an export_checkpoint that raises a plain ValueError."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run([sys.executable, "-c", _BUGGY_EXPORT, *argv], capture_output=True,
                        text=True, timeout=600,
                        env=dict(_ENV, PYTHONPATH=os.path.abspath(repo)))


def test_a_user_error_exits_with_its_message(tmp_path):
  """A directory without a run: ConfigError; a directory that is no export: ExportError."""
  no_run, no_export = run_tfdp_export(
      [f"--checkpoint_dir={tmp_path}", f"--export_dir={tmp_path}/m"], [f"--inspect={tmp_path}"])
  assert no_run.returncode == 1 and "Traceback" not in no_run.stderr, no_run.stderr[-3000:]
  assert "tfdp-export: Expected " in no_run.stderr and "run.json" in no_run.stderr
  assert no_export.returncode == 1 and "Traceback" not in no_export.stderr, (
      no_export.stderr[-3000:])
  assert "tfdp-export: " in no_export.stderr and str(tmp_path) in no_export.stderr


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_a_bug_keeps_its_traceback(tmp_path):
  """A ValueError that is no user error is a bug: it propagates with its traceback."""
  result = _run_buggy_export_main(f"--checkpoint_dir={tmp_path}", f"--export_dir={tmp_path}/m")
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "ValueError: a genuine bug" in result.stderr, (
      result.stderr[-3000:])
