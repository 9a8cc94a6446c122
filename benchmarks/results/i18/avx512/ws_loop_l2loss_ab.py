"""The A/B of 2026-12-02 (2 cores of an AMD EPYC with AVX-512) behind the l2_loss change to
WSConv2DRule's per-example loop (benchmarks/README.md, "The CNN and the WRN on an AMD EPYC with
AVX-512"): one WSConv2D layer's per-example kernel norms (32 examples, 3x3, "same"), in one
process, interleaved rounds: the loop before the change (per-channel sums of the masked squares,
weighted by 1/s^2) against the engine's (mask and 1/s in one factor, `tf.nn.l2_loss`).

  python benchmarks/results/i18/avx512/ws_loop_l2loss_ab.py 8x256,16x128 9   # as run
"""
import os, statistics, sys, time
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np, tensorflow as tf
from tfdp_prune import models, ws_conv_rule
from tfdp_prune.layer_rules import base, windowed
BATCH = 32

def per_channel_sums_loop(self, call, g, batch, variables, masks):
  """The loop before this change (commit cfe5aba): per-channel sums of the masked squares,
  weighted by 1/s^2."""
  layer = call.layer
  standardized, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
  means, along = ws_conv_rule._projections(call, g, batch, standardized)
  channel_weights = tf.reshape(tf.square(inverse_std), [-1])
  example_inputs = base.rows_per_example(call.inputs, batch)
  example_grads = base.rows_per_example(g, batch)
  grads_of = windowed.weight_grad_function(layer, standardized)
  def squared_norm(i):
    centered = grads_of(example_inputs[i], example_grads[i]) - means[i]
    per_channel = tf.reduce_sum(tf.square((centered - standardized * along[i]) * masks[0]),
                                axis=[0, 1, 2])
    return tf.reduce_sum(per_channel * channel_weights)
  return tf.map_fn(squared_norm, tf.range(batch), fn_output_signature=g.dtype)

def fns(size, channels, rng):
  a = tf.constant(np.maximum(rng.standard_normal((BATCH, size, size, channels)), 0), tf.float32)
  g = tf.constant(rng.standard_normal((BATCH, size, size, channels)) * 1e-2, tf.float32)
  layer = models.WSConv2D(channels, 3, padding="same", use_bias=False); layer.build(a.shape)
  rule = ws_conv_rule.WSConv2DRule()
  mask = tf.constant((rng.random(layer.kernel.shape) < 0.2).astype(np.float32))
  z = rule.pre_activation(layer, a)
  def norms(loop, m):
    @tf.function
    def run(a, z, g):
      return loop(rule, base.CapturedCall(layer, rule, a, z), g, tf.constant(BATCH), [layer.kernel], [m])
    return lambda: run(a, z, g)
  loops = {"per_channel_sums": per_channel_sums_loop,
           "l2loss": ws_conv_rule.WSConv2DRule._one_example_at_a_time}
  return {f"{size}x{channels} {n}/{mn}": norms(l, m) for mn, m in (("ones", tf.ones_like(mask)), ("mask80", mask)) for n, l in loops.items()}

ws_conv_rule._projections_are_cheaper = lambda call: True
rng = np.random.default_rng(0)
f = {}
for s in sys.argv[1].split(","):
  f.update(fns(*(int(v) for v in s.split("x")), rng))
for k, r in f.items():
  if "l2loss" in k:
    a, b = r().numpy(), f[k.replace("l2loss", "per_channel_sums")]().numpy()
    print(k, "max rel diff", np.max(np.abs(a - b) / b))
t = {k: [] for k in f}
for _ in range(int(sys.argv[2])):
  for k, r in f.items():
    s = time.perf_counter(); r().numpy(); t[k].append(1e3 * (time.perf_counter() - s))
for k, v in t.items():
  print(f"{k:26s} median {statistics.median(v):7.2f} ms min {min(v):7.2f}")
