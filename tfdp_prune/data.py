"""Data by name: a PUBLIC part, a disjoint PRIVATE part and a test part, as numpy arrays.

`load(dataset="digits", ...)` returns `DataSplits` from digits (embedded), a TFDS name or your
files; `DataSplits.from_arrays` takes arrays in memory; `check_splits` runs the privacy checks
(public and private disjoint, the public fingerprint) on splits built elsewhere.

Design: docs/data.md
"""

import dataclasses
import glob
import os
import types
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import local_data
from tfdp_prune import overlap

DIGITS = "digits"
ARRAYS = "arrays"  # what DataSplits.from_arrays records as the dataset and split
_DIGITS_SIZE = 1797
DEFAULT_SPLITS = {
    DIGITS: ("train[:10%]", "train[10%:80%]", "train[80%:]"),
    "tfds": ("train[:2%]", "train[2%:]", "test"),
}


class DataError(ValueError):
  """The data given or selected is unusable: an empty part, non-finite public inputs, parts of
  different shapes (overlapping parts raise `OverlapError`)."""


OverlapError = overlap.OverlapError


class DatasetNotAvailableError(DataError):
  """The dataset is unknown, or known to TFDS but not prepared on this machine."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What was loaded, for logs and the privacy metadata (`to_dict()` is JSON-compatible)."""

  dataset: str
  public_dataset: str
  public_split: str
  private_split: str
  test_split: Optional[str]
  num_public: int
  num_private: int
  num_test: int
  num_classes: int
  input_shape: Tuple[int, ...]
  public_fingerprint: overlap.PublicDataFingerprint
  overlap_count: int
  seed: int
  class_names: Optional[Tuple[str, ...]] = None  # the class folders' names, in class-id order

  def to_dict(self) -> Dict[str, Any]:
    result = dataclasses.asdict(self)
    result["input_shape"] = list(self.input_shape)
    result["public_fingerprint"] = self.public_fingerprint.to_dict()
    if self.class_names is None:  # records written before class_names read back the same
      del result["class_names"]
    else:
      result["class_names"] = list(self.class_names)
    return result

  @classmethod
  def from_dict(cls, data: Dict[str, Any]) -> "DataInfo":
    names = data.get("class_names")
    return cls(**dict(
        data, input_shape=tuple(data["input_shape"]),
        public_fingerprint=overlap.PublicDataFingerprint.from_dict(data["public_fingerprint"]),
        class_names=None if names is None else tuple(names)))


@dataclasses.dataclass(frozen=True, eq=False)
class DataSplits:
  """`public`, `private` and `test` as `(x, y)` numpy pairs (x float32 in [0, 1] for images
  stored as uint8, y int32 class ids); `test` is None without a test split."""

  public: Tuple[np.ndarray, np.ndarray]
  private: Tuple[np.ndarray, np.ndarray]
  test: Optional[Tuple[np.ndarray, np.ndarray]]
  info: DataInfo

  def __post_init__(self):
    for name in ("public", "private", "test"):
      part = getattr(self, name)
      if part is None and name == "test":
        continue
      if not (isinstance(part, tuple) and len(part) == 2 and len(part[0]) == len(part[1])):
        raise ValueError(f"Expected {name}=(x, y) with as many labels as examples. Received: "
                         f"{type(part).__name__}.")

  @classmethod
  def from_arrays(cls, *, public, private, test=None, num_classes: int,
                  name: str = ARRAYS) -> "DataSplits":
    """Splits from numpy arrays in memory, checked as `load` checks its parts.

    Args:
      public, private: `(x, y)` pairs; x numeric (any shape per example, the same for both),
        y integer class ids in 0..num_classes-1.
      test: an `(x, y)` pair for the test accuracy, or None.
      num_classes: the model's number of outputs. Declared, never counted from the labels:
        every export publishes it, and a count taken from private labels would reveal a class
        only one private example has.
      name: what the metadata records as the dataset (e.g. where the arrays came from).

    x is converted to float32 as it is, not rescaled (`load` scales uint8 images by 1/255:
    do the same for arrays of such images).

    Raises:
      DataError: a part is empty or malformed, labels outside 0..num_classes-1, non-finite or
        differently shaped public inputs.
      OverlapError: a private example is in the public part (there is no switch: a
        DataSplits given to `train` must pass `check_splits`).
    """
    _validate.positive_int("num_classes", num_classes)
    if not isinstance(name, str) or not name:
      raise ValueError(f"Expected name to be a non-empty string (the dataset the metadata "
                       f"records). Received: name={name!r}.")
    parts = {"public": public, "private": private, "test": test}
    for part_name, part in parts.items():
      if part is not None:
        parts[part_name] = _as_part(part_name, part, num_classes)
    public, private, test = parts["public"], parts["private"], parts["test"]
    check_part("private", private, source="private=")
    check_part("public", public, np.shape(private[0])[1:], source="public=")
    if test is not None:
      check_part("test", test, np.shape(private[0])[1:], source="test=")
    public_counts, overlap_count = _check_disjoint(public, private, allow_overlap=False)
    info = DataInfo(
        dataset=name, public_dataset=name, public_split=ARRAYS, private_split=ARRAYS,
        test_split=None if test is None else ARRAYS, num_public=len(public[1]),
        num_private=len(private[1]), num_test=0 if test is None else len(test[1]),
        num_classes=num_classes, input_shape=tuple(int(d) for d in private[0].shape[1:]),
        public_fingerprint=overlap.PublicDataFingerprint.from_fingerprints(public_counts),
        overlap_count=overlap_count, seed=0)
    return cls(public=public, private=private, test=test, info=info)


def load(dataset: str = DIGITS, public_split: Optional[str] = None,
         private_split: Optional[str] = None, test_split: Optional[str] = "default",
         public_dataset: Optional[str] = None, seed: int = 0, allow_overlap: bool = False,
         data_dir: Optional[str] = None, download: bool = False, *,
         label_column: Optional[str] = None, num_classes: Optional[int] = None,
         image_size: Optional[Tuple[int, int]] = None) -> DataSplits:
  """Loads the public, private and test parts of `dataset` (see the module docstring).

  Args:
    dataset: "digits" (embedded), a TFDS name, optionally with config/version ("mnist",
      "cifar10", "mnist:3.*.*"), or a path: a folder of class folders of images, a .csv or a
      .npz file (`local_data`).
    public_split, private_split, test_split: TFDS split strings; None (public/private) or
      "default" (test) takes the source's default; test_split=None loads no test part.
    public_dataset: the dataset of the public part, in the same forms; None means `dataset`.
    seed: orders digits and files (a stratified split per seed); TFDS splits do not depend on
      it.
    allow_overlap: passed to `overlap.check_disjoint`.
    data_dir: the TFDS data directory (default: TFDS's, `$TFDS_DATA_DIR` or
      ~/tensorflow_datasets).
    download: let TFDS download and prepare a missing dataset (needs internet). False by default:
      a dataset not prepared here raises `DatasetNotAvailableError` instead of a download.
    label_column: the label column of CSV files (required for them, refused without one).
    num_classes: the classes of CSV and NPZ files (required for them); for an image folder, the
      number of class folders it must have.
    image_size: (height, width) every image of a folder is resized to; None requires one size.
  """
  _check_name("dataset", dataset)
  public_dataset = dataset if public_dataset is None else public_dataset
  _check_name("public_dataset", public_dataset)
  _validate.non_negative_int("seed", seed)
  for name, value in (("allow_overlap", allow_overlap), ("download", download)):
    _validate.boolean(name, value)
  _check_file_options((dataset, public_dataset), label_column, num_classes, image_size)
  defaults = _default_splits(dataset, public_dataset)
  public_split = defaults[0] if public_split is None else public_split
  private_split = defaults[1] if private_split is None else private_split
  test_split = defaults[2] if test_split == "default" else test_split
  files = {}  # each file or folder is read once, however many parts come from it
  def read(name, split):
    if local_data.is_path(name):
      return _read_file(name, split, seed, files, label_column=label_column,
                        num_classes=num_classes, image_size=image_size)
    return _read(name, split, seed, data_dir, download) + (None,)

  private, num_classes, class_names = read(dataset, private_split)
  check_part("private", private, source=f"split {private_split!r} of {dataset!r}")
  public, public_classes, public_names = read(public_dataset, public_split)
  if public_dataset != dataset:
    _check_compatible(dataset, private, num_classes, public_dataset, public, public_classes)
    _check_same_class_names(dataset, class_names, public_dataset, public_names)
  check_part("public", public, private[0].shape[1:],
             source=f"split {public_split!r} of {public_dataset!r}")
  public_counts, overlap_count = _check_disjoint(public, private, allow_overlap)
  test = read(dataset, test_split)[0] if test_split is not None else None
  info = DataInfo(
      dataset=dataset, public_dataset=public_dataset, public_split=str(public_split),
      private_split=str(private_split), test_split=None if test_split is None else str(test_split),
      num_public=len(public[1]), num_private=len(private[1]),
      num_test=0 if test is None else len(test[1]), num_classes=num_classes,
      input_shape=tuple(int(d) for d in private[0].shape[1:]),
      public_fingerprint=overlap.PublicDataFingerprint.from_fingerprints(public_counts),
      overlap_count=overlap_count, seed=seed, class_names=class_names)
  return DataSplits(public=public, private=private, test=test, info=info)


def check_splits(splits: DataSplits, allow_overlap: bool = False) -> int:
  """Runs `load`'s privacy checks on splits that did not come from `load` as they are.

  The public and private parts must be disjoint (`overlap.check_disjoint`: the same check and
  the same error as `load`), and `splits.info.public_fingerprint` must be the public part's (the
  privacy metadata publishes it as the identity of the data the masks were chosen from).

  Args:
    splits: the parts to check, e.g. built by hand or changed after `load`.
    allow_overlap: passed to `overlap.check_disjoint`, as by `load`.

  Returns:
    The number of private examples found in the public part (0 unless allow_overlap).

  Raises:
    DataError: a part is empty, the public inputs are not finite or not of the private
      inputs' shape (`check_part`).
    OverlapError: the parts overlap (without allow_overlap).
    ValueError: the fingerprint in `splits.info` is not that of `splits.public`.
  """
  if not isinstance(splits, DataSplits):
    raise TypeError(f"Expected a tfdp_prune.data.DataSplits. Received: {type(splits).__name__}.")
  check_part("private", splits.private, source="splits.private")
  check_part("public", splits.public, np.shape(splits.private[0])[1:], source="splits.public")
  public_counts, overlap_count = _check_disjoint(splits.public, splits.private, allow_overlap)
  fingerprint = overlap.PublicDataFingerprint.from_fingerprints(public_counts)
  if splits.info.public_fingerprint != fingerprint:
    recorded = splits.info.public_fingerprint
    raise ValueError(
        f"Expected splits.info.public_fingerprint to be the fingerprint of splits.public (the "
        f"privacy metadata records it). Received: sha256 {recorded.sha256[:12]}... over "
        f"{recorded.num_examples} examples in info, but the public part has sha256 "
        f"{fingerprint.sha256[:12]}... over {fingerprint.num_examples}. After changing the "
        "public part, set info.public_fingerprint=PublicDataFingerprint.from_data(public).")
  return overlap_count


def check_part(name: str, part, input_shape=None, *, source: str = "") -> None:
  """Checks one (x, y) part: non-empty, one label per example, inputs of `input_shape` (when
  given) and, for the public part, finite inputs.

  Non-finite PRIVATE inputs are left to the DP optimizer, which drops and counts such examples
  (their gradient is not finite); public data has no such guard (public pre-training and the
  mask rules read it without clipping), so a NaN or inf there would silently spread to the
  weights or the masks.

  Raises:
    DataError: naming the part (`name`, and `source`: where it came from) and the fix.
  """
  where = f"the {name} part" + (f" ({source})" if source else "")
  x, y = part
  if len(y) == 0:
    raise DataError(f"Expected a non-empty {name} part. Received: {where} has 0 examples. Select "
                    f"a split with examples (e.g. 'train[:10%]').")
  if np.ndim(y) < 1 or len(x) != len(y):
    raise DataError(f"Expected {where} to be (x, y) with one label per example. Received: x "
                    f"of shape {np.shape(x)}, y of shape {np.shape(y)}.")
  if input_shape is not None and tuple(np.shape(x)[1:]) != tuple(input_shape):
    raise DataError(f"Expected the inputs of {where} to have the private inputs' shape "
                    f"{tuple(input_shape)}. Received: {tuple(np.shape(x)[1:])}.")
  if name == "public" and np.issubdtype(np.asarray(x).dtype, np.floating):
    bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(y), -1).all(axis=1)))
    if bad:
      raise DataError(f"Expected finite public inputs. Received: {bad} of the {len(y)} examples "
                      f"of {where} hold NaN or inf. Remove or repair them: public pre-training "
                      "and the mask rules would turn them into NaN weights or masks.")


def digits_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """The stratified order of the module docstring: indices into `labels`."""
  rng = np.random.default_rng(seed)
  positions = np.empty(len(labels), np.float64)
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    positions[members] = (np.arange(len(members)) + 0.5) / len(members)
  # Ties in position (classes of equal size) are broken by the label, then the index.
  return np.lexsort((np.arange(len(labels)), labels, positions))


# ---- internals ---------------------------------------------------------------------------------


def _check_disjoint(public, private, allow_overlap):
  """(the public part's fingerprint counts, the overlap count); raises on an overlap unless
  allow_overlap. One code path for `load` and `check_splits`."""
  public_counts = overlap.fingerprint_examples(public)
  return public_counts, overlap.check_disjoint(public_counts, private,
                                               allow_overlap=allow_overlap)


def _check_name(name, value):
  if not isinstance(value, str) or not value:
    raise ValueError(f"Expected {name} to be a dataset name (a non-empty string: 'digits', a "
                     f"TensorFlow Datasets name, or the path of a folder of class folders of "
                     f"images, a .csv or a .npz file). Received: {name}={value!r}.")


def _default_splits(dataset, public_dataset):
  """(public, private, test) split defaults: a file's defaults are digits', except that a public
  part from another file takes all of it, and the private part then starts at the beginning."""
  kind = lambda name: DIGITS if name == DIGITS or local_data.is_path(name) else "tfds"
  public, private, test = DEFAULT_SPLITS[kind(dataset)]
  if public_dataset != dataset:
    public = DEFAULT_SPLITS[kind(public_dataset)][0]
    if local_data.is_path(dataset):
      private = "train[:80%]"
    if local_data.is_path(public_dataset):
      public = "train"
  return public, private, test


def _check_file_options(names, label_column, num_classes, image_size):
  """The options of files are refused when no part comes from a file they apply to."""
  paths = [name for name in names if local_data.is_path(name)]
  csv_files = [name for name in paths if name.lower().endswith(".csv")]
  folders = [name for name in paths
             if not name.lower().endswith(local_data.TABULAR_EXTENSIONS)]
  unused = [(label_column, "--label_column", "a .csv file", csv_files),
            (num_classes, "--num_classes", "a folder, .csv or .npz file", paths),
            (image_size, "--image_size", "a folder of images", folders)]
  for value, flag, kind, users in unused:
    if value is not None and not users:
      raise DataError(f"{flag} applies to datasets read from {kind}. Received {flag}={value!r} "
                      f"with --dataset={names[0]!r}, --public_dataset={names[1]!r}. Drop {flag}.")
  if num_classes is not None:
    _validate.positive_int("num_classes", num_classes)


def _check_same_class_names(dataset, names, public_dataset, public_names):
  """Two image folders must name the same classes (the labels are indices into those names)."""
  if names is not None and public_names is not None and names != public_names:
    raise DataError(f"Expected the class folders of {public_dataset!r} to be those of "
                    f"{dataset!r} (a label is the index of its folder's name). Received "
                    f"{list(public_names)} vs {list(names)}.")


def _as_part(name, part, num_classes):
  """(x float32, y int32 class ids) of one `from_arrays` part."""
  if not (isinstance(part, (tuple, list)) and len(part) == 2):
    raise DataError(f"Expected {name}=(x, y). Received: {type(part).__name__}"
                    f"{f' of {len(part)} elements' if isinstance(part, (tuple, list)) else ''}.")
  x, y = np.asarray(part[0]), np.asarray(part[1])
  if x.dtype.kind not in "biuf" or x.ndim < 1:
    raise DataError(f"Expected numeric {name} inputs of shape (N, ...). Received dtype "
                    f"{x.dtype}, shape {x.shape}.")
  if y.ndim != 1 or len(y) != len(x):
    raise DataError(f"Expected {name} labels of shape ({len(x)},), one per example. Received "
                    f"shape {y.shape}.")
  try:
    y = local_data.class_ids(y, num_classes, f"the {name} labels")
  except local_data.LocalDataError as error:
    raise DataError(str(error)) from None
  return x.astype(np.float32), y


def _read(name, split, seed, data_dir, download):
  """((x, y), num_classes) of one split of one dataset."""
  if not isinstance(split, str) or not split:
    raise ValueError(f"Expected a TFDS split string such as 'train[:10%]'. Received: {split!r}.")
  if name == DIGITS:
    return _read_digits(split, seed)
  return _read_tfds(name, split, data_dir, download)


def _read_digits(split, seed):
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  x, y = sk_datasets.load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  return _slice_train(x, y, split, seed, "'digits'"), 10


def _read_file(path, split, seed, cache, **options):
  """((x, y), num_classes, class_names) of one split of a folder or file (`local_data`)."""
  if not isinstance(split, str) or not split:
    raise ValueError(f"Expected a TFDS split string such as 'train[:10%]'. Received: {split!r}.")
  if path not in cache:
    try:
      cache[path] = local_data.read(path, **options)
    except local_data.LocalDataError as error:
      raise DataError(str(error)) from None
  source = cache[path]
  return (_slice_train(source.x, source.y, split, seed, repr(path)), source.num_classes,
          source.class_names)


def _slice_train(x, y, split, seed, where):
  """The examples of `split` of a one-split ("train") source, in the stratified order of `seed`
  (the module docstring)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  order = digits_order(y, seed)
  x, y = x[order], y[order]
  infos = {"train": types.SimpleNamespace(num_examples=len(y), shard_lengths=[len(y)])}
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  except ValueError as error:
    raise ValueError(f"Invalid split {split!r} for {where}, which has one split, 'train', of "
                     f"{len(y)} examples (e.g. 'train[:10%]', 'train[100:]'): {error}") from None
  # TFDS writes a slice that starts at 0 or ends at the split's end with None.
  indices = np.concatenate([np.arange(i.from_ or 0, len(y) if i.to is None else i.to,
                                      dtype=np.int64) for i in instructions])
  return x[indices], y[indices]


def _read_tfds(name, split, data_dir, download):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    here = (f" A file or folder {name!r} exists here: write './{name}' to read it (a relative "
            "path starts with './')." if os.path.exists(name) else "")
    raise DatasetNotAvailableError(
        f"Unknown dataset {name!r}: it is neither 'digits' nor a TensorFlow Datasets builder "
        f"({str(error).splitlines()[0]}).{here} {_available_offline(data_dir)}") from None
  try:
    dataset = tfds.load(name, split=split, as_supervised=True, data_dir=data_dir,
                        download=download, shuffle_files=False)
  except AssertionError as error:  # TFDS's way to say "not prepared" when download=False
    if "could not find data" not in str(error):
      raise
    raise DatasetNotAvailableError(
        f"The TensorFlow Datasets dataset {name!r} is not prepared in "
        f"{builder.data_dir_root or data_dir}, and download=False. Prepare it on a machine with "
        f"internet (`tfds.builder({name!r}).download_and_prepare()`) and copy its folder into "
        f"the TFDS data directory, pass download=True (needs internet), or use the embedded "
        f"dataset='digits'. {_available_offline(data_dir)}") from None
  x, y = _to_numpy(dataset, tf)
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / np.float32(255.0)
  return (x, y.astype(np.int32)), _num_classes(builder, name)


def _to_numpy(dataset, tf):
  """All (x, y) of a finite dataset as two numpy arrays (one batch when the size is known)."""
  size = int(dataset.cardinality())
  if size == 0:
    raise ValueError("Expected a non-empty split. Received a split with 0 examples.")
  if size > 0:
    x, y = dataset.batch(size).get_single_element()
    return x.numpy(), y.numpy()
  if size == int(tf.data.INFINITE_CARDINALITY):
    raise ValueError("Expected a finite split. Received an infinite dataset.")
  xs, ys = [], []
  for x, y in dataset.batch(4096).as_numpy_iterator():
    xs.append(x)
    ys.append(y)
  if not xs:
    raise ValueError("Expected a non-empty split. Received a split with 0 examples.")
  return np.concatenate(xs), np.concatenate(ys)


def _num_classes(builder, name):
  keys = builder.info.supervised_keys
  label = keys[1] if keys else None
  feature = builder.info.features[label] if label is not None else None
  num_classes = getattr(feature, "num_classes", None)
  if not num_classes:
    raise ValueError(f"Expected {name!r} to have a class label (a tfds ClassLabel as its "
                     f"supervised target). Received supervised_keys={keys!r}.")
  return int(num_classes)


def _check_compatible(dataset, private, num_classes, public_dataset, public, public_classes):
  shape, public_shape = private[0].shape[1:], public[0].shape[1:]
  if shape != public_shape or num_classes != public_classes:
    raise ValueError(
        f"Expected the public dataset {public_dataset!r} to match the private dataset "
        f"{dataset!r}: the same input shape and number of classes (one model trains on both). "
        f"Received input shape {tuple(public_shape)} vs {tuple(shape)}, {public_classes} vs "
        f"{num_classes} classes.")
  if public[0].dtype != private[0].dtype:
    raise ValueError(f"Expected the public and private inputs to have the same dtype. Received "
                     f"{public[0].dtype} ({public_dataset!r}) vs {private[0].dtype} "
                     f"({dataset!r}).")


def _available_offline(data_dir):
  """The sentence that lists what `load` can read without internet."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  root = data_dir or tfds.core.constants.DATA_DIR
  prepared = sorted({os.path.relpath(path, root).split(os.sep)[0]
                     for depth in ("*/*", "*/*/*")
                     for path in glob.glob(os.path.join(root, depth, "dataset_info.json"))})
  listed = ", ".join(repr(name) for name in prepared) if prepared else "none"
  return (f"Available offline: 'digits' (scikit-learn's digits, embedded) and the TFDS datasets "
          f"prepared in {root}: {listed}.")
