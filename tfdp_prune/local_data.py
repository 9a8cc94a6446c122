"""Datasets in the user's files: a folder of class folders of images, a CSV file, an NPZ file.

`read(path, ...)` returns every example of one such source as `LocalDataset(x, y, class_names)`
in file order; `tfdp_prune.data` puts it in its stratified, seeded order and slices it with the
split syntax (the module docstring of `data` describes the whole path). Every unusable input is
a `LocalDataError` that names the file and the fix.

Where the classes come from: the number of classes is the model's output size, which every
export publishes, so it must not be derived from private records (one private example with a
label nobody else has would show in it). For an image folder the classes are its sub-folders
(the user's schema); for CSV and NPZ files the user declares them (`num_classes`) and the labels
must be integers 0..num_classes-1. Text labels are refused: the set of texts found in a private
file is not a schema.
"""

import csv
import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

from tfdp_prune.compat import tf

# The extensions tf_keras.utils.image_dataset_from_directory reads (compared in lower case).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
TABULAR_EXTENSIONS = (".csv", ".npz")
NPZ_KEYS = ("x", "y")
_PATH_PREFIXES = ("/", "./", "../", "~")


class LocalDataError(ValueError):
  """A file or folder given as a dataset is missing or unusable."""


@dataclasses.dataclass(frozen=True, eq=False)
class LocalDataset:
  """Every example of one source: x float32 (images in [0, 1]), y int32 class ids in
  0..num_classes-1; the class folders' names in class-id order (None for CSV and NPZ files)."""

  x: np.ndarray
  y: np.ndarray
  num_classes: int
  class_names: Optional[Tuple[str, ...]]


def is_path(name: str) -> bool:
  """Whether a `--dataset` value names a file or folder rather than a TFDS dataset.

  TFDS names may contain "/" (config names: "glue/cola"), so a relative folder is written with
  "./"; a name ending in .csv or .npz is always a file."""
  return name.startswith(_PATH_PREFIXES) or name.lower().endswith(TABULAR_EXTENSIONS)


def read(path: str, *, label_column: Optional[str] = None, num_classes: Optional[int] = None,
         image_size: Optional[Tuple[int, int]] = None) -> LocalDataset:
  """Every example of the folder or file at `path` (see the module docstring).

  Args:
    path: a folder of class folders of images, a .csv file or a .npz file.
    label_column: the CSV column holding the labels (CSV only; required there).
    num_classes: the number of classes of a CSV or NPZ file (required there); for a folder it
      must equal the number of class folders when given.
    image_size: (height, width) every image is resized to; None requires one size throughout.

  Raises:
    LocalDataError: naming the path and the fix.
  """
  expanded = os.path.expanduser(path)
  if not os.path.exists(expanded):
    raise LocalDataError(f"Expected {path!r} to be an existing folder of class folders of "
                         f"images, a .csv or a .npz file. Received a path that does not exist.")
  if os.path.isdir(expanded):
    return read_image_folder(expanded, image_size=image_size, num_classes=num_classes)
  suffix = os.path.splitext(expanded)[1].lower()
  if suffix == ".csv":
    return read_csv(expanded, label_column=label_column, num_classes=num_classes)
  if suffix == ".npz":
    return read_npz(expanded, num_classes=num_classes)
  raise LocalDataError(f"Expected {path!r} to be a folder of class folders of images, a .csv or "
                       f"a .npz file. Received a file with "
                       f"{f'the extension {suffix!r}' if suffix else 'no extension'}.")


def read_image_folder(root: str, *, image_size: Optional[Tuple[int, int]] = None,
                      num_classes: Optional[int] = None) -> LocalDataset:
  """Images of `root/<class name>/**/<image>`, as tf_keras.utils.image_dataset_from_directory
  and TFDS's ImageFolder read them: classes are the sub-folders in sorted order, a label is its
  class's index. Files with other extensions and files directly in `root` are ignored."""
  class_names = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
  if not class_names:
    raise LocalDataError(f"Expected {root} to hold one sub-folder per class, each with images "
                         f"({', '.join(IMAGE_EXTENSIONS)}). Received a folder without "
                         "sub-folders.")
  if num_classes is not None and num_classes != len(class_names):
    raise LocalDataError(f"Expected {num_classes} class folders in {root} (--num_classes). "
                         f"Received {len(class_names)}: {list(class_names)}.")
  files, labels = [], []
  for label, name in enumerate(class_names):
    found = _image_files(os.path.join(root, name))
    if not found:
      raise LocalDataError(f"Expected images ({', '.join(IMAGE_EXTENSIONS)}) in the class folder "
                           f"{os.path.join(root, name)}. Received a folder without any. Add "
                           "images or remove the folder (every sub-folder is a class).")
    files += found
    labels += [label] * len(found)
  images = [_decode_image(path, image_size) for path in files]
  _check_one_shape(images, files, image_size is not None)
  return LocalDataset(x=np.stack(images), y=np.asarray(labels, np.int32),
                      num_classes=len(class_names), class_names=class_names)


def read_csv(path: str, *, label_column: Optional[str],
             num_classes: Optional[int]) -> LocalDataset:
  """A CSV file with a header row: `label_column` holds integer labels, every other column is a
  numeric feature (float32)."""
  with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
    rows = list(csv.reader(f))
  if not rows:
    raise LocalDataError(f"Expected {path} to start with a header row. Received an empty file.")
  header, rows = rows[0], [row for row in rows[1:] if row]
  if label_column is None or label_column not in header:
    given = "no --label_column" if label_column is None else f"--label_column={label_column!r}"
    raise LocalDataError(f"Expected --label_column to name the label column of {path}, one of "
                         f"{header}. Received {given}.")
  lengths = sorted({len(row) for row in rows} - {len(header)})
  if lengths:
    raise LocalDataError(f"Expected every row of {path} to have the header's {len(header)} "
                         f"fields. Received rows of {lengths} fields.")
  if not rows:
    raise LocalDataError(f"Expected rows below the header of {path}. Received none.")
  values = np.asarray(rows, dtype=str)
  label_index = header.index(label_column)
  feature_names = [name for i, name in enumerate(header) if i != label_index]
  features = values[:, [i for i in range(len(header)) if i != label_index]]
  text = [name for j, name in enumerate(feature_names) if not _is_numeric(features[:, j])]
  if text:
    raise LocalDataError(f"Expected numeric feature columns in {path}. Received non-numeric "
                         f"(or empty) values in the columns {text}. Encode them as numbers, or "
                         "remove those columns.")
  x = features.astype(np.float64).astype(np.float32)
  _check_finite(x, path, feature_names)
  y = class_ids(values[:, label_index], num_classes, f"column {label_column!r} of {path}")
  return LocalDataset(x=x, y=y, num_classes=num_classes, class_names=None)


def read_npz(path: str, *, num_classes: Optional[int]) -> LocalDataset:
  """An NPZ file (numpy.savez) holding features `x` (numeric, any shape per example) and
  integer labels `y`."""
  try:
    with np.load(path, allow_pickle=False) as arrays:
      missing = [key for key in NPZ_KEYS if key not in arrays.files]
      if missing:
        raise LocalDataError(f"Expected arrays named {list(NPZ_KEYS)} in {path} (saved with "
                             f"numpy.savez(path, x=features, y=labels)). Received the names "
                             f"{sorted(arrays.files)}.")
      x, y = arrays["x"], arrays["y"]
  except (OSError, ValueError) as error:
    if isinstance(error, LocalDataError):
      raise
    raise LocalDataError(f"Expected {path} to be a readable .npz file (numpy.savez). Received a "
                         f"file numpy cannot read ({error}).") from None
  if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or not len(y):
    raise LocalDataError(f"Expected in {path} x of shape (N, ...) and y of shape (N,), N > 0. "
                         f"Received x {x.shape}, y {y.shape}.")
  if x.dtype.kind not in "biuf":
    raise LocalDataError(f"Expected numeric x in {path}. Received dtype {x.dtype}.")
  x = x.astype(np.float32)
  _check_finite(x.reshape(len(x), -1), path, None)
  y = class_ids(y, num_classes, f"y of {path}")
  return LocalDataset(x=x, y=y, num_classes=num_classes, class_names=None)


def class_ids(values, num_classes, where) -> np.ndarray:
  """`values` as int32 class ids; raises LocalDataError unless each is an integer in
  0..num_classes-1 (`where` names them in the message)."""
  if num_classes is None:
    raise LocalDataError(
        f"Expected --num_classes (labels 0..num_classes-1) for {where}: the number of classes "
        "is published with the model, so it is declared, not counted from private labels.")
  try:
    numbers = np.asarray(values).astype(np.float64)
  except ValueError:
    raise LocalDataError(
        f"Expected integer labels 0..{num_classes - 1} in {where}. Received text labels. Encode "
        "them as integers in a fixed order of your class names (e.g. sorted): the set of texts "
        "found in private data is not published as classes.") from None
  valid = np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= 0) & (
      numbers < num_classes)
  if not valid.all():
    raise LocalDataError(f"Expected integer labels 0..{num_classes - 1} (--num_classes="
                         f"{num_classes}) in {where}. Received {int((~valid).sum())} of "
                         f"{len(numbers)} labels outside that range or not integers.")
  return numbers.astype(np.int32)


# ---- internals ---------------------------------------------------------------------------------


def _image_files(folder):
  found = []
  for directory, subdirs, names in os.walk(folder, followlinks=True):
    subdirs.sort()
    found += [os.path.join(directory, name) for name in sorted(names)
              if name.lower().endswith(IMAGE_EXTENSIONS)]
  return found


def _decode_image(path, image_size):
  """float32 (height, width, channels) in [0, 1], resized to image_size when given.

  Scaled as `data` scales TFDS images (uint8 / 255 in numpy), so the same picture read from a
  file and from TFDS has the same values and the overlap check finds it."""
  try:
    image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
    raise LocalDataError(f"Expected a readable image at {path}. Received a file TensorFlow "
                         f"cannot decode ({error.message.splitlines()[0]}). Repair or remove "
                         "it.") from None
  image = image.astype(np.float32) / np.float32(255.0)
  if image_size is not None:
    image = np.clip(tf.image.resize(image, image_size, antialias=True).numpy(), 0.0, 1.0)
  return image


def _check_one_shape(images, files, resized):
  shapes = {}
  for image, path in zip(images, files):
    shapes.setdefault(image.shape, path)
  if len(shapes) <= 1:
    return
  examples = "; ".join(f"{shape} in {path}" for shape, path in sorted(shapes.items())[:3])
  if resized or len({shape[:2] for shape in shapes}) == 1:
    raise LocalDataError(f"Expected one number of channels in every image. Received "
                         f"{len(shapes)} shapes (height, width, channels): {examples}. Convert "
                         "the images to one mode (e.g. all RGB or all grayscale).")
  raise LocalDataError(f"Expected every image to have one size. Received {len(shapes)} shapes "
                       f"(height, width, channels): {examples}. Pass --image_size=HEIGHTxWIDTH "
                       "(e.g. --image_size=32x32) to resize every image to it.")


def _is_numeric(column) -> bool:
  try:
    column.astype(np.float64)
  except ValueError:
    return False
  return True


def _check_finite(x, path, feature_names):
  bad_rows = ~np.isfinite(x).all(axis=1)
  if not bad_rows.any():
    return
  # Counts and column names (the schema) only: no row of the data is printed.
  where = ""
  if feature_names is not None:
    columns = [name for j, name in enumerate(feature_names) if not np.isfinite(x[:, j]).all()]
    where = f" in the columns {columns}"
  raise LocalDataError(f"Expected finite features in {path}. Received NaN or inf in "
                       f"{int(bad_rows.sum())} of {len(x)} examples{where}. Impute or remove "
                       "the missing or infinite values.")
