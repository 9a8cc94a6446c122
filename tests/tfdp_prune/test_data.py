import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfdp_prune
from tfdp_prune import data
from tfdp_prune.compat import tf
from tests.tfdp_prune._testing import fake_tfds_as_dataset
from tests.tfdp_prune._testing import write_csv
from tests.tfdp_prune._testing import write_image_folder

def _rows(x):
  return {row.tobytes() for row in x.reshape(len(x), -1)}


def test_digits_default_split_sizes_classes_and_range():
  splits = data.load()
  assert (len(splits.public[1]), len(splits.private[1]), len(splits.test[1])) == (180, 1258, 359)
  assert splits.public[0].shape == (180, 64) and splits.public[0].dtype == np.float32
  assert splits.private[1].dtype == np.int32
  for x, _ in (splits.public, splits.private, splits.test):
    assert x.min() == 0.0 and x.max() == 1.0
  # Stratified: every class in proportion (digits has 174..183 examples per class).
  np.testing.assert_array_equal(np.bincount(splits.public[1]), [18] * 10)
  assert np.bincount(splits.test[1], minlength=10).min() >= 34
  info = splits.info
  assert (info.dataset, info.num_classes, info.input_shape, info.overlap_count) == (
      "digits", 10, (64,), 0)
  assert info.public_fingerprint == tfdp_prune.PublicDataFingerprint.from_data(splits.public)
  assert info.to_dict()["public_fingerprint"]["num_examples"] == 180


def test_digits_parts_are_disjoint_and_cover_the_dataset():
  splits = data.load(public_split="train[:5%]", private_split="train[5%:90%]",
                     test_split="train[90%:]")
  public, private, test = (_rows(part[0]) for part in (splits.public, splits.private,
                                                       splits.test))
  assert not public & private and not public & test and not private & test
  total = sum(len(part[1]) for part in (splits.public, splits.private, splits.test))
  assert total == 1797


def test_digits_split_is_deterministic_by_seed():
  first, again, other = data.load(seed=3), data.load(seed=3), data.load(seed=4)
  np.testing.assert_array_equal(first.public[0], again.public[0])
  np.testing.assert_array_equal(first.private[1], again.private[1])
  assert first.info.public_fingerprint == again.info.public_fingerprint
  assert first.info.public_fingerprint != other.info.public_fingerprint
  assert _rows(first.public[0]) != _rows(other.public[0])


def test_digits_overlapping_slices_raise_with_the_count():
  with pytest.raises(ValueError, match=r"18 private example\(s\)"):
    data.load(public_split="train[:10%]", private_split="train[9%:]")
  splits = data.load(public_split="train[:10%]", private_split="train[9%:]", allow_overlap=True)
  assert splits.info.overlap_count == 18
  with pytest.raises(ValueError, match="one split, 'train'"):
    data.load(test_split="test")


def test_empty_or_non_finite_parts_are_refused_and_named():
  with pytest.raises(data.DataError, match="non-empty public part.*'train\\[:0%\\]'"):
    data.load(public_split="train[:0%]")
  with pytest.raises(data.DataError, match="non-empty private part"):
    data.load(private_split="train[:0%]")
  splits = data.load()
  x = splits.public[0].copy()
  x[0, 0] = np.inf
  bad = dataclasses.replace(splits, public=(x, splits.public[1]))
  with pytest.raises(data.DataError, match="1 of the 180 examples of the public part"):
    data.check_splits(bad)
  # Private inputs may be non-finite: the DP optimizer drops and counts such examples.
  data.check_part("private", (x, splits.public[1]))
  with pytest.raises(data.DataError, match="private inputs' shape"):
    data.check_part("public", splits.public, (8, 8))


def test_check_splits_runs_the_checks_of_load_on_splits_from_elsewhere():
  assert data.check_splits(data.load()) == 0
  overlapping = dict(public_split="train[:10%]", private_split="train[9%:]")
  with pytest.raises(ValueError) as loaded:
    data.load(**overlapping)
  splits = data.load(**overlapping, allow_overlap=True)
  with pytest.raises(ValueError) as checked:
    data.check_splits(splits)
  assert str(checked.value) == str(loaded.value)
  assert data.check_splits(splits, allow_overlap=True) == 18
  # The public part changed after load: the fingerprint the metadata would publish is stale.
  fewer = dataclasses.replace(splits, public=(splits.public[0][:50], splits.public[1][:50]),
                              private=(splits.private[0][50:], splits.private[1][50:]))
  with pytest.raises(ValueError, match="info.public_fingerprint to be the fingerprint of "
                     "splits.public.*over 180 examples in info.*over 50"):
    data.check_splits(fewer)
  with pytest.raises(TypeError, match="DataSplits"):
    data.check_splits((splits.public, splits.private))


def test_tfds_splits_of_one_dataset_are_disjoint_and_scaled():
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds_as_dataset):
    splits = data.load("mnist", public_split="train[:10%]", private_split="train[10%:]")
  assert splits.public[0].shape == (20, 28, 28, 1)
  assert splits.private[0].shape == (180, 28, 28, 1)
  assert splits.test[0].shape == (50, 28, 28, 1)
  assert splits.private[0].dtype == np.float32 and splits.private[1].dtype == np.int32
  assert 0.0 <= splits.private[0].min() and splits.private[0].max() <= 1.0
  assert splits.private[0].max() > 0.99  # scaled by 1/255, not clipped or unscaled
  assert not _rows(splits.public[0]) & _rows(splits.private[0])
  info = splits.info
  assert (info.dataset, info.public_split, info.private_split, info.test_split) == (
      "mnist", "train[:10%]", "train[10%:]", "test")
  assert (info.num_public, info.num_private, info.num_test, info.num_classes) == (20, 180, 50, 10)
  assert info.input_shape == (28, 28, 1)
  assert info.public_fingerprint == tfdp_prune.PublicDataFingerprint.from_data(splits.public)


def test_tfds_public_part_from_another_dataset():
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds_as_dataset):
    splits = data.load("mnist", public_dataset="fashion_mnist", public_split="train[:30]",
                       private_split="train", test_split=None)
    own = data.load("mnist", public_split="train[:30]", private_split="train[30:]",
                    test_split=None)
  assert splits.public[0].shape == (30, 28, 28, 1) and splits.private[0].shape[0] == 200
  assert splits.test is None and splits.info.num_test == 0
  assert splits.info.public_dataset == "fashion_mnist"
  assert splits.info.public_fingerprint != own.info.public_fingerprint


def test_tfds_overlapping_splits_raise_with_the_count():
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds_as_dataset):
    with pytest.raises(ValueError, match=r"10 private example\(s\) \(10 distinct\)"):
      data.load("mnist", public_split="train[:10%]", private_split="train[5%:]")
  # mock_data's own generator gives every split the same examples: all of them overlap.
  with tfds.testing.mock_data(num_examples=12):
    with pytest.raises(ValueError, match=r"12 private example\(s\)"):
      data.load("mnist", public_split="train[:10%]", private_split="train[10%:]")


def test_incompatible_public_dataset_is_refused():
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(ValueError, match=r"same input shape and number of classes"):
      data.load("mnist", public_dataset="cifar10", public_split="train")


def test_unknown_or_unprepared_dataset_is_a_clear_error_never_a_fallback(tmp_path):
  with pytest.raises(data.DatasetNotAvailableError) as error:
    data.load("no_such_dataset_xyz", data_dir=str(tmp_path))
  message = str(error.value)
  assert "Unknown dataset 'no_such_dataset_xyz'" in message
  assert "'digits'" in message and str(tmp_path) in message

  (tmp_path / "emnist" / "3.1.0").mkdir(parents=True)
  (tmp_path / "emnist" / "3.1.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(data.DatasetNotAvailableError) as error:
    data.load("mnist", data_dir=str(tmp_path))  # registered, but not prepared here
  message = str(error.value)
  assert "'mnist' is not prepared" in message and "download_and_prepare" in message
  assert "'emnist'" in message  # what IS available offline is listed
  with pytest.raises(ValueError, match="Expected dataset to be a dataset name"):
    data.load("")


# ---- the user's own files and arrays -----------------------------------------------------------


def test_image_folder_splits_are_stratified_disjoint_seeded_and_recorded(tmp_path):
  write_image_folder(tmp_path / "imgs", classes=("b", "a"), per_class=20, size=(6, 6))
  root = str(tmp_path / "imgs")
  splits = data.load(root)  # digits' defaults: 10% / 70% / 20%
  assert (len(splits.public[1]), len(splits.private[1]), len(splits.test[1])) == (4, 28, 8)
  np.testing.assert_array_equal(np.bincount(splits.public[1]), [2, 2])  # stratified
  public, private, test = (_rows(part[0]) for part in (splits.public, splits.private,
                                                       splits.test))
  assert not public & private and not public & test and not private & test
  assert len(public | private | test) == 40
  info = splits.info
  assert (info.dataset, info.num_classes, info.input_shape, info.class_names) == (
      root, 2, (6, 6, 1), ("a", "b"))
  assert info.public_fingerprint == tfdp_prune.PublicDataFingerprint.from_data(splits.public)
  assert data.DataInfo.from_dict(info.to_dict()) == info
  again, other = data.load(root, seed=0), data.load(root, seed=1)
  np.testing.assert_array_equal(again.private[0], splits.private[0])
  assert _rows(other.public[0]) != public


def test_records_without_class_names_read_back_unchanged():
  info = data.load().info
  assert "class_names" not in info.to_dict()  # run.json of earlier runs still compares equal
  assert data.DataInfo.from_dict(info.to_dict()) == info


def test_public_part_from_another_file_takes_all_of_it(tmp_path):
  rng = np.random.default_rng(0)
  private = write_csv(tmp_path / "private.csv", ["a", "b", "y"],
                      [[*rng.normal(size=2), i % 2] for i in range(50)])
  public = write_csv(tmp_path / "public.csv", ["a", "b", "y"],
                     [[*rng.normal(size=2), i % 2] for i in range(7)])
  splits = data.load(private, public_dataset=public, label_column="y", num_classes=2)
  assert (splits.info.public_split, splits.info.private_split) == ("train", "train[:80%]")
  assert (len(splits.public[1]), len(splits.private[1]), len(splits.test[1])) == (7, 40, 10)


def test_a_private_row_in_a_public_file_is_found(tmp_path):
  rows = [[i, i * 2, i % 2] for i in range(20)]
  private = write_csv(tmp_path / "private.csv", ["a", "b", "y"], rows)
  public = write_csv(tmp_path / "public.csv", ["a", "b", "y"],
                     [[100, 1, 0], [101, 1, 1], [rows[3][0], rows[3][1], 1 - rows[3][2]]])
  with pytest.raises(data.OverlapError, match=r"1 private example\(s\)"):
    data.load(private, public_dataset=public, private_split="train", test_split=None,
              label_column="y", num_classes=2)


def test_an_image_in_a_folder_and_in_tfds_is_the_same_example(tmp_path):
  """PNG pixels are scaled as TFDS uint8 images are, so the overlap check compares equal
  values."""
  images = write_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3, size=(4, 4))
  from_tfds = np.stack(list(images.values())).astype(np.float32) / np.float32(255.0)
  assert _rows(data.load(str(tmp_path / "imgs"), public_split="train",
                         private_split="train[:1]", test_split=None,
                         allow_overlap=True).public[0]) == _rows(from_tfds)


def test_public_folder_must_have_the_private_folders_classes_and_shape(tmp_path):
  write_image_folder(tmp_path / "private", classes=("a", "b"), per_class=5, size=(6, 6))
  write_image_folder(tmp_path / "other_names", classes=("a", "c"), per_class=2, size=(6, 6),
                     seed=1)
  write_image_folder(tmp_path / "other_size", classes=("a", "b"), per_class=2, size=(5, 6),
                     seed=1)
  with pytest.raises(data.DataError, match=r"\['a', 'c'\] vs \['a', 'b'\]"):
    data.load(str(tmp_path / "private"), public_dataset=str(tmp_path / "other_names"))
  with pytest.raises(ValueError, match=r"input shape \(5, 6, 1\) vs \(6, 6, 1\)"):
    data.load(str(tmp_path / "private"), public_dataset=str(tmp_path / "other_size"))
  splits = data.load(str(tmp_path / "private"), public_dataset=str(tmp_path / "other_size"),
                     image_size=(6, 6))
  assert splits.public[0].shape == (4, 6, 6, 1)


@pytest.mark.parametrize("options, phrase", [
    (dict(label_column="y"), "--label_column applies to datasets read from a .csv file"),
    (dict(num_classes=3), "--num_classes applies"),
    (dict(image_size=(8, 8)), "--image_size applies to datasets read from a folder"),
])
def test_file_options_without_such_a_file_are_refused(options, phrase):
  with pytest.raises(data.DataError, match=phrase):
    data.load(**options)


def test_file_errors_are_data_errors():
  with pytest.raises(data.DataError, match="does not exist"):
    data.load("/nonexistent/tfdp_prune_data")


def test_from_arrays_fills_the_info_and_checks_the_parts():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 4))
  y = np.arange(30) % 3
  splits = tfdp_prune.DataSplits.from_arrays(public=(x[:5], y[:5]), private=(x[5:25], y[5:25]),
                                             test=(x[25:], y[25:]), num_classes=3)
  info = splits.info
  assert (info.num_public, info.num_private, info.num_test, info.num_classes,
          info.input_shape, info.dataset) == (5, 20, 5, 3, (4,), "arrays")
  assert splits.private[0].dtype == np.float32 and splits.private[1].dtype == np.int32
  assert data.check_splits(splits) == 0  # what train() runs on given splits
  with pytest.raises(data.OverlapError, match=r"1 private example\(s\)"):
    tfdp_prune.DataSplits.from_arrays(public=(x[:6], y[:6]), private=(x[5:], y[5:]),
                                      num_classes=3)
  with pytest.raises(data.DataError, match="Received 1 of 20 labels"):
    tfdp_prune.DataSplits.from_arrays(public=(x[:5], y[:5]),
                                      private=(x[5:25], np.r_[y[5:24], 3]), num_classes=3)
  with pytest.raises(TypeError, match="num_classes"):
    tfdp_prune.DataSplits.from_arrays(public=(x[:5], y[:5]), private=(x[5:], y[5:]))
  with pytest.raises(data.DataError, match="private inputs' shape"):
    tfdp_prune.DataSplits.from_arrays(public=(x[:5, :3], y[:5]), private=(x[5:], y[5:]),
                                      num_classes=3)
  bad = x[:5].copy()
  bad[0, 0] = np.nan
  with pytest.raises(data.DataError, match="finite public inputs"):
    tfdp_prune.DataSplits.from_arrays(public=(bad, y[:5]), private=(x[5:], y[5:]),
                                      num_classes=3)


def test_a_relative_folder_without_dot_slash_is_a_tfds_name_and_the_error_says_so(tmp_path,
                                                                                  monkeypatch):
  write_image_folder(tmp_path / "scans", classes=("a", "b"), per_class=5, size=(4, 4))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(data.DatasetNotAvailableError, match="write './scans' to read it"):
    data.load("scans", data_dir=str(tmp_path / "tfds"))
  assert data.load("./scans").info.class_names == ("a", "b")

