"""The MNIST CNN's two convolutions (250 examples): per-example norms and the reused clipped sum by
one-hot or extracted patches, space-to-depth patches, the depthwise op with the rows as channels,
ghost norms, the depthwise form for the second conv's 16 input channels (its output gradients
repeated per channel); and, for scale, the batch's own weight-gradient op (`*_weightgrad`: the
sum only, no norms). Each its own tf.function, interleaved rounds (2026-12-02,
benchmarks/README.md "The CNN and the WRN on an AMD EPYC with AVX-512"). `+mm`: the norms by a
batched matmul instead.

  python benchmarks/results/i18/avx512/cnn_conv_norm_variants.py 30
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
fac = tf.constant(rng.random((B,), dtype=np.float32))

def finish(grads):  # [B, window, out]
  return tf.reduce_sum(tf.square(grads), [1, 2]), tf.tensordot(fac, grads, 1)

def finish_mm(grads):  # norms via batched matmul
  flat = tf.reshape(grads, [B, 1, -1])
  return tf.reshape(tf.matmul(flat, flat, transpose_b=True), [B]), tf.tensordot(fac, grads, 1)

def s2d(x, k, s, pad, out):
  xp = tf.pad(x, [[0, 0], pad[0], pad[1], [0, 0]]) if pad else x
  need = s * (out - 1) + k
  return tf.nn.space_to_depth(xp[:, :need, :need, :], s)

def s2d_concat(x, g, k, s, pad, out, cout):
  d = s2d(x, k, s, pad, out); kb = k // s
  p = tf.concat([d[:, a:a + out, b:b + out, :] for a in range(kb) for b in range(kb)], -1)
  p = tf.reshape(p, [B, out * out, -1]); gr = tf.reshape(g, [B, out * out, cout])
  return p, gr

def c1_onehot(x, g, fin=finish):
  oh = tf.reshape(tf.eye(64), [8, 8, 1, 64])
  p = tf.reshape(tf.nn.conv2d(x, oh, 2, "SAME"), [B, 196, 64])
  gr = tf.reshape(g, [B, 196, 16])
  return fin(tf.transpose(tf.matmul(gr, p, transpose_a=True), [0, 2, 1]))

def c1_s2d(x, g, fin=finish):
  p, gr = s2d_concat(x, g, 8, 2, ((3, 3), (3, 3)), 14, 16)
  return fin(tf.transpose(tf.matmul(gr, p, transpose_a=True), [0, 2, 1]))

def c1_s2d_pg(x, g, fin=finish):
  p, gr = s2d_concat(x, g, 8, 2, ((3, 3), (3, 3)), 14, 16)
  return fin(tf.matmul(p, gr, transpose_a=True))

def c1_s2d_sum(x, g, fin=finish):
  d = s2d(x, 8, 2, ((3, 3), (3, 3)), 14); gr = tf.reshape(g, [B, 196, 16])
  parts = [tf.matmul(tf.reshape(d[:, a:a + 14, b:b + 14, :], [B, 196, 4]), gr, transpose_a=True) for a in range(4) for b in range(4)]
  return fin(tf.concat(parts, 1))

def c1_depthwise(x, g, fin=finish):
  xt = tf.transpose(x, [3, 1, 2, 0])
  gt = tf.reshape(tf.transpose(g, [1, 2, 0, 3]), [1, 14, 14, B * 16])
  k = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(xt, [8, 8, B, 16], gt, [1, 2, 2, 1], "SAME")
  return fin(tf.reshape(tf.transpose(k, [2, 0, 1, 3]), [B, 64, 16]))

def c2_extract(x, g, fin=finish):
  p = tf.reshape(tf.image.extract_patches(x, [1, 4, 4, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID"), [B, 25, 256])
  return fin(tf.matmul(p, tf.reshape(g, [B, 25, 32]), transpose_a=True))

def c2_s2d(x, g, fin=finish):
  p, gr = s2d_concat(x, g, 4, 2, None, 5, 32)
  return fin(tf.matmul(p, gr, transpose_a=True))

def c2_s2d_sum(x, g, fin=finish):
  d = s2d(x, 4, 2, None, 5); gr = tf.reshape(g, [B, 25, 32])
  parts = [tf.matmul(tf.reshape(d[:, a:a + 5, b:b + 5, :], [B, 25, 64]), gr, transpose_a=True) for a in range(2) for b in range(2)]
  return fin(tf.concat(parts, 1))

def c2_ghost(x, g, fin=None):
  p = tf.reshape(tf.image.extract_patches(x, [1, 4, 4, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID"), [B, 25, 256])
  gr = tf.reshape(g, [B, 25, 32])
  n = tf.reduce_sum(tf.matmul(p, p, transpose_b=True) * tf.matmul(gr, gr, transpose_b=True), [1, 2])
  s = tf.compat.v1.nn.conv2d_backprop_filter(x, [4, 4, 16, 32], g * fac[:, None, None, None], [1, 2, 2, 1], "VALID")
  return n, s

def c2_depthwise16(x, g, fin=finish):
  xt = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, 13, 13, B * 16])  # channels (row, in)
  gt = tf.repeat(tf.transpose(g, [1, 2, 0, 3]), 16, axis=2)  # [5, 5, B * 16, 32]
  grads = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(
      xt, [4, 4, B * 16, 32], tf.reshape(gt, [1, 5, 5, B * 16 * 32]), [1, 2, 2, 1], "VALID")
  return fin(tf.reshape(tf.transpose(tf.reshape(grads, [4, 4, B, 16, 32]), [2, 0, 1, 3, 4]),
                        [B, 256, 32]))

def weightgrad(kernel_shape, strides, padding):
  def run(x, g, fin=None):
    summed = tf.compat.v1.nn.conv2d_backprop_filter(x, kernel_shape, g * fac[:, None, None, None],
                                                    strides, padding)
    return None, summed
  return run

c1_weightgrad = weightgrad([8, 8, 1, 16], [1, 2, 2, 1], "SAME")
c2_weightgrad = weightgrad([4, 4, 16, 32], [1, 2, 2, 1], "VALID")

fns = {}
for name in [k for k in list(globals()) if k.startswith(("c1_", "c2_"))]:
  fn = globals()[name]
  fns[name] = tf.function(lambda x, g, fn=fn: fn(x, g))
  if name not in ("c2_ghost", "c1_weightgrad", "c2_weightgrad"):
    fns[name + "+mm"] = tf.function(lambda x, g, fn=fn: fn(x, g, finish_mm))
args = lambda k: (x1, g1) if k.startswith("c1") else (x2, g2)
ref = {"c1": fns["c1_onehot"](x1, g1), "c2": fns["c2_extract"](x2, g2)}
for k, f in fns.items():
  n, s = f(*args(k)); r = ref[k[:2]]
  print(k, "norm err", None if n is None else float(tf.reduce_max(tf.abs(n - r[0]) / r[0])),
        # s2d variants sum in their own window order (a, b, dh, dw, c): not compared.
        "sum err", "window order differs" if "s2d" in k else float(
            tf.reduce_max(tf.abs(tf.reshape(s, r[1].shape) - r[1])) / tf.reduce_max(tf.abs(r[1]))))
times = {k: [] for k in fns}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
  for k, f in fns.items():
    t = time.perf_counter(); [o.numpy() for o in f(*args(k)) if o is not None]; times[k].append(time.perf_counter() - t)
for k, v in times.items():
  print(f"{k:18s} median {1e3*statistics.median(v):6.2f} ms min {1e3*min(v):6.2f}")
