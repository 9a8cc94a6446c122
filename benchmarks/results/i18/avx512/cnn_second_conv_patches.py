"""The CNN's second conv (13x13x16 -> 5x5x32, 4x4 stride 2): its patches by extract_patches or
from a space-to-depth of the input (in the kernel's order, or stacked then transposed), each
with the per-example products, norms and weighted sum (2026-12-02):

  python benchmarks/results/i18/avx512/cnn_second_conv_patches.py
"""
import time, statistics
import numpy as np, tensorflow as tf
B = 250
rng = np.random.default_rng(0)
x2 = tf.constant(rng.random((B, 13, 13, 16), dtype=np.float32))
g2 = tf.constant(rng.standard_normal((B, 5, 5, 32), dtype=np.float32))
fac = tf.constant(rng.random((B,), dtype=np.float32))
def extract(x):
  return tf.image.extract_patches(x, [1, 4, 4, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID")
def s2d_kernel_order(x, k=4, s=2, out=5):
  need = s * (out - 1) + k
  d = tf.nn.space_to_depth(x[:, :need, :need, :], s)  # [B, 6, 6, s*s*c] channels (dh, dw, c)
  c = x.shape[-1]
  parts = []
  for kh in range(k):
    for kw in range(k):
      a, dh = divmod(kh, s); b, dw = divmod(kw, s)
      j = (dh * s + dw) * c
      parts.append(d[:, a:a + out, b:b + out, j:j + c])
  return tf.concat(parts, -1)
def s2d_reshape(x, k=4, s=2, out=5):
  # (a,b,dh,dw,c) concat then transpose to (a,dh,b,dw,c)
  need = s * (out - 1) + k
  d = tf.nn.space_to_depth(x[:, :need, :need, :], s)
  kb = k // s; c = x.shape[-1]
  p = tf.stack([tf.stack([d[:, a:a + out, b:b + out, :] for b in range(kb)], 3) for a in range(kb)], 3)  # [B,o,o,a,b,(dh,dw,c)]
  p = tf.reshape(p, [B, out, out, kb, kb, s, s, c])
  p = tf.transpose(p, [0, 1, 2, 3, 5, 4, 6, 7])
  return tf.reshape(p, [B, out, out, k * k * c])
def pipe(pf):
  def f(x, g):
    p = tf.reshape(pf(x), [B, 25, 256])
    grads = tf.matmul(p, tf.reshape(g, [B, 25, 32]), transpose_a=True)
    return tf.reduce_sum(tf.square(grads), [1, 2]), tf.tensordot(fac, grads, 1)
  return tf.function(f)
fns = {"extract": pipe(extract), "s2d_kernel_order": pipe(s2d_kernel_order), "s2d_reshape": pipe(s2d_reshape)}
for n in ("s2d_kernel_order", "s2d_reshape"):
  print(n, "equal", float(tf.reduce_max(tf.abs(tf.function(globals()[n])(x2) - extract(x2)))))
t = {k: [] for k in fns}
for _ in range(40):
  for k, f in fns.items():
    s = time.perf_counter(); [o.numpy() for o in f(x2, g2)]; t[k].append(time.perf_counter() - s)
for k, v in t.items():
  print(f"{k:18s} median {1e3*statistics.median(v):6.2f} ms min {1e3*min(v):6.2f}")
