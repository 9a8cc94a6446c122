"""The A/B of 2026-12-01 behind "Calibration on or off, measured" (benchmarks/README.md): in ONE
process (`in_process_ab`), interleaved rounds of the non-private step and the DP step traced
with the windowed strategies chosen by the heuristic (the default) and by `calibration` (timed
on this machine when the step is traced). Prints each variant's median wall and CPU ms per
step, its ratio to the non-private step, and the calibrated choices.

  python benchmarks/results/i18/calibration_ab.py [model] [arms] [steps per round] [rounds]
  python benchmarks/results/i18/calibration_ab.py cnn tfdp,tfdp_mask80 10 15   # as run
  python benchmarks/results/i18/calibration_ab.py wrn tfdp,tfdp_mask80 2 5     # as run
"""
import sys

import in_process_ab
from tfdp_prune.layer_rules import calibration  # pylint: disable=g-import-not-at-top


def main(model_name="cnn", arms="tfdp", steps_per_round="10", rounds="15"):
  calibrated = lambda enabled: lambda: calibration.set_enabled(enabled)  # read when traced
  variants = [("nonprivate", "nonprivate", calibrated(False))]
  for arm in arms.split(","):
    variants += [(f"{arm}_heuristic", arm, calibrated(False)),
                 (f"{arm}_calibrated", arm, calibrated(True))]
  times, first_step_s = in_process_ab.time_variants(model_name, variants, int(steps_per_round),
                                                    int(rounds))
  calibration.set_enabled(False)
  in_process_ab.print_medians(times, first_step_s)
  for key, record in calibration.choices().items():
    print(f"calibrated: {key}: {record['choice']}  ms {record['ms']}")


if __name__ == "__main__":
  main(*sys.argv[1:])
