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


def _run(arm, target, seed, accuracy, sparsity=0.0, kind="dp", **extra):
  """A hand-made run record with the fields aggregation and rendering read."""
  return dict(id=f"{arm}|{sparsity}|{target}|{seed}", arm=arm, kind=kind, sparsity=sparsity,
              target_epsilon=target, seed=seed, test_accuracy=accuracy,
              epsilon=None if target is None else target * 0.999,
              noise_multiplier=None if target is None else 8.0 / target, steps=189,
              wall_time_s=1.0, **extra)


def _python(*args):
  return subprocess.run([sys.executable, _SCRIPT, *args], cwd=_REPO, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                                         PYTHONPATH=_REPO))


def test_quick_grid_end_to_end(tmp_path):
  """--quick trains every kind of run, writes the JSON, RESULTS-style markdown and two PNGs;
  --render_only renders them again from the JSON, keeping hand-written conclusions."""
  out, md = str(tmp_path / "experiments.json"), str(tmp_path / "RESULTS.md")
  paths = [f"--out={out}", f"--results_md={md}", f"--plots_dir={tmp_path}"]
  result = _python("--quick", *paths)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

  with open(out, encoding="utf-8") as f:
    report = json.load(f)
  assert {"format_version", "command", "grid", "machine", "versions", "code", "data",
          "model", "paper_config", "wall_time_s", "runs", "cells"} <= set(report)
  specs = experiments.plan(experiments.QUICK_GRID)
  assert [r["id"] for r in report["runs"]] == [s.run_id for s in specs]
  for run in report["runs"]:
    assert "error" not in run, run
    assert {"config", "seed", "target_epsilon", "epsilon", "test_accuracy", "wall_time_s",
            "noise_multiplier", "steps"} <= set(run)
    assert 0.0 <= run["test_accuracy"] <= 1.0 and run["wall_time_s"] > 0
    assert run["config"]["seed"] == run["seed"]
    if run["kind"] == "dp":
      assert 0 < run["epsilon"] <= run["target_epsilon"]  # calibration never overshoots
      assert run["config"]["noise_multiplier"] == run["noise_multiplier"] > 0
    else:
      assert run["epsilon"] is None
  kinds = {r["kind"] for r in report["runs"]}
  assert kinds == {"dp", "nonprivate", "public_only"}
  assert {tuple(c["seeds"]) for c in report["cells"]} == {(0, 1)}  # 2 seeds in every cell

  with open(md, encoding="utf-8") as f:
    markdown = f.read()
  assert "| arm | sparsity | ε = 2 | ε = 8 |" in markdown
  assert "| freeze/magnitude | 0.8 |" in markdown
  assert "| target ε | noise multiplier σ |" in markdown
  for name in experiments.PLOT_NAMES.values():
    assert f"]({name})" in markdown
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == _PNG_MAGIC

  conclusions = (f"{experiments.CONCLUSIONS_BEGIN}\nHand-written.\n"
                 f"{experiments.CONCLUSIONS_END}")
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown.replace(experiments.conclusions_block(None), conclusions))
  for name in experiments.PLOT_NAMES.values():
    os.remove(tmp_path / name)
  result = _python("--render_only", *paths)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(md, encoding="utf-8") as f:
    rendered = f.read()
  assert conclusions in rendered and "| arm | sparsity | ε = 2 | ε = 8 |" in rendered
  assert all(os.path.exists(tmp_path / name) for name in experiments.PLOT_NAMES.values())


def test_full_grid_runs_each_cell_once():
  specs = experiments.plan(experiments.FULL_GRID)
  # Per seed: 2 references + 4 epsilons x (2 dense + 6 masked) + 2 sweep epsilons x 4 arms x
  # 4 sparsities other than the main 0.8 (run once, shared with the main grid).
  assert len(specs) == 5 * (2 + 4 * 8 + 2 * 4 * 4) == 330
  assert len({s.run_id for s in specs}) == len(specs)
  assert [s.seed for s in specs] == sorted(s.seed for s in specs)  # whole seeds first
  arms = {(s.arm, s.sparsity, s.epsilon) for s in specs if s.seed == 0}
  assert ("select/public_gradient", 0.8, 1.0) in arms and ("freeze/random", 0.95, 8.0) in arms
  assert ("freeze/public_gradient", 0.95, 8.0) not in arms  # sweep: magnitude and random only


def test_run_overrides_express_each_kind():
  dense = experiments.RunSpec("dp", "none", None, 0.0, False, 2.0, 3)
  assert dense.arm == experiments.DENSE_SCRATCH
  assert dense.overrides({"verbose": 0}) == dict(verbose=0, seed=3, mode="none",
                                                 public_epochs=0, epsilon=2.0)
  select = experiments.RunSpec("dp", "select", "random", 0.9, True, 8.0, 0)
  assert select.overrides({}) == dict(seed=0, mode="select", rule="random", sparsity=0.9,
                                      epsilon=8.0)
  reference = experiments.RunSpec("nonprivate", "none", None, 0.0, True, None, 1)
  assert reference.overrides({})["noise_multiplier"] == 0.0
  assert "epsilon" not in reference.overrides({})
  # A grid-wide frozen_value reaches the freeze arms only (the others refuse it).
  keep = {"frozen_value": "keep"}
  freeze = experiments.RunSpec("dp", "freeze", "magnitude", 0.8, True, 8.0, 0)
  assert freeze.overrides(keep)["frozen_value"] == "keep"
  assert "frozen_value" not in select.overrides(keep) and "frozen_value" not in dense.overrides(keep)


def test_aggregate_mean_and_sample_std_over_seeds():
  runs = [_run("select/random", 1.0, seed, accuracy, sparsity=0.8)
          for seed, accuracy in ((0, 0.5), (1, 0.6), (2, 0.7))]
  runs += [_run("select/random", 2.0, 0, 0.9, sparsity=0.8),
           _run("select/random", 1.0, 3, 0.0, sparsity=0.5),
           dict(id="broken", arm="select/random", seed=4, error="RuntimeError()")]
  cells = experiments._cells_by_key(experiments.aggregate(runs))
  assert set(cells) == {("select/random", 0.8, 1.0), ("select/random", 0.8, 2.0),
                        ("select/random", 0.5, 1.0)}
  cell = cells[("select/random", 0.8, 1.0)]
  assert cell["accuracy"]["n"] == 3 and cell["seeds"] == [0, 1, 2]
  assert cell["accuracy"]["mean"] == pytest.approx(0.6)
  assert cell["accuracy"]["std"] == pytest.approx(0.1)  # n - 1; the population std is 0.0816
  assert (cell["accuracy"]["min"], cell["accuracy"]["max"]) == (0.5, 0.7)
  assert cell["max_epsilon"] == pytest.approx(0.999)
  assert cells[("select/random", 0.8, 2.0)]["accuracy"]["std"] is None  # one seed: no spread


def test_paired_differences_use_common_seeds_only():
  runs = [_run("freeze/magnitude", 4.0, s, a, sparsity=0.8)
          for s, a in ((0, 0.80), (1, 0.70), (2, 0.90), (3, 0.50))]
  runs += [_run(experiments.PUBLIC_ONLY, None, s, a, kind="public_only")
           for s, a in ((0, 0.75), (1, 0.72), (2, 0.80))]
  diff = experiments.paired_differences(runs, "freeze/magnitude", 0.8, 4.0,
                                        (experiments.PUBLIC_ONLY, 0.0, None))
  assert diff["n"] == 3 and diff["wins"] == 2  # seed 3 has no baseline
  assert diff["mean"] == pytest.approx((0.05 - 0.02 + 0.10) / 3)
  assert diff["std"] == pytest.approx(0.0602771, abs=1e-6)
  assert experiments.paired_differences(runs, "freeze/magnitude", 0.8, 8.0,
                                        (experiments.PUBLIC_ONLY, 0.0, None)) is None


def test_markdown_tables_from_hand_made_report():
  grid = dict(epsilons=[1.0, 8.0], main_sparsity=0.8, dense_arms=[experiments.DENSE_PRETRAINED],
              main_arms=[["select", "magnitude"]], sweep_arms=[["select", "magnitude"]],
              sweep_epsilons=[8.0], sweep_sparsities=[0.5, 0.8], settings=[])
  runs = [_run(experiments.PUBLIC_ONLY, None, s, 0.7, kind="public_only") for s in (0, 1)]
  runs += [_run(experiments.DENSE_PRETRAINED, 1.0, s, a) for s, a in ((0, 0.6), (1, 0.7))]
  runs += [_run(experiments.DENSE_PRETRAINED, 8.0, s, a) for s, a in ((0, 0.8), (1, 0.9))]
  runs += [_run("select/magnitude", e, s, a, sparsity=0.8)
           for e, s, a in ((1.0, 0, 0.75), (1.0, 1, 0.85), (8.0, 0, 0.9), (8.0, 1, 0.9))]
  report = {"grid": grid, "runs": runs, "wall_time_s": 60.0}
  existing = (f"old text\n{experiments.CONCLUSIONS_BEGIN}\nKept.\n{experiments.CONCLUSIONS_END}"
              "\nmore old text")
  markdown = experiments.render_markdown(report, {"epsilon": "e.png"}, existing)
  assert "| dense (pre-trained) | 0 | 65.0 ± 7.1 (2) ↓ | 85.0 ± 7.1 (2) |" in markdown
  assert "| select/magnitude | 0.8 | **80.0 ± 7.1 (2)** | **90.0 ± 0.0 (2)** |" in markdown
  # Paired to dense (pre-trained): +15 and +15 at epsilon 1; +10 and 0 at epsilon 8.
  assert "| select/magnitude | +15.0 ± 0.0 (2/2) | +5.0 ± 7.1 (1/2) |" in markdown
  assert "**public only** (" in markdown and "70.0 ± 0.0 % (n = 2)" in markdown
  assert "| select/magnitude | n/a | 90.0 ± 0.0 (2) |" in markdown  # sweep at epsilon 8
  assert "![accuracy vs epsilon](e.png)" in markdown and "![accuracy vs sparsity]" not in markdown
  assert f"{experiments.CONCLUSIONS_BEGIN}\nKept.\n{experiments.CONCLUSIONS_END}" in markdown
  assert "old text" not in markdown
