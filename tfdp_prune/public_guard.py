"""The public-only guard: a run never exports a model worse than public data alone gives, and
says so.

A fraction of the public part is held out (`split_public`): neither the public pre-training nor
the masks see it. After DP training the public-only model (the weights right after public
pre-training, before the first DP step) and the DP model are scored on it, and the better one is
exported (`choose`; ties go to the DP model). `record` is what the metadata's `public_guard`
holds (`metadata.describe_public_guard` says it in words).

Privacy: the public-only model never saw private data, and the choice reads only public data and
the DP model, so it is post-processing of the DP release. It still depends on the DP model:
whichever model is exported carries the run's epsilon and delta, never "no cost".

Design: docs/training.md
"""

import contextlib
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np

from tfdp_prune import atomic_files

BEST = "best"  # export the better of the two on the public validation split
DP = "dp"  # export the DP model whatever the comparison says
EXPORT_CHOICES = (BEST, DP)
PUBLIC_ONLY = "public_only"
EXPORTED = (DP, PUBLIC_ONLY)
# The public-only weights, kept beside the checkpoints so that a resumed run can still compare.
SNAPSHOT_FILENAME = "public_only_weights.npz"


def split_public(public, fraction: float, seed: int):
  """(training part, validation part) of the public `(x, y)` arrays; the validation part is
  `round(fraction * n)` examples (at least one) drawn with `seed`, None when `fraction` is 0.

  Raises:
    ValueError: the split would leave no public example to pre-train and choose masks on.
  """
  if not fraction:
    return public, None
  x, y = public
  count = len(y)
  held_out = max(1, int(round(fraction * count)))
  if count - held_out < 1:
    raise ValueError(
        f"Expected --public_validation_fraction to leave public examples for the pre-training and "
        f"the masks. Received: --public_validation_fraction={fraction} of {count} public "
        f"example(s) holds out {held_out}, leaving none. Use more public data, a smaller "
        "fraction, or --public_validation_fraction=0 (no public-only comparison).")
  order = np.random.default_rng(seed).permutation(count)
  train, validation = np.sort(order[held_out:]), np.sort(order[:held_out])
  return (x[train], y[train]), (x[validation], y[validation])


def accuracy(model, validation) -> float:
  """`model`'s accuracy on the `(x, y)` validation arrays."""
  results = model.evaluate(*validation, batch_size=256, verbose=0, return_dict=True)
  return float(results["accuracy"])


@contextlib.contextmanager
def weights_of(model, weights: Sequence[np.ndarray]):
  """`model` holding `weights` inside the block; its own weights are put back after it."""
  own = model.get_weights()
  model.set_weights(weights)
  try:
    yield model
  finally:
    model.set_weights(own)


def choose(dp_accuracy: float, public_accuracy: float, export_choice: str) -> str:
  """DP or PUBLIC_ONLY: the DP model unless `export_choice` is BEST and the public-only model
  is strictly better (a tie goes to the DP model)."""
  if export_choice == BEST and public_accuracy > dp_accuracy:
    return PUBLIC_ONLY
  return DP


def record(export_choice: str, num_validation: int, dp_accuracy: Optional[float],
           public_accuracy: Optional[float], note: str = "") -> Dict[str, Any]:
  """The metadata's `public_guard`: the setting, what was exported, and on what evidence.
  Without both accuracies there was no comparison (`note` says why) and the DP model is
  exported."""
  compared = dp_accuracy is not None and public_accuracy is not None
  exported = choose(dp_accuracy, public_accuracy, export_choice) if compared else DP
  return {"export_choice": export_choice, "exported": exported, "compared": compared,
          "num_public_validation_examples": int(num_validation),
          "dp_validation_accuracy": dp_accuracy,
          "public_only_validation_accuracy": public_accuracy, "note": note}


def save_snapshot(directory: str, weights: Sequence[np.ndarray]) -> None:
  """Writes the public-only weights into the checkpoint directory, atomically."""
  os.makedirs(directory, exist_ok=True)
  tmp = atomic_files.temporary_path(directory, SNAPSHOT_FILENAME) + ".npz"
  np.savez(tmp, *weights)
  atomic_files.fsync(tmp)
  os.replace(tmp, os.path.join(directory, SNAPSHOT_FILENAME))
  atomic_files.fsync(directory)


def load_snapshot(directory: str, model) -> Optional[list]:
  """The public-only weights `save_snapshot` wrote for `model`, or None when there are none
  that fit it (a checkpoint of a release without the guard, or another model)."""
  path = os.path.join(directory, SNAPSHOT_FILENAME)
  if not os.path.isfile(path):
    return None
  with np.load(path) as stored:
    weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
  shapes = [np.shape(w) for w in model.get_weights()]
  return weights if [w.shape for w in weights] == shapes else None
