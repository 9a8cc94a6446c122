"""The A/B of 2026-12-02 behind "WSConv2D's per-example loop without its two reductions"
(benchmarks/README.md): one WSConv2D layer's per-example kernel norms (32 examples, 3x3,
"same"), in ONE process, interleaved rounds: the generic loop (`standardization_vjp` of each
example's gradient, then mask and square) against WSConv2DRule's (the mean and the projection
on the kernel from the batch's tensors, 1/s^2 on per-channel sums).

Both ways for every size (`_projections_are_cheaper`, which picks one by shape, is bypassed).

  python benchmarks/results/i18/ws_loop_projections_ab.py [sizes] [rounds]
  python benchmarks/results/i18/ws_loop_projections_ab.py 32x16,32x64,16x128,8x256 9   # as run
"""
# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access
import os
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np
import tensorflow as tf
from tfdp_prune import models
from tfdp_prune import ws_conv_rule
from tfdp_prune.layer_rules import base
from tfdp_prune.layer_rules import windowed

BATCH = 32


def _norms_functions(size, channels, rng):
  a = tf.constant(np.maximum(rng.standard_normal((BATCH, size, size, channels)), 0), tf.float32)
  g = tf.constant(rng.standard_normal((BATCH, size, size, channels)) * 1e-2, tf.float32)
  layer = models.WSConv2D(channels, 3, padding="same", use_bias=False)
  layer.build(a.shape)
  rule = ws_conv_rule.WSConv2DRule()
  mask = tf.constant((rng.random(layer.kernel.shape) < 0.2).astype(np.float32))

  z = rule.pre_activation(layer, a)  # the forward pass's, not timed (the engine has it)

  def norms(loop, mask):
    @tf.function
    def run(a, z, g):
      call = base.CapturedCall(layer, rule, a, z)
      return loop(rule, call, g, tf.constant(BATCH), [layer.kernel], [mask])
    return lambda: run(a, z, g)

  loops = {"generic": windowed.WindowedRule._one_example_at_a_time,
           "projections": ws_conv_rule.WSConv2DRule._one_example_at_a_time}
  return {f"{size}x{channels} {name}/{mask_name}": norms(loop, m)
          for mask_name, m in (("ones", tf.ones_like(mask)), ("mask80", mask))
          for name, loop in loops.items()}


def main(sizes="32x16,32x64,16x128,8x256", rounds="9"):
  ws_conv_rule._projections_are_cheaper = lambda call: True
  rng = np.random.default_rng(0)
  functions = {}
  for size in sizes.split(","):
    functions.update(_norms_functions(*(int(v) for v in size.split("x")), rng))
  for key, run in functions.items():
    generic, projections = key.replace("projections", "generic"), key
    run()
    if "projections" in key:  # the same norms both ways, up to float32 rounding
      np.testing.assert_allclose(functions[projections]().numpy(), functions[generic]().numpy(),
                                 rtol=1e-4)
  times = {key: [] for key in functions}
  for _ in range(int(rounds)):
    for key, run in functions.items():
      start = time.perf_counter()
      run().numpy()
      times[key].append((time.perf_counter() - start) * 1e3)
  for key, millis in times.items():
    print(f"{key:28s} median {statistics.median(millis):7.2f} ms  min {min(millis):7.2f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
