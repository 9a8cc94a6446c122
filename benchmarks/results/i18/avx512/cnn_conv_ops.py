"""The CNN's two convolutions' per-example norms by single ops (one-hot patches, the depthwise op
for 1 or 16 input channels, batched patches, ghost) beside the batch's weight-gradient op
(2026-12-02):

  python benchmarks/results/i18/avx512/cnn_conv_ops.py 30
"""
import time, statistics, sys
import numpy as np
import tensorflow as tf

B = 250
rng = np.random.default_rng(0)
x1 = tf.constant(rng.random((B, 28, 28, 1), dtype=np.float32))
g1 = tf.constant(rng.standard_normal((B, 14, 14, 16), dtype=np.float32))
x2 = tf.constant(rng.random((B, 13, 13, 16), dtype=np.float32))
g2 = tf.constant(rng.standard_normal((B, 5, 5, 32), dtype=np.float32))
k1 = tf.constant(rng.standard_normal((8, 8, 1, 16), dtype=np.float32))
k2 = tf.constant(rng.standard_normal((4, 4, 16, 32), dtype=np.float32))

def onehot_patches(x, ksize, stride, padding, cin):
  w = ksize * ksize * cin
  oh = tf.reshape(tf.eye(w), [ksize, ksize, cin, w])
  p = tf.nn.conv2d(x, oh, stride, padding)
  return tf.reshape(p, [B, -1, w])

@tf.function
def c1_identity(x, g):
  p = onehot_patches(x, 8, 2, "SAME", 1)
  gr = tf.reshape(g, [B, -1, 16])
  grads = tf.transpose(tf.matmul(gr, p, transpose_a=True), [0, 2, 1])
  return tf.reduce_sum(tf.square(grads), [1, 2])

@tf.function
def c1_depthwise(x, g):
  xt = tf.transpose(x, [3, 1, 2, 0])  # [1,28,28,B]
  gt = tf.reshape(tf.transpose(g, [1, 2, 0, 3]), [1, 14, 14, B * 16])
  grads = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(xt, [8, 8, B, 16], gt, [1, 2, 2, 1], "SAME")
  return tf.reduce_sum(tf.square(grads), [0, 1, 3])

@tf.function
def c1_weightgrad(x, g):  # the non-private batch op, for scale
  return tf.compat.v1.nn.conv2d_backprop_filter(x, [8, 8, 1, 16], g, [1, 2, 2, 1], "SAME")

@tf.function
def c2_batched(x, g):
  p = tf.image.extract_patches(x, [1, 4, 4, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID")
  p = tf.reshape(p, [B, 25, 256])
  gr = tf.reshape(g, [B, 25, 32])
  grads = tf.matmul(p, gr, transpose_a=True)
  return tf.reduce_sum(tf.square(grads), [1, 2])

@tf.function
def c2_identity(x, g):
  p = onehot_patches(x, 4, 2, "VALID", 16)
  gr = tf.reshape(g, [B, 25, 32])
  grads = tf.matmul(p, gr, transpose_a=True)
  return tf.reduce_sum(tf.square(grads), [1, 2])

@tf.function
def c2_depthwise(x, g):
  xt = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, 13, 13, B * 16])
  gt = tf.transpose(g, [1, 2, 0, 3])  # [5,5,B,32]
  gt = tf.reshape(tf.tile(gt[:, :, :, None, :], [1, 1, 1, 16, 1]), [1, 5, 5, B * 16 * 32])
  grads = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(xt, [4, 4, B * 16, 32], gt, [1, 2, 2, 1], "VALID")
  return tf.reduce_sum(tf.square(tf.reshape(grads, [16, B, 16, 32])), [0, 2, 3])

@tf.function
def c2_ghost(x, g):
  p = tf.image.extract_patches(x, [1, 4, 4, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID")
  p = tf.reshape(p, [B, 25, 256])
  gr = tf.reshape(g, [B, 25, 32])
  a = tf.matmul(p, p, transpose_b=True)
  gg = tf.matmul(gr, gr, transpose_b=True)
  return tf.reduce_sum(a * gg, [1, 2])

@tf.function
def c2_weightgrad(x, g):
  return tf.compat.v1.nn.conv2d_backprop_filter(x, [4, 4, 16, 32], g, [1, 2, 2, 1], "VALID")

fns = {k: v for k, v in globals().items() if k.startswith(("c1_", "c2_"))}
args = {k: ((x1, g1) if k.startswith("c1") else (x2, g2)) for k in fns}
ref1 = c1_identity(x1, g1); ref2 = c2_batched(x2, g2)
for k, f in fns.items():
  out = f(*args[k])
  if "weightgrad" not in k:
    ref = ref1 if k.startswith("c1") else ref2
    print(k, "max rel err", float(tf.reduce_max(tf.abs(out - ref) / ref)))
times = {k: [] for k in fns}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
  for k, f in fns.items():
    t = time.perf_counter(); f(*args[k]).numpy(); times[k].append(time.perf_counter() - t)
for k, v in times.items():
  print(f"{k:16s} median {1e3*statistics.median(v):7.2f} ms  min {1e3*min(v):7.2f}")
