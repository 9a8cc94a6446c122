"""Hyperparameters chosen on public data, at no privacy cost (`--tune=public`).

The planned private run is simulated on the public part: split into public-train and
public-validation (`split_public`), the same procedure (pre-training, masks, DP optimizer,
sampling, steps) runs on public-train with the private run's noise on the averaged gradient
(`matched_noise_multiplier`), and a small grid over the settings of `--tune_space`
(`tune_space`) is scored by public-validation accuracy, one stage per setting. No private
example is read: the private part's size, which the privacy plan uses anyway, is all.

Design: docs/tuning.md
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from tfdp_prune import data as data_lib
from tfdp_prune import mask_modes
from tfdp_prune import masks as masks_lib
from tfdp_prune import tune_space
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

# Public-validation share of the public part (held out from the simulated run).
VALIDATION_FRACTION = 0.3
# The simulated batch B' is at most this share of public-train (and at most the private B).
PUBLIC_BATCH_FRACTION = 0.5
# The candidates of each stage (the given value is always tried first; docs/tuning.md).
# Learning rate x clip norm, one stage: the update scale is about lr * C once most gradients are
# clipped, so both move together.
LEARNING_RATES = (0.03, 0.1, 0.3, 1.0)
CLIP_NORMS = (0.1, 1.0)
# (mode, rule, frozen value): dense DP-SGD, freezing (pruned or fine-tuning a subset) and
# re-selection. A combination the config refuses is left out (`mask_candidates`).
MASKS = (
    (mask_modes.NONE, None, None),
    (mask_modes.FREEZE, masks_lib.MagnitudeRule.name, mask_modes.FROZEN_ZERO),
    (mask_modes.FREEZE, masks_lib.MagnitudeRule.name, mask_modes.FROZEN_KEEP),
    (mask_modes.SELECT, masks_lib.MagnitudeRule.name, None),
    (mask_modes.SELECT, masks_lib.PublicGradientRule.name, None),
)
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
# The given --epochs (or --steps) times these; each length has its own calibrated sigma.
LENGTH_FACTORS = (0.5, 1.0, 2.0)
# Fewer public examples than this per part leave nothing to tell candidates apart.
MIN_EXAMPLES = 10
NO_PRIVATE_DATA = ("Chosen on public data alone: no private example was read (only the private "
                   "part's size, which the privacy plan uses), so tuning spends no privacy.")


@dataclasses.dataclass(frozen=True)
class PrivatePlan:
  """The private run's numbers for one config, from the private part's size alone: its
  logical steps T, noise multiplier sigma and expected batch B (`training.plan_for_size`)."""

  steps: int
  noise_multiplier: float
  expected_batch_size: float


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
  values), every `candidates` run (in order; a point equal to the previous stage's best is not
  run again), the `grid`, the `space` tuned, and how (`simulation`, the chosen length's;
  `simulations`, every length's when the length was tuned; the public sizes). `left_out`: the
  points not run, each with its "why" (a mask combination the config refuses, a length that
  cannot be planned or plans the same steps as another)."""

  config: TrainConfig
  chosen: Dict[str, Any]
  given: Dict[str, Any]
  candidates: Tuple[Candidate, ...]
  grid: Dict[str, list]
  simulation: Simulation
  num_public_train: int
  num_public_validation: int
  space: Tuple[str, ...] = tune_space.DEFAULT
  simulations: Tuple[Dict[str, Any], ...] = ()
  left_out: Tuple[Dict[str, Any], ...] = ()

  @property
  def best_accuracy(self) -> float:
    return max(candidate.accuracy for candidate in self.candidates)

  def record(self) -> Dict[str, Any]:
    """The JSON record of the privacy metadata's `tuning` field. Records written before
    `--tune_space` have no "space" (it was `tune_space.DEFAULT`), "simulations" nor
    "left_out"; `record_summary` and a resumption read them without."""
    record = {
        "mode": "public", "private_data_read": False, "statement": NO_PRIVATE_DATA,
        "space": list(self.space),
        "chosen": dict(self.chosen), "given": dict(self.given),
        "grid": dict(self.grid),
        "candidates": [candidate.to_dict() for candidate in self.candidates],
        "num_public_train": self.num_public_train,
        "num_public_validation": self.num_public_validation,
        "validation_fraction": VALIDATION_FRACTION,
        "simulation": dataclasses.asdict(self.simulation),
        "left_out": [dict(item) for item in self.left_out]}
    if self.simulations:
      record["simulations"] = [dict(item) for item in self.simulations]
    return record

  def summary(self) -> str:
    """One line for the run summary."""
    return record_summary(self.record())


# A simulated run: (config, public-train, public-validation, simulation) -> validation accuracy.
Simulate = Callable[[TrainConfig, Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray],
                     Simulation], float]


def record_summary(record: Dict[str, Any]) -> str:
  """One line from a `TuningResult.record()` (as the privacy metadata holds it)."""
  chosen = ", ".join(f"{name} {_text(value)}" for name, value in record["chosen"].items()
                     if value is not None)
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


def mask_candidates(config: TrainConfig) -> Tuple[Dict[str, Any], ...]:
  """The masks stage's points, {"mode", "rule", "frozen_value"}: the given ones first, then
  `MASKS`; a combination the config refuses (`_with_masks` raises ConfigError) is left out."""
  points, _ = _accepted(config, _mask_points(config, ()))
  return tuple(settings for settings, _ in points)


def length_candidates(config: TrainConfig) -> Tuple[Dict[str, Any], ...]:
  """The length stage's points: {"epochs": the given epochs x `LENGTH_FACTORS`}, or {"steps":
  ...} (rounded, at least 1) for a run given in steps; the given length first."""
  if config.steps is not None:
    lengths = dict.fromkeys([config.steps] + [max(1, int(round(config.steps * factor)))
                                              for factor in LENGTH_FACTORS])
    return tuple({"steps": steps} for steps in lengths)
  return tuple({"epochs": epochs}
               for epochs in _given_first(config.epochs,
                                          [config.epochs * f for f in LENGTH_FACTORS]))


# The stages, in the order `tune` runs them: each is (the names of `tune_space` it tunes, its
# points around the best config so far, `points(config, space)`). docs/tuning.md says why this
# order.
def _rate_and_clip(config: TrainConfig, space) -> Sequence[Dict[str, Any]]:
  rates = (_given_first(config.learning_rate, LEARNING_RATES)
           if tune_space.LEARNING_RATE in space else (None,))
  clips = (_given_first(config.l2_norm_clip, CLIP_NORMS)
           if tune_space.L2_NORM_CLIP in space else (None,))
  return [{name: value for name, value in (("learning_rate", rate), ("l2_norm_clip", clip))
           if value is not None} for rate in rates for clip in clips]


def _mask_points(config: TrainConfig, space) -> Sequence[Dict[str, Any]]:
  """Every (mode, rule, frozen value) of `MASKS`, the given ones first; `tune` leaves out
  those the config refuses."""
  del space  # the stage tunes all three together
  given = (config.mode, config.effective_rule, config.effective_frozen_value)
  return [{"mode": mode, "rule": rule, "frozen_value": frozen_value}
          for mode, rule, frozen_value in dict.fromkeys((given,) + tuple(MASKS))]


def _sparsities(config: TrainConfig, space) -> Sequence[Dict[str, Any]]:
  del space  # one setting
  if config.mode == mask_modes.NONE:
    return []
  return [{"sparsity": s} for s in _given_first(config.effective_sparsity, SPARSITIES)]


def _lengths(config: TrainConfig, space) -> Sequence[Dict[str, Any]]:
  del space  # one setting
  return length_candidates(config)


STAGES = (
    ((tune_space.LEARNING_RATE, tune_space.L2_NORM_CLIP), _rate_and_clip),
    ((tune_space.MASKS,), _mask_points),
    ((tune_space.SPARSITY,), _sparsities),
    ((tune_space.EPOCHS,), _lengths),
)


def tune(config: TrainConfig, public, *, plan: Callable[[TrainConfig], PrivatePlan],
         num_classes: int, simulate: Simulate) -> TuningResult:
  """Chooses the settings of `config.tune_space` by simulating `config` on the public part
  (see the module docstring): the `STAGES` that tune a setting of the space, in order, each
  keeping the best public-validation accuracy (the given values win ties).

  Args:
    config: the planned run; what the space leaves out (sampling, pre-training, ...) is
      simulated as given.
    public: the public (x, y) part; it is all the data this reads.
    plan: the private run's plan of a config (`training.plan_for_size`: from the private
      part's size alone). Called once per length tried (cached): a length candidate is
      simulated with its own steps and the sigma calibrated for them.
    num_classes: the model's outputs.
    simulate: runs one candidate (`training.simulate_on_public`).

  Raises:
    ConfigError: the given length cannot be planned (`plan` raises it).
  """
  space = tune_space.parse(config.tune_space)
  train, validation = split_public(public, config.seed)
  simulations = {}  # (epochs, steps) -> Simulation: one plan (calibration) per length

  def simulation_for(candidate: TrainConfig) -> Simulation:
    # (epochs, steps) is the whole key only because no stage changes anything else the plan
    # reads (batch size, sampling, delta, accountant, accumulation).
    key = (candidate.epochs, candidate.steps)
    if key not in simulations:
      private = plan(candidate)
      batch = public_batch_size(private.expected_batch_size, len(train[1]))
      simulations[key] = Simulation(
          steps=int(private.steps), batch_size=batch,
          noise_multiplier=matched_noise_multiplier(private.noise_multiplier,
                                                    private.expected_batch_size, batch),
          private_noise_multiplier=float(private.noise_multiplier),
          private_batch_size=float(private.expected_batch_size), num_classes=num_classes)
    return simulations[key]

  candidates, grid, left_out, lengths = [], {}, [], ()
  tuned, accuracy = config, None
  for names, points_of in STAGES:
    if not any(name in space for name in names):
      continue
    points, refused = _accepted(tuned, points_of(tuned, space))
    if tune_space.EPOCHS in names:
      points, unplanned = _plannable(points, tuned, space, simulation_for)
      refused += unplanned
      lengths = _simulations_record(points, simulation_for)
    left_out.extend(refused)
    if not points:
      continue
    _add_to_grid(grid, names, [settings for settings, _ in points])
    scored = []
    for settings, candidate in points:
      if accuracy is not None and _tuned_values(candidate, space) == _tuned_values(tuned, space):
        score = accuracy  # this point was scored in the stage before
      else:
        score = float(simulate(candidate, train, validation, simulation_for(candidate)))
        candidates.append(Candidate(_simulated_settings(settings, candidate, names), score))
      scored.append((score, candidate))
    # max keeps the first of equals: the given values when they tie.
    accuracy, tuned = max(scored, key=lambda pair: pair[0])
  return TuningResult(
      config=tuned, chosen=_tuned_values(tuned, space), given=_tuned_values(config, space),
      candidates=tuple(candidates), grid=grid, simulation=simulation_for(tuned),
      num_public_train=len(train[1]), num_public_validation=len(validation[1]), space=space,
      simulations=lengths, left_out=tuple(left_out))


# (settings, the config with them) of a stage's points.
_Points = Sequence[Tuple[Dict[str, Any], TrainConfig]]


def _accepted(config: TrainConfig, points: Sequence[Dict[str, Any]]):
  """(the points the config accepts, as (settings, config); the others, each with its "why":
  the ConfigError's message)."""
  accepted, refused = [], []
  for settings in points:
    try:
      accepted.append((settings, _apply(config, settings)))
    except ConfigError as error:
      refused.append(dict(settings, why=str(error)))
  return accepted, refused


def _plannable(points: _Points, tuned: TrainConfig, space, simulation_for):
  """The length stage's points that can be planned (the given one first; a length that no
  sigma reaches the target at, or PLD cannot account for, is left out) and that plan to steps
  no earlier point has (the same steps are the same simulation). Returns (those points, the
  others, each with its "why").

  Raises:
    ConfigError: the given length cannot be planned (the run itself cannot).
  """
  kept, left_out, steps_of = [], [], {}
  for settings, candidate in points:
    try:
      steps = simulation_for(candidate).steps
    except ConfigError as error:
      if _tuned_values(candidate, space) == _tuned_values(tuned, space):
        raise
      left_out.append(dict(settings, why=str(error)))
      continue
    if steps in steps_of:
      left_out.append(dict(settings, why=f"plans the same {steps} steps as "
                                         f"{_settings_text(steps_of[steps])}"))
      continue
    steps_of[steps] = settings
    kept.append((settings, candidate))
  return kept, left_out


def _simulations_record(points: _Points, simulation_for) -> Tuple[Dict[str, Any], ...]:
  """Each length's setting ("epochs", or "steps" for a run given in steps) and its
  simulation's fields. A run given in steps plans exactly those steps (`plan_privacy`), so
  there its "steps" is both; the setting is never replaced by a field."""
  record = []
  for settings, candidate in points:
    item = dict(settings)
    for name, value in dataclasses.asdict(simulation_for(candidate)).items():
      item.setdefault(name, value)
    record.append(item)
  return tuple(record)


def _simulated_settings(settings: Dict[str, Any], candidate: TrainConfig,
                        names) -> Dict[str, Any]:
  """A candidate's record: its stage's settings; the masks stage's with the select_every and
  sparsity the candidate was simulated at (a switch to a masked mode takes the defaults)."""
  if tune_space.MASKS in names:
    return _tuned_values(candidate, (tune_space.MASKS,))
  return dict(settings)


def _settings_text(settings: Dict[str, Any]) -> str:
  return ", ".join(f"{name} {_text(value)}" for name, value in settings.items())


def _apply(config: TrainConfig, settings: Dict[str, Any]) -> TrainConfig:
  if "mode" in settings:
    return _with_masks(config, settings["mode"], settings["rule"], settings["frozen_value"])
  return dataclasses.replace(config, **settings)


def _with_masks(config: TrainConfig, mode: str, rule: Optional[str],
                frozen_value: Optional[str]) -> TrainConfig:
  """`config` with the masks (mode, rule, frozen value); its sparsity and re-selection period
  are kept where the mode has them (the defaults otherwise). Raises ConfigError as the config
  does."""
  if mode == mask_modes.NONE:
    return dataclasses.replace(config, mode=mode, rule=None, sparsity=None, select_every=None,
                               frozen_value=None)
  masked = config.mode != mask_modes.NONE
  return dataclasses.replace(
      config, mode=mode, rule=rule, sparsity=config.sparsity if masked else None,
      select_every=(config.select_every if mode == config.mode == mask_modes.SELECT else None),
      frozen_value=frozen_value)


def _add_to_grid(grid: Dict[str, list], names, points) -> None:
  """The stage's `points` into the record's grid: setting -> its values in order; the masks
  stage's points whole (its mode, rule and frozen value are not a product)."""
  if tune_space.MASKS in names:
    grid["masks"] = [dict(point) for point in points]
    return
  for point in points:
    for name, value in point.items():
      values = grid.setdefault(name, [])
      if value not in values:
        values.append(value)


def _tuned_values(config: TrainConfig, space: Sequence[str]) -> Dict[str, Any]:
  """The config's values of the settings `space` tunes, as `dataclasses.replace` takes them
  (so that a resumption applies them)."""
  values = {}
  if tune_space.LEARNING_RATE in space:
    values["learning_rate"] = config.learning_rate
  if tune_space.L2_NORM_CLIP in space:
    values["l2_norm_clip"] = config.l2_norm_clip
  masked = config.mode != mask_modes.NONE
  if tune_space.MASKS in space:
    values.update(mode=config.mode, rule=config.effective_rule,
                  frozen_value=config.effective_frozen_value,
                  select_every=config.effective_select_every)
  if tune_space.MASKS in space or (tune_space.SPARSITY in space and masked):
    values["sparsity"] = config.effective_sparsity if masked else None
  if tune_space.EPOCHS in space:
    if config.steps is not None:
      values["steps"] = config.steps
    else:
      values["epochs"] = config.epochs
  return values


def _given_first(given: Optional[float], values: Sequence[float]) -> Tuple[float, ...]:
  return tuple(dict.fromkeys([float(given)] + [float(v) for v in values]))


def _text(value) -> str:
  return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else (
      str(value))
