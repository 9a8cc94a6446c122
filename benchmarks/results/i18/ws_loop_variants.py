"""The micro-benchmark of 2026-12-01 behind "The WRN on the AMD EPYC" (benchmarks/README.md):
one WSConv2D layer's per-example squared norms (32 examples, 3x3 kernel, "same" padding) by
variants of the per-example loop, each its own `tf.function`, timed in interleaved rounds.

  op_only         the bare per-example weight-gradient op (a floor, no norm)
  current         the loop as the engine ran it (until `ws_loop_projections_ab.py`'s change):
                  tape gradient, standardization map, mask, square
  folded          1/s^2 folded into a per-channel reduction (one kernel-sized pass less)
  xla             the map, mask and square compiled with XLA inside the loop
  stacked         per-example gradients stacked [32, *kernel], mapped in batch-wide ops
  ghost32/ghost64 ghost norms (Gram matrices of patches and output gradients), no rounding
                  bound and no standardization (a lower bound on their cost)
  grouped         the examples as channel groups of one grouped weight-gradient op

  python benchmarks/results/i18/ws_loop_variants.py [height x channels] [rounds] [variants]
  python benchmarks/results/i18/ws_loop_variants.py 8x256 9     # as run (all variants)
  python benchmarks/results/i18/ws_loop_variants.py 16x128 9
  (The output's "grouped" lines are from `... 8x256 1 grouped`, run again once the printed
  error named the filter size.)
"""
import os
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfdp_prune import ws_conv_rule  # pylint: disable=g-import-not-at-top,wrong-import-position

BATCH = 32
ALL = ("op_only", "current", "folded", "xla", "stacked", "ghost32", "ghost64", "grouped")


def _weight_grad(x, gy, kernel_shape):
  return tf.compat.v1.nn.conv2d_backprop_filter(x, kernel_shape, gy, [1, 1, 1, 1], "SAME")


@tf.function(jit_compile=True)
def _xla_norm(c, w_hat, inverse_std, mask):
  return tf.reduce_sum(tf.square(ws_conv_rule.standardization_vjp(w_hat, inverse_std)(c) * mask))


def _variant(name, layer, mask):
  """A tf.function (inputs, output grads) -> [B] squared norms (or a stand-in of their cost)."""

  @tf.function
  def norms(a, g):
    w_hat, inverse_std = layer.standardize(tf.convert_to_tensor(layer.kernel))
    vjp = ws_conv_rule.standardization_vjp(w_hat, inverse_std)
    entries = tf.cast(tf.reduce_prod(tf.shape(w_hat)[:-1]), tf.float32)
    shape = tf.shape(w_hat)
    per_example = lambda body: tf.map_fn(body, tf.range(BATCH), fn_output_signature=tf.float32)

    def tape_grad(x, gy):
      kernel = tf.identity(w_hat)
      with tf.GradientTape() as tape:
        tape.watch(kernel)
        z = tf.keras.layers.Conv2D.convolution_op(layer, x, kernel)
      return tape.gradient(z, kernel, output_gradients=gy)

    def folded(c):
      mean = tf.reduce_mean(c, [-4, -3, -2], keepdims=True)
      along = tf.reduce_sum(c * w_hat, [-4, -3, -2], keepdims=True) / entries
      v = (c - mean - w_hat * along) * mask
      per_channel = tf.reduce_sum(tf.square(v), [-4, -3, -2])
      return tf.reduce_sum(per_channel * tf.square(inverse_std[0, 0, 0]), -1)

    one = lambda i: (a[i:i + 1], g[i:i + 1])
    if name == "op_only":
      return per_example(lambda i: tf.reduce_sum(_weight_grad(*one(i), shape)))
    if name == "current":
      return per_example(lambda i: tf.reduce_sum(tf.square(vjp(tape_grad(*one(i))) * mask)))
    if name == "folded":
      return per_example(lambda i: folded(_weight_grad(*one(i), shape)))
    if name == "xla":
      return per_example(
          lambda i: _xla_norm(_weight_grad(*one(i), shape), w_hat, inverse_std, mask))
    if name == "stacked":
      stacked = tf.map_fn(lambda i: _weight_grad(*one(i), shape), tf.range(BATCH),
                          fn_output_signature=tf.float32)
      return tf.reduce_sum(tf.square(vjp(stacked) * mask), [1, 2, 3, 4])
    if name in ("ghost32", "ghost64"):
      dtype = tf.float32 if name == "ghost32" else tf.float64
      positions = a.shape[1] * a.shape[2]
      patches = tf.image.extract_patches(a, [1, 3, 3, 1], [1, 1, 1, 1], [1, 1, 1, 1], "SAME")
      patches = tf.cast(tf.reshape(patches, [BATCH, positions, -1]), dtype)
      grads = tf.cast(tf.reshape(g, [BATCH, positions, -1]), dtype)
      grams = (tf.matmul(patches, patches, transpose_b=True)
               * tf.matmul(grads, grads, transpose_b=True))
      return tf.cast(tf.reduce_sum(grams, [1, 2]), tf.float32)
    if name == "grouped":
      channels = a.shape[-1]
      as_groups = lambda t: tf.reshape(tf.transpose(t, [1, 2, 0, 3]),
                                       [1, t.shape[1], t.shape[2], -1])
      kernels = tf.raw_ops.Conv2DBackpropFilter(
          input=as_groups(a), filter_sizes=[3, 3, channels, BATCH * channels],
          out_backprop=as_groups(g), strides=[1, 1, 1, 1], padding="SAME")
      per_example_kernels = tf.reshape(kernels, [3, 3, channels, BATCH, -1])
      return tf.reduce_sum(tf.square(per_example_kernels), [0, 1, 2, 4])
    raise ValueError(name)

  return norms


def main(shape="8x256", rounds="9", names=",".join(ALL)):
  size, channels = (int(v) for v in shape.split("x"))
  rng = np.random.default_rng(0)
  a = tf.constant(np.maximum(rng.standard_normal((BATCH, size, size, channels)), 0), tf.float32)
  g = tf.constant(rng.standard_normal((BATCH, size, size, channels)) * 1e-2, tf.float32)
  layer = models.WSConv2D(channels, 3, padding="same")
  layer.build(a.shape)
  masks = {"ones": tf.ones(layer.kernel.shape),
           "mask80": tf.constant((rng.random(layer.kernel.shape) < 0.2).astype(np.float32))}
  steps = {}
  for name in names.split(","):
    for mask_name, mask in masks.items():
      if mask_name == "mask80" and name not in ("current", "folded", "xla", "stacked"):
        continue  # the others take no mask
      step = _variant(name, layer, mask)
      try:
        step(a, g)
      except tf.errors.OpError as error:  # e.g. grouped filters on CPU
        lines = [line for line in str(error).splitlines() if "filter" in line] or [str(error)]
        print(f"{name}: fails: {type(error).__name__}: {lines[0][:200]}")
        break
      steps[f"{name}/{mask_name}"] = step
  times = {key: [] for key in steps}
  for _ in range(int(rounds)):
    for key, step in steps.items():
      start = time.perf_counter()
      step(a, g).numpy()
      times[key].append((time.perf_counter() - start) * 1e3)
  for key, millis in times.items():
    print(f"{shape} {key:16s} median {statistics.median(millis):7.2f} ms  min {min(millis):7.2f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
