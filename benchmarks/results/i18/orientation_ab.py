"""The A/B of 2026-12-01 behind "Per-example products the cheaper way round" (benchmarks/README.md):
in ONE process, interleaved rounds of the non-private step and the DP step traced with each
way round of the per-example conv products (the choice is made when the step is traced; "old"
forces P^T G everywhere). One process, so the spread between processes that `step_time.py`
sees on this machine does not enter the comparison.

  python benchmarks/results/i18/orientation_ab.py [model] [arms] [steps per round] [rounds]
  python benchmarks/results/i18/orientation_ab.py cnn tfdp,tfdp_mask80 10 15   # as run
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
from tfdp_prune.layer_rules import windowed  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cpu_s():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(model_name="cnn", arms="tfdp", steps_per_round="10", rounds="15"):
  spec = step_time.MODELS[model_name]
  batch, steps_per_round, rounds = spec["batch"], int(steps_per_round), int(rounds)
  x, y = profile_step._data(model_name, batch, 0)  # pylint: disable=protected-access
  chosen_way = windowed._transposing_the_gradients_is_cheaper  # pylint: disable=protected-access
  patches_way = lambda *_: False
  variants = [("nonprivate", "nonprivate", chosen_way)]
  for arm in arms.split(","):
    variants += [(f"{arm}_old", arm, patches_way), (f"{arm}_new", arm, chosen_way)]
  steps = {}
  for name, arm, way in variants:
    windowed._transposing_the_gradients_is_cheaper = way  # pylint: disable=protected-access
    model, _ = step_time._build(model_name, arm, batch, spec["input_shape"], 0)  # pylint: disable=protected-access
    steps[name] = step_time.fit_step(model, x, y)
    steps[name]()  # traces with `way`
    steps[name]()
  times = {arm: ([], []) for arm in steps}
  for _ in range(rounds):
    for arm, step in steps.items():
      wall, cpu = time.perf_counter(), _cpu_s()
      for _ in range(steps_per_round):
        step()
      times[arm][0].append((time.perf_counter() - wall) / steps_per_round * 1e3)
      times[arm][1].append((_cpu_s() - cpu) / steps_per_round * 1e3)
  base_wall, base_cpu = (statistics.median(t) for t in times["nonprivate"])
  for arm, (wall, cpu) in times.items():
    print(f"{arm:18s} wall {statistics.median(wall):7.2f} ms "
          f"({statistics.median(wall) / base_wall:.2f}x)  CPU {statistics.median(cpu):7.2f} ms "
          f"({statistics.median(cpu) / base_cpu:.2f}x)")


if __name__ == "__main__":
  main(*sys.argv[1:])
