"""The A/B of 2026-12-01 behind "Per-example products the cheaper way round" (benchmarks/README.md):
in ONE process (`in_process_ab`), interleaved rounds of the non-private step and the DP step
traced with each way round of the per-example conv products (the choice is made when the step
is traced; "old" forces P^T G everywhere).

  python benchmarks/results/i18/orientation_ab.py [model] [arms] [steps per round] [rounds]
  python benchmarks/results/i18/orientation_ab.py cnn tfdp,tfdp_mask80 10 15   # as run
"""
import sys

import in_process_ab
from tfdp_prune.layer_rules import windowed  # pylint: disable=g-import-not-at-top

CHOSEN_WAY = windowed._transposing_the_gradients_is_cheaper  # pylint: disable=protected-access


def _products_way(way):
  def configure():
    windowed._transposing_the_gradients_is_cheaper = way  # pylint: disable=protected-access
  return configure


def main(model_name="cnn", arms="tfdp", steps_per_round="10", rounds="15"):
  patches_way = lambda *_: False
  variants = [("nonprivate", "nonprivate", _products_way(CHOSEN_WAY))]
  for arm in arms.split(","):
    variants += [(f"{arm}_old", arm, _products_way(patches_way)),
                 (f"{arm}_new", arm, _products_way(CHOSEN_WAY))]
  times, _ = in_process_ab.time_variants(model_name, variants, int(steps_per_round), int(rounds))
  windowed._transposing_the_gradients_is_cheaper = CHOSEN_WAY  # pylint: disable=protected-access
  in_process_ab.print_medians(times)


if __name__ == "__main__":
  main(*sys.argv[1:])
