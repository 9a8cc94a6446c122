"""The audit's canaries: private examples taken out, mislabelled, and each put back with
probability 1/2 (`add_canaries`); the splits an audited run trains on.
"""

import dataclasses
from typing import Tuple

import numpy as np

from tfdp_prune import data as data_lib
from tfdp_prune.train_config import ConfigError


@dataclasses.dataclass(frozen=True, eq=False)
class Canaries:
  """The canaries: inputs, true labels, the wrong labels they are trained with when included,
  and whether each was included (a bool per canary)."""

  x: np.ndarray
  true_labels: np.ndarray
  labels: np.ndarray
  included: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class AuditData:
  """The splits to train on (private part: the non-canary private examples plus the included
  canaries), the canaries, and the non-canary private examples (the MIA's members)."""

  splits: data_lib.DataSplits
  canaries: Canaries
  members: Tuple[np.ndarray, np.ndarray]


def add_canaries(splits: data_lib.DataSplits, count: int, seed: int) -> AuditData:
  """Takes `count` canaries out of the private part, relabels each to a uniformly random wrong
  class, and puts each back independently with probability 1/2 (all from `seed`).

  The returned splits' `info.num_private` is the size of the new private part (the accountant
  and the metadata use it); its `private_split` says what was done.
  """
  x, y = splits.private
  info = splits.info
  if count >= len(y):
    raise ConfigError(f"Expected --canaries < the {len(y)} private examples (the canaries are "
                      f"taken out of the private part). Received: --canaries={count}.")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(y))
  pool, rest = order[:count], order[count:]
  # A uniformly random wrong class: the true one shifted by 1..C-1 (mod C).
  labels = ((y[pool] + rng.integers(1, info.num_classes, size=count)) % info.num_classes)
  labels = labels.astype(y.dtype)
  included = rng.random(count) < 0.5
  train_x = np.concatenate([x[rest], x[pool][included]])
  train_y = np.concatenate([y[rest], labels[included]])
  shuffle = rng.permutation(len(train_y))
  info = dataclasses.replace(
      info, num_private=len(train_y),
      private_split=(f"{info.private_split} without {count} audit canaries, plus the "
                     f"{int(included.sum())} of them included, mislabelled"))
  audited = data_lib.DataSplits(public=splits.public, private=(train_x[shuffle], train_y[shuffle]),
                                test=splits.test, info=info)
  canaries = Canaries(x=x[pool], true_labels=y[pool], labels=labels, included=included)
  return AuditData(splits=audited, canaries=canaries, members=(x[rest], y[rest]))
