"""Where the time of one tfdp_prune DP step goes: each stage as its own tf.function on the
same batch, timed in interleaved rounds (one call of every stage per round, median over rounds),
so that load from other processes spreads over all stages alike.

Stages (per-layer engine):
  forward_capture   the training forward pass with the engine's capture, and the loss sum
  backward          + the gradient to every captured layer output (reported as the difference)
  norms/<layer>     that layer's per-example masked squared norms, from its captured input,
                    output gradient and saved tensors (constants here); for a layer whose
                    kernel takes the engine's loop over examples (one_example_at_a_time), the
                    loop: the kernel's norms AND its clipped sum, formed together
  clip_sum/<layer>  that layer's clipped sum, given clip factors (batched / identity_patches:
                    with forming the per-example gradients it weights, so it overlaps norms/;
                    one_example_at_a_time: the bias's alone, the kernel's is in norms/)
  engine            the whole engine (`PerLayerEngine.clipped_sum`): all of the above + clipping
  noise             Gaussian noise on the masked coordinates of every variable
  apply             the optimizer's stages 2-6 (accumulate, noise, scale, update, keep frozen)
  dp_step           one step of the DP model as `model.fit` runs it (`step_time.fit_step`)
  nonprivate_step   the same for the same model with non-private SGD

The per-layer rows are measured apart from the engine, so they add up to about, not exactly,
the engine's time (no overlap between layers, no shared subexpressions).

Usage (from the repo root):
  python benchmarks/profile_step.py --models=cnn,wrn --rounds=15 \
      --out=benchmarks/results/profile_step.json
"""

import argparse
import json
import os
import statistics
import sys
import time

import machine  # benchmarks/machine.py (the script's directory is on sys.path)
import provenance  # benchmarks/provenance.py
import step_time  # benchmarks/step_time.py: the same models and arms

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _data(model_name, batch, seed):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  spec = step_time.MODELS[model_name]
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.random((batch,) + spec["input_shape"], dtype=np.float32))
  y = tf.constant(rng.integers(0, 10, size=(batch,)), dtype=tf.int64)
  return x, y


def _strategy(rule, call):
  """Which path the rule takes for this call (for the table)."""
  from tfdp_prune.layer_rules import windowed  # pylint: disable=import-outside-toplevel
  if isinstance(rule, windowed.WindowedRule):
    if type(rule).__name__ == "DenseRule" and call.inputs.shape.rank == 2:
      return "rank-one"
    strategy = windowed.choose_strategy(rule, call)
    if strategy == windowed.GHOST:
      return f"ghost if unmasked, else {windowed.choose_strategy(rule, call, (windowed.GHOST,))}"
    return strategy
  return "per-example grads"


def _norms(pieces, x):
  """A layer's squared norms; with its kernel's loop over examples run (norms and sums)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tfdp_prune import example_loop  # pylint: disable=import-outside-toplevel
  if pieces.loop is None:
    return pieces.squared_norms
  squared = tf.cast(pieces.squared_norms, tf.float64)
  return example_loop.norms_and_sums([pieces.loop], squared, tf.ones([x.shape[0]]), 1.0)[0]


def _clip_sum_fn(call, rule, pieces, batch, variables, masks, factors, kept):
  """The layer's clipped sum alone (windowed rules: without the norms, which a graph with a
  loop in it would not prune). A materialized strategy's sum is a weighted sum of the
  per-example gradients its norms formed: its row includes forming them (overlaps the norms)."""
  from tfdp_prune.layer_rules import base  # pylint: disable=import-outside-toplevel
  from tfdp_prune.layer_rules import windowed  # pylint: disable=import-outside-toplevel
  materialized = isinstance(rule, windowed.WindowedRule) and windowed.choose_strategy(
      rule, call) in windowed.MATERIALIZED

  def clip_sum(a, g, saved):
    layer_pieces = pieces(a, g, saved)
    if layer_pieces.loop is not None:  # the kernel's sum is formed with its norms
      return layer_pieces.clipped_sum(factors, kept)
    if hasattr(rule, "_clipped_sum") and not materialized:
      record = base.CapturedCall(call.layer, rule, a, g, call.call_kwargs, saved=saved)
      return rule._clipped_sum(record, g, batch, variables, masks, factors, kept)  # pylint: disable=protected-access
    return layer_pieces.clipped_sum(factors, kept)

  return clip_sum


def _stages(model, x, y, seed, jit):
  """{stage name: (callable, description)}; every callable runs its tf.function once."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tfdp_prune import clipping  # pylint: disable=import-outside-toplevel
  from tfdp_prune import noise  # pylint: disable=import-outside-toplevel
  from tfdp_prune import per_layer  # pylint: disable=import-outside-toplevel
  from tfdp_prune.layer_rules import base  # pylint: disable=import-outside-toplevel

  optimizer = model.optimizer
  variables = model.trainable_variables
  optimizer.build(variables)
  masks = [tf.convert_to_tensor(m) for m in optimizer.update_masks(variables)]
  loss_fn = model.loss
  weights = tf.ones([x.shape[0]])
  settings = optimizer.dp_settings
  records = []

  def forward(x, y):
    del records[:]
    with tf.GradientTape() as tape:
      with per_layer._capturing(model, records):  # pylint: disable=protected-access
        predictions = model(x, training=True)
      total = tf.reduce_sum(loss_fn(y, predictions))
    return tape, total

  @tf.function
  def forward_capture(x, y):
    return forward(x, y)[1]

  @tf.function
  def backward(x, y):
    tape, total = forward(x, y)
    grads = tape.gradient(total, [r.outputs for r in records],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [r.inputs for r in records], [r.saved for r in records], grads

  inputs, saved_tensors, grads = backward(x, y)  # traces: `records` holds this trace's calls
  calls = list(records)
  mask_of = {base.variable_key(v): m for v, m in zip(variables, masks)}
  batch = tf.constant(x.shape[0])
  factors = tf.random.stateless_uniform([x.shape[0]], [seed, 1], 0.1, 1.0)
  kept = tf.ones([x.shape[0]], tf.bool)
  stages = {"forward_capture": (lambda: forward_capture(x, y), "forward with capture"),
            "backward": (lambda: backward(x, y), "forward + backward to layer outputs")}

  # The tensors a rule saved in the forward pass (a normalization's xhat) are passed in too.
  for call, a, saved, g in zip(calls, inputs, saved_tensors, grads):
    rule = call.rule
    layer_vars = [v for v in rule.variables(call.layer) if base.variable_key(v) in mask_of]
    layer_masks = [mask_of[base.variable_key(v)] for v in layer_vars]

    def pieces(a, g, saved, call=call, rule=rule, layer_vars=layer_vars,
               layer_masks=layer_masks):
      record = base.CapturedCall(call.layer, rule, a, g, call.call_kwargs, saved=saved)
      return rule.pieces(record, g, batch, False, layer_vars, layer_masks)

    norms = tf.function(lambda a, g, saved, pieces=pieces: _norms(pieces(a, g, saved), x))
    sums = tf.function(_clip_sum_fn(call, rule, pieces, batch, layer_vars, layer_masks,
                                    factors, kept))
    label = (f"{call.layer.name} ({type(call.layer).__name__}, "
             f"{_strategy(rule, base.CapturedCall(call.layer, rule, a, g))}, "
             f"out {g.shape[1:].as_list()})")
    stages[f"norms/{call.layer.name}"] = (lambda n=norms, a=a, g=g, t=saved: n(a, g, t), label)
    stages[f"clip_sum/{call.layer.name}"] = (lambda s=sums, a=a, g=g, t=saved: s(a, g, t),
                                             label)

  engine = tf.function(lambda x, y: settings.per_example_engine.clipped_sum(
      model, loss_fn, x, y, weights, variables, masks, settings.l2_norm_clip).clipped.grads)
  stages["engine"] = (lambda: engine(x, y), "the whole per-example engine")
  if jit:
    engine_xla = tf.function(engine.python_function, jit_compile=True)
    stages["engine_xla"] = (lambda: engine_xla(x, y), "the engine, jit_compile=True")
  summed = engine(x, y)
  generator = tf.random.Generator.from_seed(seed)
  stddev = settings.noise_multiplier * settings.l2_norm_clip
  add_noise = tf.function(lambda: noise.add_gaussian_noise(summed, masks, stddev, generator))
  stages["noise"] = (add_noise, "Gaussian noise on masked coordinates")
  clipped = clipping.ClippedSum(summed, batch, tf.constant(0), None)
  apply = tf.function(lambda: optimizer.apply_clipped_sum(clipped, variables))
  stages["apply"] = (apply, "optimizer stages 2-6 (accumulate, noise, scale, update)")
  stages["dp_step"] = (step_time.fit_step(model, x, y), "fit's train step, DP")
  return stages


def run(args):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tfdp_prune.layer_rules import calibration  # pylint: disable=import-outside-toplevel
  report = {"command": " ".join([sys.executable] + sys.argv), "machine": machine.machine(),
            "tensorflow": tf.__version__, "git_commit": provenance.git_commit(REPO),
            "rounds": args.rounds, "models": {}}
  for model_name in [m for m in args.models.split(",") if m]:
    spec = step_time.MODELS[model_name]
    batch = args.batch or spec["batch"]
    x, y = _data(model_name, batch, args.seed)
    for arm in [a for a in args.arms.split(",") if a]:
      model, notes = step_time._build(model_name, arm, batch, spec["input_shape"], args.seed)  # pylint: disable=protected-access
      stages = _stages(model, x, y, args.seed, args.jit)
      nonprivate, _ = step_time._build(model_name, "nonprivate", batch, spec["input_shape"],  # pylint: disable=protected-access
                                       args.seed)
      stages["nonprivate_step"] = (step_time.fit_step(nonprivate, x, y),
                                   "fit's train step, non-private SGD")
      if args.jit:
        compiled, _ = step_time._build(model_name, "nonprivate", batch, spec["input_shape"],  # pylint: disable=protected-access
                                       args.seed)
        compiled.compile(optimizer=compiled.optimizer, loss=compiled.loss, jit_compile=True)
        stages["nonprivate_step_xla"] = (step_time.fit_step(compiled, x, y),
                                         "fit's train step, non-private SGD, jit_compile=True")
      loadavg_at_start = list(os.getloadavg())
      for fn, _ in stages.values():  # trace, then one warm call
        fn()
        fn()
      times = {name: [] for name in stages}
      for _ in range(args.rounds):
        for name, (fn, _) in stages.items():
          t0 = time.perf_counter()
          fn()
          times[name].append(time.perf_counter() - t0)
      medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
      medians["backward"] -= medians["forward_capture"]
      rows = [{"stage": name, "what": stages[name][1], "median_ms": round(ms, 2),
               "min_ms": round(min(times[name]) * 1e3, 2)} for name, ms in medians.items()]
      step = medians["dp_step"]
      for row in rows:
        row["pct_of_dp_step"] = round(100 * row["median_ms"] / step, 1)
      key = f"{model_name}/{arm}"
      report["models"][key] = {"batch": batch, "notes": notes, "stages": rows,
                               "dp_over_nonprivate": round(step / medians["nonprivate_step"], 2),
                               "loadavg_at_start": loadavg_at_start,
                               "loadavg_at_end": list(os.getloadavg()),
                               "calibration": calibration.choices()}
      print(f"{key}: load average at start {loadavg_at_start}, at end {os.getloadavg()}")
      for row in rows:
        print(f"  {row['stage']:<40} {row['median_ms']:9.2f} ms {row['pct_of_dp_step']:6.1f}%"
              f"  {row['what']}")
      _write(report, args.out)
  return report


def _write(report, out):
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="cnn,wrn")
  parser.add_argument("--arms", default="tfdp,tfdp_mask80", help="tfdp arms of step_time.py")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--jit", action="store_true",
                      help="also the engine and the non-private step with jit_compile=True")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "profile_step.json"))
  args = parser.parse_args()
  info = machine.cpu_info()
  print(f"CPU: {info['cpu_model']}; AVX-512: {'yes' if info['avx512'] else 'no'}; "
        f"load average {os.getloadavg()}", flush=True)
  run(args)


if __name__ == "__main__":
  main()
