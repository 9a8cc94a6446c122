"""One peer (model, arm) of `step_time.py`, run by the peers' own Python
(`benchmarks/peers/.venv/bin/python`): builds it, times it (`harness.run`) and prints the result
as one `RESULT_JSON {...}` line, as `step_time.py`'s own child does.

  benchmarks/peers/.venv/bin/python benchmarks/peers/run_arm.py --model=cnn --arm=jax_vmap_dp \
      --batch=250 --steps=50 --min_steps=3 --warmup=2 --budget_s=40
"""

import argparse
import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import arms  # pylint: disable=wrong-import-position
import harness  # pylint: disable=wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, choices=("cnn", "wrn"))
  parser.add_argument("--arm", required=True, choices=sorted(arms.PEER_ARMS))
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--wrn_width", type=int, default=4)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--min_steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--budget_s", type=float, default=40.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--l2_norm_clip", type=float, required=True)
  parser.add_argument("--noise_multiplier", type=float, required=True)
  parser.add_argument("--learning_rate", type=float, required=True)
  args = parser.parse_args(argv)
  # Only the arm's own framework is imported.
  builder = importlib.import_module(arms.module_name(args.arm))

  def build():
    return builder.build(args.model, args.arm, args.batch, args.seed,
                      l2_norm_clip=args.l2_norm_clip, noise_multiplier=args.noise_multiplier,
                      learning_rate=args.learning_rate, width_factor=args.wrn_width)

  result = harness.run(build, warmup=args.warmup, steps=args.steps, min_steps=args.min_steps,
                       budget_s=args.budget_s)
  result.update(model=args.model, arm=args.arm, batch=args.batch, wrn_width=args.wrn_width,
                framework=arms.framework(args.arm))
  print("RESULT_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
