"""The cost of the privacy ledger's durability: one fsync'ed append per logical step.

`DPCheckpoint` appends one line to `privacy_ledger.jsonl` and fsyncs it before every logical step
(DESIGN.md rule 15). This measures, on the file system of `--dir`:

  append          seconds per `checkpointing.append_ledger` (JSON line, SHA-256, write, fsync),
                  over `--appends` appends to one ledger (median, 90th percentile, max);
  default step    seconds per logical step of the default `tfdp-train` run (digits MLP, batch
                  100, 80% frozen, Poisson sampling, sigma 1), timed by a callback between
                  batches over `--steps` steps after `--warmup` untimed ones, with no checkpoint
                  directory (so no ledger);
  with ledger     the same run with a checkpoint directory under `--dir`: DPCheckpoint appends
                  to the ledger before every step (and checkpoints once per epoch: the median
                  step does not see those);
  fraction        median append / median default step: what the ledger adds to a step.

Usage (from the repo root; about a minute on 2 cores):
  /work/main/.venv/bin/python benchmarks/ledger.py --out=benchmarks/results/ledger.json
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tfdp_prune import accounting  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune import atomic_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune import training  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune.compat import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune.train_config import TrainConfig  # pylint: disable=g-import-not-at-top,wrong-import-position


def time_appends(directory: str, count: int) -> list:
  """Seconds of each of `count` appends of a realistic ledger line (the default run's spec)."""
  spec = accounting.PrivacySpec(noise_multiplier=1.0, steps=0, delta=1e-5,
                                sampling_probability=100 / 1258)
  seconds = []
  for step in range(1, count + 1):
    state = spec.with_steps(step).to_dict()
    start = time.perf_counter()
    checkpointing.append_ledger(directory, state, step)
    seconds.append(time.perf_counter() - start)
  return seconds


class _StepTimer(keras.callbacks.Callback):
  """Wall seconds between consecutive batch ends (one batch is one logical step here)."""

  def __init__(self):
    super().__init__()
    self.seconds, self._last = [], None

  def on_train_batch_end(self, batch, logs=None):
    now = time.perf_counter()
    if self._last is not None:
      self.seconds.append(now - self._last)
    self._last = now


def time_default_steps(steps: int, warmup: int, checkpoint_dir=None) -> list:
  """Seconds per logical step of the default run (sigma fixed: no calibration to time)."""
  timer = _StepTimer()
  config = TrainConfig(steps=steps + warmup, epochs=None, epsilon=None, noise_multiplier=1.0,
                       export_dir=None, verbose=0, checkpoint_dir=checkpoint_dir)
  training.train(config, callbacks=[timer])
  return timer.seconds[warmup:]


def _summary(seconds):
  ordered = sorted(seconds)
  return {"median_s": statistics.median(ordered),
          "p90_s": ordered[int(0.9 * (len(ordered) - 1))], "max_s": ordered[-1],
          "count": len(ordered)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default=None, help="where the ledger is written (default: a "
                      "temporary directory under the repo, the file system checkpoints use)")
  parser.add_argument("--appends", type=int, default=300)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(dir=args.dir or os.path.dirname(HERE)) as directory:
    appends = _summary(time_appends(directory, args.appends))
    with_ledger = _summary(time_default_steps(args.steps, args.warmup,
                                              os.path.join(directory, "run")))
  steps = _summary(time_default_steps(args.steps, args.warmup))
  result = {
      "what": "privacy ledger append (fsync) vs the default tfdp-train step",
      "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "python": platform.python_version()},
      "ledger_dir_filesystem_of": args.dir or os.path.dirname(HERE),
      "append": appends, "default_step": steps, "default_step_with_ledger": with_ledger,
      "append_fraction_of_step": appends["median_s"] / steps["median_s"],
      "step_with_ledger_over_without": with_ledger["median_s"] / steps["median_s"],
      "command": "python benchmarks/ledger.py " + " ".join(sys.argv[1:]),
  }
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    atomic_files.replace_file(args.out, text + "\n")


if __name__ == "__main__":
  main()
