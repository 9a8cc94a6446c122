"""The paper's comparisons on scikit-learn's digits, every run as JSON, RESULTS.md and PNG plots.

Adamczewski & Park (arXiv 2303.04612) train, with DP-SGD, only coordinates chosen from public
data. This script compares, on digits with its 10% public part and disjoint private part:
  dense DP-SGD        all coordinates, from scratch or after public pre-training;
  freeze/<rule>       after public pre-training, one mask: the rest is pruned to zero;
  select/<rule>       after public pre-training, a new mask every 10 steps (the others keep
                      their values); rules magnitude, random, public_gradient;
at target epsilons 1, 2, 4, 8 (delta 1e-5), a sparsity sweep, 5 seeds, and two references:
non-private (public pre-training, then the private part without noise) and public only.

Every run is one `tfdp_prune.training.train` call (what `tfdp-train` runs) with the library's
default hyperparameters (`TrainConfig()`), the same for every arm and epsilon: nothing is tuned.
Noise: `training.plan_privacy` (the calibration `train` itself does) runs once per target epsilon
and the run gets that sigma as `noise_multiplier`; the achieved epsilon is recomputed by the
library for each run. (PLD calibration costs as much as a whole run, and it is the same for
every arm and seed: q = batch / private examples and the steps do not depend on them.)

Usage (from the repo root):
  python benchmarks/experiments.py                 # full grid (34 min on 2 CPUs), then renders
  python benchmarks/experiments.py --resume        # continues an interrupted full run
  python benchmarks/experiments.py --render_only   # RESULTS.md and plots from the JSON again
  python benchmarks/experiments.py --quick         # tiny grid into a temp dir (the test runs it)

Writes `benchmarks/results/experiments.json` (settings, machine, versions, every run, per-cell
aggregates), `benchmarks/results/experiments_*.png` and `RESULTS.md`. The Conclusions block of an
existing RESULTS.md (between the conclusions markers) is written by hand and kept on re-render.
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
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FORMAT_VERSION = 1
PAPER_CONFIG = "cifar10_wrn16_4_eps8"
PUBLIC_ONLY, NON_PRIVATE = "public only", "non-private"
DENSE_SCRATCH, DENSE_PRETRAINED = "dense (scratch)", "dense (pre-trained)"
MASKED_ARMS = (("freeze", "magnitude"), ("freeze", "random"), ("freeze", "public_gradient"),
               ("select", "magnitude"), ("select", "random"), ("select", "public_gradient"))
CONCLUSIONS_BEGIN, CONCLUSIONS_END = "<!-- conclusions:begin -->", "<!-- conclusions:end -->"
PLOT_NAMES = {"epsilon": "experiments_accuracy_vs_epsilon.png",
              "sparsity": "experiments_accuracy_vs_sparsity.png"}
# training.train pre-trains on the public part with this batch size; public-only does the same.
PUBLIC_BATCH_SIZE = 64


# ---- the grid -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Grid:
  """Which runs to make. `settings` are TrainConfig overrides applied to every run."""

  epsilons: Tuple[float, ...]
  seeds: Tuple[int, ...]
  main_arms: Tuple[Tuple[str, str], ...]  # (mode, rule) at main_sparsity, every epsilon
  main_sparsity: float
  dense_arms: Tuple[str, ...]  # DENSE_SCRATCH and/or DENSE_PRETRAINED, every epsilon
  sweep_arms: Tuple[Tuple[str, str], ...]
  sweep_epsilons: Tuple[float, ...]
  sweep_sparsities: Tuple[float, ...]
  # No public validation part: the public-only reference pre-trains on the whole public part,
  # and so must the DP arms it is compared with.
  settings: Tuple[Tuple[str, Any], ...] = (("export_dir", None), ("verbose", 0),
                                           ("public_validation_fraction", 0.0))


FULL_GRID = Grid(
    epsilons=(1.0, 2.0, 4.0, 8.0), seeds=(0, 1, 2, 3, 4), main_arms=MASKED_ARMS,
    main_sparsity=0.8, dense_arms=(DENSE_SCRATCH, DENSE_PRETRAINED),
    sweep_arms=(("freeze", "magnitude"), ("freeze", "random"), ("select", "magnitude"),
                ("select", "random")),
    sweep_epsilons=(1.0, 8.0), sweep_sparsities=(0.0, 0.5, 0.8, 0.9, 0.95))

# A few steps per run: exercises every kind of run, the JSON and the rendering in about a minute.
# Its numbers mean nothing.
QUICK_GRID = Grid(
    epsilons=(2.0, 8.0), seeds=(0, 1), main_arms=(("freeze", "magnitude"),), main_sparsity=0.8,
    dense_arms=(DENSE_PRETRAINED,), sweep_arms=(("freeze", "magnitude"),), sweep_epsilons=(8.0,),
    sweep_sparsities=(0.8,),
    settings=(("export_dir", None), ("verbose", 0), ("public_validation_fraction", 0.0),
              ("epochs", 0.4), ("public_epochs", 2),
              ("accountant", "rdp")))  # RDP calibrates in milliseconds, PLD in tens of seconds


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run. kind: "dp", "nonprivate" or "public_only"; epsilon: the target (dp)."""

  kind: str
  mode: str
  rule: Optional[str]
  sparsity: float
  pretrained: bool
  epsilon: Optional[float]
  seed: int

  @property
  def arm(self) -> str:
    if self.kind == "public_only":
      return PUBLIC_ONLY
    if self.kind == "nonprivate":
      return NON_PRIVATE
    if self.mode == "none":
      return DENSE_PRETRAINED if self.pretrained else DENSE_SCRATCH
    return f"{self.mode}/{self.rule}"

  @property
  def run_id(self) -> str:
    return f"{self.arm}|sparsity={self.sparsity}|epsilon={self.epsilon}|seed={self.seed}"

  def overrides(self, settings) -> Dict[str, Any]:
    """TrainConfig overrides of the default config (the target epsilon for dp runs, which
    `run_one` replaces by the calibrated noise multiplier)."""
    result = dict(settings, seed=self.seed, mode=self.mode)
    if self.mode != "freeze":  # a grid-wide --frozen_value applies to the freeze arms only
      result.pop("frozen_value", None)
    if self.mode != "none":
      result.update(rule=self.rule, sparsity=self.sparsity)
    if not self.pretrained:
      result["public_epochs"] = 0
    if self.kind == "dp":
      result["epsilon"] = self.epsilon
    else:
      result["noise_multiplier"] = 0.0
    return result


def plan(grid: Grid) -> List[RunSpec]:
  """Every run of the grid once, seed by seed (an interrupted run has whole seeds)."""
  specs = []
  for seed in grid.seeds:
    specs.append(RunSpec("nonprivate", "none", None, 0.0, True, None, seed))
    specs.append(RunSpec("public_only", "none", None, 0.0, True, None, seed))
    for epsilon in grid.epsilons:
      for arm in grid.dense_arms:
        specs.append(RunSpec("dp", "none", None, 0.0, arm == DENSE_PRETRAINED, epsilon, seed))
      for mode, rule in grid.main_arms:
        specs.append(RunSpec("dp", mode, rule, grid.main_sparsity, True, epsilon, seed))
    for epsilon in grid.sweep_epsilons:
      for mode, rule in grid.sweep_arms:
        for sparsity in grid.sweep_sparsities:
          specs.append(RunSpec("dp", mode, rule, sparsity, True, epsilon, seed))
  return list(dict.fromkeys(specs))  # the sweep repeats the main sparsity: run it once


# ---- running (imports TensorFlow) -----------------------------------------------------------

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


def make_config(spec: RunSpec, settings, splits, sigma_cache):
  """The run's TrainConfig; a dp run gets the noise multiplier calibrated to its target."""
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  overrides = spec.overrides(settings)
  if spec.kind == "dp":
    sigma = calibrated_sigma(train_config.resolve("default", overrides), splits, sigma_cache)
    overrides = dict(overrides, noise_multiplier=sigma)
    del overrides["epsilon"]
  return train_config.resolve("default", overrides)


def run_one(spec: RunSpec, config, splits) -> Dict[str, Any]:
  """Trains (or, for public only, pre-trains) one run; returns its JSON record."""
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  start = time.time()
  record = dict(id=spec.run_id, arm=spec.arm, **dataclasses.asdict(spec),
                config=config.to_dict())
  record["target_epsilon"] = record.pop("epsilon")
  if spec.kind == "public_only":
    record.update(test_accuracy=public_only_accuracy(config, splits), epsilon=None, steps=0,
                  noise_multiplier=None, mask_sparsity=0.0)
  else:
    result = training.train(config, splits=splits)
    metadata = result.metadata
    record.update(test_accuracy=result.test_accuracy,
                  epsilon=metadata.epsilon if metadata.private else None,
                  steps=metadata.steps, noise_multiplier=metadata.noise_multiplier,
                  mask_sparsity=metadata.mask_sparsity)
  record.update(delta=config.delta, wall_time_s=round(time.time() - start, 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
  return record


def run_grid(grid: Grid, out: str, resume: bool, quick: bool, started: float) -> Dict[str, Any]:
  """Runs the grid, rewriting `out` after every run; with `resume`, reuses the runs of an
  existing `out` whose config is exactly the one the run would use. `started`: when the
  command started (the wall time includes imports and calibration)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  from tfdp_prune import training  # pylint: disable=import-outside-toplevel
  from tfdp_prune.compat import keras, tf  # pylint: disable=import-outside-toplevel
  tf.get_logger().setLevel("ERROR")  # Keras' retracing warnings: every run builds a new model
  previous = {}
  if resume and os.path.exists(out):
    previous = {r["id"]: r for r in read_report(out)["runs"] if "error" not in r}
  report = new_report(grid, quick)
  report["wrn16_4_forward_flops"] = wrn16_4_forward_flops()
  specs, sigma_cache = plan(grid), {}
  settings = dict(grid.settings)
  for seed in grid.seeds:
    seed_config = train_config.resolve("default", dict(settings, seed=seed))
    splits = training.load_data(seed_config)
    info = splits.info
    report.setdefault("model", model_sizes(seed_config, info))
    report["data"][str(seed)] = {"dataset": info.dataset, "num_public": info.num_public,
                                 "num_private": info.num_private, "num_test": info.num_test}
    for spec in (s for s in specs if s.seed == seed):
      done = len(report["runs"])
      try:
        config = make_config(spec, settings, splits, sigma_cache)
        record = previous.get(spec.run_id)
        if record is None or record["config"] != config.to_dict():
          record = run_one(spec, config, splits)
      except Exception as error:  # pylint: disable=broad-except
        traceback.print_exc()
        record = dict(id=spec.run_id, arm=spec.arm, seed=spec.seed, error=repr(error))
      keras.backend.clear_session()
      gc.collect()
      report["runs"].append(record)
      elapsed = time.time() - started
      print(f"[{done + 1}/{len(specs)}] {spec.run_id}: accuracy "
            f"{record.get('test_accuracy')}, epsilon {record.get('epsilon')}, "
            f"{record.get('wall_time_s')} s; elapsed {elapsed / 60:.1f} min, eta "
            f"{elapsed / (done + 1) * (len(specs) - done - 1) / 60:.1f} min", flush=True)
      report["calibrations"] = list(sigma_cache.values())
      finish_report(report, started)
      write_report(report, out)
  return report


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
          "data": {}, "started": _now(), "load_average_start": os.getloadavg()[0], "runs": []}


def finish_report(report: Dict[str, Any], started: float) -> None:
  report.update(finished=_now(), wall_time_s=round(time.time() - started, 1),
                load_average_end=os.getloadavg()[0], cells=aggregate(report["runs"]))


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


# ---- aggregation (pure) ---------------------------------------------------------------------

def cell_key(run) -> Tuple[str, float, Optional[float]]:
  return (run["arm"], run["sparsity"], run["target_epsilon"])


def summarize(values: Sequence[float]) -> Dict[str, Any]:
  """n, mean, sample standard deviation (n - 1; None for n < 2), min and max."""
  return {"n": len(values), "mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "min": min(values), "max": max(values)}


def aggregate(runs: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Test accuracy over seeds per (arm, sparsity, target epsilon); failed runs are left out."""
  groups: Dict[tuple, list] = {}
  for run in runs:
    if "error" not in run:
      groups.setdefault(cell_key(run), []).append(run)
  cells = []
  for (arm, sparsity, target), members in groups.items():
    epsilons = [r["epsilon"] for r in members if r["epsilon"] is not None]
    cells.append({"arm": arm, "sparsity": sparsity, "target_epsilon": target,
                  "seeds": sorted(r["seed"] for r in members),
                  "accuracy": summarize([r["test_accuracy"] for r in members]),
                  "max_epsilon": max(epsilons) if epsilons else None,
                  "noise_multiplier": members[0]["noise_multiplier"],
                  "steps": members[0]["steps"],
                  "mean_wall_time_s": statistics.fmean(r["wall_time_s"] for r in members)})
  return cells


def paired_differences(runs, arm, sparsity, target, baseline) -> Optional[Dict[str, Any]]:
  """Accuracy of (arm, sparsity, target) minus the baseline's on the same seed (same data
  split, same initialization), over the seeds both have: summary plus wins (difference > 0).
  `baseline` is a cell key; its target may be None (public only, non-private)."""
  ok = [r for r in runs if "error" not in r]
  ours = {r["seed"]: r["test_accuracy"] for r in ok if cell_key(r) == (arm, sparsity, target)}
  theirs = {r["seed"]: r["test_accuracy"] for r in ok if cell_key(r) == tuple(baseline)}
  seeds = sorted(set(ours) & set(theirs))
  if not seeds:
    return None
  differences = [ours[s] - theirs[s] for s in seeds]
  return dict(summarize(differences), wins=sum(d > 0 for d in differences))


# ---- rendering: markdown --------------------------------------------------------------------

def _cells_by_key(cells):
  return {(c["arm"], c["sparsity"], c["target_epsilon"]): c for c in cells}


def _percent(summary, signed=False) -> str:
  if summary is None:
    return "n/a"
  sign = "+" if signed else ""
  std = "n/a" if summary["std"] is None else f"{100 * summary['std']:.1f}"
  return f"{100 * summary['mean']:{sign}.1f} ± {std}"


def _table(header, rows) -> List[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _epsilon_label(epsilon):
  return f"ε = {epsilon:g}"


def _main_arms(grid) -> List[Tuple[str, float]]:
  """(arm, sparsity) of the main table, dense first."""
  return ([(arm, 0.0) for arm in grid["dense_arms"]]
          + [(f"{mode}/{rule}", grid["main_sparsity"]) for mode, rule in grid["main_arms"]])


def reference_lines(cells) -> List[str]:
  by_key = _cells_by_key(cells)
  lines = []
  for arm, what in ((NON_PRIVATE, "public pre-training, then the private part with the same "
                     "optimizer (clipping at C = 1 kept) and no noise"),
                    (PUBLIC_ONLY, "public pre-training only: the model every pre-trained arm "
                     "starts from")):
    cell = by_key.get((arm, 0.0, None))
    if cell is not None:
      a = cell["accuracy"]
      lines.append(f"- **{arm}** ({what}): {_percent(a)} % (n = {a['n']})")
  return lines


def main_table(cells, grid) -> List[str]:
  """Accuracy (%) per arm and target epsilon; best mean per column in bold; ↓ marks a mean not
  above public only (that arm adds nothing over the public data alone)."""
  by_key = _cells_by_key(cells)
  public = by_key.get((PUBLIC_ONLY, 0.0, None))
  public_mean = public["accuracy"]["mean"] if public else None
  rows, best = [], {}
  for epsilon in grid["epsilons"]:
    means = [by_key[(a, s, epsilon)]["accuracy"]["mean"] for a, s in _main_arms(grid)
             if (a, s, epsilon) in by_key]
    best[epsilon] = max(means) if means else None
  for arm, sparsity in _main_arms(grid):
    row = [arm, f"{sparsity:g}"]
    for epsilon in grid["epsilons"]:
      cell = by_key.get((arm, sparsity, epsilon))
      if cell is None:
        row.append("n/a")
        continue
      a = cell["accuracy"]
      text = f"{_percent(a)} ({a['n']})"
      if a["mean"] == best[epsilon]:
        text = f"**{text}**"
      if public_mean is not None and a["mean"] <= public_mean:
        text += " ↓"
      row.append(text)
    rows.append(row)
  return _table(["arm", "sparsity"] + [_epsilon_label(e) for e in grid["epsilons"]], rows)


def paired_table(runs, grid, baseline_arm, baseline_epsilon_fixed) -> List[str]:
  """Per-seed accuracy differences (percentage points) to a baseline arm: mean ± std (wins/n).
  The baseline is at the same epsilon, or (public only) has none."""
  rows = []
  for arm, sparsity in _main_arms(grid):
    if arm == baseline_arm:
      continue
    row = [arm]
    for epsilon in grid["epsilons"]:
      baseline = (baseline_arm, 0.0, None if baseline_epsilon_fixed else epsilon)
      diff = paired_differences(runs, arm, sparsity, epsilon, baseline)
      row.append("n/a" if diff is None else f"{_percent(diff, signed=True)} "
                 f"({diff['wins']}/{diff['n']})")
    rows.append(row)
  return _table(["arm"] + [_epsilon_label(e) for e in grid["epsilons"]], rows)


def sweep_table(cells, grid, epsilon) -> List[str]:
  by_key = _cells_by_key(cells)
  rows = []
  for mode, rule in grid["sweep_arms"]:
    row = [f"{mode}/{rule}"]
    for sparsity in grid["sweep_sparsities"]:
      cell = by_key.get((f"{mode}/{rule}", sparsity, epsilon))
      row.append("n/a" if cell is None else f"{_percent(cell['accuracy'])} "
                 f"({cell['accuracy']['n']})")
    rows.append(row)
  dense = by_key.get((DENSE_PRETRAINED, 0.0, epsilon))
  if dense is not None:
    rows.append([f"{DENSE_PRETRAINED} (no mask)", f"{_percent(dense['accuracy'])} "
                 f"({dense['accuracy']['n']})"] + [""] * (len(grid["sweep_sparsities"]) - 1))
  return _table(["arm \\ sparsity"] + [f"{s:g}" for s in grid["sweep_sparsities"]], rows)


def privacy_table(runs, grid, calibrations=()) -> List[str]:
  """Per target epsilon: sigma, steps, the largest epsilon any run reached, the number of DP runs
  and how long the (one) calibration took."""
  seconds = {c["target_epsilon"]: c["seconds"] for c in calibrations}
  rows = []
  for epsilon in grid["epsilons"]:
    dp = [r for r in runs if "error" not in r and r["kind"] == "dp"
          and r["target_epsilon"] == epsilon]
    if not dp:
      continue
    sigmas = sorted({r["noise_multiplier"] for r in dp})
    rows.append([f"{epsilon:g}", ", ".join(f"{s:.4f}" for s in sigmas),
                 ", ".join(str(s) for s in sorted({r["steps"] for r in dp})),
                 f"{max(r['epsilon'] for r in dp):.4f}", len(dp), seconds.get(epsilon, "n/a")])
  return _table(["target ε", "noise multiplier σ", "logical steps", "max achieved ε", "DP runs",
                 "calibration (s)"], rows)


def conclusions_block(existing_markdown: Optional[str]) -> str:
  """The hand-written Conclusions of an existing RESULTS.md, or a placeholder."""
  if existing_markdown and CONCLUSIONS_BEGIN in existing_markdown:
    start = existing_markdown.index(CONCLUSIONS_BEGIN)
    end = existing_markdown.index(CONCLUSIONS_END, start) + len(CONCLUSIONS_END)
    return existing_markdown[start:end]
  return (f"{CONCLUSIONS_BEGIN}\n_Not written yet: read the tables, then write the conclusions "
          f"here (this block is kept when RESULTS.md is re-rendered)._\n{CONCLUSIONS_END}")


def paper_config_section(report) -> List[str]:
  """De et al.'s CIFAR-10 WRN-16-4 epsilon-8 config: command, and a runtime estimate from FLOPs."""
  config = report.get("paper_config")
  if config is None:
    return []
  flops = report.get("wrn16_4_forward_flops")
  lines = [
      f"## De et al.'s CIFAR-10 WRN-16-4 at ε = 8 (`--config={PAPER_CONFIG}`)", "",
      "De et al. (2022) report 79.5 % test accuracy on CIFAR-10 for WRN-16-4 at (8, 1e-5)-DP. "
      "The named config holds their recipe:", "",
      "```", f"tfdp-train --config={PAPER_CONFIG} --strategy=tpu   # or mirrored on GPUs",
      "```", "",
      "Settings: " + ", ".join(f"`{k}={v}`" for k, v in config.items()) + ".", "",
      "It needs CIFAR-10 prepared for TFDS and an accelerator. **Here only its pipeline is "
      "exercised, on mock data** (`tfds.testing.mock_data`): "
      "`tests/tfdp_prune/test_training.py::test_paper_config_pipeline_on_mock_data` (WRN-10-1, "
      "tiny batches, accumulation, augmult, EMA, epsilon target) and the `slow`-marked "
      "`test_paper_config_wrn16_4_on_mock_data` (the real WRN-16-4, 2,748,890 parameters, one "
      "step). The 79.5 % is not reproduced here.", ""]
  if flops:
    examples = config["steps"] * config["batch_size"] * config["augmult"]
    total = 3 * flops * examples  # forward + backward is about 3 forward passes
    lines += [
        "**Expected runtime: an estimate from FLOPs, not a measurement** (we found no "
        "published time for this run: jax_privacy's image-classification README gives none). "
        f"One WRN-16-4 forward pass on a 32x32 image is {flops / 1e9:.2f} GFLOPs (convolutions "
        f"and dense layer of `models.wide_resnet(16, 4)`, counted by this script); "
        f"{config['steps']} steps x {config['batch_size']} examples x augmult "
        f"{config['augmult']} = {examples / 1e6:.1f} M forward/backward passes, about "
        f"3 x {flops / 1e9:.2f} GFLOPs each = {total / 1e15:.0f} PFLOPs, before the DP "
        "overhead (per-example norms: the per-layer engine measured 1.7-1.9x the non-private "
        "step time for WRN-16-4 on CPU, `benchmarks/results/step_time.md`). At a sustained "
        f"100 TFLOP/s (an A100-class GPU in bf16 at about a third of its 312 TFLOP/s peak, or "
        f"a TPU v3-8) that is {2 * total / 1e14 / 3600:.1f} h with a 2x DP overhead; at 20 TFLOP/s "
        f"(plain fp32) {2 * total / 2e13 / 3600:.0f} h. On this 2-CPU machine (2.4 s per "
        "32-example step, same benchmark) it would take about "
        f"{examples / 32 * 2.39 / 86400:.0f} days.", ""]
  return lines


def _code_line(code) -> str:
  differs = code.get("differs_from_head")
  if differs is None:
    return "the tfdp_prune imported could not be compared with a git commit."
  how = ("is identical to that commit's `tfdp_prune/`" if not differs else
         f"differs from that commit's `tfdp_prune/` in {', '.join(differs)}")
  return (f"repository HEAD {code.get('git_head')}; the tfdp_prune imported (from "
          f"`{code.get('tfdp_prune_dir')}`) {how}.")


def _overridden(grid) -> str:
  """The grid's changes to the default hyperparameters (output settings aside), as text."""
  changed = {k: v for k, v in grid.get("settings", ()) if k not in ("export_dir", "verbose")}
  return "; this grid sets " + ", ".join(f"{k}={v}" for k, v in changed.items()) if changed else ""


def render_markdown(report, links: Dict[str, str], existing: Optional[str] = None) -> str:
  """RESULTS.md from a report (runs are re-aggregated here, so hand-made JSON needs only runs).
  `links`: paths relative to RESULTS.md of the JSON ("json") and the plots ("epsilon",
  "sparsity"); `existing`: the current RESULTS.md, whose Conclusions are kept."""
  json_link = links.get("json", "benchmarks/results/experiments.json")
  runs, grid = report["runs"], report["grid"]
  cells = aggregate(runs)
  failures = [r for r in runs if "error" in r]
  defaults = dict(report.get("defaults", {}), **dict(grid.get("settings", ())))
  versions = report.get("versions", {})
  data = next(iter(report.get("data", {}).values()), None)
  machine_info = report.get("machine", {})
  model = report.get("model", {})
  lines = [
      "# Results: DP training of the coordinates chosen from public data, on digits", "",
      "Reproduces the comparisons of Adamczewski & Park, *Differential privacy meets neural "
      "network pruning* (arXiv 2303.04612), at small scale: dense DP-SGD vs parameter freezing "
      "vs parameter selection, the rules magnitude / random / public-gradient, a sparsity sweep, "
      "four privacy levels. Generated by `benchmarks/experiments.py` from "
      f"[`{json_link}`]({json_link}) (every run's config, seed, achieved ε, test accuracy and "
      "wall time); only the Conclusions are written by hand.", "",
      "## What was run", "",
      f"- Command: `{report.get('command')}`" + (" (**quick grid: a smoke test, not results**)"
                                                 if report.get("quick") else ""),
      f"- Machine: {machine_info.get('cpu_count')} CPUs ({machine_info.get('cpu_model')}), "
      f"{machine_info.get('platform')}; shared with other work (load average "
      f"{report.get('load_average_start', float('nan')):.2f} at the start, "
      f"{report.get('load_average_end', float('nan')):.2f} at the end).",
      f"- Wall time: **{report.get('wall_time_s', 0) / 60:.1f} min** for {len(runs)} runs "
      f"({report.get('started')} to {report.get('finished')}); "
      f"sum of the runs' own times {sum(r.get('wall_time_s') or 0 for r in runs) / 60:.1f} min.",
      "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
      f"- Code: {_code_line(report.get('code', {}))}",
      f"- Failed runs: {len(failures)}." + "".join(f"\n  - `{r['id']}`: {r['error']}"
                                                   for r in failures), ""]
  lines += ["## Setup", ""]
  if data:
    lines.append(
        f"- Data: scikit-learn's digits (1,797 real 8x8 images, 10 classes), split per seed "
        f"(stratified): public {data['num_public']} (10 %), private {data['num_private']}, "
        f"test {data['num_test']}; public and private are disjoint (checked by `data.load`).")
  lines += [
      f"- Model: `{model.get('name')}` (`models.mlp`: 64-128-10, ReLU), "
      f"{model.get('parameters', 0):,} parameters, of which {model.get('maskable', 0):,} in the "
      "kernels that masks apply to (biases are always trained).",
      f"- Hyperparameters: the library defaults (`TrainConfig()`{_overridden(grid)}), the same "
      "for every arm and epsilon, **not tuned** (no search on test or validation data): DP-SGD "
      f"with momentum {defaults.get('momentum')}, learning rate "
      f"{defaults.get('learning_rate')}, Poisson sampling with expected batch "
      f"{defaults.get('batch_size')}, {defaults.get('epochs')} epochs, clip norm "
      f"{defaults.get('l2_norm_clip')}, {defaults.get('accountant')} accountant, δ = "
      f"{defaults.get('delta')}; public pre-training {defaults.get('public_epochs')} epochs of "
      f"SGD at {defaults.get('public_learning_rate')}; selection every "
      f"{defaults.get('select_every')} steps. How the defaults were first chosen is not "
      "recorded; the default run is freeze/magnitude/0.8 at ε = 8, so that arm may be favoured "
      "by them.",
      "- Arms: **dense (scratch)**: DP-SGD on all coordinates from a random init. **dense "
      "(pre-trained)**: public pre-training, then DP-SGD on all coordinates (DP fine-tuning, "
      "the paper's baseline). **freeze/rule**: public pre-training, one mask, the rest set to "
      "zero (pruned) and never updated. **select/rule**: public pre-training, a new mask every "
      f"{defaults.get('select_every')} steps from the current weights / public gradients / "
      "randomness; unselected coordinates keep their values. Rules: magnitude (layer-wise), "
      "random, public_gradient (gradient magnitude on the public part). Sparsity = fraction of "
      "each kernel not trained.",
      "- Noise: calibrated once per target ε by `training.plan_privacy` (the calibration "
      "`train` does) and passed as `noise_multiplier`; every run's ε is recomputed by the "
      "library from the steps taken (table below).",
      "- Statistics: mean ± sample standard deviation (n - 1) over seeds, n in parentheses, "
      "test accuracy in %. A seed fixes the data split, the initialization and the random "
      "masks (the DP noise and the sampling draw from OS entropy, never from the seed), so arms "
      "on the same seed are paired in data and initialization.", ""]
  lines += ["## Accuracy vs ε", "", "References (no ε):", ""] + reference_lines(cells) + [""]
  lines += [f"Masked arms at sparsity {grid['main_sparsity']:g}. Bold: best mean in the column; "
            "↓: mean not above public only (the DP training adds nothing over the public data "
            "alone).", ""] + main_table(cells, grid) + [""]
  lines += ["Paired differences to **dense (pre-trained)** at the same ε (percentage points, "
            "same seed): mean ± std (seeds where the arm is better / n).", ""]
  lines += paired_table(runs, grid, DENSE_PRETRAINED, False) + [""]
  lines += ["Paired differences to **public only** (same seed).", ""]
  lines += paired_table(runs, grid, PUBLIC_ONLY, True) + [""]
  if "epsilon" in links:
    lines += [f"![accuracy vs epsilon]({links['epsilon']})", ""]
  lines += ["## Accuracy vs sparsity", ""]
  for epsilon in grid["sweep_epsilons"]:
    lines += [f"At {_epsilon_label(epsilon)}:", ""] + sweep_table(cells, grid, epsilon) + [""]
  if "sparsity" in links:
    lines += [f"![accuracy vs sparsity]({links['sparsity']})", ""]
  lines += ["## Privacy actually spent", ""]
  lines += privacy_table(runs, grid, report.get("calibrations", ())) + [""]
  lines += ["## Conclusions", "", conclusions_block(existing), ""]
  lines += paper_config_section(report)
  lines += ["## Reproduce", "", "```", "python benchmarks/experiments.py            # every run, "
            "then RESULTS.md and the plots", "python benchmarks/experiments.py "
            "--render_only  # RESULTS.md and the plots from the JSON", "```", ""]
  return "\n".join(lines)


# ---- rendering: plots -----------------------------------------------------------------------

def render_plots(report, plots_dir: str) -> Dict[str, str]:
  """Accuracy vs epsilon (one panel per mode) and vs sparsity (one panel per sweep epsilon), with
  std error bars and the reference lines; returns the PNG paths by kind."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel,unused-import
  grid, cells = report["grid"], aggregate(report["runs"])
  by_key = _cells_by_key(cells)
  os.makedirs(plots_dir, exist_ok=True)
  paths = {}

  def references(axis):
    for arm, style in ((NON_PRIVATE, "--"), (PUBLIC_ONLY, ":")):
      cell = by_key.get((arm, 0.0, None))
      if cell is not None:
        axis.axhline(100 * cell["accuracy"]["mean"], color="gray", linestyle=style, label=arm)

  def curve(axis, xs, keys, label, shift=lambda x: x, **style):
    points = [(shift(x), by_key[k]["accuracy"]) for x, k in zip(xs, keys) if k in by_key]
    if points:
      axis.errorbar([p[0] for p in points], [100 * p[1]["mean"] for p in points],
                    yerr=[100 * (p[1]["std"] or 0.0) for p in points], label=label, capsize=3,
                    marker="o", **style)

  modes = sorted({mode for mode, _ in grid["main_arms"]}, key=["freeze", "select"].index)
  figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), sharey=True,
                              squeeze=False)
  epsilons = grid["epsilons"]
  for axis, mode in zip(axes[0], modes):
    arms = [(arm, 0.0) for arm in grid["dense_arms"]] + [
        (f"{m}/{rule}", grid["main_sparsity"]) for m, rule in grid["main_arms"] if m == mode]
    for index, (arm, sparsity) in enumerate(arms):
      # Spread the curves a little along x, so that their error bars stay apart.
      factor = 1.03 ** (index - (len(arms) - 1) / 2)
      style = ({"color": "black", "linestyle": "-" if arm == DENSE_PRETRAINED else "-."}
               if sparsity == 0.0 else {})
      curve(axis, epsilons, [(arm, sparsity, e) for e in epsilons],
            arm if sparsity == 0.0 else f"{arm} ({sparsity:g})",
            shift=lambda x, f=factor: x * f, **style)
    references(axis)
    axis.set(xscale="log", xlabel="target ε (δ = 1e-5)", title=f"{mode} vs dense")
    axis.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
  figure.tight_layout()
  paths["epsilon"] = os.path.join(plots_dir, PLOT_NAMES["epsilon"])
  figure.savefig(paths["epsilon"], dpi=110)
  plt.close(figure)

  sweep = grid["sweep_epsilons"]
  figure, axes = plt.subplots(1, len(sweep), figsize=(6 * len(sweep), 4.5), squeeze=False)
  sparsities = grid["sweep_sparsities"]
  for axis, epsilon in zip(axes[0], sweep):
    for index, (mode, rule) in enumerate(grid["sweep_arms"]):
      offset = 0.004 * (index - (len(grid["sweep_arms"]) - 1) / 2)
      curve(axis, sparsities, [(f"{mode}/{rule}", s, epsilon) for s in sparsities],
            f"{mode}/{rule}", shift=lambda x, o=offset: x + o,
            linestyle="-" if mode == "select" else "--")
    dense = by_key.get((DENSE_PRETRAINED, 0.0, epsilon))
    if dense is not None:
      axis.axhline(100 * dense["accuracy"]["mean"], color="black", label=DENSE_PRETRAINED)
    references(axis)
    axis.set(xlabel="sparsity (fraction of each kernel not trained)",
             ylabel="test accuracy (%)", title=f"target {_epsilon_label(epsilon)}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  paths["sparsity"] = os.path.join(plots_dir, PLOT_NAMES["sparsity"])
  figure.savefig(paths["sparsity"], dpi=110)
  plt.close(figure)
  return paths


def render(report, json_path: str, results_md: str, plots_dir: str) -> None:
  """Writes the plots and RESULTS.md (keeping its hand-written Conclusions)."""
  paths = dict(render_plots(report, plots_dir), json=json_path)
  md_dir = os.path.dirname(os.path.abspath(results_md))
  links = {kind: os.path.relpath(path, md_dir) for kind, path in paths.items()}
  existing = None
  if os.path.exists(results_md):
    with open(results_md, encoding="utf-8") as f:
      existing = f.read()
  from tfdp_prune import atomic_files  # pylint: disable=import-outside-toplevel
  atomic_files.replace_file(results_md, render_markdown(report, links, existing))


# ---- main -----------------------------------------------------------------------------------

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="Tiny grid (a few steps per run); outputs default to a temp dir.")
  parser.add_argument("--render_only", action="store_true",
                      help="Render RESULTS.md and the plots from --out; train nothing.")
  parser.add_argument("--resume", action="store_true",
                      help="Keep the runs already in --out that used the same settings.")
  parser.add_argument("--out", help="JSON (default benchmarks/results/experiments.json).")
  parser.add_argument("--results_md", help="Markdown (default RESULTS.md in the repo root).")
  parser.add_argument("--plots_dir", help="PNG directory (default benchmarks/results).")
  parser.add_argument("--frozen_value", choices=("zero", "keep"),
                      help="What the freeze arms' frozen coordinates hold (default: the "
                      "library's, zero); keep: their public pre-trained values.")
  args = parser.parse_args(argv)
  started = time.time()
  default_dir = (os.path.join(tempfile.gettempdir(), "tfdp_prune_experiments_quick")
                 if args.quick else None)
  out = args.out or os.path.join(default_dir or os.path.join(HERE, "results"), "experiments.json")
  results_md = args.results_md or os.path.join(default_dir or REPO, "RESULTS.md")
  plots_dir = args.plots_dir or default_dir or os.path.join(HERE, "results")
  if args.render_only:
    report = read_report(out)
  else:
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.frozen_value:
      grid = dataclasses.replace(grid, settings=grid.settings + (("frozen_value",
                                                                  args.frozen_value),))
    report = run_grid(grid, out, args.resume, args.quick, started)
  render(report, out, results_md, plots_dir)
  print(f"wrote {out}, {results_md} and the plots in {plots_dir}")


if __name__ == "__main__":
  main()
