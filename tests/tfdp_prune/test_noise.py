import numpy as np
from scipy import stats

from tfdp_prune import noise
from tfdp_prune.compat import tf


def _draw(stddev, seed=0, n=20000):
  generator = tf.random.Generator.from_seed(seed)
  grads = [tf.zeros([n])]
  masks = [tf.ones([n])]
  return noise.add_gaussian_noise(grads, masks, stddev, generator)[0].numpy()


def test_noise_has_the_given_stddev_and_not_a_nearby_one():
  sample = _draw(stddev=0.7)
  assert stats.kstest(sample, "norm", args=(0, 0.7)).pvalue > 1e-3
  for wrong in (0.7 * 2 / 3, 0.7 * 3 / 2):
    assert stats.kstest(sample, "norm", args=(0, wrong)).pvalue < 1e-6


def test_frozen_coordinates_get_exactly_no_noise():
  generator = tf.random.Generator.from_seed(1)
  mask = tf.constant([1.0, 0.0] * 500)
  noisy = noise.add_gaussian_noise([tf.zeros([1000])], [mask], 5.0, generator)[0].numpy()
  np.testing.assert_array_equal(noisy[1::2], 0.0)
  assert np.all(noisy[0::2] != 0.0)


def test_each_call_draws_fresh_noise_and_a_seed_reproduces_the_sequence():
  generator = tf.random.Generator.from_seed(3)
  args = ([tf.zeros([100])], [tf.ones([100])], 1.0)
  first = noise.add_gaussian_noise(*args, generator)[0].numpy()
  second = noise.add_gaussian_noise(*args, generator)[0].numpy()
  assert not np.any(first == second)
  replay = tf.random.Generator.from_seed(3)
  np.testing.assert_array_equal(noise.add_gaussian_noise(*args, replay)[0], first)


def test_the_default_generator_takes_its_whole_state_from_os_entropy(monkeypatch):
  from tfdp_prune import randomness  # pylint: disable=g-import-not-at-top
  words = [7, 2**64 - 2, 2**63]
  monkeypatch.setattr(randomness, "os_entropy_words", lambda count: list(words)[:count])
  generator = noise.make_noise_generator()
  assert generator.state.numpy().view(np.uint64).tolist() == words
  assert generator.algorithm == tf.random.Algorithm.PHILOX.value


def test_default_generators_differ_and_the_insecure_seed_replays_from_seed():
  args = ([tf.zeros([100])], [tf.ones([100])], 1.0)
  first, second = (noise.add_gaussian_noise(*args, noise.make_noise_generator())[0].numpy()
                   for _ in range(2))
  assert not np.any(first == second)
  seeded = noise.add_gaussian_noise(*args, noise.make_noise_generator(insecure_seed=4))[0]
  np.testing.assert_array_equal(
      seeded, noise.add_gaussian_noise(*args, tf.random.Generator.from_seed(4))[0])


def test_every_tensor_gets_its_own_independent_noise_of_its_shape():
  """One draw serves all tensors (split): each tensor's slice is its own, never another's, and
  a float64 gradient gets float64 noise."""
  generator = tf.random.Generator.from_seed(5)
  grads = [tf.zeros([3000]), tf.zeros([60, 50]), tf.zeros([0, 4]), tf.zeros([3000], tf.float64)]
  noisy = noise.add_gaussian_noise(grads, [tf.ones_like(g) for g in grads], 2.0, generator)
  assert [n.shape.as_list() for n in noisy] == [[3000], [60, 50], [0, 4], [3000]]
  assert [n.dtype for n in noisy] == [tf.float32, tf.float32, tf.float32, tf.float64]
  first, second, _, third = (n.numpy().ravel() for n in noisy)
  for sample in (first, second, third):
    assert stats.kstest(sample, "norm", args=(0, 2.0)).pvalue > 1e-3
  # Independent: uncorrelated (|r| < 5 / sqrt(n) holds with probability 1 - 6e-7), not equal.
  for a, b in ((first, second), (first, third), (second, third)):
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(3000)
    assert not np.any(a == b)
