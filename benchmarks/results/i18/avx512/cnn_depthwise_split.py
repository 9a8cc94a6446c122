"""The CNN's first conv: the rows-as-channels depthwise op whole or split in 2, 5, 10 by rows,
against one-hot patches (2026-12-02):

  python benchmarks/results/i18/avx512/cnn_depthwise_split.py
"""
import time, statistics, sys
import numpy as np, tensorflow as tf
B = 250
rng = np.random.default_rng(0)
x1 = tf.constant(rng.random((B, 28, 28, 1), dtype=np.float32))
g1 = tf.constant(rng.standard_normal((B, 14, 14, 16), dtype=np.float32))
def dw(x, g):
  rows = x.shape[0]
  xt = tf.transpose(x, [3, 1, 2, 0])
  gt = tf.reshape(tf.transpose(g, [1, 2, 0, 3]), [1, 14, 14, rows * 16])
  k = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(xt, [8, 8, rows, 16], gt, [1, 2, 2, 1], "SAME")
  return tf.reshape(tf.transpose(k, [2, 0, 1, 3]), [rows, 64, 16])
def split(n):
  def f(x, g):
    xs = tf.split(x, n); gs = tf.split(g, n)
    return tf.concat([dw(a, b) for a, b in zip(xs, gs)], 0)
  return f
def onehot(x, g):
  oh = tf.reshape(tf.eye(64), [8, 8, 1, 64])
  p = tf.reshape(tf.nn.conv2d(x, oh, 2, "SAME"), [B, 196, 64])
  return tf.transpose(tf.matmul(tf.reshape(g, [B, 196, 16]), p, transpose_a=True), [0, 2, 1])
fns = {"onehot": onehot, "dw": dw, "dw_split2": split(2), "dw_split5": split(5), "dw_split10": split(10)}
fns = {k: tf.function(lambda x, g, f=f: tf.reduce_sum(tf.square(f(x, g)), [1, 2])) for k, f in fns.items()}
ref = fns["onehot"](x1, g1)
for k, f in fns.items():
  print(k, float(tf.reduce_max(tf.abs(f(x1, g1) - ref) / ref)))
t = {k: [] for k in fns}
for _ in range(40):
  for k, f in fns.items():
    s = time.perf_counter(); f(x1, g1).numpy(); t[k].append(1e3 * (time.perf_counter() - s))
for k, v in t.items():
  print(f"{k:12s} median {statistics.median(v):6.2f} min {min(v):6.2f}")
