"""The privacy of a private hyperparameter search: a random number of DP trials, the best output.

Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential Privacy" (ICLR 2022,
arXiv 2110.03620), as dp_accounting implements it (`RepeatAndSelectDpEvent`, RDP accountant).
Pure functions, no TensorFlow. Design: docs/private-tuning.md
"""

import dataclasses
import math
from typing import Any, Dict

from dp_accounting import dp_event

from tfdp_prune import _search
from tfdp_prune import _validate
from tfdp_prune import accounting

POISSON = "poisson"
GEOMETRIC = "geometric"
# The distribution of the number of trials K -> dp_accounting's `shape`: Poisson is shape inf
# (Theorem 6); the geometric on {1, 2, ...} is the truncated negative binomial with eta = 1
# (Theorem 2; gamma = 1 / mean).
SHAPES = {POISSON: math.inf, GEOMETRIC: 1.0}
DISTRIBUTIONS = tuple(SHAPES)
_RTOL = 1e-9
# Calibration's range of trial noise multipliers (beyond 2**20, dp_accounting's RDP of the
# sampled Gaussian fails in log space; no useful run needs that much noise).
_MIN_NOISE = 2.0**-19
_MAX_NOISE = 2.0**20  # how closely a recorded epsilon must match its recomputation


def trial_event(spec: accounting.PrivacySpec, score_noise_multiplier: float) -> dp_event.DpEvent:
  """One trial: its whole training run (`spec`, at the planned steps) and its noisy validation
  score, a count of correct predictions (sensitivity 1) plus N(0, score_noise_multiplier^2).

  The score is part of the trial's output because the search ranks by it: Papernot-Steinke
  require the base algorithm's output, score included, to be DP. Training and validation use
  disjoint parts; composing both events (rather than taking the max) is the conservative choice.
  """
  _validate.positive("score_noise_multiplier", score_noise_multiplier)
  return dp_event.ComposedDpEvent(
      [spec.dp_event(), dp_event.GaussianDpEvent(score_noise_multiplier)])


def search_event(spec: accounting.PrivacySpec, score_noise_multiplier: float,
                 distribution: str, mean_trials: float) -> dp_event.DpEvent:
  """The whole search: run K trials (K drawn from `distribution` with mean `mean_trials`,
  independently of the data), output the best by its noisy score."""
  _validate.one_of("distribution", distribution, DISTRIBUTIONS)
  _check_mean(mean_trials)
  return dp_event.RepeatAndSelectDpEvent(
      event=trial_event(spec, score_noise_multiplier), mean=float(mean_trials),
      shape=SHAPES[distribution])


def rdp_epsilon(spec: accounting.PrivacySpec, event: dp_event.DpEvent) -> float:
  """Epsilon at `spec.delta` of `event` by dp_accounting's RDP accountant (its orders, its RDP
  -> (epsilon, delta) conversion), under the adjacency of `spec`'s sampling.

  For a RepeatAndSelectDpEvent the accountant applies, per order lambda (dp_accounting
  `_compute_rdp_repeat_and_select`):
    Poisson, Theorem 6: eps'(lambda) = eps(lambda) + mu * delta_hat + log(mu) / (lambda - 1),
      with delta_hat the trial's delta at eps_hat = log(1 + 1 / (lambda - 1)) (the largest
      eps_hat the theorem allows), from the trial's RDP curve;
    truncated negative binomial (eta, gamma), Theorem 2: eps'(lambda) = eps(lambda)
      + (1 + eta) * min over lambda_hat of ((1 - 1/lambda_hat) eps(lambda_hat)
      + log(1/gamma) / lambda_hat) + log(E[K]) / (lambda - 1), then made monotone in lambda.
  """
  if spec.accountant != "rdp":
    raise ValueError(f"Expected accountant='rdp' (Papernot-Steinke's theorems are RDP "
                     f"statements). Received: accountant={spec.accountant!r}.")
  return float(spec.make_accountant().compose(event).get_epsilon(spec.delta))


def trial_epsilon(spec: accounting.PrivacySpec, score_noise_multiplier: float) -> float:
  """Epsilon of ONE trial (training and its noisy score): what the search would cost if it ran
  exactly one trial with no selection. The search's total is larger."""
  return rdp_epsilon(spec, trial_event(spec, score_noise_multiplier))


def search_epsilon(spec: accounting.PrivacySpec, score_noise_multiplier: float,
                   distribution: str, mean_trials: float) -> float:
  """Epsilon at `spec.delta` of the whole search (see `rdp_epsilon`)."""
  return rdp_epsilon(spec, search_event(spec, score_noise_multiplier, distribution, mean_trials))


def search_delta(spec: accounting.PrivacySpec, mean_trials: float, epsilon: float) -> float:
  """The delta of the search's guarantee: `spec.delta`, plus the sampler's overflow term of
  every trial. A trial's capped sampler differs from the analysed one on an event of probability
  at most steps * p; over the search (union bound, E[K] = mean_trials trials on average) at most
  mean_trials * steps * p, which adds (1 + e^epsilon) times that to delta (as
  `PrivacySpec.overflow_delta` does for one run)."""
  if spec.overflow_probability == 0 or spec.steps == 0:
    return spec.delta
  if epsilon > 700:
    return 1.0
  extra = (1.0 + math.exp(epsilon)) * mean_trials * spec.steps * spec.overflow_probability
  return min(1.0, spec.delta + extra)


def calibrate_noise_multiplier(template: accounting.PrivacySpec, score_noise_multiplier: float,
                               distribution: str, mean_trials: float, target_epsilon: float,
                               tol: float = 1e-4) -> float:
  """The smallest trial noise multiplier (to within `tol`) whose SEARCH epsilon is at most
  `target_epsilon`; `template` is one trial's spec at its planned steps (its sigma ignored).
  The returned sigma was evaluated and found within the target (never a neighbour of one).

  Raises:
    accounting.UnreachableEpsilonError: no sigma <= 2**30 meets the target (e.g. the score's
      noise alone, or the log(mean)/(lambda - 1) term, already costs more).
  """
  _validate.positive("target_epsilon", target_epsilon)

  def value(sigma):
    spec = dataclasses.replace(template, noise_multiplier=float(sigma))
    try:
      return search_epsilon(spec, score_noise_multiplier, distribution, mean_trials)
    except ValueError:  # dp_accounting's log-space arithmetic fails: count it as too much
      return math.inf

  try:
    _, sigma = _search.smallest_fitting(value, target_epsilon, tol, _MIN_NOISE, _MAX_NOISE)
  except _search.NotFoundError:
    raise accounting.UnreachableEpsilonError(
        f"No trial noise multiplier <= {_MAX_NOISE:g} brings the search's epsilon to "
        f"{target_epsilon} (even that much noise gives {value(_MAX_NOISE):.3g}: the score "
        f"noise {score_noise_multiplier} and the mean number of trials {mean_trials} cost that "
        "much alone).") from None
  if not value(sigma) <= target_epsilon:  # a privacy guard: never an assert
    raise RuntimeError(f"Calibration found sigma={sigma} above the target; not returned.")
  return sigma


def record(spec: accounting.PrivacySpec, score_noise_multiplier: float, distribution: str,
           mean_trials: float) -> Dict[str, Any]:
  """The fields of the metadata's `tuning` record that determine the guarantee, with the
  epsilon and delta they give (`verify` recomputes them)."""
  epsilon = search_epsilon(spec, score_noise_multiplier, distribution, mean_trials)
  return {"method": method(distribution, mean_trials), "distribution": distribution,
          "mean_trials": float(mean_trials),
          "score_noise_multiplier": float(score_noise_multiplier),
          "trial_privacy_spec": spec.to_dict(with_statement=False),
          "trial_epsilon": trial_epsilon(spec, score_noise_multiplier),
          "epsilon": epsilon, "delta": search_delta(spec, mean_trials, epsilon)}


def verify(tuning: Dict[str, Any]) -> Dict[str, float]:
  """Recomputes the search's epsilon and delta from a `tuning` record's fields; raises
  ValueError if the recorded ones differ. Returns {"epsilon": ..., "delta": ...}."""
  try:
    spec = accounting.PrivacySpec.from_dict(tuning["trial_privacy_spec"])
    expected = record(spec, tuning["score_noise_multiplier"], tuning["distribution"],
                      tuning["mean_trials"])
  except (KeyError, TypeError) as error:
    raise ValueError(f"Incomplete tuning record: missing or invalid {error}.") from None
  for name in ("epsilon", "delta", "trial_epsilon"):
    if not math.isclose(tuning.get(name, math.nan), expected[name], rel_tol=_RTOL):
      raise ValueError(f"The tuning record's {name}={tuning.get(name)!r} does not match the "
                       f"{expected[name]!r} its fields give (dp_accounting RDP, "
                       f"{expected['method']}).")
  return {"epsilon": expected["epsilon"], "delta": expected["delta"]}


def method(distribution: str, mean_trials: float) -> str:
  """The method's label in the metadata, naming the paper and the theorem used."""
  if distribution == POISSON:
    return f"private (Papernot-Steinke 2022, Theorem 6: Poisson mu={mean_trials:g})"
  return (f"private (Papernot-Steinke 2022, Theorem 2: truncated negative binomial eta=1 "
          f"(geometric), mean {mean_trials:g})")


def _check_mean(mean_trials: float) -> None:
  _validate.positive("mean_trials", mean_trials)
  if mean_trials < 1:  # dp_accounting's formulas need E[K] >= 1 (log(mean) >= 0)
    raise ValueError(f"Expected mean_trials >= 1. Received: mean_trials={mean_trials!r}.")
