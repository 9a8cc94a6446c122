"""tuning_accounting: the search's epsilon is Papernot-Steinke's bound, built here independently
from dp_accounting's primitives (per-order RDP of one trial, compute_delta, compute_epsilon)."""

import dataclasses
import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from tfdp_prune import accounting
from tfdp_prune import tuning_accounting as ta

ORDERS = np.array(rdp.DEFAULT_RDP_ORDERS, dtype=float)
SCORE_NOISE = 5.0


def trial(noise_multiplier=1.1, steps=50, q=0.05, delta=1e-5, **kwargs):
  return accounting.PrivacySpec(noise_multiplier=noise_multiplier, steps=steps, delta=delta,
                                sampling_probability=q, accountant="rdp", **kwargs)


def trial_rdp(spec, score_noise):
  """One trial's RDP curve by hand: steps x the sampled Gaussian, plus the score's Gaussian
  (sensitivity 1: lambda / (2 sigma^2))."""
  sampled = rdp._compute_rdp_poisson_subsampled_gaussian(  # pylint: disable=protected-access
      spec.sampling_probability, spec.noise_multiplier, ORDERS)
  return spec.steps * np.asarray(sampled) + ORDERS / (2 * score_noise**2)


def expected_poisson(spec, score_noise, mu):
  """Theorem 6: eps'(l) = eps(l) + mu * delta_hat + log(mu) / (l - 1), delta_hat at
  eps_hat = log(1 + 1 / (l - 1))."""
  eps = trial_rdp(spec, score_noise)
  out = np.full_like(eps, np.inf)
  for i, order in enumerate(ORDERS):
    delta_hat = rdp.compute_delta(ORDERS, eps, math.log1p(1 / (order - 1)))[0]
    out[i] = eps[i] + mu * delta_hat + math.log(mu) / (order - 1)
  return rdp.compute_epsilon(ORDERS, out, spec.delta)[0]


def expected_geometric(spec, score_noise, mu):
  """Theorem 2 with eta = 1, gamma = 1 / mu: eps'(l) = eps(l) + 2 min_l' ((1 - 1/l') eps(l')
  + log(mu) / l') + log(mu) / (l - 1); RDP is monotone in the order, so each order takes the
  least bound of the orders above it."""
  eps = trial_rdp(spec, score_noise)
  c = 2 * np.min((1 - 1 / ORDERS) * eps + math.log(mu) / ORDERS)
  out = eps + c + math.log(mu) / (ORDERS - 1)
  out = np.array([out[ORDERS >= order].min() for order in ORDERS])
  return rdp.compute_epsilon(ORDERS, out, spec.delta)[0]


@pytest.mark.parametrize("mu", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_poisson_search_epsilon_is_theorem_6(mu, sigma):
  spec = trial(noise_multiplier=sigma)
  got = ta.search_epsilon(spec, SCORE_NOISE, ta.POISSON, mu)
  assert got == pytest.approx(expected_poisson(spec, SCORE_NOISE, mu), rel=1e-9)


@pytest.mark.parametrize("mu", [1.0, 2.0, 5.0])
def test_geometric_search_epsilon_is_theorem_2_with_eta_1(mu):
  spec = trial()
  got = ta.search_epsilon(spec, SCORE_NOISE, ta.GEOMETRIC, mu)
  assert got == pytest.approx(expected_geometric(spec, SCORE_NOISE, mu), rel=1e-9)


def test_one_trial_epsilon_counts_the_training_and_the_score():
  spec = trial()
  assert ta.trial_epsilon(spec, SCORE_NOISE) == pytest.approx(
      rdp.compute_epsilon(ORDERS, trial_rdp(spec, SCORE_NOISE), spec.delta)[0], rel=1e-9)
  assert ta.trial_epsilon(spec, SCORE_NOISE) > spec.epsilon()  # the score is not free


@pytest.mark.parametrize("distribution", ta.DISTRIBUTIONS)
def test_the_total_exceeds_one_trial_and_grows_with_the_mean_number_of_trials(distribution):
  spec = trial()
  totals = [ta.search_epsilon(spec, SCORE_NOISE, distribution, mu) for mu in (2, 5, 10)]
  assert ta.trial_epsilon(spec, SCORE_NOISE) < totals[0] < totals[1] < totals[2]


def test_calibration_meets_the_search_total_and_is_tight():
  template = trial(noise_multiplier=1.0)
  sigma = ta.calibrate_noise_multiplier(template, SCORE_NOISE, ta.POISSON, 2.0, 8.0, tol=1e-3)
  at = lambda s: ta.search_epsilon(dataclasses.replace(template, noise_multiplier=s),
                                   SCORE_NOISE, ta.POISSON, 2.0)
  assert at(sigma) <= 8.0 < at(sigma - 1e-3)
  # One trial at this sigma is well below the target: the target is the search's.
  assert ta.trial_epsilon(dataclasses.replace(template, noise_multiplier=sigma),
                          SCORE_NOISE) < 7.0


def test_an_unreachable_target_is_an_error():
  with pytest.raises(accounting.UnreachableEpsilonError, match="score noise"):
    ta.calibrate_noise_multiplier(trial(), 0.01, ta.POISSON, 2.0, 1.0)


def test_the_overflow_term_counts_every_expected_trial():
  spec = trial(overflow_probability=1e-12)
  epsilon = ta.search_epsilon(spec, SCORE_NOISE, ta.POISSON, 3.0)
  assert ta.search_delta(spec, 3.0, epsilon) == pytest.approx(
      1e-5 + (1 + math.exp(epsilon)) * 3.0 * 50 * 1e-12, rel=1e-12)
  assert ta.search_delta(trial(), 3.0, epsilon) == 1e-5


def test_the_record_verifies_and_an_edited_one_does_not():
  record = ta.record(trial(), SCORE_NOISE, ta.POISSON, 2.0)
  assert ta.verify(record) == {"epsilon": record["epsilon"], "delta": record["delta"]}
  assert "Theorem 6" in record["method"] and "mu=2" in record["method"]
  for name, value in (("epsilon", record["epsilon"] * 0.9), ("mean_trials", 1.5),
                      ("score_noise_multiplier", 50.0)):
    with pytest.raises(ValueError, match="does not match"):
      ta.verify(dict(record, **{name: value}))


def test_only_rdp_and_a_mean_of_at_least_one():
  with pytest.raises(ValueError, match="accountant='rdp'"):
    ta.search_epsilon(dataclasses.replace(trial(), accountant="pld"), SCORE_NOISE, ta.POISSON, 2)
  with pytest.raises(ValueError, match="mean_trials >= 1"):
    ta.search_epsilon(trial(), SCORE_NOISE, ta.POISSON, 0.5)
