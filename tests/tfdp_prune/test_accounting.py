import dataclasses
import json
import math
import pathlib

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from tfdp_prune import _pld
from tfdp_prune import accounting
from tfdp_prune.accounting import PrivacySpec

ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
FAST_PLD = 1e-3  # Coarser PLD grid for the many-case tests; the regression tests use the default.


def poisson(accountant="pld", noise_multiplier=1.5, q=0.04, steps=2250, delta=1e-5, **kwargs):
  return PrivacySpec(noise_multiplier=noise_multiplier, sampling_probability=q, steps=steps,
                     delta=delta, accountant=accountant, **kwargs)


def shuffle(accountant="pld", noise_multiplier=8.0, steps=2250, delta=1e-5, batch_size=400,
            num_examples=10000, **kwargs):
  return PrivacySpec(noise_multiplier=noise_multiplier, steps=steps, delta=delta,
                     sampling="shuffle", batch_size=batch_size, num_examples=num_examples,
                     accountant=accountant, **kwargs)


def direct_epsilon(accountant, event, delta, relation=ADD_OR_REMOVE, pld_discretization=1e-4):
  if accountant == "rdp":
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
  else:
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=relation, value_discretization_interval=pld_discretization)
  return acc.compose(event).get_epsilon(delta)


def event_classes(event):
  """Class names of every event nested in `event`."""
  found = [type(event).__name__]
  for value in getattr(event, "__attrs_attrs__", ()):
    child = getattr(event, value.name)
    if isinstance(child, dp_accounting.DpEvent):
      found += event_classes(child)
  return found


def random_poisson_settings(seed, count):
  rng = np.random.default_rng(seed)
  return [(float(rng.uniform(0.6, 3.0)), float(rng.uniform(0.002, 0.2)),
           int(rng.integers(1, 400))) for _ in range(count)]


def test_rdp_epsilon_matches_the_reference_value():
  assert abs(poisson("rdp").epsilon() - 7.3291) < 1e-4


def test_pld_epsilon_matches_the_reference_value_and_is_below_rdp():
  epsilon = poisson("pld").epsilon()
  assert abs(epsilon - 6.7688) < 1e-4
  assert epsilon < poisson("rdp").epsilon()


def test_the_poisson_event_is_self_composed_poisson_sampled_gaussian():
  assert poisson(steps=7).dp_event() == dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(1.5)), 7)
  assert poisson(steps=7).adjacency == "add_or_remove_one"


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_called_directly(accountant):
  for sigma, q, steps in random_poisson_settings(seed=7, count=4):
    spec = poisson(accountant, sigma, q, steps, delta=1e-6, pld_discretization=FAST_PLD)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    want = direct_epsilon(accountant, event, 1e-6, pld_discretization=FAST_PLD)
    assert abs(spec.epsilon() - want) <= 1e-6, (sigma, q, steps)


# (sigma, q, steps, delta, pld_discretization): the reference run; epsilon exactly 0 (delta 0.1,
# one step); a sparse one-step PLD over many steps (dp_accounting decides sparse-or-dense by
# computing size**steps); q = 1 (a symmetric PLD); a tiny delta.
_PLD_CASES = [(1.5, 0.04, 2250, 1e-5, 1e-4), (0.97, 0.08, 1, 0.1, FAST_PLD),
              (5.0, 1e-4, 458752, 1e-5, 1e-4), (2.0, 1.0, 50, 1e-5, FAST_PLD),
              (20.0, 1e-5, 1000, 1e-9, FAST_PLD)]


@pytest.mark.parametrize("sigma, q, steps, delta, discretization", _PLD_CASES)
def test_pld_epsilon_is_exactly_the_pld_accountants(sigma, q, steps, delta, discretization):
  """The one-step PLD is built once and reused for other step counts: the numbers stay
  dp_accounting's, bit for bit."""
  spec = poisson("pld", sigma, q, steps, delta=delta, pld_discretization=discretization)
  for count in (steps, steps + 7):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count)
    want = direct_epsilon("pld", event, delta, pld_discretization=discretization)
    assert spec.with_steps(count).epsilon() == want, count


def test_sparse_or_dense_is_decided_without_computing_the_power():
  assert _pld._sparse_too_large(3, 10**12)  # 3**(10**12) would never finish
  assert _pld._sparse_too_large(2, 10) and not _pld._sparse_too_large(2, 9)  # 1024 > 1000
  assert not _pld._sparse_too_large(1, 10**12) and not _pld._sparse_too_large(31, 2)


def test_a_pld_too_large_to_compute_is_a_clear_error_before_anything_is_built():
  with pytest.raises(accounting.PLDTooLargeError, match="accountant='rdp'"):
    poisson(noise_multiplier=0.01, q=1.0, steps=10).epsilon()  # 1.2e8 points for one step
  with pytest.raises(accounting.PLDTooLargeError, match="pld_discretization >= "):
    poisson(noise_multiplier=2.0, q=1.0, steps=10**7, pld_discretization=FAST_PLD).epsilon()
  assert poisson("rdp", noise_multiplier=0.01, q=1.0, steps=10).epsilon() > 1e3


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_shuffle_is_never_reported_with_the_poisson_epsilon(accountant):
  spec = shuffle(accountant)
  assert "PoissonSampledDpEvent" not in event_classes(spec.dp_event())
  assert spec.sampling == "shuffle" and spec.adjacency == "replace_one"
  assert spec.statement().startswith("NOT a Poisson guarantee")
  assert spec.to_dict()["adjacency"] == "replace_one"
  same_rate_poisson = poisson(accountant, noise_multiplier=8.0, q=400 / 10000)
  assert spec.epsilon() > 2 * same_rate_poisson.epsilon()


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_shuffle_epsilon_is_the_unamplified_replace_one_gaussian_per_pass(accountant):
  spec = shuffle(accountant, noise_multiplier=8.0, steps=2250)  # 25 steps a pass, 90 passes.
  assert spec.passes == 90
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 90)
  assert spec.dp_event() == event
  want = direct_epsilon(accountant, event, 1e-5, relation=REPLACE_ONE)
  assert abs(spec.epsilon() - want) <= 1e-6


def test_the_shuffle_statement_covers_the_library_sampler_only():
  statement = shuffle().statement()
  assert "tfdp_prune's ShuffleSampler" in statement and "disjoint batches" in statement
  assert "Not valid for other batching" in statement and "repeat() before batch()" in statement
  assert "any data order" not in statement  # the former, too wide, claim
  design = (pathlib.Path(__file__).parents[2] / "docs" / "sampling-and-accounting.md").read_text()
  section = design.split("## `tfdp_prune/accounting.py`")[1].split("\n## ")[0]  # accounting's design
  assert "NOT covered" in section
  assert "straddle" not in section.split("NOT covered")[0]  # only as not covered


def test_shuffle_counts_every_started_pass_with_the_remainder_dropped():
  # 1000 // 300 = 3 full batches per pass.
  passes = [shuffle(steps=s, batch_size=300, num_examples=1000).passes for s in (1, 3, 4, 6, 7)]
  assert passes == [1, 1, 2, 2, 3]


def test_shuffle_refuses_a_sampling_probability():
  with pytest.raises(ValueError, match="not a Poisson|no Poisson amplification"):
    PrivacySpec(noise_multiplier=1.0, steps=10, delta=1e-5, sampling="shuffle",
                sampling_probability=0.04, batch_size=40, num_examples=1000)


def test_no_steps_is_zero_epsilon_and_no_noise_is_infinite_epsilon():
  assert poisson(steps=0).epsilon() == 0.0
  assert isinstance(poisson(steps=0).dp_event(), dp_accounting.NoOpDpEvent)
  for accountant in ("rdp", "pld"):
    assert math.isinf(poisson(accountant, noise_multiplier=0.0, steps=3).epsilon())
    assert math.isinf(shuffle(accountant, noise_multiplier=0.0, steps=3).epsilon())


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibrated_noise_never_overshoots_the_target_and_is_tight(accountant):
  rng = np.random.default_rng(11)
  tol = 1e-3
  for _ in range(4):  # 4 seeded cases per accountant: 8 in all.
    target = float(rng.uniform(0.5, 10.0))
    q = float(rng.uniform(0.005, 0.1))
    steps = int(rng.integers(10, 300))
    sigma = accounting.calibrate_noise_multiplier(
        target, 1e-5, q, steps, accountant, pld_discretization=FAST_PLD, tol=tol)
    spec = poisson(accountant, sigma, q, steps, pld_discretization=FAST_PLD)
    assert spec.epsilon() <= target, (target, q, steps, sigma)
    less_noise = poisson(accountant, sigma - 2 * tol, q, steps, pld_discretization=FAST_PLD)
    assert less_noise.epsilon() > target, (target, q, steps, sigma)


# Calibration cases: (accountant, target epsilon, q, steps). The last reaches the bottom of the
# search: epsilon(2**-19) = 1.5e12 <= 3e12 < epsilon(2**-20) = 6.0e12.
_CALIBRATION_CASES = [("rdp", 0.3, 0.02, 50), ("rdp", 2.0, 0.1, 5), ("rdp", 8.0, 0.004, 3000),
                      ("rdp", 50.0, 1.0, 1), ("pld", 1.0, 0.05, 20), ("pld", 6.0, 0.01, 200),
                      ("rdp", 3e12, 0.01, 10)]


@pytest.mark.parametrize("accountant, target, q, steps", _CALIBRATION_CASES)
def test_calibrated_epsilon_computed_independently_is_within_the_target(accountant, target, q,
                                                                        steps):
  sigma = accounting.calibrate_noise_multiplier(target, 1e-5, q, steps, accountant,
                                                pld_discretization=FAST_PLD, tol=1e-3)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  assert direct_epsilon(accountant, event, 1e-5, pld_discretization=FAST_PLD) <= target, sigma


def _record_epsilons(monkeypatch):
  """Every (spec, epsilon) `PrivacySpec.epsilon()` computes from now on."""
  computed = []
  epsilon = accounting._epsilon

  def recording(spec):
    computed.append((spec, epsilon(spec)))
    return computed[-1][1]

  monkeypatch.setattr(accounting, "_epsilon", recording)
  return computed


def _assert_checked(computed, sigma, target, template):
  checked = [e for spec, e in computed
             if spec == dataclasses.replace(template, noise_multiplier=sigma)]
  assert checked and checked[-1] <= target, (sigma, computed)


@pytest.mark.parametrize("accountant, target, q, steps", [
    _CALIBRATION_CASES[0], _CALIBRATION_CASES[4], _CALIBRATION_CASES[-1]])
def test_calibration_returns_a_sigma_whose_epsilon_it_checked(accountant, target, q, steps,
                                                              monkeypatch):
  computed = _record_epsilons(monkeypatch)
  sigma = accounting.calibrate_noise_multiplier(target, 1e-5, q, steps, accountant,
                                                pld_discretization=FAST_PLD, tol=1e-3)
  _assert_checked(computed, sigma, target,
                  poisson(accountant, 1.0, q, steps, pld_discretization=FAST_PLD))


@pytest.mark.parametrize("error", [-0.05, -1e-6])
def test_a_guess_that_overshoots_is_never_returned(error, monkeypatch):
  """The search's guess (from coarser grids) only steers it: a guess just below the optimum
  (its epsilon above the target) is never returned; a checked, tight value is."""
  optimum = accounting.calibrate_noise_multiplier(2.0, 1e-5, 0.05, 100, "rdp", tol=1e-9)
  monkeypatch.setattr(accounting, "_guess_noise_multiplier", lambda *args: optimum + error)
  computed = _record_epsilons(monkeypatch)
  sigma = accounting.calibrate_noise_multiplier(2.0, 1e-5, 0.05, 100, "rdp", tol=1e-9)
  assert sigma != optimum + error
  assert poisson("rdp", optimum + error, 0.05, 100).epsilon() > 2.0  # the guess did overshoot
  _assert_checked(computed, sigma, 2.0, poisson("rdp", 1.0, 0.05, 100))
  assert poisson("rdp", sigma - 2e-9, 0.05, 100).epsilon() > 2.0


DIGITS_Q = 100 / 1258  # tfdp-train's default: batch 100 of the 1258 private digits


@pytest.mark.parametrize("accountant, steps, target", [
    ("pld", 2, 8.0), ("pld", 2, 1.0), ("rdp", 1, 1.0), ("rdp", 2, 1.0)])
def test_calibration_at_delta_0_1_over_few_steps(accountant, steps, target):
  """`--delta=0.1 --steps=2`: the PLD epsilon is exactly 0 at sigma >= 0.5 (with target 1, the
  search's bracket is [0.25, 0.5]); the answer is checked and tight all the same. (PLD over
  one step to epsilon 8 needs sigma 0.066, where dp_accounting fails to build the PLD.)"""
  tol = 1e-3
  sigma = accounting.calibrate_noise_multiplier(target, 0.1, DIGITS_Q, steps, accountant,
                                                pld_discretization=FAST_PLD, tol=tol)
  spec = poisson(accountant, sigma, DIGITS_Q, steps, delta=0.1, pld_discretization=FAST_PLD)
  less_noise = dataclasses.replace(spec, noise_multiplier=sigma - 2 * tol)
  assert spec.epsilon() <= target < less_noise.epsilon()
  if accountant == "pld":
    assert dataclasses.replace(spec, noise_multiplier=0.5).epsilon() == 0.0


@pytest.mark.parametrize("target, q, steps", [(8.0, DIGITS_Q, 189), (1.0, 1e-4, 4510072)])
def test_calibration_on_the_default_grid_is_the_default_grids_answer(target, q, steps):
  """The searches are guided by coarser grids, whose answers may be far off (the second case,
  where one step's privacy loss spans a few grid points: sigma 50.1 on a 1e-2 grid and 5.0
  on 1e-3, for 1.066); the answer is the default grid's own, checked and tight."""
  tol = 1e-4
  sigma = accounting.calibrate_noise_multiplier(target, 1e-5, q, steps, "pld", tol=tol)
  spec = poisson("pld", sigma, q, steps)
  assert spec.epsilon() <= target < dataclasses.replace(spec, noise_multiplier=sigma - tol).epsilon()


def test_calibration_stops_at_the_least_noise_it_tries_when_any_noise_meets_the_target(
    monkeypatch):
  """delta 0.1 >= q: one step is (0, 0.1)-DP whatever the noise (epsilon 0 everywhere). The
  search stops at the least sigma whose one-step PLD is small enough to build in seconds
  (2**20 points; 2**12 here), checked, instead of building ever larger PLDs."""
  monkeypatch.setattr(accounting, "_CALIBRATION_MAX_POINTS", 2**12)
  sigma = accounting.calibrate_noise_multiplier(8.0, 0.1, 0.01, 1, pld_discretization=FAST_PLD)
  assert _pld.one_step_points(sigma, 0.01, FAST_PLD) <= 2**12
  assert _pld.one_step_points(sigma / 1.02, 0.01, FAST_PLD) > 2**12
  spec = poisson(noise_multiplier=sigma, q=0.01, steps=1, delta=0.1, pld_discretization=FAST_PLD)
  assert spec.epsilon() == 0.0


def _fake_epsilon(monkeypatch, epsilon_of):
  """PrivacySpec.epsilon() is epsilon_of(spec) from now on."""
  monkeypatch.setattr(accounting, "_epsilon", epsilon_of)


def _zero_then_inf(spec):
  """Nonincreasing in sigma: inf below 0.5, 4 / sigma**2 - 1 up to 2, 0 above; nondecreasing in
  the steps: 0 up to 5, then steps / 40 up to 40, then inf. (At 40 steps: the sigma part.)"""
  sigma, steps = spec.noise_multiplier, spec.steps
  if sigma < 0.5 or steps > 40:
    return math.inf
  return 0.0 if sigma > 2.0 or steps <= 5 else (4 / sigma**2 - 1) * steps / 40


def _zero_then_unavailable(spec):
  """As `_zero_then_inf`, but dp_accounting fails where that is inf."""
  epsilon = _zero_then_inf(spec)
  if epsilon == math.inf:
    raise accounting.PLDError("dp_accounting could not build the PLD (a test).")
  return epsilon


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target, want", [(3.0, 1.0), (15.0, 0.5), (15.5, 0.5), (1e-3, 1.9990)])
def test_calibration_with_zero_and_infinite_epsilons(accountant, target, want, monkeypatch):
  _fake_epsilon(monkeypatch, _zero_then_inf)
  sigma = accounting.calibrate_noise_multiplier(target, 1e-5, 0.01, 40, accountant, tol=1e-6)
  epsilon = lambda sigma: _zero_then_inf(poisson(noise_multiplier=sigma, steps=40))
  assert epsilon(sigma) <= target < epsilon(sigma - 2e-6)
  assert abs(sigma - want) < 1e-4


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target, want", [(1e-9, 5), (0.5, 6), (1.0, 13), (3.0, 40), (50.0, 40)])
def test_max_steps_with_zero_and_infinite_epsilons(accountant, target, want, monkeypatch):
  _fake_epsilon(monkeypatch, _zero_then_inf)
  assert accounting.max_steps(poisson(accountant, noise_multiplier=1.0, steps=0), target,
                              cap=2**31) == want


def test_a_pld_that_cannot_be_computed_steers_the_searches_but_is_never_an_answer(monkeypatch):
  _fake_epsilon(monkeypatch, _zero_then_unavailable)
  spec = poisson(noise_multiplier=1.0, steps=0)
  assert accounting.max_steps(spec, 1.0, cap=2**31) == 13
  with pytest.raises(accounting.PLDError):  # the answer would be 40: 41 must be computed
    accounting.max_steps(spec, 3.0, cap=2**31)
  assert accounting.calibrate_noise_multiplier(3.0, 1e-5, 0.01, 40, tol=1e-6) == pytest.approx(
      1.0, abs=1e-6)
  assert accounting.calibrate_noise_multiplier(15.0, 1e-5, 0.01, 40, tol=1e-6) == pytest.approx(
      0.5, abs=1e-6)  # checked; that less noise exceeds the target could not be: a warning


def test_calibration_for_shuffle_uses_the_shuffle_guarantee():
  sigma = accounting.calibrate_noise_multiplier(
      8.0, 1e-5, steps=100, accountant="rdp", sampling="shuffle", batch_size=100,
      num_examples=1000, tol=1e-3)
  spec = shuffle("rdp", sigma, steps=100, batch_size=100, num_examples=1000)
  assert spec.epsilon() <= 8.0 < spec.with_steps(200).epsilon()
  assert sigma > accounting.calibrate_noise_multiplier(8.0, 1e-5, 0.1, 100, "rdp")


def test_the_sampler_overflow_term_is_added_to_delta():
  p = 1e-7
  spec = dataclasses.replace(poisson("rdp", steps=100), overflow_probability=p)
  epsilon = spec.epsilon()
  assert epsilon == poisson("rdp", steps=100).epsilon()  # epsilon is the accountant's
  assert spec.overflow_delta() == pytest.approx((1 + math.exp(epsilon)) * 100 * p, rel=1e-12)
  assert spec.total_delta() == pytest.approx(1e-5 + (1 + math.exp(epsilon)) * 100 * p,
                                             rel=1e-12)
  assert f"1e-05 + {spec.overflow_delta():.3g} = {spec.total_delta():.10g}" in spec.statement()
  assert "(1 + e^epsilon) * steps * 1e-07" in spec.statement()
  assert poisson("rdp", steps=100).total_delta() == 1e-5  # no overflow possible: delta itself
  assert spec.with_steps(0).total_delta() == 1e-5
  huge = dataclasses.replace(spec, overflow_probability=0.5)
  assert huge.total_delta() == 1.0  # capped: a vacuous but true delta
  with pytest.raises(ValueError, match="overflow_probability=0 with sampling='shuffle'"):
    dataclasses.replace(shuffle(), overflow_probability=1e-9)
  with pytest.raises(ValueError, match="overflow_probability"):
    dataclasses.replace(spec, overflow_probability=1.0)
  with pytest.raises(ValueError, match="Cannot resume"):  # another cap is another mechanism
    accounting.PrivacyLedger(poisson("rdp", steps=0)).restore(spec.to_dict())


@pytest.mark.parametrize("spec", [
    poisson(), poisson("rdp", steps=0), shuffle(), shuffle("rdp"),
    PrivacySpec(noise_multiplier=1.5, steps=10, delta=1e-5, sampling_probability=0.04,
                overflow_probability=3e-16)])
def test_to_dict_round_trips_through_json(spec):
  data = json.loads(json.dumps(spec.to_dict()))
  assert PrivacySpec.from_dict(data) == spec
  assert accounting.event_from_dict(data["dp_event"]) == spec.dp_event()
  assert data["adjacency"] == spec.adjacency


def test_from_dict_refuses_an_event_or_adjacency_that_contradicts_the_settings():
  data = poisson().to_dict()
  data["dp_event"]["count"] = 10
  with pytest.raises(ValueError, match="does not match"):
    PrivacySpec.from_dict(data)
  data = shuffle().to_dict()
  data["adjacency"] = "add_or_remove_one"
  with pytest.raises(ValueError, match="does not match"):
    PrivacySpec.from_dict(data)


def test_event_from_dict_only_builds_dp_accounting_events():
  data = accounting.event_to_dict(dp_accounting.GaussianDpEvent(1.0))
  with pytest.raises(ValueError, match="module_name"):
    accounting.event_from_dict(dict(data, module_name="os"))
  with pytest.raises(ValueError, match="class_name"):
    accounting.event_from_dict(dict(data, class_name="attr"))


def test_ledger_resumes_epsilon_from_a_saved_state():
  ledger = accounting.PrivacyLedger(poisson("rdp", steps=0))
  for _ in range(3):
    ledger.record_steps(500)
  state = json.loads(json.dumps(ledger.get_state()))
  resumed = accounting.PrivacyLedger(poisson("rdp", steps=0))
  resumed.restore(state)
  assert resumed.steps == 1500
  resumed.record_steps(750)
  assert abs(resumed.epsilon() - 7.3291) < 1e-4
  assert accounting.PrivacyLedger.from_state(state).epsilon() == ledger.epsilon()
  assert ledger.epsilon_after(750) == resumed.epsilon()


def test_ledger_refuses_to_resume_with_different_settings():
  state = accounting.PrivacyLedger(poisson("rdp", steps=10)).get_state()
  for other in (poisson("rdp", noise_multiplier=1.0, steps=0), poisson("rdp", q=0.05, steps=0),
                poisson("pld", steps=0), shuffle("rdp", steps=0)):
    with pytest.raises(ValueError, match="Cannot resume"):
      accounting.PrivacyLedger(other).restore(state)


@pytest.mark.parametrize("epochs,n,batch,want", [(1, 1000, 10, 100), (0.1, 1000, 10, 10),
                                                 (3, 60000, 256, 704), (1, 10, 20, 1)])
def test_steps_for_epochs_rounds_up_only_a_real_remainder(epochs, n, batch, want):
  assert accounting.steps_for_epochs(epochs, n, batch) == want


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan"), None, "0.1", True])
def test_sampling_probability_outside_zero_one_is_a_clear_error(q):
  with pytest.raises(ValueError, match=r"sampling_probability in \(0, 1\]"):
    poisson(q=q)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("inf"), None])
def test_delta_outside_the_open_unit_interval_is_a_clear_error(delta):
  with pytest.raises(ValueError, match=r"delta in \(0, 1\)"):
    poisson(delta=delta)
  with pytest.raises(ValueError, match=r"delta in \(0, 1\)"):
    accounting.calibrate_noise_multiplier(1.0, delta, 0.01, 10)


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), None])
def test_negative_or_non_finite_noise_multiplier_is_a_clear_error(sigma):
  with pytest.raises(ValueError, match="noise_multiplier >= 0"):
    poisson(noise_multiplier=sigma)


@pytest.mark.parametrize("name,value,pattern", [
    ("accountant", "moments", r"accountant in \['pld', 'rdp'\]"),
    ("sampling", "uniform", r"sampling in \['poisson', 'shuffle'\]"),
    ("steps", -1, "steps to be an integer >= 0"),
    ("steps", 1.5, "steps to be an integer >= 0"),
])
def test_unknown_names_and_bad_steps_are_clear_errors(name, value, pattern):
  kwargs = dict(noise_multiplier=1.0, steps=10, delta=1e-5, sampling_probability=0.1)
  kwargs[name] = value
  with pytest.raises(ValueError, match=pattern):
    PrivacySpec(**kwargs)


def test_shuffle_needs_a_batch_no_larger_than_the_dataset_and_poisson_refuses_one():
  with pytest.raises(ValueError, match="batch_size <= num_examples"):
    shuffle(batch_size=11, num_examples=10)
  with pytest.raises(ValueError, match="batch_size to be an integer"):
    shuffle(batch_size=None)
  with pytest.raises(ValueError, match="batch_size=None with sampling='poisson'"):
    poisson(batch_size=10)


@pytest.mark.parametrize("target", [0.0, -1.0, float("nan")])
def test_calibration_rejects_a_non_positive_target(target):
  with pytest.raises(ValueError, match="target_epsilon > 0"):
    accounting.calibrate_noise_multiplier(target, 1e-5, 0.01, 10)


def test_an_unreachable_target_epsilon_is_its_own_error():
  """Even 2**30 noise exceeds the target: UnreachableEpsilonError (not a search's internals),
  at every grid (the coarser guide grids fail too)."""
  with pytest.raises(accounting.UnreachableEpsilonError, match="2\\*\\*30"):
    accounting.calibrate_noise_multiplier(1e-5, 1e-5, 0.2, 1_000_000)


def test_an_unreachable_target_is_refused_without_a_search(monkeypatch):
  """The user waits for one accounting at the most noise, not a 30-step bracket per grid."""
  evaluations = []
  epsilon = accounting._epsilon  # pylint: disable=protected-access
  monkeypatch.setattr(accounting, "_epsilon", lambda spec: evaluations.append(spec) or
                      epsilon(spec))
  with pytest.raises(accounting.UnreachableEpsilonError):
    accounting.calibrate_noise_multiplier(1e-5, 1e-5, 0.2, 1_000_000)
  assert {spec.noise_multiplier for spec in evaluations} == {2.0**30}


@pytest.mark.slow  # 20-30 s: a search over 1e6 steps
def test_a_target_only_the_finer_grid_reaches_is_calibrated_not_refused():
  """A coarser (more pessimistic) guide grid that fails is no reason to refuse: the spec's own
  grid reaches epsilon 1e-3 over 1e6 steps, and the answer is checked there."""
  sigma = accounting.calibrate_noise_multiplier(1e-3, 1e-5, 0.2, 1_000_000)
  spec = accounting.PrivacySpec(noise_multiplier=sigma, steps=1_000_000, delta=1e-5,
                                sampling_probability=0.2)
  assert spec.epsilon() <= 1e-3
