"""Gaussian noise for the clipped sum: the privacy mechanism itself."""

from typing import Sequence

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
  for g, m in zip(grads, masks):
    noise = generator.normal(tf.shape(g), stddev=tf.cast(stddev, g.dtype), dtype=g.dtype)
    noisy.append(g + tf.where(tf.cast(m, tf.bool), noise, tf.zeros_like(noise)))
  return noisy
