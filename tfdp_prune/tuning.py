"""Hyperparameters chosen on public data, at no privacy cost (`--tune=public`).

The planned private run is simulated on the public part: split into public-train and
public-validation (`split_public`), the same procedure (pre-training, masks, DP optimizer,
sampling, steps) runs on public-train with the private run's noise on the averaged gradient
(`matched_noise_multiplier`), and a small grid is scored by public-validation accuracy. No
private example is read: the private part's size, which the privacy plan uses anyway, is all.

Design: docs/tuning.md
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from tfdp_prune import data as data_lib
from tfdp_prune import mask_modes
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

# Public-validation share of the public part (held out from the simulated run).
VALIDATION_FRACTION = 0.3
# The simulated batch B' is at most this share of public-train (and at most the private B).
PUBLIC_BATCH_FRACTION = 0.5
# Stage 1: learning rate x clip norm (the update scale is about lr * C once most gradients are
# clipped, so both move together). Stage 2: sparsity, at the best pair.
LEARNING_RATES = (0.03, 0.1, 0.3, 1.0)
CLIP_NORMS = (0.1, 1.0)
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
# Fewer public examples than this per part leave nothing to tell candidates apart.
MIN_EXAMPLES = 10
NO_PRIVATE_DATA = ("Chosen on public data alone: no private example was read (only the private "
                   "part's size, which the privacy plan uses), so tuning spends no privacy.")


@dataclasses.dataclass(frozen=True)
class Simulation:
  """The simulated run's fixed numbers: the private run's steps, the public batch B' and the
  noise multiplier sigma' that gives its averaged gradient the private run's noise (sigma and
  B are the private run's)."""

  steps: int
  batch_size: int
  noise_multiplier: float
  private_noise_multiplier: float
  private_batch_size: float
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One grid point (settings -> values) and its public-validation accuracy."""

  settings: Dict[str, Any]
  accuracy: float

  def to_dict(self) -> Dict[str, Any]:
    return dict(self.settings, public_validation_accuracy=self.accuracy)


@dataclasses.dataclass(frozen=True, eq=False)
class TuningResult:
  """What `tune` chose: `config` (the given one with the chosen values), `chosen` (those
  values), every `candidates` run (in order; a stage-2 point equal to the stage-1 best is not
  run again), the `grid`, and how (`simulation`, the public sizes)."""

  config: TrainConfig
  chosen: Dict[str, Any]
  given: Dict[str, Any]
  candidates: Tuple[Candidate, ...]
  grid: Dict[str, list]
  simulation: Simulation
  num_public_train: int
  num_public_validation: int

  @property
  def best_accuracy(self) -> float:
    return max(candidate.accuracy for candidate in self.candidates)

  def record(self) -> Dict[str, Any]:
    """The JSON record of the privacy metadata's `tuning` field."""
    return {
        "mode": "public", "private_data_read": False, "statement": NO_PRIVATE_DATA,
        "chosen": dict(self.chosen), "given": dict(self.given),
        "grid": dict(self.grid),
        "candidates": [candidate.to_dict() for candidate in self.candidates],
        "num_public_train": self.num_public_train,
        "num_public_validation": self.num_public_validation,
        "validation_fraction": VALIDATION_FRACTION,
        "simulation": dataclasses.asdict(self.simulation)}

  def summary(self) -> str:
    """One line for the run summary."""
    return record_summary(self.record())


# A simulated run: (config, public-train, public-validation, simulation) -> validation accuracy.
Simulate = Callable[[TrainConfig, Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray],
                     Simulation], float]


def record_summary(record: Dict[str, Any]) -> str:
  """One line from a `TuningResult.record()` (as the privacy metadata holds it)."""
  chosen = ", ".join(f"{name} {value:g}" for name, value in record["chosen"].items())
  best = max(c["public_validation_accuracy"] for c in record["candidates"])
  return (f"tuning ({record['mode']}; no private data read): {chosen}; public-validation "
          f"accuracy {best:.4f}, best of {len(record['candidates'])} candidates "
          f"({record['num_public_train']} public-train, {record['num_public_validation']} "
          "public-validation examples)")


def matched_noise_multiplier(noise_multiplier: float, batch_size: float,
                             public_batch_size: float) -> float:
  """sigma' with sigma' * C / B' == sigma * C / B: the noise on the averaged gradient of a
  batch of B' matches the private run's (noise std sigma * C on a sum of B, divided by B)."""
  return noise_multiplier * public_batch_size / batch_size


def public_batch_size(batch_size: float, num_public_train: int) -> int:
  """B' = min(B, PUBLIC_BATCH_FRACTION of public-train), at least 1."""
  return max(1, min(int(batch_size), int(PUBLIC_BATCH_FRACTION * num_public_train)))


def split_public(public, seed: int, fraction: float = VALIDATION_FRACTION):
  """(public-train, public-validation): a stratified split of the public part, the same for
  the same seed (`data.digits_order`); validation is the last `fraction` of that order."""
  x, y = public
  order = data_lib.digits_order(np.asarray(y), seed)
  num_train = len(order) - int(round(fraction * len(order)))
  if min(num_train, len(order) - num_train) < MIN_EXAMPLES:
    raise ConfigError(
        f"--tune=public needs at least {MIN_EXAMPLES} public examples for public-train and for "
        f"public-validation. Received: a public part of {len(order)} examples. Use a larger "
        "--public_split, or --tune=none.")
  train, validation = order[:num_train], order[num_train:]
  return (x[train], y[train]), (x[validation], y[validation])


def grid(config: TrainConfig) -> Tuple[Sequence[Dict[str, Any]], Sequence[Dict[str, Any]]]:
  """(stage 1: learning rate x clip norm, stage 2: sparsity); the given values come first so
  that a tie keeps them. Stage 2 is empty without masks."""
  rates = _given_first(config.learning_rate, LEARNING_RATES)
  clips = _given_first(config.l2_norm_clip, CLIP_NORMS)
  first = [{"learning_rate": rate, "l2_norm_clip": clip} for rate in rates for clip in clips]
  second = []
  if config.mode != mask_modes.NONE:
    second = [{"sparsity": s} for s in _given_first(config.effective_sparsity, SPARSITIES)]
  return first, second


def tune(config: TrainConfig, public, *, steps: int, noise_multiplier: float,
         expected_batch_size: float, num_classes: int, simulate: Simulate) -> TuningResult:
  """Chooses the learning rate, clip norm and sparsity by simulating `config` on the public
  part (see the module docstring): stage 1 then stage 2 of `grid`, each keeping the best
  public-validation accuracy.

  Args:
    config: the planned run; its sampling, masks and pre-training are simulated as given.
    public: the public (x, y) part; it is all the data this reads.
    steps, noise_multiplier, expected_batch_size: the private run's plan (its steps, sigma, B).
    num_classes: the model's outputs.
    simulate: runs one candidate (`training.simulate_on_public`).
  """
  train, validation = split_public(public, config.seed)
  batch = public_batch_size(expected_batch_size, len(train[1]))
  simulation = Simulation(
      steps=steps, batch_size=batch,
      noise_multiplier=matched_noise_multiplier(noise_multiplier, expected_batch_size, batch),
      private_noise_multiplier=noise_multiplier, private_batch_size=float(expected_batch_size),
      num_classes=num_classes)
  first, second = grid(config)
  candidates = []

  def best_of(base, stage, base_accuracy=None):
    scored = []
    for settings in stage:
      candidate = dataclasses.replace(base, **settings)
      if base_accuracy is not None and _tuned_values(candidate) == _tuned_values(base):
        accuracy = base_accuracy  # this point was scored in the stage before
      else:
        accuracy = float(simulate(candidate, train, validation, simulation))
        candidates.append(Candidate(dict(settings), accuracy))
      scored.append((accuracy, settings))
    # max keeps the first of equals: the given values when they tie.
    accuracy, settings = max(scored, key=lambda pair: pair[0])
    return dataclasses.replace(base, **settings), accuracy

  tuned, accuracy = best_of(config, first)
  if second:
    tuned, accuracy = best_of(tuned, second, accuracy)
  return TuningResult(
      config=tuned, chosen=_tuned_values(tuned), given=_tuned_values(config),
      candidates=tuple(candidates), grid=_grid_of(first + second), simulation=simulation,
      num_public_train=len(train[1]), num_public_validation=len(validation[1]))


def _grid_of(points) -> Dict[str, list]:
  """Setting -> its values in the grid's `points`, in order."""
  tried = {}
  for point in points:
    for name, value in point.items():
      tried.setdefault(name, {})[value] = None
  return {name: list(values) for name, values in tried.items()}


def _tuned_values(config: TrainConfig) -> Dict[str, Any]:
  values = {"learning_rate": config.learning_rate, "l2_norm_clip": config.l2_norm_clip}
  if config.mode != mask_modes.NONE:
    values["sparsity"] = config.effective_sparsity
  return values


def _given_first(given: Optional[float], values: Sequence[float]) -> Tuple[float, ...]:
  return tuple(dict.fromkeys([float(given)] + [float(v) for v in values]))
