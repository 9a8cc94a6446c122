"""The per-example weight-gradient op (one example at a time, in a while_loop) against
extract_patches + matmul per example and the batch op once (issue 18: how far the WRN loop
sits from the batch op). Usage: python per_example_op_vs_matmul.py H C"""
import time, sys
import numpy as np, tensorflow as tf
H = int(sys.argv[1]); C = int(sys.argv[2]); B = 32
x = tf.random.normal([B, H, H, C]); g = tf.random.normal([B, H, H, C])
shape = tf.constant([3, 3, C, C])

def op_loop():
  def body(i, acc):
    gi = tf.raw_ops.Conv2DBackpropFilter(input=x[i:i+1], filter_sizes=shape, out_backprop=g[i:i+1],
        strides=[1,1,1,1], padding="SAME")
    return i + 1, acc + tf.reduce_sum(tf.square(gi))
  return tf.while_loop(lambda i, a: i < B, body, (0, 0.0), parallel_iterations=10)[1]

def mm_loop():
  def body(i, acc):
    p = tf.image.extract_patches(x[i:i+1], [1,3,3,1], [1,1,1,1], [1,1,1,1], "SAME")
    p = tf.reshape(p, [H*H, 9*C])
    gi = tf.matmul(p, tf.reshape(g[i], [H*H, C]), transpose_a=True)
    return i + 1, acc + tf.reduce_sum(tf.square(gi))
  return tf.while_loop(lambda i, a: i < B, body, (0, 0.0), parallel_iterations=10)[1]

def batch_op():
  gi = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=shape, out_backprop=g,
        strides=[1,1,1,1], padding="SAME")
  return tf.reduce_sum(gi)

fs = {n: tf.function(f) for n, f in [("op_loop", op_loop), ("mm_loop", mm_loop), ("batch_op", batch_op)]}
for f in fs.values(): f(); f()
print(float(fs["op_loop"]()), float(fs["mm_loop"]()))
res = {n: [] for n in fs}
for r in range(7):
  for n, f in fs.items():
    t = time.perf_counter(); f().numpy(); res[n].append(time.perf_counter() - t)
for n, v in res.items(): print(H, C, n, "%.1f ms" % (1000 * np.median(v)))
