"""benchmarks/step_time.py: the peer arms' bookkeeping (no JAX or PyTorch needed), and, when the
peers' environment exists (benchmarks/peers/setup.sh; CI never makes it), the peer arms
themselves."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BENCHMARKS = os.path.join(_REPO, "benchmarks")
_PEERS_PYTHON = os.path.join(_BENCHMARKS, "peers", ".venv", "bin", "python")


def _load_script():
  """The script as a module (benchmarks/ is not a package); importing it imports no TF. Its
  directory is on sys.path only while it loads (it imports machine, provenance, peers.arms)."""
  sys.path.insert(0, _BENCHMARKS)
  try:
    spec = importlib.util.spec_from_file_location("step_time", os.path.join(_BENCHMARKS,
                                                                            "step_time.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(_BENCHMARKS)
  return module


step_time = _load_script()


def _run(model, arm, round_index, median, cpu=None, minimum=None, params=26010, rss=500.0):
  """A hand-made child result with the fields aggregation and rendering read."""
  return {"model": model, "arm": arm, "batch": 250, "round": round_index, "params": params,
          "median_step_s": median, "min_step_s": median if minimum is None else minimum,
          "max_step_s": median, "median_cpu_step_s": median if cpu is None else cpu,
          "timed_steps": 3, "warmup_steps": 2, "first_step_s": 1.0, "peak_rss_mb": rss,
          "peak_rss_increase_mb": rss / 2, "loadavg_1min_at_end": 1.0, "notes": {}}


def _results(runs):
  return {(r["model"], r["arm"]): r for r in step_time.add_ratios(step_time.aggregate(runs))}


def test_each_arm_is_compared_with_its_own_frameworks_non_private_step():
  runs = [_run("cnn", "nonprivate", 0, 0.010), _run("cnn", "tfdp", 0, 0.015),
          _run("cnn", "tfp_vectorized", 0, 1.0),
          _run("cnn", "jax_nonprivate", 0, 0.002), _run("cnn", "jax_vmap_dp", 0, 0.006),
          _run("cnn", "jax_privacy_dp", 0, 0.008),
          _run("cnn", "torch_nonprivate", 0, 0.004), _run("cnn", "opacus_dp", 0, 0.020)]
  results = _results(runs)
  expected = {"nonprivate": ("nonprivate", 1.0), "tfdp": ("nonprivate", 1.5),
              "tfp_vectorized": ("nonprivate", 100.0),
              "jax_nonprivate": ("jax_nonprivate", 1.0), "jax_vmap_dp": ("jax_nonprivate", 3.0),
              "jax_privacy_dp": ("jax_nonprivate", 4.0),
              "torch_nonprivate": ("torch_nonprivate", 1.0), "opacus_dp": ("torch_nonprivate", 5.0)}
  for arm, (baseline, ratio) in expected.items():
    r = results[("cnn", arm)]
    assert r["baseline_arm"] == baseline, arm
    assert r["ratio_to_nonprivate"] == pytest.approx(ratio), arm
    assert r["min_ratio_to_nonprivate"] == pytest.approx(ratio), arm
    assert r["cpu_ratio_to_nonprivate"] == pytest.approx(ratio), arm
  assert {r["framework"] for r in results.values()} == {"tf_keras", "jax", "torch"}


def test_ratios_compare_the_same_model_only():
  runs = [_run("cnn", "jax_nonprivate", 0, 0.002), _run("wrn", "jax_nonprivate", 0, 0.1),
          _run("cnn", "jax_vmap_dp", 0, 0.004), _run("wrn", "jax_vmap_dp", 0, 0.5)]
  results = _results(runs)
  assert results[("cnn", "jax_vmap_dp")]["ratio_to_nonprivate"] == pytest.approx(2.0)
  assert results[("wrn", "jax_vmap_dp")]["ratio_to_nonprivate"] == pytest.approx(5.0)


def test_every_peer_arm_has_a_non_private_baseline_of_its_own_framework():
  for arm in step_time.peer_arms.PEER_ARMS:
    baseline = step_time.baseline_arm(arm)
    assert baseline in step_time.ARMS
    assert step_time.framework(baseline) == step_time.framework(arm)
    assert step_time.baseline_arm(baseline) == baseline
    assert arm in step_time.ARM_LABELS
  assert step_time.baseline_arm("tfp_dpmodel") == "nonprivate"
  assert step_time.framework("tfdp_mask80") == "tf_keras"


def test_the_ratio_is_the_median_of_the_per_round_ratios():
  # The machine slows down 10x in round 2 for both arms: per-round ratios 2, 3, 2 -> 2; the ratio
  # of the medians over rounds would be 3.
  runs = []
  for i, (base, dp) in enumerate([(1.0, 2.0), (1.0, 3.0), (10.0, 20.0)]):
    runs += [_run("wrn", "torch_nonprivate", i, base), _run("wrn", "opacus_dp", i, dp)]
  r = _results(runs)[("wrn", "opacus_dp")]
  assert r["median_step_s"] == 3.0 and r["rounds"] == 3
  assert r["ratio_to_nonprivate"] == pytest.approx(2.0)
  assert r["min_ratio_to_nonprivate"] == pytest.approx(2.0)  # min 2.0 / min 1.0


def test_aggregate_takes_medians_over_rounds_and_the_worst_memory():
  runs = [_run("cnn", "jax_vmap_dp", i, m, cpu=c, minimum=lo, rss=rss)
          for i, (m, c, lo, rss) in enumerate([(0.3, 0.5, 0.25, 700.0), (0.1, 0.2, 0.09, 900.0),
                                               (0.2, 0.4, 0.15, 800.0)])]
  (r,) = step_time.aggregate(runs)
  assert r["median_step_s"] == 0.2 and r["median_cpu_step_s"] == 0.4
  assert r["min_step_s"] == 0.09 and r["peak_rss_mb"] == 900.0
  assert r["rounds"] == 3 and r["failed_rounds"] == 0 and r["timed_steps"] == 9
  assert [p["median_step_s"] for p in r["per_round"]] == [0.3, 0.1, 0.2]


def test_a_failed_round_is_counted_and_the_others_still_count():
  runs = [_run("cnn", "jax_nonprivate", 0, 0.002), _run("cnn", "jax_vmap_dp", 0, 0.004),
          _run("cnn", "jax_nonprivate", 1, 0.002),
          {"model": "cnn", "arm": "jax_vmap_dp", "batch": 250, "round": 1, "error": "boom"}]
  r = _results(runs)[("cnn", "jax_vmap_dp")]
  assert r["rounds"] == 1 and r["failed_rounds"] == 1
  assert r["ratio_to_nonprivate"] == pytest.approx(2.0)


def test_no_ratio_without_the_baseline_and_no_crash():
  runs = [_run("cnn", "opacus_dp", 0, 0.02),
          {"model": "cnn", "arm": "torch_nonprivate", "batch": 250, "round": 0, "error": "boom"}]
  results = _results(runs)
  assert "ratio_to_nonprivate" not in results[("cnn", "opacus_dp")]
  assert "error" in results[("cnn", "torch_nonprivate")]


def test_a_parameter_count_that_differs_from_the_non_private_arm_is_noted():
  runs = [_run("wrn", "nonprivate", 0, 1.0, params=2748890),
          _run("wrn", "jax_nonprivate", 0, 0.5, params=2748890),
          _run("wrn", "torch_nonprivate", 0, 0.5, params=2748000)]
  results = _results(runs)
  assert "params_differ_from_tf_keras_nonprivate" not in results[("wrn", "jax_nonprivate")]["notes"]
  assert results[("wrn", "torch_nonprivate")]["notes"]["params_differ_from_tf_keras_nonprivate"] == 2748890


def test_rounds_run_every_model_and_arm_once_each_in_the_same_order():
  order = step_time.schedule(["cnn", "wrn"], ["nonprivate", "jax_vmap_dp", "opacus_dp"], 2)
  one_round = [("cnn", "nonprivate"), ("cnn", "jax_vmap_dp"), ("cnn", "opacus_dp"),
               ("wrn", "nonprivate"), ("wrn", "jax_vmap_dp"), ("wrn", "opacus_dp")]
  assert order == [(0, m, a) for m, a in one_round] + [(1, m, a) for m, a in one_round]
  assert step_time.schedule(["cnn"], ["tfdp"], 1) == [(0, "cnn", "tfdp")]


def test_in_one_process_a_models_tf_arms_are_one_entry_where_the_first_was():
  order = step_time.schedule(["cnn"], ["jax_vmap_dp", "nonprivate", "opacus_dp", "tfdp_mask80"],
                             2, tf_arms_in_one_process=True)
  one_round = ["jax_vmap_dp", "nonprivate,tfdp_mask80", "opacus_dp"]
  assert order == [(r, "cnn", a) for r in range(2) for a in one_round]
  assert step_time.schedule(["cnn"], ["opacus_dp"], 1, tf_arms_in_one_process=True) == [
      (0, "cnn", "opacus_dp")]


def test_interleaved_steps_put_every_arm_in_every_position_equally_often():
  arms = ["nonprivate", "tfdp", "tfdp_mask80"]
  orders = [step_time.interleaved_order(arms, i) for i in range(6)]
  assert all(sorted(order) == sorted(arms) for order in orders)
  for position in range(3):
    assert sorted(order[position] for order in orders) == sorted(arms * 2)


def test_arms_that_share_a_process_report_no_peak_memory_and_still_get_ratios():
  runs = [_run("cnn", "nonprivate", i, 0.05) for i in range(2)]
  runs += [_run("cnn", "tfdp", i, t) for i, t in enumerate([0.06, 0.065])]
  for run in runs:
    run["peak_rss_mb"] = run["peak_rss_increase_mb"] = None
  results = _results(runs)
  r = results[("cnn", "tfdp")]
  assert r["peak_rss_mb"] is None and r["peak_rss_increase_mb"] is None
  assert r["ratio_to_nonprivate"] == pytest.approx(1.25)
  table = step_time._markdown({  # pylint: disable=protected-access
      "machine": {"date": "d", "cpu_count": 2, "platform": "p"}, "command": "c",
      "versions": {"tensorflow": "x", "tf_keras": "x", "tensorflow_privacy": "x"},
      "loadavg_at_start": [0.0], "settings": {"rounds": 2}, "results": list(results.values())})
  assert "| 1.0 | n/a | n/a |" in table  # first step (s), peak RSS, RSS increase


@pytest.mark.slow  # three CNN steps traced in one child: about 20 s
def test_a_child_runs_a_models_tf_arms_interleaved_and_reports_each(tmp_path):
  args = _args(tmp_path, batch=8, code_dir=_REPO, min_steps=3, steps=3)
  results = step_time._run_arm("cnn", "nonprivate,tfdp,tfdp_mask80", args)  # pylint: disable=protected-access
  assert [r["arm"] for r in results] == ["nonprivate", "tfdp", "tfdp_mask80"], results
  for r in results:
    assert "error" not in r, r
    assert r["timed_steps"] == 3 and r["median_step_s"] > 0 and r["peak_rss_mb"] is None
    assert r["notes"]["one_process_with"] == ",".join(
        a for a in ("nonprivate", "tfdp", "tfdp_mask80") if a != r["arm"])
  assert results[2]["notes"]["trained_fraction"] < 0.5


def _args(tmp_path, **overrides):
  args = dict(models="cnn", arms="jax_vmap_dp,opacus_dp", steps=2, min_steps=2, budget_s=0.0,
              warmup=2, timeout_s=60.0, seed=0, batch=0, wrn_width=4, accumulation_steps=1,
              rounds=2, peers_python=str(tmp_path / "no_such_venv" / "bin" / "python"),
              out=str(tmp_path / "out" / "step_time.json"), code=None,
              unknown_batch_size=False, tf_arms_in_one_process=False)
  args.update(overrides)
  return argparse.Namespace(**args)


def test_a_peer_arm_without_the_peers_environment_is_reported_not_installed(tmp_path):
  (result,) = step_time._run_arm("cnn", "jax_privacy_dp", _args(tmp_path))  # pylint: disable=protected-access
  assert result["not_installed"] and result["error"] == step_time.NOT_INSTALLED
  assert "benchmarks/peers/setup.sh" in result["error"]
  assert step_time._peer_versions(_args(tmp_path).peers_python) is None  # pylint: disable=protected-access


def test_the_benchmark_runs_through_and_reports_missing_peers(tmp_path, monkeypatch):
  """The whole parent with only peer arms and no peers' environment: it writes its JSON and
  table, with a 'not installed' row per (model, arm), instead of failing."""
  monkeypatch.setattr(step_time, "_versions", lambda: {
      "python": "3.11", "tensorflow": "x", "tf_keras": "x", "tensorflow_privacy": "x",
      "numpy": "x", "intra_op_threads": 0, "inter_op_threads": 0})
  args = _args(tmp_path)
  step_time.run_parent(args)
  with open(args.out) as f:
    report = json.load(f)
  assert [(r["model"], r["arm"]) for r in report["results"]] == [("cnn", "jax_vmap_dp"),
                                                                  ("cnn", "opacus_dp")]
  assert all(r["not_installed"] for r in report["results"])
  assert len(report["runs"]) == 4 and report["settings"]["rounds"] == 2
  assert report["versions"]["peers"] is None
  with open(os.path.splitext(args.out)[0] + ".md") as f:
    table = f.read()
  assert table.count("| not installed |") == 2
  assert step_time.NOT_INSTALLED in table
  assert "AVX-512: " in table


def test_the_report_names_the_cpu_and_its_vector_extensions():
  line = step_time.machine_line({"cpu_count": 2, "cpu_model": "Some Xeon", "avx512": True,
                                 "avx512_flags": ["avx512f", "avx512bw"], "avx2": True,
                                 "amx": False})
  assert line == ("2 CPUs (Some Xeon; AVX-512: yes (avx512f, avx512bw); AVX2: yes; AMX: no)")


def test_fit_step_trains_one_step_per_call_on_one_iterator_and_returns_the_loss():
  """The timed step is fit's train function on an iterator that outlives the call (not
  `train_on_batch`, which makes and tears down one per call): each call is one optimizer step
  on the same batch, and returns once it has run, with the loss as a number."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tfdp_prune.compat import keras  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x, y = tf.constant(np.ones((4, 3), np.float32)), tf.constant([0, 1, 0, 1])
  step = step_time.fit_step(model, x, y)
  made = []
  original_iter = tf.data.Dataset.__iter__
  tf.data.Dataset.__iter__ = lambda self: made.append(1) or original_iter(self)
  try:
    losses = [step()["loss"] for _ in range(3)]
  finally:
    tf.data.Dataset.__iter__ = original_iter
  assert int(model.optimizer.iterations.numpy()) == 3
  assert not made  # no iterator per call
  assert all(isinstance(loss, float) for loss in losses) and losses[2] < losses[0]
  assert step.element_spec[0].shape.as_list() == [4, 3]
  # As `fit` on arrays traces the step: batch size None.
  unknown = step_time.fit_step(model, x, y, unknown_batch_size=True)
  assert unknown.element_spec[0].shape.as_list() == [None, 3]
  unknown()
  assert int(model.optimizer.iterations.numpy()) == 4


# ------------------------------------------------------------------------------------------------
# The peer arms themselves: only where benchmarks/peers/setup.sh made the peers' environment.
# ------------------------------------------------------------------------------------------------

_needs_peers = pytest.mark.skipif(not os.path.exists(_PEERS_PYTHON),
                                  reason="no peers' environment (run benchmarks/peers/setup.sh)")


@pytest.mark.slow  # 3-10 s per arm: a peer framework's process each
@_needs_peers
@pytest.mark.parametrize("arm", sorted(step_time.peer_arms.PEER_ARMS))
def test_each_peer_arm_runs_two_steps_on_a_tiny_batch(arm):
  proc = subprocess.run(
      [_PEERS_PYTHON, os.path.join(_BENCHMARKS, "peers", "run_arm.py"), "--model=cnn",
       f"--arm={arm}", "--batch=4", "--steps=2", "--min_steps=2", "--warmup=2", "--budget_s=0",
       "--l2_norm_clip=1.0", "--noise_multiplier=1.1", "--learning_rate=0.1"],
      capture_output=True, text=True, timeout=600, cwd=_REPO,
      env=dict(os.environ, OMP_NUM_THREADS="1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
  result = json.loads(line[len("RESULT_JSON "):])
  assert result["arm"] == arm and result["framework"] == step_time.framework(arm)
  assert result["params"] == 26010  # TF Privacy's tutorial CNN, as benchmarks/models.py builds it
  assert result["timed_steps"] == 2 and result["median_step_s"] > 0
  assert isinstance(result["last_loss"], float)


@_needs_peers
@pytest.mark.slow
def test_every_peer_dp_step_equals_the_per_example_clipped_sum():
  """benchmarks/peers/check_dp.py on the CNN (the WRN takes minutes: run the script)."""
  proc = subprocess.run([_PEERS_PYTHON, os.path.join(_BENCHMARKS, "peers", "check_dp.py"),
                         "--models=cnn"], capture_output=True, text=True, timeout=900,
                        cwd=_REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "all DP steps match the per-example reference" in proc.stdout
