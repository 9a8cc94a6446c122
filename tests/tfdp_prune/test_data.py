import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfdp_prune
from tfdp_prune import data
from tfdp_prune.compat import tf
from tests.tfdp_prune._testing import fake_tfds_as_dataset

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
