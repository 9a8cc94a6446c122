"""Where the DP mechanism's randomness (noise and sampling) comes from, and the insecure switch.

By default from the operating system's CSPRNG (`os.urandom`), never from a seed: whoever could
reproduce the noise could subtract it (DESIGN.md rule 11). Reproducible randomness exists only
behind arguments named `insecure_*`, which log a warning and label the export INSECURE. See
README.md, "Where the randomness comes from". Pure Python (no TensorFlow): the metadata schema
imports the labels from here.
"""

import numbers
import os
import warnings
from typing import List, Optional

from absl import logging

OS_ENTROPY = "os_entropy"  # drawn from os.urandom, recorded nowhere but in checkpoints
INSECURE_SEED = "insecure_seed"  # derived from an `insecure_*` seed: reproducible
SOURCES = (OS_ENTROPY, INSECURE_SEED)
MAX_INSECURE_SEED = 2**63 - 1


class InsecureRandomnessWarning(UserWarning):
  """The DP noise or sampling is derived from a seed, so whoever knows it can reproduce it."""


def os_entropy_words(count: int) -> List[int]:
  """`count` independent uniform 64-bit words (ints in [0, 2**64)) from `os.urandom`."""
  data = os.urandom(8 * count)
  return [int.from_bytes(data[8 * i:8 * i + 8], "little") for i in range(count)]


def source(insecure_seed: Optional[int]) -> str:
  """The label of the randomness a component with this `insecure_*` seed uses."""
  return OS_ENTROPY if insecure_seed is None else INSECURE_SEED


def check_insecure_seed(name: str, seed) -> Optional[int]:
  """None, or an integer in [0, 2**63) returned as a Python int; else a ValueError."""
  if seed is None:
    return None
  if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
      or not 0 <= seed <= MAX_INSECURE_SEED):
    raise ValueError(f"Expected {name} to be None (OS entropy, the default) or an integer in "
                     f"[0, 2**63). Received: {name}={seed!r}.")
  return int(seed)


def warn_insecure(what: str, name: str, stacklevel: int = 3) -> None:
  """Logs (absl) and warns (`InsecureRandomnessWarning`) that `what` is seeded by `name`;
  `stacklevel` as in `warnings.warn`, counted from the caller of this function plus one.

  The seed's value is never logged: logs may be published, and a logged seed is a published one.
  """
  message = (f"INSECURE: {what} is derived from {name}, so anyone who knows or guesses that seed "
             "can reproduce it and undo the differential privacy of everything trained with it. "
             "Use it for tests and debugging only; the privacy metadata and model card of such a "
             f"run say INSECURE. Leave {name}=None (OS entropy) for any model you release.")
  logging.warning(message)
  warnings.warn(message, InsecureRandomnessWarning, stacklevel=stacklevel)


def removed_seed_error(owner: str, insecure_name: str) -> TypeError:
  """The error for the removed `seed=` argument of the mechanism's components."""
  return TypeError(
      f"{owner} no longer takes `seed=`: the DP mechanism's randomness (noise and sampling) comes "
      "from OS entropy, so that nothing published (flags, code, metadata) can reproduce it. "
      f"Drop `seed=` (recommended; seed the model's initialization with "
      f"keras.utils.set_random_seed), or pass `{insecure_name}=<int>` for reproducible but "
      "INSECURE randomness (tests and debugging only; exports say INSECURE).")
