"""Checks public data in every form the mask rules and public pre-training accept (DESIGN.md
rule 4 and issue 14): non-empty, one label per example, the expected input shape, finite inputs.

Public data has no DP guard: public pre-training and the mask rules read it without clipping,
so a NaN there turns into NaN weights or masks, and an empty set picks masks from random weights.

Accepted forms (`FORMS`):
  - `(x, y)`: x an array (or tensor) [n, ...], or a dict of such arrays (a model with named
    inputs), y the n labels;
  - a finite `tf.data.Dataset` of `(x, y)` BATCHES, x a tensor or a dict of tensors (an optional
    third element, sample weights, is ignored by the checks). It is iterated once here.
Anything else is refused with a message that lists these forms.
"""

from typing import Any, Optional, Sequence

import numpy as np

from tfdp_prune import data as data_lib
from tfdp_prune.compat import tf

FORMS = ("(x, y) with x an array [n, ...] or a dict of such arrays and y the n labels",
         "a finite tf.data.Dataset of (x, y) batches (x a tensor or a dict of tensors)")


def check(public_data, input_shape: Optional[Sequence[int]] = None, *, source: str) -> None:
  """Raises `data.DataError` naming `source` unless `public_data` is in one of `FORMS` and is
  non-empty, has one label per example, finite inputs and (given `input_shape`, for a single
  input) inputs of that shape per example."""
  if isinstance(public_data, tf.data.Dataset):
    _check_dataset(public_data, input_shape, source)
    return
  if not (isinstance(public_data, (tuple, list)) and len(public_data) == 2):
    raise data_lib.DataError(_form_error(public_data, source))
  x, y = public_data
  if isinstance(x, dict):
    _check_features(x, np.asarray(y), source)
    return
  if not _is_array(x) or not _is_array(y):
    raise data_lib.DataError(_form_error(public_data, source))
  data_lib.check_part("public", (np.asarray(x), np.asarray(y)), input_shape, source=source)


def _check_dataset(dataset, input_shape, source) -> None:
  if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
    raise data_lib.DataError(
        f"Expected {source} to be a finite dataset (the mask rules and public pre-training read "
        "it to its end). Received: an infinite tf.data.Dataset (repeat() without a count). "
        "Drop the repeat().")
  examples = 0
  for number, element in enumerate(dataset):
    if not (isinstance(element, (tuple, list)) and len(element) in (2, 3)):
      raise data_lib.DataError(
          f"Expected the elements of {source} to be (x, y) batches. Received: element {number} "
          f"is a {type(element).__name__}. Accepted forms: {'; '.join(FORMS)}.")
    x, y = element[0], np.asarray(element[1])
    if np.ndim(y) < 1:
      raise data_lib.DataError(
          f"Expected {source} to hold BATCHES (x, y), y of shape [batch]. Received: element "
          f"{number} has a scalar label: batch the dataset (dataset.batch(64)).")
    where = f"{source}, batch {number}"
    if isinstance(x, dict):
      _check_features(x, y, where)
    else:
      data_lib.check_part("public", (np.asarray(x), y), input_shape, source=where)
    examples += len(y)
  if not examples:
    raise data_lib.DataError(
        f"Expected a non-empty public part. Received: {source} has 0 examples. Pass public "
        "examples: the masks would be chosen from random weights.")


def _check_features(features: dict, y: np.ndarray, source: str) -> None:
  """Each named input of a dict `x` is checked as an (x, y) part of its own."""
  if not features:
    raise data_lib.DataError(f"Expected {source} to hold at least one input. Received: x is an "
                             "empty dict.")
  for name, values in sorted(features.items()):
    if not _is_array(values):
      raise data_lib.DataError(f"Expected the input {name!r} of {source} to be an array or "
                               f"tensor. Received: {type(values).__name__}.")
    data_lib.check_part("public", (np.asarray(values), y), source=f"{source}, input {name!r}")


def _is_array(value: Any) -> bool:
  return isinstance(value, (np.ndarray, tf.Tensor, list))


def _form_error(public_data, source: str) -> str:
  received = type(public_data).__name__
  if isinstance(public_data, dict):
    received = f"a dict with keys {sorted(public_data)} (not a pair (x, y))"
  elif isinstance(public_data, (tuple, list)):
    received = f"a {received} of {len(public_data)} elements"
  return (f"Expected {source} in one of these forms: {'; '.join(FORMS)}. Received: {received}. "
          "For a model with named inputs pass (dict of inputs, labels).")
