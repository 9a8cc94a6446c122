"""Interleaved A/B of DP-step variants in ONE process: the timing loop shared by the i18 A/B
scripts (`orientation_ab.py`, `calibration_ab.py`). One process, so the spread between processes
that `step_time.py` sees on this machine does not enter the comparison.

Each variant is (name, step_time arm, configure): `configure()` runs before the variant's model
is built and its step traced, since the choice under test is read when the step is traced.
"""
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cpu_s():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _traced_steps(model_name, variants):
  """{name: step} with every step traced (each after its `configure()`), and the first step's
  seconds per name (tracing, and whatever the variant does when traced)."""
  spec = step_time.MODELS[model_name]
  x, y = profile_step._data(model_name, spec["batch"], 0)  # pylint: disable=protected-access
  steps, first_step_s = {}, {}
  for name, arm, configure in variants:
    configure()
    model, _ = step_time._build(model_name, arm, spec["batch"], spec["input_shape"], 0)  # pylint: disable=protected-access
    steps[name] = step_time.fit_step(model, x, y)
    start = time.perf_counter()
    steps[name]()
    first_step_s[name] = time.perf_counter() - start
    steps[name]()
  return steps, first_step_s


def time_variants(model_name, variants, steps_per_round, rounds):
  """Rounds of `steps_per_round` steps of each variant in turn. Returns {name: (wall ms per
  step, CPU ms per step), one entry per round} and {name: first step s}."""
  steps, first_step_s = _traced_steps(model_name, variants)
  times = {name: ([], []) for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      wall, cpu = time.perf_counter(), _cpu_s()
      for _ in range(steps_per_round):
        step()
      times[name][0].append((time.perf_counter() - wall) / steps_per_round * 1e3)
      times[name][1].append((_cpu_s() - cpu) / steps_per_round * 1e3)
  return times, first_step_s


def print_medians(times, first_step_s=None, baseline="nonprivate"):
  """Each variant's median wall and CPU ms per step and its ratio to `baseline`'s."""
  base_wall, base_cpu = (statistics.median(t) for t in times[baseline])
  width = max(len(name) for name in times) + 2
  for name, (wall, cpu) in times.items():
    line = (f"{name:{width}s} wall {statistics.median(wall):8.2f} ms "
            f"({statistics.median(wall) / base_wall:.2f}x)  CPU {statistics.median(cpu):8.2f} ms "
            f"({statistics.median(cpu) / base_cpu:.2f}x)")
    if first_step_s is not None:
      line += f"  first step {first_step_s[name]:.1f} s"
    print(line)
