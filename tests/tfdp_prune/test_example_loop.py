"""The engine's one loop over examples (`example_loop`): every loop's terms of example i
weighted by i's clip factor from ALL its norms, padding and non-finite examples never added,
a frozen layer never run."""

import numpy as np

from tfdp_prune import clipping
from tfdp_prune import example_loop
from tfdp_prune.compat import tf
from tfdp_prune.layer_rules import base

_CLIP = 1.5


def _table_loop(table, scale=1.0, trained=None):
  """A loop whose example i's masked gradient is scale * table[i]."""
  table = tf.constant(table, tf.float32)
  variable = tf.Variable(tf.zeros(table.shape[1:]))

  def example(i):
    gradient = scale * table[i]
    return [gradient], tf.reduce_sum(tf.square(gradient))

  return base.ExampleLoop([variable], example, [tf.zeros(table.shape[1:])], trained)


def _never_run_loop(shape):
  """A loop that fails if its example function ever RUNS (it is traced in a tf.cond)."""
  variable = tf.Variable(tf.zeros(shape))

  def example(i):
    check = tf.debugging.Assert(False, [i])
    with tf.control_dependencies([check]):
      return [tf.ones(shape)], tf.constant(1.0)

  return base.ExampleLoop([variable], example, [tf.zeros(shape)], trained=tf.constant(False))


def test_every_loop_is_weighted_by_the_factor_of_all_its_norms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 3)).astype("float32")
  b = rng.normal(size=(6, 2, 2)).astype("float32")
  a[4, 1] = np.nan  # example 4: not finite, dropped
  b[2] *= 100.0  # example 2: padding, its (large) terms never added
  other = rng.uniform(0.0, 4.0, size=6)
  weights = np.array([1, 1, 0, 1, 1, 1], "float32")
  loops = [_table_loop(a), _table_loop(b, scale=2.0), _never_run_loop((2,)),
           _table_loop(a, trained=tf.constant(True))]
  squared, sums = tf.function(lambda: example_loop.norms_and_sums(
      loops, tf.constant(other), tf.constant(weights), _CLIP))()

  want_squared = (other + np.sum(a.astype("float64")**2, axis=1) * 2
                  + np.sum((2.0 * b.astype("float64"))**2, axis=(1, 2)))
  np.testing.assert_allclose(squared.numpy()[[0, 1, 2, 3, 5]],
                             want_squared[[0, 1, 2, 3, 5]], rtol=1e-6)
  assert np.isnan(squared.numpy()[4])
  factors, kept, _ = clipping.clip_weights(clipping.norms_of_squares(squared),
                                           tf.constant(weights), _CLIP)
  assert kept.numpy().tolist() == [True, True, False, True, False, True]
  weighted = lambda t: np.einsum("b,b...->...", factors.numpy()[kept], t[kept.numpy()])
  assert np.all(factors.numpy()[kept] < 1.0)  # every kept example clipped
  np.testing.assert_allclose(sums[0][0], weighted(a), rtol=1e-5)
  np.testing.assert_allclose(sums[1][0], 2.0 * weighted(b), rtol=1e-5)
  np.testing.assert_array_equal(sums[2][0], np.zeros(2))  # frozen: zeros, never run
  np.testing.assert_allclose(sums[3][0], weighted(a), rtol=1e-5)


def test_an_empty_batch_gives_the_other_norms_and_zero_sums():
  loops = [_table_loop(np.ones((0, 3), "float32"))]
  squared, sums = example_loop.norms_and_sums(loops, tf.zeros([0], tf.float64), tf.zeros([0]),
                                              _CLIP)
  assert squared.shape == (0,)
  np.testing.assert_array_equal(sums[0][0], np.zeros(3))
