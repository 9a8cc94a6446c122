"""Reading the user's own files: image class folders, CSV and NPZ, and every way they can be bad."""

import os

import numpy as np
import pytest

from tfdp_prune import local_data
from tests.tfdp_prune._testing import write_csv
from tests.tfdp_prune._testing import write_image_folder
from tests.tfdp_prune._testing import write_png


def test_image_folder_reads_classes_sorted_and_pixels_exactly(tmp_path):
  images = write_image_folder(tmp_path / "data", classes=("zebra", "ant", "moth"), per_class=3,
                              size=(5, 7), channels=3)
  (tmp_path / "data" / "README.txt").write_text("files beside the class folders are ignored")
  (tmp_path / "data" / "ant" / "notes.txt").write_text("so are files that are not images")
  write_png(tmp_path / "data" / "moth" / "more" / "x.png", np.full((5, 7, 3), 255, np.uint8))
  read = local_data.read(str(tmp_path / "data"))
  assert read.class_names == ("ant", "moth", "zebra") and read.num_classes == 3
  assert read.x.shape == (10, 5, 7, 3) and read.x.dtype == np.float32
  np.testing.assert_array_equal(read.y, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # moth/more/x.png last
  expected = [images[os.path.join(str(tmp_path / "data"), name, f"{i:03d}.png")]
              for name in ("ant", "moth") for i in range(3)]
  np.testing.assert_array_equal(read.x[:6], np.stack(expected) / np.float32(255))
  assert read.x[6].min() == 1.0


def test_mixed_image_sizes_are_refused_unless_an_image_size_is_given(tmp_path):
  write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=(8, 8))
  write_png(tmp_path / "d" / "b" / "big.png", np.zeros((12, 10, 1), np.uint8))
  with pytest.raises(local_data.LocalDataError, match=r"one size.*\(12, 10, 1\).*--image_size"):
    local_data.read(str(tmp_path / "d"))
  read = local_data.read(str(tmp_path / "d"), image_size=(6, 4))
  assert read.x.shape == (5, 6, 4, 1) and 0.0 <= read.x.min() and read.x.max() <= 1.0


def test_mixed_channels_are_refused_even_when_resized(tmp_path):
  write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=(8, 8), channels=1)
  write_png(tmp_path / "d" / "a" / "rgb.png", np.zeros((8, 8, 3), np.uint8))
  for size in (None, (8, 8)):
    with pytest.raises(local_data.LocalDataError, match="one number of channels"):
      local_data.read(str(tmp_path / "d"), image_size=size)


@pytest.mark.parametrize("make, phrase", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "without sub-folders"),
    (lambda root: (root / "a").mkdir(parents=True), "images .* in the class folder .*a"),
    (lambda root: (root.mkdir(), (root / "a").mkdir(), (root / "a" / "x.png").write_text("no")),
     r"readable image at .*x\.png"),
    (lambda root: root.write_text("text"), "a file with no extension"),
])
def test_bad_folders_name_the_problem(tmp_path, make, phrase):
  root = tmp_path / "data"
  make(root)
  with pytest.raises(local_data.LocalDataError, match=phrase):
    local_data.read(str(root))


def test_folder_class_count_must_match_a_declared_num_classes(tmp_path):
  write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
  assert local_data.read(str(tmp_path / "d"), num_classes=2).num_classes == 2
  with pytest.raises(local_data.LocalDataError, match="Expected 3 class folders"):
    local_data.read(str(tmp_path / "d"), num_classes=3)


def test_csv_features_and_integer_labels(tmp_path):
  path = write_csv(tmp_path / "t.csv", ["age", "y", "dose"],
                   [[30, 1, 0.5], [41, 0, 1e-3], [25, 2.0, -2]])
  read = local_data.read(path, label_column="y", num_classes=3)
  np.testing.assert_array_equal(read.x, np.float32([[30, 0.5], [41, 1e-3], [25, -2]]))
  np.testing.assert_array_equal(read.y, [1, 0, 2])
  assert read.y.dtype == np.int32 and read.class_names is None


@pytest.mark.parametrize("header, rows, options, phrase", [
    (["a", "y"], [[1, 0]], dict(label_column="label", num_classes=2),
     r"--label_column to name the label column of .*, one of \['a', 'y'\]"),
    (["a", "y"], [[1, 0]], dict(num_classes=2), "Received no --label_column"),
    (["a", "name", "city", "y"], [[1, "ann", "oslo", 0]], dict(label_column="y", num_classes=2),
     r"non-numeric \(or empty\) values in the columns \['name', 'city'\]"),
    (["a", "b", "y"], [[1, "", 0]], dict(label_column="y", num_classes=2), r"columns \['b'\]"),
    (["a", "b", "y"], [[1, "nan", 0], [2, 3, 1], ["-inf", 1, 1]],
     dict(label_column="y", num_classes=2), r"NaN or inf in 2 of 3 examples in the columns "
     r"\['a', 'b'\]"),
    (["a", "y"], [[1, "cat"]], dict(label_column="y", num_classes=2), "Received text labels"),
    (["a", "y"], [[1, 2], [1, 0.5], [1, -1], [1, 1]], dict(label_column="y", num_classes=2),
     r"labels 0\.\.1 \(--num_classes=2\) .* Received 3 of 4"),
    (["a", "y"], [[1, 0]], dict(label_column="y"), "Expected --num_classes"),
    (["a", "y"], [[1, 0], [1]], dict(label_column="y", num_classes=2), r"rows of \[1\] fields"),
    (["a", "y"], [], dict(label_column="y", num_classes=2), "rows below the header"),
])
def test_bad_csv_files_name_the_problem(tmp_path, header, rows, options, phrase):
  path = write_csv(tmp_path / "t.csv", header, rows)
  with pytest.raises(local_data.LocalDataError, match=phrase):
    local_data.read(path, **options)


def test_npz_reads_x_and_y_and_refuses_other_names_and_bad_values(tmp_path):
  x = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)
  np.savez(tmp_path / "ok.npz", x=x, y=[0, 1, 1, 0])
  read = local_data.read(str(tmp_path / "ok.npz"), num_classes=2)
  np.testing.assert_array_equal(read.x, x.astype(np.float32))
  np.testing.assert_array_equal(read.y, [0, 1, 1, 0])
  np.savez(tmp_path / "names.npz", x_train=x, y_train=[0, 1, 1, 0])
  with pytest.raises(local_data.LocalDataError, match=r"named \['x', 'y'\].*\['x_train', "):
    local_data.read(str(tmp_path / "names.npz"), num_classes=2)
  np.savez(tmp_path / "nan.npz", x=np.float32([[0.0], [np.nan]]), y=[0, 1])
  with pytest.raises(local_data.LocalDataError, match="NaN or inf in 1 of 2 examples"):
    local_data.read(str(tmp_path / "nan.npz"), num_classes=2)
  np.savez(tmp_path / "labels.npz", x=x, y=[0, 1, 5, 0])
  with pytest.raises(local_data.LocalDataError, match="Received 1 of 4 labels"):
    local_data.read(str(tmp_path / "labels.npz"), num_classes=2)
  (tmp_path / "broken.npz").write_text("not a zip")
  with pytest.raises(local_data.LocalDataError, match="readable .npz"):
    local_data.read(str(tmp_path / "broken.npz"), num_classes=2)


def test_csv_with_a_byte_order_mark_finds_its_label_column(tmp_path):
  path = tmp_path / "excel.csv"
  path.write_bytes("\ufeffy,a\n0,1.5\n1,2\n".encode("utf-8"))
  read = local_data.read(str(path), label_column="y", num_classes=2)
  np.testing.assert_array_equal(read.y, [0, 1])


@pytest.mark.parametrize("name, is_path", [
    ("mnist", False), ("glue/cola", False), ("mnist:3.*.*", False), ("digits", False),
    ("/data/x", True), ("./x", True), ("../x", True), ("~/x", True), ("t.csv", True),
    ("D.NPZ", True)])
def test_paths_are_told_from_tfds_names(name, is_path):
  assert local_data.is_path(name) == is_path
