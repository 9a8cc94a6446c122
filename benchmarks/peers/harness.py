"""The timing loop of the peer arms, as in `step_time.py`'s child (standard library only).

A framework module (`jax_arms.py`, `torch_arms.py`) builds an `Arm`: one training step on one
fixed batch that returns only when the step's work is done. `run` times it and returns the same
result fields as `step_time.py`'s child.
"""

import dataclasses
import os
import resource
import statistics
import time
from typing import Callable


@dataclasses.dataclass
class Arm:
  """One built (model, arm).

  Attributes:
    step: runs one training step and returns its loss as a Python float (so the step's work is
      finished when it returns: JAX dispatches asynchronously).
    params: number of trainable parameters of the model.
    notes: anything the report should show beside the arm (threads, API used, ...).
  """
  step: Callable[[], float]
  params: int
  notes: dict = dataclasses.field(default_factory=dict)


def rss_mb() -> float:
  """Current resident set size (Linux /proc; 0.0 elsewhere)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return 0.0


def max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed_step_count(estimate_s: float, budget_s: float, min_steps: int, max_steps: int) -> int:
  """About `budget_s` seconds of steps of `estimate_s` each, clamped to [min_steps, max_steps]."""
  return int(min(max_steps, max(min_steps, round(budget_s / max(estimate_s, 1e-9)))))


def run(build: Callable[[], Arm], *, warmup: int, steps: int, min_steps: int,
        budget_s: float) -> dict:
  """Builds the arm, runs `warmup` untimed steps (the first compiles and is reported as
  `first_step_s`), then times the steps; returns step_time.py's result fields."""
  rss_after_import = rss_mb()
  arm = build()
  rss_baseline = rss_mb()
  t0 = time.perf_counter()
  arm.step()  # traces and compiles: reported, never timed
  first_step = time.perf_counter() - t0
  warmup_times = []
  for _ in range(max(1, warmup - 1)):
    t0 = time.perf_counter()
    arm.step()
    warmup_times.append(time.perf_counter() - t0)
  timed_steps = timed_step_count(warmup_times[-1], budget_s, min_steps, steps)
  times, cpu_times = [], []
  loss = None
  for _ in range(timed_steps):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = arm.step()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  result = {
      "params": arm.params,
      "median_step_s": statistics.median(times),
      "min_step_s": min(times), "max_step_s": max(times),
      "median_cpu_step_s": statistics.median(cpu_times),
      "timed_steps": timed_steps, "warmup_steps": 1 + len(warmup_times),
      "first_step_s": first_step,
      "peak_rss_mb": max_rss_mb(),
      "rss_after_import_mb": rss_after_import,
      "rss_baseline_mb": rss_baseline,
      "last_loss": loss if loss is None or loss == loss and abs(loss) != float("inf")
                   else str(loss),
      "notes": arm.notes,
      "loadavg_1min_at_end": os.getloadavg()[0],
  }
  result["peak_rss_increase_mb"] = result["peak_rss_mb"] - rss_baseline
  return result
