"""Gaussian noise for the clipped sum, and the generator it is drawn from: the mechanism itself."""

from typing import Optional, Sequence

import numpy as np

from tfdp_prune import randomness
from tfdp_prune.compat import tf


def add_gaussian_noise(grads: Sequence[tf.Tensor], masks: Sequence[tf.Tensor], stddev,
                       generator: tf.random.Generator) -> list:
  """Returns grads + N(0, stddev^2) on every coordinate whose mask is 1, and exactly nothing
  on frozen coordinates (mask 0).

  `stddev` is the noise standard deviation itself, i.e. noise_multiplier * l2_norm_clip (divided
  by sqrt(replicas) when each replica adds its own share). Each call draws fresh noise from
  `generator`, whose state advances, so no draw is ever reused.
  """
  noisy = []
  for g, m, noise in zip(grads, masks, _draws(grads, stddev, generator)):
    noisy.append(g + tf.where(tf.cast(m, tf.bool), noise, tf.zeros([], noise.dtype)))
  return noisy


def _draws(grads: Sequence[tf.Tensor], stddev, generator: tf.random.Generator) -> list:
  """One N(0, stddev^2) tensor shaped like each of `grads`, from ONE draw per dtype, split:
  the same i.i.d. Gaussians as a draw per tensor, in a few ops instead of ten per tensor (the
  op count, not the arithmetic, is what the draws cost)."""
  draws = [None] * len(grads)
  for dtype in dict.fromkeys(g.dtype for g in grads):
    indices = [i for i, g in enumerate(grads) if g.dtype == dtype]
    # int64: an int32 total overflows at 2^31 coordinates.
    sizes = [tf.size(grads[i], out_type=tf.int64) for i in indices]
    flat = generator.normal(tf.reshape(tf.add_n(sizes), [1]), stddev=tf.cast(stddev, dtype),
                            dtype=dtype)
    for i, part in zip(indices, tf.split(flat, tf.stack(sizes))):
      draws[i] = tf.reshape(part, tf.shape(grads[i]))
  return draws


def make_noise_generator(insecure_seed: Optional[int] = None) -> tf.random.Generator:
  """The noise generator: Philox with its whole 192-bit state (128-bit counter, 64-bit key) from
  `os.urandom`; only when `insecure_seed` is given, `Generator.from_seed(insecure_seed)`
  (reproducible, hence INSECURE: the caller warns and labels).

  Not `tf.random.Generator.from_non_deterministic_state()`: its state comes from TensorFlow's
  process-wide std::mt19937_64, seeded with ONE 32-bit value of std::random_device (`New64` in
  TSL's platform/random.cc), i.e. at most 2**32 possible noise streams per process.

  Create it where the optimizer's variables are created (under a tf.distribute strategy's scope):
  its state is then a mirrored variable, under MultiWorkerMirroredStrategy broadcast from the
  chief when it is created, and each replica draws with its own key, derived by
  tf.random.Generator from the shared key and the replica id, so replicas add independent noise.
  The state is checkpointed with the optimizer and never published.
  """
  if insecure_seed is None:
    state = np.array(randomness.os_entropy_words(3), dtype=np.uint64).view(np.int64)
    return tf.random.Generator.from_state(state, alg="philox")
  return tf.random.Generator.from_seed(insecure_seed, alg="philox")
