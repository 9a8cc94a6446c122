"""Tensor memory of the training step: what the traced step keeps allocated between steps, and
the peak of live tensors during a step, per model and arm (`step_time.py`'s models and tf_keras
arms), each in its own process.

Peak RSS (`step_time.py`) also counts the TensorFlow runtime, the traced graphs and what the C
allocator keeps after a free; this counts tensors only. TensorFlow counts CPU tensors only with
its BFC allocator, chosen when it starts (TF_CPU_ALLOCATOR_USE_BFC=true, set for the children
here), so the steps here run on a different allocator than users' and these numbers are not
step_time.py's.

In the child: build the model and its optimizer, record the allocated bytes (variables, optimizer
slots, masks), run the first (tracing) step and one more, reset the peak, run --steps steps on one fixed batch as
`fit` runs them; report the bytes allocated after them beyond those before the first step
("held between steps") and the peak.

Usage (from the repo root):
  python benchmarks/tensor_memory.py --models=cnn,wrn --arms=nonprivate,tfdp,tfdp_mask80 \
      --out=benchmarks/results/tensor_memory.json
"""

import argparse
import json
import os
import subprocess
import sys

import machine  # benchmarks/machine.py (the script's directory is on sys.path)
import provenance  # benchmarks/provenance.py
import step_time  # benchmarks/step_time.py

MB = 2**20


def run_child(args):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def allocated():
    return tf.config.experimental.get_memory_info("CPU:0")

  spec = step_time.MODELS[args.model]
  batch = spec["batch"]
  build = step_time._build  # pylint: disable=protected-access
  model, notes = build(args.model, args.arm, batch, spec["input_shape"], args.seed)
  rng = np.random.default_rng(args.seed)
  x = tf.constant(rng.random((batch,) + spec["input_shape"], dtype=np.float32))
  y = tf.constant(rng.integers(0, 10, size=(batch,)), dtype=tf.int64)
  step = step_time.fit_step(model, x, y)
  model.optimizer.build(model.trainable_variables)  # its slots and masks, before "before"
  before = allocated()["current"]
  step()  # traces
  step()
  tf.config.experimental.reset_memory_stats("CPU:0")
  for _ in range(args.steps):
    step()
  after = allocated()
  print("RESULT_JSON " + json.dumps({
      "model": args.model, "arm": args.arm, "batch": batch, "notes": notes,
      "before_first_step_mb": before / MB,
      "held_between_steps_mb": (after["current"] - before) / MB, "peak_mb": after["peak"] / MB}),
        flush=True)


def _run_arm(model, arm, args):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--model={model}",
         f"--arm={arm}", f"--steps={args.steps}", f"--seed={args.seed}"]
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
             TF_CPU_ALLOCATOR_USE_BFC="true")
  if args.code:
    env["PYTHONPATH"] = os.path.abspath(args.code) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s,
                        cwd=step_time.REPO, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT_JSON "):
      return json.loads(line[len("RESULT_JSON "):])
  return {"model": model, "arm": arm, "error": f"child exited with code {proc.returncode}",
          "stderr_tail": proc.stderr[-4000:]}


def _markdown(report):
  lines = [
      "# Tensor memory of the training step",
      "",
      f"{report['machine']['date']}; {step_time.machine_line(report['machine'])}; tfdp_prune at "
      f"{report['git_commit']} ({report['code']}).",
      "",
      f"Command: `{report['command']}`",
      "",
      "BFC allocator counts (tensors only). Held between steps = allocated after the steps "
      "minus allocated before the first step (variables, slots and masks excluded); peak = the "
      "most allocated at once during the timed steps; x = against the same model's "
      "non-private arm.",
      "",
      "| model | arm | before first step (MB) | held between steps (MB) | peak (MB) | x peak |",
      "|---|---|---|---|---|---|",
  ]
  peaks = {r["model"]: r["peak_mb"] for r in report["results"]
           if r["arm"] == "nonprivate" and "error" not in r}
  for r in report["results"]:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['arm']} | FAILED: {r['error']} | | | |")
      continue
    ratio = (f"{r['peak_mb'] / peaks[r['model']]:.2f}" if r["model"] in peaks else "n/a")
    lines.append(f"| {r['model']} | {r['arm']} | {r['before_first_step_mb']:.1f} | "
                 f"{r['held_between_steps_mb']:.1f} | {r['peak_mb']:.1f} | {ratio} |")
  return "\n".join(lines) + "\n"


def run_parent(args):
  models = [m for m in args.models.split(",") if m]
  arms = [a for a in args.arms.split(",") if a]
  for name in models:
    if name not in step_time.MODELS:
      raise SystemExit(f"unknown model {name!r}; expected some of {sorted(step_time.MODELS)}")
  for name in arms:
    if name not in step_time.TF_ARMS:
      raise SystemExit(f"unknown arm {name!r}; expected some of {list(step_time.TF_ARMS)}")
  report = {"command": " ".join([sys.executable] + sys.argv), "machine": machine.machine(),
            "git_commit": provenance.git_commit(args.code or step_time.REPO),
            "code": os.path.abspath(args.code or step_time.REPO), "results": []}
  for model in models:
    for arm in arms:
      result = _run_arm(model, arm, args)
      print(json.dumps(result)[:2000], flush=True)
      report["results"].append(result)
  out_json = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(out_json), exist_ok=True)
  with open(out_json, "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.splitext(out_json)[0] + ".md", "w") as f:
    f.write(_markdown(report))
  print(_markdown(report))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="cnn,wrn")
  parser.add_argument("--arms", default="nonprivate,tfdp,tfdp_mask80")
  parser.add_argument("--steps", type=int, default=3, help="steps after the two warm-up steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timeout_s", type=float, default=900.0)
  parser.add_argument("--out", default=os.path.join(step_time.HERE, "results",
                                                    "tensor_memory.json"))
  parser.add_argument("--code", default=None,
                      help="a directory whose tfdp_prune/ is measured (default: this checkout)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--arm", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    run_child(args)
  else:
    run_parent(args)


if __name__ == "__main__":
  main()
