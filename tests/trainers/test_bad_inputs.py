"""Bad input to the binaries: each row is a file system state and flags, the exit code, a phrase
of the message; nothing was trained or exported, and no file was written or deleted.

The rows run `tfdp-train`'s console runner in-process (`train.run_main`, as the console script
does, with training, pre-training and export monkeypatched to fail); one row runs the installed
binary to prove the console-script path prints the message without a traceback.
"""

import errno
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from tfdp_prune import freezing
from tfdp_prune import training
from tfdp_prune.trainers import train
from tests.tfdp_prune._testing import write_csv
from tests.tfdp_prune._testing import write_image_folder
from tests.tfdp_prune._testing import write_png
from tests.trainers._console_testing import run_in_process
from tests.trainers._console_testing import run_tfdp_export
from tests.trainers._console_testing import unindented_lines

_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _file(path):
  path.write_text("not a directory")


def _readonly_mount(path):
  path.mkdir()
  (path / "kept").write_text("an earlier run's file")  # must not be deleted


def _version_1(path):
  (path / "1").mkdir(parents=True)


def _damaged_checkpoint(path):
  (path / "ckpt-5").mkdir(parents=True)
  (path / "ckpt-5" / "checkpoint.json").write_text('{"trunc')  # a crash mid-write


def _class_folder_without_images(path):
  write_image_folder(path, classes=("a",), per_class=2)
  (path / "b").mkdir()


def _unreadable_image(path):
  write_image_folder(path, classes=("a", "b"), per_class=2)
  (path / "b" / "broken.png").write_text("not a PNG")


def _mixed_sizes(path):
  write_image_folder(path, classes=("a", "b"), per_class=2, size=(8, 8))
  write_png(path / "b" / "big.png", np.zeros((9, 8, 1), np.uint8))


def _csv(header, rows):
  def make(path):
    path.mkdir()
    write_csv(path / "d.csv", header, rows)
  return make


def _private_row_in_public_csv(path):
  path.mkdir()
  rows = [[i, i % 2] for i in range(20)]
  write_csv(path / "private.csv", ["a", "y"], rows)
  write_csv(path / "public.csv", ["a", "y"], [[100, 0], [101, 1], rows[4]])


def _npz_other_names(path):
  path.mkdir()
  np.savez(path / "d.npz", features=np.zeros((4, 2)), labels=[0, 1, 0, 1])


_CSV_FLAGS = ["--dataset={tmp}/data/d.csv", "--label_column=y", "--num_classes=2"]

# (id, file system state under tmp_path or None, flags ({tmp} is tmp_path), exit code, phrase)
ROWS = [
    ("export_dir_is_a_file", ("models", _file), ["--export_dir={tmp}/models"], 1,
     "--export_dir to be a directory"),
    ("export_dir_under_a_file", ("models", _file), ["--export_dir={tmp}/models/digits"], 1,
     "which is a file"),
    ("export_dir_read_only", ("ro", _readonly_mount), ["--export_dir={tmp}/ro/digits"], 1,
     "--export_dir to be writable"),
    ("checkpoint_dir_is_a_file", ("runs", _file), ["--checkpoint_dir={tmp}/runs"], 1,
     "--checkpoint_dir to be a directory"),
    ("damaged_checkpoint", ("runs", _damaged_checkpoint), ["--checkpoint_dir={tmp}/runs"], 1,
     "is corrupt or unreadable"),
    ("damaged_checkpoint_names_the_carry_flag", ("runs", _damaged_checkpoint),
     ["--checkpoint_dir={tmp}/runs"], 1, "tfdp-train --carry_spend_from={tmp}/runs"),
    ("carry_spend_without_checkpoint_dir", None, ["--carry_spend_from={tmp}/runs"], 1,
     "Expected --checkpoint_dir (a new directory"),
    ("carry_spend_from_a_directory_without_ledger", ("runs", _version_1),
     ["--carry_spend_from={tmp}/runs", "--checkpoint_dir={tmp}/new"], 1,
     "privacy_ledger.jsonl (written by tfdp-train --checkpoint_dir)"),
    ("export_version_exists", ("models", _version_1),
     ["--export_dir={tmp}/models", "--export_version=1"], 1, "--overwrite"),
    ("empty_private_split", None, ["--private_split=train[:0%]"], 1,
     "non-empty private part"),
    ("empty_public_split", None, ["--public_split=train[:0%]"], 1, "non-empty public part"),
    ("overlap", None, ["--public_split=train[:20%]"], 1,
     "Choose a --public_split and --private_split that do not overlap"),
    ("epsilon_inf", None, ["--epsilon=inf"], 1, "--noise_multiplier=0"),
    ("epsilon_unreachable", None, ["--epsilon=0.00001", "--steps=1000000"], 1,
     "Expected an --epsilon that some noise multiplier reaches. Received: --epsilon=1e-05 for "
     "1000000 steps"),
    ("mask_flag_without_masks", None, ["--mode=none", "--sparsity=0.5"], 1, "--sparsity"),
    ("positional_argument", None, ["train"], 1, "Unexpected arguments"),
    ("unknown_flag", None, ["--epsilom=2"], 1, "epsilom"),
    # --dataset from the user's own files
    ("dataset_path_missing", None, ["--dataset={tmp}/nowhere"], 1, "does not exist"),
    ("image_folder_empty", ("data", lambda path: path.mkdir()), ["--dataset={tmp}/data"], 1,
     "Received a folder without sub-folders"),
    ("class_folder_without_images", ("data", _class_folder_without_images),
     ["--dataset={tmp}/data"], 1, "Received a folder without any"),
    ("unreadable_image", ("data", _unreadable_image), ["--dataset={tmp}/data"], 1,
     "broken.png. Received a file TensorFlow cannot decode"),
    ("mixed_image_sizes", ("data", _mixed_sizes), ["--dataset={tmp}/data"], 1,
     "Pass --image_size=HEIGHTxWIDTH"),
    ("image_size_malformed", None, ["--image_size=big"], 1,
     "Expected --image_size=HEIGHTxWIDTH"),
    ("image_size_without_a_folder", None, ["--image_size=8x8"], 1,
     "--image_size applies to datasets read from a folder"),
    ("csv_without_the_label_column", ("data", _csv(["a", "label"], [[1, 0]])), _CSV_FLAGS, 1,
     "Expected --label_column to name the label column"),
    ("csv_non_numeric_column", ("data", _csv(["a", "town", "y"], [[1, "oslo", 0]])),
     _CSV_FLAGS, 1, "non-numeric (or empty) values in the columns ['town']"),
    ("csv_text_labels", ("data", _csv(["a", "y"], [[1, "sick"]])), _CSV_FLAGS, 1,
     "Received text labels"),
    ("csv_labels_out_of_range", ("data", _csv(["a", "y"], [[1, 0], [2, 2]])), _CSV_FLAGS, 1,
     "Expected integer labels 0..1 (--num_classes=2)"),
    ("csv_non_finite_features", ("data", _csv(["a", "y"], [[1, 0], ["inf", 1]])), _CSV_FLAGS,
     1, "Received NaN or inf in 1 of 2 examples"),
    ("csv_without_num_classes", ("data", _csv(["a", "y"], [[1, 0]])),
     ["--dataset={tmp}/data/d.csv", "--label_column=y"], 1, "Expected --num_classes"),
    ("npz_other_names", ("data", _npz_other_names),
     ["--dataset={tmp}/data/d.npz", "--num_classes=2"], 1, "Expected arrays named ['x', 'y']"),
    ("public_file_holds_a_private_row", ("data", _private_row_in_public_csv),
     ["--dataset={tmp}/data/private.csv", "--public_dataset={tmp}/data/public.csv",
      "--label_column=y", "--num_classes=2"], 1,
     "or a --public_dataset without the private examples"),
]
# Phrases that would point at a fix that does not exist for tfdp-train.
_NO_SUCH_FIX = ("allow_overlap", "--batch_size")


def _tree(root):
  """{path: None for a directory, (size, mtime) for a file} of everything under root (a
  directory's mtime is left out: the writability probe creates and removes an entry)."""
  tree = {}
  for directory, subdirs, files in os.walk(root):
    tree.update({os.path.join(directory, name): None for name in subdirs})
    for name in files:
      stat = os.stat(os.path.join(directory, name))
      tree[os.path.join(directory, name)] = (stat.st_size, stat.st_mtime_ns)
  return tree


@pytest.fixture
def no_training(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("a bad input reached training or export")
  monkeypatch.setattr(training, "_fit", fail)
  monkeypatch.setattr(freezing, "pretrain_on_public_data", fail)
  monkeypatch.setattr(training.export_lib, "export_saved_model", fail)


@pytest.mark.parametrize("state, argv, code, phrase", [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_bad_input_exits_with_a_message_before_training(state, argv, code, phrase, tmp_path,
                                                        monkeypatch, capsys, no_training):
  if state is not None:
    state[1](tmp_path / state[0])
  if state is not None and state[1] is _readonly_mount:  # root ignores modes: fail like EROFS
    readonly, mkdtemp = str(tmp_path / state[0]), training.tempfile.mkdtemp
    def read_only_mkdtemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
      if dir is not None and os.path.abspath(dir).startswith(readonly):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
      return mkdtemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(training.tempfile, "mkdtemp", read_only_mkdtemp)
  monkeypatch.chdir(tmp_path)  # the default --export_dir is relative
  before = _tree(tmp_path)
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  exit_code, message, _ = run_in_process(train.run_main, argv, monkeypatch, capsys)
  phrase = phrase.replace("{tmp}", str(tmp_path))
  assert exit_code == code, message
  assert phrase in message, message
  assert "Traceback" not in message, message
  unindented = unindented_lines(message)
  assert phrase in unindented, message
  for wrong in _NO_SUCH_FIX:
    assert wrong not in unindented, message
  assert _tree(tmp_path) == before  # nothing written, nothing deleted


def test_binary_prints_the_message_without_a_traceback(tmp_path):
  (tmp_path / "models").write_text("not a directory")
  binary = os.path.join(os.path.dirname(sys.executable), "tfdp-train")
  result = subprocess.run([binary, f"--export_dir={tmp_path}/models"], capture_output=True,
                          text=True, timeout=300, env=_ENV, cwd=tmp_path)
  assert result.returncode == 1
  assert "tfdp-train: Expected --export_dir to be a directory" in result.stderr, result.stderr
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["models"]


@pytest.mark.parametrize("program, main_module", [("tfdp-train", "train"), ("tfdp-audit", "audit")])
def test_help_lists_every_flag_of_the_binary(program, main_module, monkeypatch, capsys):
  from tfdp_prune.trainers import audit  # pylint: disable=g-import-not-at-top
  module = {"train": train, "audit": audit}[main_module]
  monkeypatch.setattr(sys, "argv", [program, "--help"])
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit):
      module.run_main()
  finally:
    flags.FLAGS.unparse_flags()
  listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", capsys.readouterr().out, re.M))
  expected = {"config"} | {name for name, _, _ in train._FLAG_SPECS}
  if module is audit:
    expected |= set(audit._AUDIT_FLAGS)
  assert expected <= listed, sorted(expected - listed)


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_tfdp_export_help_lists_its_flags_and_the_old_version_flag_names_the_new_one(tmp_path):
  # (CI runs the installed tfdp-export script's --help too.)
  helped, result = run_tfdp_export(
      ["--help"], [f"--checkpoint_dir={tmp_path}", f"--export_dir={tmp_path}/m", "--version=3"],
      cwd=tmp_path)
  listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", helped.stdout, re.M))
  assert {"checkpoint_dir", "export_dir", "export_version", "overwrite", "ema",
          "inspect"} <= listed, helped.stdout
  assert result.returncode == 1
  assert "--version was renamed --export_version" in result.stderr, result.stderr[-2000:]
  assert "pass --export_version=3" in result.stderr and "Traceback" not in result.stderr
  assert os.listdir(tmp_path) == []


def test_a_bug_in_tfdp_train_keeps_its_traceback(monkeypatch):
  """Only user errors (ConfigError, CheckpointError) end in a one-line message; a ValueError
  from anywhere else is a bug and propagates with its traceback."""
  def buggy_run(*args, **kwargs):
    raise ValueError("a genuine bug")
  monkeypatch.setattr(training, "run", buggy_run)
  monkeypatch.setattr(sys, "argv", ["tfdp-train"])
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(ValueError, match="a genuine bug"):
      train.run_main()
  finally:
    flags.FLAGS.unparse_flags()
