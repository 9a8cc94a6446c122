import math
import warnings

import numpy as np
import pytest
from scipy import stats

import tfdp_prune
from tfdp_prune import randomness
from tfdp_prune import sampling
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T

NUM_EXAMPLES, RATE, STEPS = 1000, 0.02, 2000


def _indexed_data(n, features=3):
  """x[i] = (i + 1) * ones, y[i] = i: every row says which example it is; padding is all 0."""
  x = np.repeat(np.arange(1, n + 1, dtype="float32")[:, None], features, axis=1)
  return x, np.arange(n, dtype="int32")


def _logical_batches(sampler, start_step=0, steps=1):
  """Reads `steps` logical batches (K dataset elements each) as lists of numpy triples."""
  elements = list(sampler.dataset(start_step).take(steps * sampler.gradient_accumulation_steps))
  elements = [tuple(t.numpy() for t in element) for element in elements]
  k = sampler.gradient_accumulation_steps
  return [elements[i:i + k] for i in range(0, len(elements), k)]


def _included(logical_batch):
  """The example indices (y) of the rows of weight 1 of one logical batch, sorted."""
  return np.sort(np.concatenate([y[w == 1] for _, y, w in logical_batch]))


def _insecure(make, *args, **kwargs):
  """A sampler with insecure_sampling_seed, its (expected) warning silenced."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", randomness.InsecureRandomnessWarning)
    return make(*args, **kwargs)


@pytest.fixture(scope="module")
def long_run():
  """STEPS logical steps of one Poisson sampler, read from its dataset: (sampler, batches).
  Seeded (insecure) so that the statistical checks below are deterministic; the draws are the
  same function of the secret whatever the secret's source."""
  sampler = _insecure(sampling.PoissonSampler, _indexed_data(NUM_EXAMPLES), RATE,
                      insecure_sampling_seed=3)
  return sampler, _logical_batches(sampler, steps=STEPS)


# ---- the draw is Poisson: binomial batch sizes, every example at rate q -----------------------

def _binomial_size_check(sizes, n, q):
  """z-tests on the mean and variance of the batch sizes against Binomial(n, q); True = pass."""
  sizes = np.asarray(sizes, np.float64)
  mean, variance = n * q, n * q * (1 - q)
  z_mean = (sizes.mean() - mean) / np.sqrt(variance / len(sizes))
  # Var of the sample variance: (mu4 - (m-3)/(m-1) var^2) / m, mu4 the binomial 4th moment.
  mu4 = variance * (1 + 3 * (n - 2) * q * (1 - q))
  z_variance = (sizes.var(ddof=1) - variance) / np.sqrt(
      (mu4 - (len(sizes) - 3) / (len(sizes) - 1) * variance**2) / len(sizes))
  return abs(z_mean) < 5 and abs(z_variance) < 5


def _uniform_inclusion_check(counts, steps, q):
  """Chi-square test that every example was included Binomial(steps, q) times; True = pass."""
  counts = np.asarray(counts, np.float64)
  statistic = np.sum((counts - steps * q)**2 / (steps * q * (1 - q)))
  return stats.chi2.sf(statistic, df=len(counts)) > 1e-4 and stats.chi2.cdf(
      statistic, df=len(counts)) > 1e-4


def test_batch_sizes_have_the_binomial_mean_and_variance(long_run):
  sampler, batches = long_run
  sizes = [len(_included(batch)) for batch in batches]
  assert _binomial_size_check(sizes, NUM_EXAMPLES, RATE)
  # The check has power: it rejects a fixed-size sampler and a rate 20% off either way.
  rng = np.random.default_rng(0)
  assert not _binomial_size_check(np.full(STEPS, 20), NUM_EXAMPLES, RATE)
  assert not _binomial_size_check(rng.binomial(NUM_EXAMPLES, RATE * 1.2, STEPS), NUM_EXAMPLES,
                                  RATE)
  assert not _binomial_size_check(rng.binomial(NUM_EXAMPLES, RATE * 0.8, STEPS), NUM_EXAMPLES,
                                  RATE)
  assert sampler.expected_batch_size == pytest.approx(NUM_EXAMPLES * RATE)


def test_every_example_is_included_at_rate_q(long_run):
  _, batches = long_run
  counts = np.bincount(np.concatenate([_included(b) for b in batches]), minlength=NUM_EXAMPLES)
  assert len(counts) == NUM_EXAMPLES
  assert _uniform_inclusion_check(counts, STEPS, RATE)
  # It has power: it rejects half the examples at 1.2 q and half at 0.8 q (same mean rate),
  # and a sampler that always takes the same examples.
  rng = np.random.default_rng(1)
  favoured = rng.binomial(STEPS, np.where(np.arange(NUM_EXAMPLES) % 2 == 0, 1.2, 0.8) * RATE)
  assert not _uniform_inclusion_check(favoured, STEPS, RATE)
  assert not _uniform_inclusion_check(
      np.where(np.arange(NUM_EXAMPLES) < NUM_EXAMPLES * RATE, STEPS, 0), STEPS, RATE)


def test_the_dataset_and_indices_agree_and_no_example_repeats_in_a_step(long_run):
  sampler, batches = long_run
  for step in (0, 1, 777, STEPS - 1):
    np.testing.assert_array_equal(_included(batches[step]), sampler.indices(step))
  assert all(len(np.unique(_included(b))) == len(_included(b)) for b in batches)


# ---- fixed shape, padding, empty draws ----------------------------------------------------------

@pytest.mark.parametrize("accumulation", [1, 3])
def test_fixed_static_shape_real_rows_weight_one_padding_weight_zero(accumulation):
  x, y = _indexed_data(300)
  sampler = sampling.PoissonSampler((x, y), 0.05, gradient_accumulation_steps=accumulation)
  batch = sampler.physical_batch_size
  assert sampler.max_batch_size == batch * accumulation >= 15
  spec = sampler.dataset().element_spec
  assert [s.shape.as_list() for s in spec] == [[batch, 3], [batch], [batch]]
  for step, logical in enumerate(_logical_batches(sampler, steps=40)):
    assert len(logical) == accumulation
    for x_batch, y_batch, weight in logical:
      assert x_batch.shape == (batch, 3) and y_batch.shape == weight.shape == (batch,)
      assert set(np.unique(weight)) <= {0.0, 1.0}
      real = weight == 1
      np.testing.assert_array_equal(x_batch[real], x[y_batch[real]])  # the real example's row
      np.testing.assert_array_equal(x_batch[~real], 0.0)  # padding: data-independent zeros
      np.testing.assert_array_equal(y_batch[~real], 0)
    np.testing.assert_array_equal(_included(logical), sampler.indices(step))


def test_an_empty_draw_is_a_valid_all_padding_step():
  x, y = T.dense_data(n=50)
  sampler = sampling.PoissonSampler((x, y), 1e-3, gradient_accumulation_steps=2)
  empty = [s for s in range(20) if len(sampler.indices(s)) == 0]
  assert empty, "expected an empty draw among 20 steps at q * N = 0.05"
  (first, second), = _logical_batches(sampler, start_step=empty[0])
  for _, _, weight in (first, second):
    assert weight.shape == (sampler.physical_batch_size,)
    np.testing.assert_array_equal(weight, 0.0)

  model = T.dp_model(T.dense_model(), noise_multiplier=0.0, gradient_accumulation_steps=2,
                     expected_batch_size=sampler.expected_batch_size)
  before = T.weights(model)
  model.fit(sampler.dataset(start_step=empty[0]), steps_per_epoch=2, verbose=0)
  assert model.optimizer.iterations.numpy() == 1
  for got, want in zip(T.weights(model), before):  # no noise, no examples: no change
    np.testing.assert_array_equal(got, want)


# ---- the cap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,q,p", [(1000, 0.02, 1e-9), (1000, 0.02, 1e-15),
                                   (50000, 4096 / 50000, 1e-15), (20, 0.9, 1e-15)])
def test_the_cap_is_a_binomial_tail_quantile(n, q, p):
  cap = sampling.poisson_batch_cap(n, q, p)
  assert stats.binom.sf(cap, n, q) < p
  assert sampling.binomial_tail_bound(n, q, cap) >= stats.binom.sf(cap, n, q)  # a true bound
  assert cap <= min(n, stats.binom.isf(p, n, q) + 2)  # and a tight one
  sampler = sampling.PoissonSampler(T.dense_data(n=n), q, gradient_accumulation_steps=4,
                                    overflow_probability=p)
  assert sampler.max_batch_size % 4 == 0 and sampler.max_batch_size >= cap
  # The sampler's cap also holds for a neighbour with one more example.
  assert stats.binom.sf(sampler.max_batch_size, n + 1, q) <= sampler.overflow_probability < p
  if sampler.max_batch_size >= n + 1:
    assert sampler.overflow_probability == 0.0


def test_a_draw_above_the_cap_raises_instead_of_dropping_examples():
  sampler = sampling.PoissonSampler(T.dense_data(n=100), 0.5, max_batch_size=10)
  assert sampler.overflow_probability > 0.99
  with pytest.raises(tf.errors.InvalidArgumentError, match="exceeds the capacity"):
    list(sampler.dataset().take(1))
  with pytest.raises(tf.errors.InvalidArgumentError, match="exceeds the capacity"):
    sampler.indices(0)


# ---- determinism and resuming -------------------------------------------------------------------

def _flat(batches):
  return [t for logical in batches for element in logical for t in element]


_MAKERS = {
    "poisson": lambda data, **kw: sampling.PoissonSampler(data, 0.1, gradient_accumulation_steps=2,
                                                          **kw),
    "shuffle": lambda data, **kw: sampling.ShuffleSampler(data, 30, gradient_accumulation_steps=2,
                                                          **kw),
}


@pytest.mark.parametrize("kind", sorted(_MAKERS))
def test_default_draws_differ_between_samplers_built_alike(kind):
  """The draws come from OS entropy, not from the arguments: two samplers built with identical
  arguments (and identical global seeds) draw different batches."""
  data = _indexed_data(200)
  runs = []
  for _ in range(2):
    keras.utils.set_random_seed(0)
    sampler = _MAKERS[kind](data)
    assert sampler.mechanism_randomness == "os_entropy"
    runs.append(_flat(_logical_batches(sampler, steps=6)))
  assert any(not np.array_equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("kind", sorted(_MAKERS))
def test_the_insecure_seed_reproduces_the_draws_and_warns(kind):
  data = _indexed_data(200)
  with pytest.warns(randomness.InsecureRandomnessWarning, match="insecure_sampling_seed"):
    first = _MAKERS[kind](data, insecure_sampling_seed=5)
  assert first.mechanism_randomness == "insecure_seed"
  run = lambda sampler: _flat(_logical_batches(sampler, steps=10))
  same = _insecure(_MAKERS[kind], data, insecure_sampling_seed=5)
  other = _insecure(_MAKERS[kind], data, insecure_sampling_seed=6)
  for got, want in zip(run(first), run(same)):
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b) for a, b in zip(run(first), run(other)))


def test_the_secret_is_128_bits_of_os_entropy_and_every_bit_keys_the_draws(monkeypatch):
  words = [0x0123456789ABCDEF, 0xFEDCBA9876543210]
  calls = []
  monkeypatch.setattr(randomness, "os_entropy_words",
                      lambda count: calls.append(count) or list(words))
  data = _indexed_data(200)
  sampler = sampling.PoissonSampler(data, 0.5)
  assert calls == [2]
  assert sampler.state.secret.numpy().view(np.uint64).tolist() == words
  assert "secret" not in str(sampler.get_config()) and words[0] not in sampler.get_config().values()
  reference = sampler.indices(3)
  np.testing.assert_array_equal(  # the draws are the documented function of (secret, step)
      reference, np.flatnonzero(sampling.step_uniform(
          np.array(words, np.uint64).view(np.int64), 3, 200).numpy() < 0.5))
  for word in (0, 1):  # flipping any one of the 128 bits gives other draws
    for bit in (0, 31, 32, 63):
      flipped = list(words)
      flipped[word] ^= 1 << bit
      sampler.state.secret.assign(np.array(flipped, np.uint64).view(np.int64))
      assert not np.array_equal(sampler.indices(3), reference), (word, bit)


def test_the_removed_seed_argument_says_what_to_use():
  data = _indexed_data(20)
  for make in (lambda: sampling.PoissonSampler(data, 0.1, seed=0),
               lambda: sampling.ShuffleSampler(data, 5, seed=None),
               lambda: sampling.make_sampler(data, sampling="poisson", sampling_probability=0.1,
                                             seed=3)):
    with pytest.raises(TypeError, match="no longer takes `seed=`.*OS entropy.*"
                                        "insecure_sampling_seed"):
      make()


@pytest.mark.parametrize("kind", sorted(_MAKERS))
def test_resuming_at_step_s_continues_the_uninterrupted_stream(kind, tmp_path):
  make = _MAKERS[kind]
  sampler = make(_indexed_data(200))
  uninterrupted = _flat(_logical_batches(sampler, steps=16))
  # A new sampler (a new secret) given the checkpointed state continues the same stream.
  path = tf.train.Checkpoint(sampler=sampler.state).write(str(tmp_path / "sampler"))
  fresh = make(_indexed_data(200))
  assert not np.array_equal(fresh.indices(0), sampler.indices(0))
  tf.train.Checkpoint(sampler=fresh.state).read(path).assert_consumed()
  for resumed_sampler in (sampler, fresh):
    for start in (1, 6, 13):  # 6 logical steps per pass for the shuffle sampler: crosses passes
      resumed = _flat(_logical_batches(resumed_sampler, start_step=start, steps=16 - start))
      assert len(resumed) == len(uninterrupted[start * 2 * 3:])
      for got, want in zip(resumed, uninterrupted[start * 2 * 3:]):
        np.testing.assert_array_equal(got, want)
  # Mid-logical-batch checkpoint after p physical batches: dataset(p // K).skip(p % K).
  mid = [t.numpy() for element in sampler.dataset(start_step=3).skip(1).take(1) for t in element]
  for got, want in zip(mid, uninterrupted[(3 * 2 + 1) * 3:]):
    np.testing.assert_array_equal(got, want)


# ---- shuffling: the explicit alternative --------------------------------------------------------

def test_shuffle_batches_are_fixed_size_and_disjoint_within_a_pass():
  sampler = sampling.ShuffleSampler(_indexed_data(100), 32, gradient_accumulation_steps=3)
  assert sampler.steps_per_epoch == 3 and sampler.physical_batch_size == 11
  batches = [_included(b) for b in _logical_batches(sampler, steps=6)]
  assert all(len(b) == 32 for b in batches)
  for first in (0, 3):  # pass 0 and pass 1: 96 distinct examples each, a new permutation
    assert len(np.unique(np.concatenate(batches[first:first + 3]))) == 96
  assert not np.array_equal(batches[0], batches[3])
  assert sampler.expected_batch_size == 32.0


# ---- accounting follows the sampling ------------------------------------------------------------

def test_privacy_spec_matches_the_sampler():
  data = T.dense_data(n=500)
  poisson = sampling.make_sampler(data, sampling="poisson", sampling_probability=0.04)
  shuffle = sampling.make_sampler(data, sampling="shuffle", batch_size=20)
  assert isinstance(poisson, sampling.PoissonSampler)
  assert isinstance(shuffle, sampling.ShuffleSampler)
  assert 0 < poisson.overflow_probability < 1e-15
  assert poisson.privacy_spec(1.1, steps=100, delta=1e-5) == tfdp_prune.PrivacySpec(
      noise_multiplier=1.1, steps=100, delta=1e-5, sampling="poisson", sampling_probability=0.04,
      overflow_probability=poisson.overflow_probability)
  assert shuffle.privacy_spec(1.1, steps=100, delta=1e-5, accountant="rdp") == (
      tfdp_prune.PrivacySpec(noise_multiplier=1.1, steps=100, delta=1e-5, accountant="rdp",
                             sampling="shuffle", batch_size=20, num_examples=500))
  assert poisson.steps_per_epoch == 25 and shuffle.steps_per_epoch == 25
  # One epoch is round(1 / q) logical steps (1 / 0.15 = 6.67 -> 7), K physical batches each.
  rounded = sampling.PoissonSampler(data, 0.15, gradient_accumulation_steps=4)
  assert (rounded.steps_per_epoch, rounded.physical_steps_per_epoch) == (7, 28)
  with pytest.raises(ValueError, match="batch_size=None with sampling='poisson'"):
    sampling.make_sampler(data, sampling="poisson", sampling_probability=0.04, batch_size=20)
  with pytest.raises(ValueError, match="only batch_size with sampling='shuffle'"):
    sampling.make_sampler(data, sampling="shuffle", batch_size=20, sampling_probability=0.04)
  with pytest.raises(ValueError, match="sampling in"):
    sampling.make_sampler(data, sampling="uniform")


def test_a_user_cap_is_paid_for_in_the_reported_delta():
  """A cap the draws can exceed makes the run stop with a probability that depends on the data:
  (1 + e^epsilon) * T * p goes into the reported delta, never left out."""
  data = T.dense_data(n=1000)
  capped = sampling.PoissonSampler(data, 0.02, max_batch_size=36)  # mean 20: p is not negligible
  p = capped.overflow_probability
  assert 1e-4 < p < 1e-3 and p >= stats.binom.sf(36, 1001, 0.02)
  spec = capped.privacy_spec(noise_multiplier=1.0, steps=20, delta=1e-5, accountant="rdp")
  assert spec.overflow_probability == p
  epsilon = spec.epsilon()
  assert spec.total_delta() == pytest.approx(1e-5 + (1 + math.exp(epsilon)) * 20 * p, rel=1e-12)
  assert 100 * spec.delta < spec.total_delta() < 1
  assert f"= {spec.total_delta():.10g}" in spec.statement()
  # Without a cap that can be reached (here: capacity >= N + 1) the delta is the accountant's.
  uncapped = sampling.PoissonSampler(T.dense_data(n=20), 0.9)
  assert uncapped.overflow_probability == 0.0
  exact = uncapped.privacy_spec(noise_multiplier=1.0, steps=50, delta=1e-5)
  assert exact.total_delta() == 1e-5 and "sampler's fixed-shape cap" not in exact.statement()


# ---- model.fit ----------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulation", [1, 2])
def test_model_fit_runs_one_optimizer_step_per_logical_batch(accumulation):
  sampler = sampling.PoissonSampler(T.dense_data(n=200), 0.1,
                                    gradient_accumulation_steps=accumulation)
  model = T.dp_model(T.dense_model(), noise_multiplier=1.0,
                     expected_batch_size=sampler.expected_batch_size,
                     gradient_accumulation_steps=accumulation)
  before = T.weights(model)
  history = model.fit(sampler.dataset(), steps_per_epoch=sampler.physical_steps_per_epoch,
                      epochs=2, verbose=0)
  assert sampler.steps_per_epoch == 10
  assert model.optimizer.iterations.numpy() == 2 * sampler.steps_per_epoch
  assert len(history.history["loss"]) == 2
  assert all(np.all(np.isfinite(w)) and not np.array_equal(w, b)
             for w, b in zip(T.weights(model), before))


def test_model_fit_with_the_shuffle_sampler_and_dict_inputs_from_a_dataset():
  x, y = T.dense_data(n=60)
  inputs = keras.Input((8,), name="features")
  model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
  data = tf.data.Dataset.from_tensor_slices(({"features": x}, y))
  sampler = sampling.ShuffleSampler(data, 16, gradient_accumulation_steps=3)
  assert sampler.num_examples == 60 and sampler.physical_batch_size == 6
  T.dp_model(model, noise_multiplier=1.0, expected_batch_size=sampler.expected_batch_size,
             gradient_accumulation_steps=3)
  model.fit(sampler.dataset(), steps_per_epoch=sampler.physical_steps_per_epoch, verbose=0)
  assert model.optimizer.iterations.numpy() == sampler.steps_per_epoch == 3


# ---- configuration and errors -------------------------------------------------------------------

def test_get_config_round_trips_with_the_same_data():
  data = _indexed_data(120)
  sampler = sampling.PoissonSampler(data, 0.05, gradient_accumulation_steps=2)
  config = sampler.get_config()
  assert config["insecure_sampling_seed"] is None
  restored = sampling.PoissonSampler.from_config(config, data)
  assert restored.get_config() == config
  # The settings do not hold the secret: a rebuilt sampler draws anew (a checkpoint's
  # `sampler.state` brings the secret back; see the resume test).
  assert any(not np.array_equal(restored.indices(s), sampler.indices(s)) for s in range(5))
  seeded = _insecure(sampling.PoissonSampler, data, 0.05, insecure_sampling_seed=4)
  again = _insecure(sampling.PoissonSampler.from_config, seeded.get_config(), data)
  np.testing.assert_array_equal(again.indices(7), seeded.indices(7))
  shuffle = sampling.ShuffleSampler(data, 10)
  assert sampling.ShuffleSampler.from_config(shuffle.get_config(), data).get_config() == (
      shuffle.get_config())
  with pytest.raises(ValueError, match="num_examples=120"):
    sampling.PoissonSampler.from_config(config, _indexed_data(100))


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampling_probability=0.0), r"sampling_probability in \(0, 1\]"),
    (dict(sampling_probability=1.5), r"sampling_probability in \(0, 1\]"),
    (dict(sampling_probability=0.1, insecure_sampling_seed=-1), "insecure_sampling_seed"),
    (dict(sampling_probability=0.1, insecure_sampling_seed=2**63), "insecure_sampling_seed"),
    (dict(sampling_probability=0.1, overflow_probability=0.0), "overflow_probability"),
    (dict(sampling_probability=0.1, max_batch_size=0), "max_batch_size"),
    (dict(sampling_probability=0.1, gradient_accumulation_steps=0),
     "gradient_accumulation_steps"),
])
def test_invalid_arguments_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.PoissonSampler(T.dense_data(n=10), **kwargs)


def test_invalid_data_is_a_clear_error():
  x, y = T.dense_data(n=10)
  with pytest.raises(ValueError, match="same number of rows"):
    sampling.PoissonSampler((x, y[:9]), 0.1)
  with pytest.raises(ValueError, match=r"data=\(x, y\)"):
    sampling.PoissonSampler((x, y, np.ones(10)), 0.1)
  with pytest.raises(ValueError, match="infinite"):
    sampling.PoissonSampler(tf.data.Dataset.from_tensor_slices((x, y)).repeat(), 0.1)
  with pytest.raises(ValueError, match="batch_size <= num_examples"):
    sampling.ShuffleSampler((x, y), 11)
