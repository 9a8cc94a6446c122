"""The A/B of 2026-12-01 behind "Calibration on or off, measured" (benchmarks/README.md): in ONE
process, interleaved rounds of the non-private step and the DP step traced with the windowed
strategies chosen by the heuristic (the default) and by `calibration` (timed on this machine
when the step is traced). One process, so the spread between processes that `step_time.py`
sees on this machine does not enter the comparison. Prints each variant's median wall and CPU
ms per step, its ratio to the non-private step, and the calibrated choices.

  python benchmarks/results/i18/calibration_ab.py [model] [arms] [steps per round] [rounds]
  python benchmarks/results/i18/calibration_ab.py cnn tfdp,tfdp_mask80 10 15   # as run
  python benchmarks/results/i18/calibration_ab.py wrn tfdp,tfdp_mask80 2 5     # as run
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
from tfdp_prune.layer_rules import calibration  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cpu_s():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(model_name="cnn", arms="tfdp", steps_per_round="10", rounds="15"):
  spec = step_time.MODELS[model_name]
  batch, steps_per_round, rounds = spec["batch"], int(steps_per_round), int(rounds)
  x, y = profile_step._data(model_name, batch, 0)  # pylint: disable=protected-access
  variants = [("nonprivate", "nonprivate", False)]
  for arm in arms.split(","):
    variants += [(f"{arm}_heuristic", arm, False), (f"{arm}_calibrated", arm, True)]
  steps, first_step_s = {}, {}
  for name, arm, calibrated in variants:
    calibration.set_enabled(calibrated)  # read when the step is traced
    model, _ = step_time._build(model_name, arm, batch, spec["input_shape"], 0)  # pylint: disable=protected-access
    steps[name] = step_time.fit_step(model, x, y)
    start = time.perf_counter()
    steps[name]()  # traces (and, calibrated, times the candidates)
    first_step_s[name] = time.perf_counter() - start
    steps[name]()
  calibration.set_enabled(False)
  times = {name: ([], []) for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      wall, cpu = time.perf_counter(), _cpu_s()
      for _ in range(steps_per_round):
        step()
      times[name][0].append((time.perf_counter() - wall) / steps_per_round * 1e3)
      times[name][1].append((_cpu_s() - cpu) / steps_per_round * 1e3)
  base_wall, base_cpu = (statistics.median(t) for t in times["nonprivate"])
  for name, (wall, cpu) in times.items():
    print(f"{name:22s} wall {statistics.median(wall):8.2f} ms "
          f"({statistics.median(wall) / base_wall:.2f}x)  CPU {statistics.median(cpu):8.2f} ms "
          f"({statistics.median(cpu) / base_cpu:.2f}x)  first step {first_step_s[name]:.1f} s")
  for key, record in calibration.choices().items():
    print(f"calibrated: {key}: {record['choice']}  ms {record['ms']}")


if __name__ == "__main__":
  main(*sys.argv[1:])
