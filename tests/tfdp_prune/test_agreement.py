import pytest

import tfdp_prune
from tfdp_prune import accounting
from tfdp_prune.agreement import check_agreement
from tests.tfdp_prune import _testing as T

N = 200
DATA = T.dense_data(n=N)


def _poisson(q=0.1, steps=1):
  return tfdp_prune.PoissonSampler(DATA, sampling_probability=q,
                                   gradient_accumulation_steps=steps)


def _shuffle(batch_size=20, steps=1):
  return tfdp_prune.ShuffleSampler(DATA, batch_size=batch_size,
                                   gradient_accumulation_steps=steps)


def _optimizer(**kwargs):
  settings = dict(l2_norm_clip=1.0, noise_multiplier=1.0)
  settings.update(kwargs)
  return tfdp_prune.DPKerasSGDOptimizer(**settings)


def _spec(sampler, sigma=1.0):
  return sampler.privacy_spec(noise_multiplier=sigma, steps=0, delta=1e-5, accountant="rdp")


def test_the_sampler_and_what_is_built_from_it_agree():
  for sampler in (_poisson(steps=4), _shuffle(steps=4), _shuffle(batch_size=18, steps=4)):
    optimizer = _optimizer(expected_batch_size=sampler.expected_batch_size,
                           gradient_accumulation_steps=4)
    check_agreement(optimizer, sampler=sampler, spec=_spec(sampler))
  shuffle = _shuffle()  # no padding: dividing by the rows is dividing by the batch size
  check_agreement(_optimizer(num_microbatches=5), sampler=shuffle, spec=_spec(shuffle))


def test_accumulation_that_sums_several_draws_per_update_is_refused():
  # The case: one draw per physical batch, four physical batches per update.
  sampler = _poisson(steps=1)
  optimizer = _optimizer(expected_batch_size=sampler.expected_batch_size,
                         gradient_accumulation_steps=4)
  with pytest.raises(ValueError, match=r"cuts each draw into 1 physical batch\(es\), the "
                                       r"optimizer sums 4.*4 draws while the budget counts one"):
    check_agreement(optimizer, sampler=sampler, spec=_spec(sampler))


@pytest.mark.parametrize("optimizer_kwargs,message", [
    (dict(), r"padding included \(.*\), not by the expected batch size 20"),
    (dict(expected_batch_size=25.0), "expected_batch_size=25, the sampler's expected logical "
                                     "batch is 20"),
    (dict(expected_batch_size=20.0, noise_multiplier=2.0), "noise_multiplier=2.0 differs"),
])
def test_a_poisson_divisor_or_noise_that_differs_is_refused(optimizer_kwargs, message):
  sampler = _poisson(q=0.1)
  with pytest.raises(ValueError, match=message):
    check_agreement(_optimizer(**optimizer_kwargs), sampler=sampler, spec=_spec(sampler))


def test_a_spec_that_is_not_the_samplers_is_refused():
  sampler = _poisson(q=0.1)
  optimizer = _optimizer(expected_batch_size=sampler.expected_batch_size)
  with pytest.raises(ValueError, match="draws with q=0.1, the budget accounts for q=0.2"):
    check_agreement(optimizer, sampler=sampler, spec=_spec(_poisson(q=0.2)))
  with pytest.raises(ValueError, match="draws poisson batches, the budget accounts for shuffle"):
    check_agreement(optimizer, sampler=sampler, spec=_spec(_shuffle(batch_size=20)))


@pytest.mark.parametrize("sampler,num_microbatches,message", [
    (_poisson(), 4, "Poisson-sampled batches"),
    (_shuffle(batch_size=18, steps=4), 2, r"2 padding row\(s\)"),
    (_shuffle(batch_size=20), 3, "does not divide the physical batch size 20"),
])
def test_microbatches_need_fixed_size_batches_without_padding(sampler, num_microbatches,
                                                              message):
  optimizer = _optimizer(num_microbatches=num_microbatches,
                         gradient_accumulation_steps=sampler.gradient_accumulation_steps)
  with pytest.raises(ValueError, match=message):
    check_agreement(optimizer, sampler=sampler)


def test_without_a_sampler_the_spec_and_the_optimizer_are_compared():
  spec = accounting.PrivacySpec(noise_multiplier=1.0, steps=0, delta=1e-5,
                                sampling_probability=0.1)
  check_agreement(_optimizer(expected_batch_size=20.0), spec=spec, num_examples=N)
  with pytest.raises(ValueError, match="Poisson sampling, whose batches vary"):
    check_agreement(_optimizer(), spec=spec)
  with pytest.raises(ValueError, match="q=0.1 over N=200 examples gives 20"):
    check_agreement(_optimizer(expected_batch_size=30.0), spec=spec, num_examples=N)
  with pytest.raises(ValueError, match="num_microbatches=4 with Poisson sampling"):
    check_agreement(_optimizer(num_microbatches=4), spec=spec)
  shuffle = _spec(_shuffle(batch_size=20))
  with pytest.raises(ValueError, match="shuffled batches of 20. Pass expected_batch_size=20"):
    check_agreement(_optimizer(expected_batch_size=10.0), spec=shuffle)


def test_the_message_says_what_each_of_the_three_says_and_the_fix():
  sampler = _poisson(steps=2)
  with pytest.raises(ValueError) as error:
    check_agreement(_optimizer(gradient_accumulation_steps=4), sampler=sampler,
                    spec=_spec(sampler))
  message = str(error.value)
  assert "the optimizer: gradient_accumulation_steps=4, expected_batch_size=None" in message
  assert "the sampler: Poisson q=0.1 over N=200 (expected logical batch 20), 2 physical" in message
  assert "the budget: Poisson q=0.1, noise_multiplier=1.0" in message
  assert "(1) " in message and "(2) " in message
  assert "gradient_accumulation_steps=sampler.gradient_accumulation_steps" in message
