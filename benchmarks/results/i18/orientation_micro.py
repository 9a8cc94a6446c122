"""Micro-benchmark behind "Per-example products the cheaper way round" (benchmarks/README.md):
the MNIST CNN's two per-example conv products (batch 250), each way round, as tf.functions;
median wall ms of 15 interleaved rounds of 5 calls.

  python benchmarks/results/i18/orientation_micro.py
"""
import statistics
import time

import tensorflow as tf

BATCH = 250
SHAPES = {"first conv": (196, 64, 16), "second conv": (25, 256, 32)}  # T, window, out


def _ways(positions, window, out):
  patches = tf.random.normal([BATCH, positions, window])
  grads = tf.random.normal([BATCH, positions, out])
  return {
      "P^T G (transpose_a on the patches)": lambda: tf.matmul(patches, grads, transpose_a=True),
      "G^T P, then the result transposed": lambda: tf.transpose(
          tf.matmul(grads, patches, transpose_a=True), [0, 2, 1]),
      "G^T P alone": lambda: tf.matmul(grads, patches, transpose_a=True),
  }


def main():
  calls = {(name, way): tf.function(fn) for name, shape in SHAPES.items()
           for way, fn in _ways(*shape).items()}
  for fn in calls.values():
    fn()
  ms = {key: [] for key in calls}
  for _ in range(15):
    for key, fn in calls.items():
      start = time.perf_counter()
      for _ in range(5):
        result = fn()
      result.numpy()
      ms[key].append((time.perf_counter() - start) / 5 * 1e3)
  for (name, way), times in ms.items():
    print(f"{name:12s} {way:36s} {statistics.median(times):6.2f} ms")


if __name__ == "__main__":
  main()
