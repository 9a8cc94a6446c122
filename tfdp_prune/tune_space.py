"""The settings `--tune=public` may choose (`--tune_space`), one list.

`tuning` implements a stage for each name; `train_config` validates `--tune_space` against this
list. Design: docs/tuning.md
"""

from typing import Optional, Tuple

LEARNING_RATE = "learning_rate"
L2_NORM_CLIP = "l2_norm_clip"
SPARSITY = "sparsity"
MASKS = "masks"  # the mask mode, rule and frozen value, together
EPOCHS = "epochs"  # the run's length (--epochs, or --steps when the run gives steps)
# In the order the tuner runs its stages (docs/tuning.md says why).
NAMES = (LEARNING_RATE, L2_NORM_CLIP, MASKS, SPARSITY, EPOCHS)
# --tune_space unset: the space of the releases before it.
DEFAULT = (LEARNING_RATE, L2_NORM_CLIP, SPARSITY)


def parse(value: Optional[str]) -> Tuple[str, ...]:
  """"learning_rate,epochs" -> the names, in `NAMES` order; None -> `DEFAULT`.

  Raises:
    ValueError: an empty list, or a name not in `NAMES` (the message names the flag).
  """
  if value is None:
    return DEFAULT
  if not isinstance(value, str):
    raise ValueError(f"Expected --tune_space to be a comma-separated list of {', '.join(NAMES)}. "
                     f"Received: --tune_space={value!r}.")
  given = [name.strip() for name in value.split(",") if name.strip()]
  unknown = [name for name in given if name not in NAMES]
  if not given or unknown:
    what = f"unknown {unknown}" if unknown else "an empty list"
    raise ValueError(f"Expected --tune_space to be a comma-separated list of some of "
                     f"{', '.join(NAMES)} (e.g. --tune_space=learning_rate,l2_norm_clip,epochs). "
                     f"Received: --tune_space={value!r} ({what}).")
  return tuple(name for name in NAMES if name in given)
