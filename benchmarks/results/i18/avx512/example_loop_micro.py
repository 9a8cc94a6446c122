"""One WSConv2D layer of the WRN-16-4, 32 examples, 80 % mask: the per-example loop's norms
(tf.map_fn) then the clipped sum by the weight-gradient op on factor-scaled output gradients
("current", the engine of 59e1e51), against one tf.while_loop that adds f_i c_i as it goes
("fused", the prototype of example_loop). Run against commit 59e1e51's tfdp_prune (where
WSConv2DRule._one_example_at_a_time is the projections loop); argument 0/1/2 = the 8x8x256,
16x16x128, 32x32x64 layer (the prototype takes the projections at every size). Output:
example_loop_micro.txt. Usage: python example_loop_micro.py 0"""
import time, sys
import numpy as np
from tfdp_prune.compat import tf, keras
from tfdp_prune import models, ws_conv_rule, clipping
from tfdp_prune.layer_rules import base, windowed

B = 32
shape, ch = [(8, 256), (16, 128), (32, 64)][int(sys.argv[1])]
layer = models.WSConv2D(ch, 3, padding="same", use_bias=False)
layer.build((None, shape, shape, ch))
rule = ws_conv_rule.WSConv2DRule()
a = tf.random.normal([B, shape, shape, ch]); g = tf.random.normal([B, shape, shape, ch]) * 1e-3
mask = tf.cast(tf.random.uniform(layer.kernel.shape) < 0.2, tf.float32)
kept = tf.ones([B], tf.bool)

@tf.function
def current(a, g):
  call = base.CapturedCall(layer, rule, a, g)
  sq = rule._one_example_at_a_time(call, g, B, [layer.kernel], [mask])
  f, kept, _ = clipping.clip_weights(tf.sqrt(sq), tf.ones([B]), 1.0)
  return rule._clipped_sum(call, g, B, [layer.kernel], [mask], f, kept)[0]

@tf.function
def fused(a, g):
  call = base.CapturedCall(layer, rule, a, g)
  standardized, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
  means, along = ws_conv_rule._projections(call, g, B, standardized)
  scaled_mask = mask * tf.reshape(inverse_std, [-1])
  grads_of = windowed.weight_grad_function(layer, standardized)
  def body(i, acc, ta):
    c = grads_of(a[i:i+1], g[i:i+1])
    sq = 2.0 * tf.nn.l2_loss((c - means[i] - standardized * along[i]) * scaled_mask)
    f = tf.minimum(1.0, 1.0 / tf.sqrt(sq))
    acc = tf.cond(tf.math.is_finite(sq), lambda: acc + f * c, lambda: acc)
    return i + 1, acc, ta.write(i, sq)
  _, acc, ta = tf.while_loop(lambda i, *_: i < B, body,
      (0, tf.zeros_like(standardized), tf.TensorArray(tf.float32, B)))
  return ws_conv_rule.standardization_vjp(standardized, inverse_std)(acc) * mask

x1 = current(a, g); x2 = fused(a, g)
print("max rel diff", float(tf.reduce_max(tf.abs(x1 - x2)) / tf.reduce_max(tf.abs(x1))))
ts = {"current": [], "fused": []}
for r in range(9):
  for name, fn in (("current", current), ("fused", fused)):
    t = time.perf_counter(); fn(a, g).numpy(); ts[name].append(time.perf_counter() - t)
print(shape, {k: round(1e3 * float(np.median(v)), 1) for k, v in ts.items()})
