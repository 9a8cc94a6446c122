"""Step time and peak memory of tfdp_prune vs non-private Keras vs TF Privacy 0.9.0.

Every (model, arm) runs in its own subprocess, so peak resident set sizes don't mix. In the child:
build the model, compile, (masks), record the RSS baseline, run warm-up steps (the first one traces
and compiles; it is reported separately and never timed), then time training steps on one fixed
batch of random data, run as `model.fit` runs them (`fit_step`: not `train_on_batch`, whose
per-call tf.data iterator adds up to 2.5 s to a step). The number of timed steps is chosen from the second warm-up step so that
each arm spends about --budget_s seconds, clamped to [--min_steps, --steps].

Arms:
  nonprivate      tf_keras SGD, mean loss.
  tfdp            tfdp_prune.DPKerasSGDOptimizer + make_private (per-layer engine), no mask.
  tfdp_mask80     same, random masks with 20% True on every kernel (biases/GN params all True).
  tfdp_vectorized, tfdp_vectorized_mask80
                  the same two with per_example_engine="vectorized" (the reference engine).
  tfp_vectorized  TF Privacy VectorizedDPKerasSGDOptimizer (legacy SGD), per-example loss.
  tfp_dpmodel     TF Privacy DPSequential / DPModel with make_default_layer_registry() (fast
                  gradient clipping when every trainable layer is registered), use_xla=True
                  (its default), plain SGD, mean loss.
  jax_*, torch_nonprivate, opacus_*
                  peer libraries on the same models (benchmarks/peers/arms.py), run by the
                  peers' own Python (benchmarks/peers/.venv, made by benchmarks/peers/setup.sh);
                  reported as not installed when it is missing. Each DP arm's ratio is to its
                  own framework's non-private arm.

--rounds N runs every (model, arm) once per round, round after round, so all arms see the same
machine state; per arm: the median over rounds, and ratios as the median of the per-round ratios.

--tf_arms_in_one_process runs a model's tf_keras arms in ONE child per round instead, their
steps interleaved (arm A's step, B's, C's, then A's again, the order rotating), so the ratio
compares steps taken moments apart in the same process. On a 2-core AMD EPYC the same code's
CNN ratio moved by 0.1-0.3 between separate processes and by about 0.02 in one. Peak RSS is
then the process's, shared by its arms: not reported per arm (run without the flag for memory).

Usage (from the repo root):
  /work/venv/bin/python benchmarks/step_time.py --models=cnn,wrn \
      --out=benchmarks/results/step_time.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback

import machine  # benchmarks/machine.py (the script's directory is on sys.path)
from peers import arms as peer_arms  # benchmarks/peers/arms.py: standard library only
import provenance  # benchmarks/provenance.py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TF_ARMS = ("nonprivate", "tfdp", "tfdp_mask80", "tfdp_vectorized", "tfdp_vectorized_mask80",
           "tfp_vectorized", "tfp_dpmodel")
ARMS = TF_ARMS + tuple(peer_arms.PEER_ARMS)
PEERS_DIR = os.path.join(HERE, "peers")
PEERS_PYTHON = os.path.join(PEERS_DIR, ".venv", "bin", "python")
NOT_INSTALLED = "not installed (run benchmarks/peers/setup.sh)"
MODELS = {"cnn": {"batch": 250, "input_shape": (28, 28, 1)},
          "wrn": {"batch": 32, "input_shape": (32, 32, 3)}}
ARM_LABELS = {
    "nonprivate": "non-private tf_keras SGD",
    "tfdp": "tfdp_prune DPKerasSGDOptimizer (per-layer engine), no mask",
    "tfdp_mask80": "tfdp_prune (per-layer engine), masks 80% sparse",
    "tfdp_vectorized": "tfdp_prune, vectorized engine, no mask",
    "tfdp_vectorized_mask80": "tfdp_prune, vectorized engine, masks 80% sparse",
    "tfp_vectorized": "TF Privacy VectorizedDPKerasSGDOptimizer",
    "tfp_dpmodel": "TF Privacy DPModel (registry, XLA)",
    **{arm: peer_arms.label(arm) for arm in peer_arms.PEER_ARMS},
}
L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.1
SPARSITY = 0.8


# ------------------------------------------------------------------------------------------------
# Child: one (model, arm).
# ------------------------------------------------------------------------------------------------

def _rss_mb():
  import psutil  # pylint: disable=import-outside-toplevel
  return psutil.Process().memory_info().rss / 2**20


def _max_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _build(model_name, arm, batch, input_shape, seed, wrn_width=4, accumulation_steps=1):
  """Returns (model, notes) compiled for `arm`."""
  sys.path.insert(0, HERE)
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tf_keras as keras  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  import tfdp_prune  # pylint: disable=import-outside-toplevel

  keras.utils.set_random_seed(seed)
  notes = {}
  print("tfdp_prune from", tfdp_prune.__file__, file=sys.stderr)
  per_example_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                reduction="none")
  mean_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  if arm == "tfp_dpmodel":
    tfp = tfdp_prune.compat.tf_privacy()
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    dp_kwargs = dict(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
                     layer_registry=layer_registry.make_default_layer_registry())
    if model_name == "cnn":
      model = models.build_cnn(tfp.dp_keras_model.DPSequential, **dp_kwargs)
    else:
      model = models.build_wrn(width_factor=wrn_width, model_cls=tfp.dp_keras_model.DPModel,
                               **dp_kwargs)
    fast = bool(model._enable_fast_peg_computation)  # pylint: disable=protected-access
    notes["fast_gradient_clipping"] = fast
    if not fast:
      unregistered = sorted({type(l).__name__ for l in model.layers
                             if l.trainable_variables
                             and not dp_kwargs["layer_registry"].is_elem(l)})
      notes["unregistered_layers"] = unregistered
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=mean_loss)
    return model, notes

  model = (models.build_cnn() if model_name == "cnn"
           else models.build_wrn(width_factor=wrn_width))
  if arm == "nonprivate":
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=mean_loss)
  elif arm.startswith("tfdp"):
    optimizer = tfdp_prune.DPKerasSGDOptimizer(
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
        learning_rate=LEARNING_RATE, gradient_accumulation_steps=accumulation_steps,
        per_example_engine="vectorized" if "vectorized" in arm else "per_layer")
    if accumulation_steps > 1:
      notes["logical_batch"] = batch * accumulation_steps
    model.compile(optimizer=optimizer, loss=per_example_loss)
    tfdp_prune.make_private(model)
    if arm.endswith("mask80"):
      variables = model.trainable_variables
      model.optimizer.build(variables)
      rng = np.random.default_rng(seed)
      masks, kept, total = [], 0, 0
      for v in variables:
        if "kernel" in v.name:
          mask = rng.random(v.shape) >= SPARSITY
        else:
          mask = np.ones(v.shape, dtype=bool)
        masks.append(mask)
        kept += int(mask.sum())
        total += mask.size
      model.optimizer.set_update_masks(variables, masks)
      notes["trained_fraction"] = round(kept / total, 4)
  elif arm == "tfp_vectorized":
    tfp = tfdp_prune.compat.tf_privacy()
    optimizer = tfp.dp_optimizer_keras_vectorized.VectorizedDPKerasSGDOptimizer(
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, num_microbatches=batch,
        learning_rate=LEARNING_RATE)
    model.compile(optimizer=optimizer, loss=per_example_loss)
  else:
    raise ValueError(f"unknown arm {arm!r}")
  return model, notes


def fit_step(model, x, y, unknown_batch_size=False):
  """A function running one training step of `model` on (x, y) as `model.fit` runs its steps:
  the model's train function on one iterator that lives across steps; returns the logs as
  numbers (so it returns after the step has run).

  Not `train_on_batch`: that builds a tf.data iterator for every call, and the call returns
  only once the iterator's autotuning thread (tf.data's `Model::OptimizeLoop`) has ended, which
  it does at its next timed wake-up, 20, 60, 140, ..., 1260, 2540 ms after the call began. Measured
  (2 cores, TF 2.21): WRN steps of 0.8 s (non-private) and 1.4 s (DP) returned after 1.27 s and
  2.55 s in about half the calls, the CNN's 45 ms non-private step after 63 ms by median.

  `unknown_batch_size`: the batches' static shape has batch size None, as `fit` on arrays or
  on a dataset batched without `drop_remainder` traces the step."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  dataset = (tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)) if unknown_batch_size
             else tf.data.Dataset.from_tensors((x, y)))
  iterator = iter(dataset.repeat())
  train_function = model.make_train_function()

  def step():
    return {name: float(value) for name, value in train_function(iterator).items()}

  step.element_spec = iterator.element_spec
  return step


def run_child(args):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  rss_after_import = _rss_mb()
  spec = MODELS[args.model]
  batch = args.batch or spec["batch"]
  if args.accumulation_steps > 1 and not args.arm.startswith("tfdp"):
    raise ValueError(f"--accumulation_steps applies to the tfdp arms only; got {args.arm}")
  model, notes = _build(args.model, args.arm, batch, spec["input_shape"], args.seed,
                        args.wrn_width, args.accumulation_steps)
  rng = np.random.default_rng(args.seed)
  x = tf.constant(rng.random((batch,) + spec["input_shape"], dtype=np.float32))
  y = tf.constant(rng.integers(0, 10, size=(batch,)), dtype=tf.int64)
  step = fit_step(model, x, y, args.unknown_batch_size)
  rss_baseline = _rss_mb()

  t0 = time.perf_counter()
  step()  # traces (and compiles): reported, never timed
  first_step = time.perf_counter() - t0
  warmup = []
  for _ in range(max(1, args.warmup - 1)):
    t0 = time.perf_counter()
    step()
    warmup.append(time.perf_counter() - t0)
  estimate = warmup[-1]
  timed_steps = int(min(args.steps, max(args.min_steps, round(args.budget_s / estimate))))
  times, cpu_times = [], []
  for _ in range(timed_steps):
    t0, c0 = time.perf_counter(), time.process_time()
    logs = step()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  loss = float(logs["loss"]) if "loss" in logs else None
  result = {
      "model": args.model, "arm": args.arm, "batch": batch, "wrn_width": args.wrn_width,
      "params": int(model.count_params()),
      "median_step_s": statistics.median(times),
      "min_step_s": min(times), "max_step_s": max(times),
      # CPU seconds of all the process's threads: the work done, less sensitive than wall time
      # to other processes competing for the cores.
      "median_cpu_step_s": statistics.median(cpu_times),
      "timed_steps": timed_steps, "warmup_steps": 1 + len(warmup),
      "first_step_s": first_step,
      "peak_rss_mb": _max_rss_mb(),
      "rss_after_import_mb": rss_after_import,
      "rss_baseline_mb": rss_baseline,
      "last_loss": loss if loss is None or np.isfinite(loss) else str(loss),
      "notes": notes,
      "loadavg_1min_at_end": os.getloadavg()[0],
  }
  result["peak_rss_increase_mb"] = result["peak_rss_mb"] - rss_baseline
  print("RESULT_JSON " + json.dumps(result), flush=True)


def interleaved_order(arms, step_index):
  """The order of `arms` at timed step `step_index`: rotated by one each step, so every arm
  takes every position (first after the others' steps, last before them) equally often."""
  shift = step_index % len(arms)
  return list(arms[shift:]) + list(arms[:shift])


def run_child_interleaved(args):
  """Several tf_keras arms of one model in this process, their timed steps interleaved; one
  RESULT_JSON line per arm (no peak RSS: the process's is shared)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  arms = args.arm.split(",")
  spec = MODELS[args.model]
  batch = args.batch or spec["batch"]
  rng = np.random.default_rng(args.seed)
  x = tf.constant(rng.random((batch,) + spec["input_shape"], dtype=np.float32))
  y = tf.constant(rng.integers(0, 10, size=(batch,)), dtype=tf.int64)
  built = {}
  for arm in arms:
    model, notes = _build(args.model, arm, batch, spec["input_shape"], args.seed,
                          args.wrn_width, args.accumulation_steps)
    notes["one_process_with"] = ",".join(a for a in arms if a != arm)
    built[arm] = (model, notes, fit_step(model, x, y, args.unknown_batch_size))
  first_step, estimate = {}, {}
  for arm, (_, _, step) in built.items():
    for i in range(max(2, args.warmup)):
      t0 = time.perf_counter()
      step()
      if i == 0:  # traces (and compiles): reported, never timed
        first_step[arm] = time.perf_counter() - t0
      else:  # the last warm-up step's time sets the number of timed steps
        estimate[arm] = time.perf_counter() - t0
  timed_steps = int(min(args.steps, max(args.min_steps,
                                        round(args.budget_s / sum(estimate.values())))))
  times = {arm: [] for arm in arms}
  cpu_times = {arm: [] for arm in arms}
  logs = {}
  for i in range(timed_steps):
    for arm in interleaved_order(arms, i):
      t0, c0 = time.perf_counter(), time.process_time()
      logs[arm] = built[arm][2]()
      times[arm].append(time.perf_counter() - t0)
      cpu_times[arm].append(time.process_time() - c0)
  for arm, (model, notes, _) in built.items():
    loss = float(logs[arm]["loss"]) if "loss" in logs[arm] else None
    result = {
        "model": args.model, "arm": arm, "batch": batch, "wrn_width": args.wrn_width,
        "params": int(model.count_params()),
        "median_step_s": statistics.median(times[arm]),
        "min_step_s": min(times[arm]), "max_step_s": max(times[arm]),
        "median_cpu_step_s": statistics.median(cpu_times[arm]),
        "timed_steps": timed_steps, "warmup_steps": max(2, args.warmup),
        "first_step_s": first_step[arm],
        "peak_rss_mb": None, "peak_rss_increase_mb": None,
        "last_loss": loss if loss is None or np.isfinite(loss) else str(loss),
        "notes": notes,
        "loadavg_1min_at_end": os.getloadavg()[0],
    }
    print("RESULT_JSON " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: runs the children, writes JSON and markdown.
# ------------------------------------------------------------------------------------------------

def _versions():
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
  code = ("import json, sys, tensorflow as tf, tf_keras, importlib.metadata as m\n"
          "def v(p):\n"
          "  try: return m.version(p)\n"
          "  except Exception: return None\n"
          "print(json.dumps({'python': sys.version.split()[0], 'tensorflow': tf.__version__,"
          " 'tf_keras': tf_keras.__version__, 'tensorflow_privacy': v('tensorflow_privacy'),"
          " 'numpy': v('numpy'), 'intra_op_threads': tf.config.threading."
          "get_intra_op_parallelism_threads(), 'inter_op_threads': tf.config.threading."
          "get_inter_op_parallelism_threads()}))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _snapshot_tfdp_prune(dest, source=REPO):
  """Copies `source`/tfdp_prune/ so every arm imports the same code even if it is edited meanwhile;
  returns a content hash of the copy."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(os.path.join(source, "tfdp_prune"), os.path.join(dest, "tfdp_prune"),
                  ignore=shutil.ignore_patterns("__pycache__"))
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(os.path.join(dest, "tfdp_prune"))):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()[:12]


def framework(arm):
  """The framework whose non-private step an arm's ratio is taken against."""
  return "tf_keras" if arm in TF_ARMS else peer_arms.framework(arm)


def baseline_arm(arm):
  """The non-private arm of `arm`'s own framework."""
  return "nonprivate" if arm in TF_ARMS else peer_arms.baseline(arm)


def schedule(model_names, arm_names, rounds, tf_arms_in_one_process=False):
  """[(round, model, arm)]: every (model, arm) once per round, in the same order each round.
  With `tf_arms_in_one_process`, a model's tf_keras arms are one entry, their names joined by
  commas, where the first of them was."""
  entries = list(arm_names)
  if tf_arms_in_one_process:
    tf_arms = [arm for arm in arm_names if arm in TF_ARMS]
    if tf_arms:
      first = entries.index(tf_arms[0])
      entries = [arm for arm in entries if arm not in TF_ARMS]
      entries.insert(first, ",".join(tf_arms))
  return [(r, model, arm) for r in range(rounds) for model in model_names for arm in entries]


def _peer_versions(python):
  """Versions and thread settings of the peers' environment; None when it is not installed."""
  if not os.path.exists(python):
    return None
  code = ("import json, os, importlib.metadata as m\n"
          "def v(p):\n"
          "  try: return m.version(p)\n"
          "  except Exception: return None\n"
          "out = {p: v(p) for p in ('jax', 'jaxlib', 'jax-privacy', 'optax', 'torch', 'opacus',"
          " 'numpy')}\n"
          "try:\n"
          "  import torch\n"
          "  out['torch_intra_op_threads'] = torch.get_num_threads()\n"
          "  out['torch_inter_op_threads'] = torch.get_num_interop_threads()\n"
          "except ImportError:\n"
          "  pass\n"
          "out.update({k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'XLA_FLAGS')})\n"
          "print(json.dumps(out))")
  try:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False,
                          timeout=300)
  except subprocess.TimeoutExpired:
    return {"error": "no answer within 300 s"}
  if proc.returncode:
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_peer_arm(model, arm, args):
  """A peer arm, in the peers' own Python (benchmarks/peers/run_arm.py)."""
  batch = args.batch or MODELS[model]["batch"]
  if not os.path.exists(args.peers_python):
    return {"model": model, "arm": arm, "batch": batch, "error": NOT_INSTALLED,
            "not_installed": True}
  if args.accumulation_steps > 1:
    return {"model": model, "arm": arm, "batch": batch,
            "error": "--accumulation_steps applies to the tfdp arms only"}
  cmd = [args.peers_python, os.path.join(PEERS_DIR, "run_arm.py"), f"--model={model}",
         f"--arm={arm}", f"--batch={batch}", f"--steps={args.steps}",
         f"--min_steps={args.min_steps}", f"--warmup={args.warmup}",
         f"--budget_s={args.budget_s}", f"--seed={args.seed}", f"--wrn_width={args.wrn_width}",
         f"--l2_norm_clip={L2_NORM_CLIP}", f"--noise_multiplier={NOISE_MULTIPLIER}",
         f"--learning_rate={LEARNING_RATE}"]
  return _run_child_process(cmd, dict(os.environ), model, arm, batch, args.timeout_s)[0]


def _run_arm(model, arm, args):
  """One (model, arm) in its own child; `arm` may name several tf_keras arms, comma-separated,
  which one child then runs interleaved (--tf_arms_in_one_process): a list of results then."""
  if arm not in TF_ARMS and "," not in arm:
    return [_run_peer_arm(model, arm, args)]
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--model={model}", f"--arm={arm}",
         f"--steps={args.steps}", f"--min_steps={args.min_steps}", f"--warmup={args.warmup}",
         f"--budget_s={args.budget_s}", f"--seed={args.seed}", f"--batch={args.batch}",
         f"--wrn_width={args.wrn_width}", f"--accumulation_steps={args.accumulation_steps}"]
  if args.unknown_batch_size:
    cmd.append("--unknown_batch_size")
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
  env["PYTHONPATH"] = args.code_dir + (
      os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return _run_child_process(cmd, env, model, arm, args.batch or MODELS[model]["batch"],
                            args.timeout_s)


def _run_child_process(cmd, env, model, arm, batch, timeout_s):
  """Runs one child; its RESULT_JSON lines (one per arm of `arm`, comma-separated), or an error
  record per arm."""
  errors = lambda **fields: [dict({"model": model, "arm": a, "batch": batch}, **fields)
                             for a in arm.split(",")]
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO)
  except subprocess.TimeoutExpired as e:
    return errors(error=f"timed out after {timeout_s} s",
                  stderr_tail=(e.stderr or b"")[-3000:].decode(errors="replace")
                  if isinstance(e.stderr, bytes) else (e.stderr or "")[-3000:])
  wall = time.time() - t0
  results = [json.loads(line[len("RESULT_JSON "):]) for line in proc.stdout.splitlines()
             if line.startswith("RESULT_JSON ")]
  if len(results) != len(arm.split(",")):
    return errors(error=f"child exited with code {proc.returncode}", wall_s=wall,
                  stderr_tail=proc.stderr[-6000:])
  for result in results:
    result["wall_s"] = wall
  return results


def aggregate(runs):
  """One result per (model, arm) from its runs in every round (first-seen order).

  Step times: the median over rounds of each round's median (min: the min over rounds); peak
  RSS: the max over rounds; `per_round` keeps each round's times for the paired ratios. An arm
  with no successful round keeps its last error."""
  groups = {}
  for run in runs:
    groups.setdefault((run["model"], run["arm"]), []).append(run)
  results = []
  for group in groups.values():
    ok = [r for r in group if "error" not in r]
    if not ok:
      results.append(dict(group[-1], rounds=0, failed_rounds=len(group)))
      continue
    result = dict(ok[-1])
    median = lambda key: statistics.median(r[key] for r in ok)
    result.update(
        median_step_s=median("median_step_s"), median_cpu_step_s=median("median_cpu_step_s"),
        first_step_s=median("first_step_s"), loadavg_1min_at_end=median("loadavg_1min_at_end"),
        min_step_s=min(r["min_step_s"] for r in ok), max_step_s=max(r["max_step_s"] for r in ok),
        peak_rss_mb=_max_or_none(r["peak_rss_mb"] for r in ok),
        peak_rss_increase_mb=_max_or_none(r["peak_rss_increase_mb"] for r in ok),
        timed_steps=sum(r["timed_steps"] for r in ok),
        rounds=len(ok), failed_rounds=len(group) - len(ok),
        per_round=[{"round": r.get("round", i), "median_step_s": r["median_step_s"],
                    "median_cpu_step_s": r["median_cpu_step_s"], "min_step_s": r["min_step_s"]}
                   for i, r in enumerate(ok)])
    results.append(result)
  return results


def _max_or_none(values):
  """The max of the values that are not None (None if all are: RSS shared by one process)."""
  known = [v for v in values if v is not None]
  return max(known) if known else None


def add_ratios(results):
  """Adds to each result the ratios to its own framework's non-private arm on the same model
  (`baseline_arm`): the median over the rounds both ran of the per-round ratio (median and CPU
  time), and the ratio of the minima."""
  by_key = {(r["model"], r["arm"]): r for r in results}
  for r in results:
    r["framework"] = framework(r["arm"])
    r["baseline_arm"] = baseline_arm(r["arm"])
    reference = by_key.get((r["model"], "nonprivate"))
    if ("params" in r and reference is not None and "params" in reference
        and r["params"] != reference["params"]):
      r.setdefault("notes", {})["params_differ_from_tf_keras_nonprivate"] = reference["params"]
    base = by_key.get((r["model"], r["baseline_arm"]))
    if "error" in r or base is None or "error" in base:
      continue
    base_rounds = {b["round"]: b for b in base["per_round"]}
    paired = [(p, base_rounds[p["round"]]) for p in r["per_round"] if p["round"] in base_rounds]
    if not paired:
      continue
    r["ratio_to_nonprivate"] = statistics.median(p["median_step_s"] / b["median_step_s"]
                                                 for p, b in paired)
    r["cpu_ratio_to_nonprivate"] = statistics.median(
        p["median_cpu_step_s"] / b["median_cpu_step_s"] for p, b in paired)
    r["min_ratio_to_nonprivate"] = r["min_step_s"] / base["min_step_s"]
  return results


def _fmt(v, spec):
  return "n/a" if v is None else format(v, spec)


def _ms(v):
  return "n/a" if v is None else format(1000 * v, ".1f")


def machine_line(m):
  """The CPU and the vector extensions that change the kernels' speed, from /proc/cpuinfo."""
  avx512 = ("yes (" + ", ".join(m.get("avx512_flags") or []) + ")") if m.get("avx512") else "no"
  return (f"{m['cpu_count']} CPUs ({m.get('cpu_model', '?')}; AVX-512: {avx512}; "
          f"AVX2: {'yes' if m.get('avx2') else 'no'}; AMX: {'yes' if m.get('amx') else 'no'})")


def _peers_line(v):
  peers = v.get("peers")
  if peers is None:
    return f"peers: {NOT_INSTALLED}"
  if "error" in peers:
    return "peers: their Python failed to report versions"
  return (f"peers: JAX {peers.get('jax')} (jaxlib {peers.get('jaxlib')}), jax_privacy "
          f"{peers.get('jax-privacy')}, optax {peers.get('optax')}, PyTorch {peers.get('torch')} "
          f"({peers.get('torch_intra_op_threads')} intra-op / "
          f"{peers.get('torch_inter_op_threads')} inter-op threads), Opacus {peers.get('opacus')}"
          f"; OMP_NUM_THREADS={peers.get('OMP_NUM_THREADS')}, XLA_FLAGS={peers.get('XLA_FLAGS')}")


def _markdown(report):
  m, v = report["machine"], report["versions"]
  lines = [
      "# Step time and peak memory",
      "",
      f"{m['date']}; {machine_line(m)}, {m['platform']}; "
      f"TF {v['tensorflow']}, tf_keras {v['tf_keras']}, TF Privacy {v['tensorflow_privacy']} "
      f"(TF threads: {v.get('intra_op_threads')} intra-op / {v.get('inter_op_threads')} "
      f"inter-op, 0 = TF's default); {_peers_line(v)}; "
      f"tfdp_prune at {report.get('git_commit')} (snapshot sha256 "
      f"{report.get('tfdp_prune_snapshot_sha256')}); load average at start "
      f"{report['loadavg_at_start'][0]:.2f}; {report['settings'].get('rounds', 1)} round(s).",
      "",
      f"Command: `{report['command']}`",
      "",
      "Median of the timed steps after warm-up (the first, tracing/compiling step is excluded "
      "and shown as 'first step'), in ms; with several rounds, the median over rounds. "
      "x own non-private = the arm's median / the median of its OWN framework's non-private "
      "arm on the same model (`nonprivate` for tf_keras arms, `jax_nonprivate`, "
      "`torch_nonprivate`), the median of the per-round ratios; the min columns are less "
      "sensitive to other load on the machine, and CPU = median CPU seconds per step of all "
      "the process's threads (the work done; least sensitive to other load). Peak RSS = "
      "ru_maxrss of the arm's own process; increase = peak minus RSS after model build "
      "(before the first step).",
      "",
      "| model | batch | framework | arm | params | median step (ms) | x own non-private "
      "| min step (ms) | min x own non-private | CPU step (ms) | CPU x own non-private "
      "| timed steps | rounds | first step (s) | peak RSS (MB) | RSS increase (MB) | load avg | notes |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in report["results"]:
    fw = framework(r["arm"])
    if "error" in r:
      status = "not installed" if r.get("not_installed") else "FAILED"
      lines.append(f"| {r['model']} | {r['batch']} | {fw} | {r['arm']} | | {status} | | | | | "
                   f"| | | | | | | {r['error']} |")
      continue
    notes = "; ".join(f"{k}={v}" for k, v in r.get("notes", {}).items())
    if r.get("failed_rounds"):
      notes = f"failed rounds={r['failed_rounds']}; " + notes
    lines.append(
        f"| {r['model']} | {r['batch']} | {fw} | {r['arm']} | {_fmt(r.get('params'), ',')} | "
        f"{_ms(r['median_step_s'])} | "
        f"{_fmt(r.get('ratio_to_nonprivate'), '.2f')} | {_ms(r['min_step_s'])} | "
        f"{_fmt(r.get('min_ratio_to_nonprivate'), '.2f')} | "
        f"{_ms(r.get('median_cpu_step_s'))} | "
        f"{_fmt(r.get('cpu_ratio_to_nonprivate'), '.2f')} | {r['timed_steps']} | "
        f"{r.get('rounds', 1)} | "
        f"{r['first_step_s']:.1f} | {_fmt(r['peak_rss_mb'], '.0f')} | "
        f"{_fmt(r['peak_rss_increase_mb'], '.0f')} | "
        f"{r['loadavg_1min_at_end']:.1f} | {notes} |")
  lines += ["", "Arms: " + "; ".join(f"`{k}` = {v}" for k, v in ARM_LABELS.items()) + "."]
  return "\n".join(lines) + "\n"


def run_parent(args):
  model_names = [s for s in args.models.split(",") if s]
  arm_names = [s for s in args.arms.split(",") if s]
  for name in model_names:
    if name not in MODELS:
      raise SystemExit(f"unknown model {name!r}; expected some of {sorted(MODELS)}")
  for name in arm_names:
    if name not in ARMS:
      raise SystemExit(f"unknown arm {name!r}; expected some of {list(ARMS)}")
  if args.rounds < 1:
    raise SystemExit(f"Expected --rounds >= 1. Received: --rounds={args.rounds}.")
  versions = _versions()
  if any(arm not in TF_ARMS for arm in arm_names):
    versions["peers"] = _peer_versions(args.peers_python)
  report = {"command": " ".join([sys.executable] + sys.argv),
            "machine": machine.machine(), "versions": versions,
            "git_commit": provenance.git_commit(args.code or REPO),
            "settings": {"steps_max": args.steps, "min_steps": args.min_steps,
                         "warmup": args.warmup, "budget_s": args.budget_s, "seed": args.seed,
                         "l2_norm_clip": L2_NORM_CLIP, "noise_multiplier": NOISE_MULTIPLIER,
                         "learning_rate": LEARNING_RATE, "mask_sparsity": SPARSITY,
                         "rounds": args.rounds, "unknown_batch_size": args.unknown_batch_size,
                         "tf_arms_in_one_process": args.tf_arms_in_one_process},
            "results": []}
  import tempfile  # pylint: disable=import-outside-toplevel
  code_dir = tempfile.mkdtemp(prefix="tfdp_bench_code_")
  report["tfdp_prune_snapshot_sha256"] = _snapshot_tfdp_prune(code_dir, args.code or REPO)
  if args.code:
    report["code"] = os.path.abspath(args.code)
  args.code_dir = code_dir
  report["loadavg_at_start"] = os.getloadavg()
  out_json = os.path.abspath(args.out)
  out_md = os.path.splitext(out_json)[0] + ".md"
  os.makedirs(os.path.dirname(out_json), exist_ok=True)

  print(machine_line(report["machine"]), flush=True)
  if "peers" in versions:
    print(_peers_line(versions), flush=True)
  report["runs"] = []

  def write():
    report["results"] = add_ratios(aggregate(report["runs"]))
    with open(out_json, "w") as f:
      json.dump(report, f, indent=2)
    with open(out_md, "w") as f:
      f.write(_markdown(report))

  for round_index, model, arm in schedule(model_names, arm_names, args.rounds,
                                         args.tf_arms_in_one_process):
    print(f"[{time.strftime('%H:%M:%S')}] round {round_index + 1}/{args.rounds}: "
          f"{model} / {arm} ...", flush=True)
    for result in _run_arm(model, arm, args):
      result["round"] = round_index
      report["runs"].append(result)
      if result.get("not_installed"):
        print(f"  {result['error']}", flush=True)
      elif "error" in result:
        print(f"  {result['arm']} FAILED: {result['error']}\n"
              f"{result.get('stderr_tail', '')[-2000:]}", flush=True)
      else:
        print(f"  {result['arm']}: median {result['median_step_s']:.4f} s over "
              f"{result['timed_steps']} steps, first {result['first_step_s']:.1f} s, peak RSS "
              f"{_fmt(result['peak_rss_mb'], '.0f')} MB, wall {result['wall_s']:.0f} s",
              flush=True)
    write()  # partial results survive an interrupted run
  print(f"wrote {out_json} and {out_md}")
  print(_markdown(report))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="cnn,wrn", help="comma-separated: cnn,wrn")
  parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ",".join(ARMS))
  parser.add_argument("--steps", type=int, default=50, help="at most this many timed steps")
  parser.add_argument("--min_steps", type=int, default=3, help="at least this many timed steps")
  parser.add_argument("--budget_s", type=float, default=40.0,
                      help="target seconds of timed steps per arm (sets the step count)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps, the first (tracing) one included")
  parser.add_argument("--timeout_s", type=float, default=900.0, help="per-arm subprocess limit")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch", type=int, default=0,
                      help="batch size for every model (0: each model's default, cnn 250, wrn 32)")
  parser.add_argument("--wrn_width", type=int, default=4, help="WRN-16-k width factor k")
  parser.add_argument("--accumulation_steps", type=int, default=1,
                      help="tfdp arms: physical batches per logical batch (a step is one "
                           "physical batch; time at least this many to include an update)")
  parser.add_argument("--unknown_batch_size", action="store_true",
                      help="tf_keras arms: batches of static batch size None, as `fit` on "
                           "arrays traces the step (default: the batch's static shape)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run every (model, arm) once per round, round after round; report "
                           "the median over rounds")
  parser.add_argument("--tf_arms_in_one_process", action="store_true",
                      help="run a model's tf_keras arms in one child per round, their steps "
                           "interleaved (steadier ratios; no per-arm peak RSS)")
  parser.add_argument("--peers_python", default=PEERS_PYTHON,
                      help="the Python of the peers' environment (benchmarks/peers/setup.sh)")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "step_time.json"))
  parser.add_argument("--code", default=None,
                      help="a checkout whose tfdp_prune/ is measured (default: this one), "
                           "e.g. an export of the commit before a change")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--arm", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    try:
      (run_child_interleaved if "," in args.arm else run_child)(args)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      sys.exit(1)
  else:
    run_parent(args)


if __name__ == "__main__":
  main()
