"""Variants of WSConv2DRule's per-example loop on 2 cores of an AMD EPYC with AVX-512
(2026-12-02; benchmarks/README.md "The CNN and the WRN on an AMD EPYC with AVX-512"): one
WSConv2D layer's norms of 32 examples (3x3, "same"), interleaved rounds, each against the
engine's (`l2loss`: mask and 1/s in one factor, `tf.nn.l2_loss`):

  per_channel_sums  the loop before the l2_loss change (commit cfe5aba): per-channel sums of
                    the masked squares, weighted by 1/s^2
  sqdiff            the offset mean + w_hat along formed per example, tf.math.squared_difference,
                    and a dot with (mask / s)^2 (tried, not kept)
  gathered          only the trained coordinates gathered from each example's gradient before
                    the elementwise work (tried, not kept)

  python benchmarks/results/i18/avx512/ws_loop_variants.py 8x256,16x128 9 per_channel_sums,l2loss
      # as run for the change: ws_loop_l2loss_ab.txt
  python benchmarks/results/i18/avx512/ws_loop_variants.py 8x256,16x128 7 l2loss,sqdiff,gathered
      # as run for the tried ones: ws_loop_tried.txt
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

def sqdiff_loop(self, call, g, batch, variables, masks):
  layer = call.layer
  standardized, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
  means, along = ws_conv_rule._projections(call, g, batch, standardized)
  weights = tf.reshape(tf.square(masks[0] * tf.reshape(inverse_std, [-1])), [-1])
  example_inputs = base.rows_per_example(call.inputs, batch)
  example_grads = base.rows_per_example(g, batch)
  grads_of = windowed.weight_grad_function(layer, standardized)
  def squared_norm(i):
    offset = standardized * along[i] + means[i]
    sq = tf.math.squared_difference(grads_of(example_inputs[i], example_grads[i]), offset)
    return tf.tensordot(tf.reshape(sq, [-1]), weights, 1)
  return tf.map_fn(squared_norm, tf.range(batch), fn_output_signature=g.dtype)

def gathered_loop(self, call, g, batch, variables, masks):
  layer = call.layer
  standardized, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
  means, along = ws_conv_rule._projections(call, g, batch, standardized)
  out = tf.shape(standardized)[-1]
  scaled_mask = tf.reshape(masks[0] * tf.reshape(inverse_std, [-1]), [-1])
  kept = tf.reshape(tf.where(tf.not_equal(scaled_mask, 0)), [-1])
  channel = tf.cast(kept % tf.cast(out, tf.int64), tf.int32)
  scaled = tf.gather(scaled_mask, kept)
  w_kept = tf.gather(tf.reshape(standardized, [-1]), kept) * scaled
  means_kept = tf.gather(means, channel, axis=1) * scaled   # [B, kept]
  along_kept = tf.gather(along, channel, axis=1)
  example_inputs = base.rows_per_example(call.inputs, batch)
  example_grads = base.rows_per_example(g, batch)
  grads_of = windowed.weight_grad_function(layer, standardized)
  def squared_norm(i):
    c = tf.gather(tf.reshape(grads_of(example_inputs[i], example_grads[i]), [-1]), kept)
    return 2.0 * tf.nn.l2_loss(c * scaled - means_kept[i] - w_kept * along_kept[i])
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
           "l2loss": ws_conv_rule.WSConv2DRule._one_example_at_a_time, "sqdiff": sqdiff_loop,
           "gathered": gathered_loop}
  loops = {n: loops[n] for n in VARIANTS}
  return {f"{size}x{channels} {n}/{mn}": norms(l, m) for mn, m in (("ones", tf.ones_like(mask)), ("mask80", mask)) for n, l in loops.items()}

VARIANTS = (sys.argv[3] if len(sys.argv) > 3 else "per_channel_sums,l2loss,sqdiff,gathered").split(",")
ws_conv_rule._projections_are_cheaper = lambda call: True
rng = np.random.default_rng(0)
f = {}
for s in sys.argv[1].split(","):
  f.update(fns(*(int(v) for v in s.split("x")), rng))
for k, r in f.items():
  if "l2loss" not in k:
    a, b = r().numpy(), f[k.replace(k.split()[1].split("/")[0], "l2loss")]().numpy()
    print(k, "max rel diff", np.max(np.abs(a - b) / b))
t = {k: [] for k in f}
for _ in range(int(sys.argv[2])):
  for k, r in f.items():
    s = time.perf_counter(); r().numpy(); t[k].append(1e3 * (time.perf_counter() - s))
for k, v in t.items():
  print(f"{k:26s} median {statistics.median(v):7.2f} ms min {min(v):7.2f}")
