"""Public/private overlap: no private example may be in the public data (DESIGN rule 4).

`check_disjoint(public, private)` raises when exact duplicates are found (compared by feature
values, labels ignored); `PublicDataFingerprint` identifies a public set for the metadata.

Design: docs/data.md
"""

import collections
import dataclasses
import hashlib
import re
from typing import Mapping

import numpy as np
from absl import logging

from tfdp_prune import _validate
from tfdp_prune.compat import tf

FINGERPRINT_VERSION = "tfdp_prune.overlap.v1"
DEFAULT_BATCH_SIZE = 1024

_HEADER = FINGERPRINT_VERSION.encode() + b"\n"
_EXACT_INT = 2 ** 53  # integers up to this magnitude are exact in float64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class OverlapError(ValueError):
  """Private examples were found in the public data. `found` says how many, without the fix
  (a caller that has no allow_overlap switch names the fix that exists for it)."""

  def __init__(self, message: str, found: str):
    super().__init__(message)
    self.found = found


def fingerprint_examples(data, batch_size: int = DEFAULT_BATCH_SIZE) -> collections.Counter:
  """Counts of the examples' fingerprints (hex sha256 digests of their features).

  Numpy data is converted `batch_size` examples at a time; a dataset is iterated once, in the
  batches it yields."""
  _validate.positive_int("batch_size", batch_size)
  counts = collections.Counter()
  for leaves in _leaf_batches(data, batch_size):
    counts.update(_digests(leaves))
  return counts


def check_disjoint(public_data, private_data, allow_overlap: bool = False,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> int:
  """Raises OverlapError (a ValueError) when private examples are in the public data; returns
  their count.

  The count includes repeats: a private example present twice in the private data counts twice.
  With `allow_overlap=True` the overlap is logged as a warning instead of raised. Either data may
  also be given as the Counter `fingerprint_examples` returned, to iterate a dataset only once."""
  _validate.boolean("allow_overlap", allow_overlap)
  public = _fingerprints(public_data, batch_size)
  private = _fingerprints(private_data, batch_size)
  shared = [digest for digest in private if digest in public]
  count = sum(private[digest] for digest in shared)
  if not count:
    return 0
  found = (f"{count} private example(s) ({len(shared)} distinct) were found in the public data "
           f"({sum(private.values())} private and {sum(public.values())} public examples, "
           f"compared by their features, labels ignored).")
  if allow_overlap:
    logging.warning("%s Continuing because allow_overlap=True: the masks are chosen from data "
                    "that contains these private examples.", found)
    return count
  raise OverlapError(
      f"{found} Expected the public and private examples to be disjoint: masks are chosen from "
      "public data at no privacy cost, so a private example in the public data reaches them "
      "without noise. Remove these examples from the public data, or pass allow_overlap=True "
      "only if the overlap is itself public (e.g. the same public-domain images are in both "
      "sets).", found)


@dataclasses.dataclass(frozen=True)
class PublicDataFingerprint:
  """Order-independent identity of a public dataset, for the privacy metadata.

  `sha256` covers every example's fingerprint with its multiplicity: the same examples in any
  order or batching give the same value; changing, adding or removing one example changes it."""

  num_examples: int
  sha256: str
  version: str = FINGERPRINT_VERSION

  def __post_init__(self):
    if (isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int)
        or self.num_examples < 0):
      raise ValueError(f"Expected num_examples to be an integer >= 0. Received: "
                       f"num_examples={self.num_examples!r}.")
    if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
      raise ValueError(f"Expected sha256 to be 64 lowercase hex digits. Received: "
                       f"sha256={self.sha256!r}.")
    if not isinstance(self.version, str) or not self.version:
      raise ValueError(f"Expected version to be a non-empty string. Received: "
                       f"version={self.version!r}.")

  @classmethod
  def from_data(cls, data, batch_size: int = DEFAULT_BATCH_SIZE) -> "PublicDataFingerprint":
    return cls.from_fingerprints(fingerprint_examples(data, batch_size))

  @classmethod
  def from_fingerprints(cls, counts: collections.Counter) -> "PublicDataFingerprint":
    digest = hashlib.sha256(_HEADER)
    for example in sorted(counts):
      digest.update(f"{example} {counts[example]}\n".encode())
    return cls(num_examples=int(sum(counts.values())), sha256=digest.hexdigest())

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, config: dict) -> "PublicDataFingerprint":
    return cls(**config)


def _fingerprints(data, batch_size) -> collections.Counter:
  if isinstance(data, collections.Counter):
    return data
  return fingerprint_examples(data, batch_size)


def _leaf_batches(data, batch_size):
  """Lists of numpy feature arrays, one list per batch, all with the same number of rows."""
  if isinstance(data, tf.data.Dataset):
    for batch in data:
      yield _leaves(_features(batch))
    return
  leaves = _leaves(_features(data))
  for start in range(0, _num_rows(leaves), batch_size):
    yield [leaf[start:start + batch_size] for leaf in leaves]


def _features(data):
  """x of `(x,)`, `(x, y)`, `(x, y, sample_weight)`; anything else is x itself."""
  if isinstance(data, tuple):
    if not 1 <= len(data) <= 3:
      raise ValueError(f"Expected data as (x, y), (x, y, sample_weight) or x. Received a tuple "
                       f"of {len(data)} elements; pass several inputs as a list or a dict.")
    return data[0]
  return data


def _leaves(features) -> list:
  if isinstance(features, Mapping):
    return [leaf for key in sorted(features) for leaf in _leaves(features[key])]
  if isinstance(features, (list, tuple)):
    return [leaf for part in features for leaf in _leaves(part)]
  if isinstance(features, (tf.RaggedTensor, tf.SparseTensor)):
    raise TypeError(f"Expected dense features; {type(features).__name__} is not supported. "
                    "Convert it with .to_tensor() (or fingerprint the raw examples).")
  array = features.numpy() if isinstance(features, tf.Tensor) else np.asarray(features)
  if array.ndim == 0:
    raise ValueError(f"Expected features with a leading example (batch) dimension. Received a "
                     f"scalar: {array!r}.")
  return [array]


def _num_rows(leaves) -> int:
  if not leaves:
    raise ValueError("Expected at least one feature array. Received empty features.")
  rows = {leaf.shape[0] for leaf in leaves}
  if len(rows) != 1:
    raise ValueError(f"Expected every feature to have the same number of examples (rows). "
                     f"Received: {sorted(rows)}.")
  return rows.pop()


def _digests(leaves) -> list:
  encoded = [_encode_rows(leaf) for leaf in leaves]
  digests = []
  for i in range(_num_rows(leaves)):
    digest = hashlib.sha256(_HEADER)
    for rows in encoded:
      digest.update(rows[i])
    digests.append(digest.hexdigest())
  return digests


def _encode_rows(array: np.ndarray) -> list:
  """The canonical bytes of each example (row) of one feature array, framed (tag + length)."""
  rows = array.reshape(array.shape[0], -1)
  kind = array.dtype.kind
  if kind in "OSU":
    return [_frame(b"t", b"".join(_text(item) for item in row)) for row in rows]
  if kind in "biu":
    return _integer_rows(rows)
  if kind == "f" or (kind == "V" and "float" in array.dtype.name):  # V: bfloat16 (ml_dtypes)
    return _number_rows(rows.astype(np.float64))
  raise TypeError(f"Expected numeric, boolean or text features. Received dtype {array.dtype}.")


def _number_rows(values: np.ndarray) -> list:
  values = values + 0.0  # a copy in which -0.0 is 0.0
  values[np.isnan(values)] = np.nan  # one NaN bit pattern
  values = values.astype("<f8", copy=False)
  return [_frame(b"n", row.tobytes()) for row in values]


def _integer_rows(values: np.ndarray) -> list:
  """Integers exact in float64 are encoded as numbers (so 3 == 3.0); larger ones exactly."""
  if values.dtype.kind == "b":
    return _number_rows(values.astype(np.float64))
  if values.dtype.kind == "u":
    exact = np.all(values <= np.uint64(_EXACT_INT), axis=1)
  else:
    values = values.astype(np.int64, copy=False)
    exact = np.all((values >= np.int64(-_EXACT_INT)) & (values <= np.int64(_EXACT_INT)), axis=1)
  encoded = _number_rows(values.astype(np.float64))
  for i in np.flatnonzero(~exact):
    row = values[i]
    if row.dtype.kind == "u" and row.max() > np.iinfo(np.int64).max:
      encoded[i] = _frame(b"u", row.astype("<u8").tobytes())
    else:
      encoded[i] = _frame(b"i", row.astype("<i8").tobytes())
  return encoded


def _text(item) -> bytes:
  if isinstance(item, str):
    item = item.encode("utf-8")
  elif not isinstance(item, bytes):
    raise TypeError(f"Expected text features (str or bytes) in an object array. Received an "
                    f"element of type {type(item).__name__}: {item!r}.")
  return len(item).to_bytes(8, "little") + bytes(item)


def _frame(tag: bytes, payload: bytes) -> bytes:
  return tag + len(payload).to_bytes(8, "little") + payload
