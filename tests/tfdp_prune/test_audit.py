"""The one-run audit: the bound's math against closed forms and an independent scipy evaluation,
the AUC against scikit-learn, the canaries' construction, and real audits: a non-private run is
caught (bound clearly above 1), a run at epsilon 1 is not (bound <= 1), and the export carries
the audit apart from the unchanged proven epsilon."""

import dataclasses
import math
import os

import numpy as np
import pytest
from scipy import optimize
from scipy import stats
from sklearn import metrics

from tfdp_prune import audit
from tfdp_prune import audit_bounds
from tfdp_prune import audit_canaries
from tfdp_prune import audit_statistics
from tfdp_prune import data as data_lib
from tfdp_prune.compat import tf
from tfdp_prune.export import inspection
from tfdp_prune.export import serving_files
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig


def _logit(p):
  return math.log(p / (1 - p))


def _reference_p_value(m, r, v, epsilon, delta):
  """The paper's bound written out with scipy, the max over ALL i = 1..m (not only 1..v)."""
  q = 1 / (1 + math.exp(-epsilon))
  f = lambda k: stats.binom.sf(np.asarray(k) - 1, r, q)  # P[Binomial(r, q) >= k]; 1 if k <= 0
  i = np.arange(1, m + 1)
  alpha = np.max((f(v - i) - f(v)) / i)
  return min(float(f(v)) + 2 * m * delta * alpha, 1.0)


# ---- the bound --------------------------------------------------------------------------------

def test_issue_anchor_100_correct_guesses_give_3_49():
  assert audit_bounds.epsilon_lower_bound(100, 100, 100, 0.0, 0.95) == pytest.approx(
      3.4930, abs=5e-5)


@pytest.mark.parametrize("r", [5, 10, 100, 1000])
def test_all_correct_without_delta_is_the_closed_form(r):
  # logit((1 - confidence)^(1/r)), or 0 where that is negative (nothing is rejected).
  for m, confidence in ((r, 0.95), (2 * r, 0.99)):
    expected = max(0.0, _logit((1 - confidence) ** (1 / r)))
    assert audit_bounds.epsilon_lower_bound(m, r, r, 0.0, confidence) == pytest.approx(
        expected, abs=1e-8)


CASES = [(1000, 100, 90, 1e-5), (1000, 500, 400, 1e-4), (200, 80, 79, 1e-5),
         (5000, 1000, 700, 1e-6), (50, 20, 17, 1e-3)]


@pytest.mark.parametrize("m, r, v, delta", CASES)
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 2.0, 6.0])
def test_p_value_matches_the_paper_formula_evaluated_with_scipy(m, r, v, delta, epsilon):
  for d in (0.0, delta):
    assert audit_bounds.p_value(m, r, v, epsilon, d) == pytest.approx(
        _reference_p_value(m, r, v, epsilon, d), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("m, r, v, delta", CASES)
def test_bound_is_where_the_scipy_p_value_crosses_the_significance(m, r, v, delta):
  for d in (0.0, delta):
    bound = audit_bounds.epsilon_lower_bound(m, r, v, d, 0.95)
    expected = optimize.brentq(lambda e: _reference_p_value(m, r, v, e, d) - 0.05, 0.0, 50.0,
                               xtol=1e-12)
    assert bound == pytest.approx(expected, abs=1e-7)
    assert _reference_p_value(m, r, v, bound, d) <= 0.05  # valid: the bound itself is rejected
  # The delta term only weakens the evidence.
  assert (audit_bounds.epsilon_lower_bound(m, r, v, delta)
          < audit_bounds.epsilon_lower_bound(m, r, v, 0.0))


def test_more_correct_guesses_give_a_higher_bound():
  bounds = [audit_bounds.epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(60, 101)]
  assert all(b > 0 for b in bounds[5:])
  assert all(later > earlier for earlier, later in zip(bounds[5:], bounds[6:]))


@pytest.mark.parametrize("r", [1, 2, 10, 101, 1000])
def test_at_most_half_correct_gives_zero(r):
  for v in {0, r // 2 - 1, r // 2} - {-1}:
    assert audit_bounds.epsilon_lower_bound(r, r, v, 0.0) == 0.0
    assert audit_bounds.epsilon_lower_bound(2 * r, r, v, 1e-5) == 0.0


def test_invalid_counts_are_refused():
  with pytest.raises(ValueError, match="v <= r <= m"):
    audit_bounds.p_value(10, 5, 6, 1.0)
  with pytest.raises(ValueError, match="v <= r <= m"):
    audit_bounds.epsilon_lower_bound(10, 11, 5)
  with pytest.raises(ValueError, match="confidence"):
    audit_bounds.epsilon_lower_bound(10, 10, 10, confidence=1.0)


# ---- guesses and the choice of (k+, k-) -------------------------------------------------------

def test_count_correct_guesses_top_as_included_and_bottom_as_excluded():
  scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
  included = np.array([True, False, True, False, True, False])
  assert audit_statistics.count_correct(scores, included, 2, 0) == 1   # 5: in, 4: out
  assert audit_statistics.count_correct(scores, included, 1, 2) == 2   # 5: in; 1: in (wrong), 0: out
  assert audit_statistics.count_correct(scores, included, 3, 3) == 4
  assert audit_statistics.count_correct(-scores, included, 0, 1) == 0  # lowest is 5.0, included


def test_best_of_the_grid_is_bonferroni_corrected():
  rng = np.random.default_rng(0)
  included = rng.random(400) < 0.5
  scores = included * 1.0 + rng.normal(0, 0.7, 400)
  grid = audit_statistics.guess_grid(400)
  assert grid == ((20, 20), (40, 40), (80, 80))
  result = audit_statistics.one_run_audit(scores, included, delta=1e-5)
  assert result.candidates == 3 and result.test_confidence == pytest.approx(1 - 0.05 / 3)
  assert (result.k_plus, result.k_minus) in grid and result.guesses == 2 * result.k_plus
  assert result.correct == audit_statistics.count_correct(scores, included, result.k_plus, result.k_minus)
  bounds = [audit_bounds.epsilon_lower_bound(
      400, kp + km, audit_statistics.count_correct(scores, included, kp, km), 1e-5, 1 - 0.05 / 3)
      for kp, km in grid]
  assert result.epsilon_lower_bound == max(bounds) > 0
  # Fixed a priori: one candidate, tested at the confidence itself.
  fixed = audit_statistics.one_run_audit(scores, included, delta=1e-5, guess_counts=[(40, 40)])
  assert fixed.candidates == 1 and fixed.test_confidence == 0.95
  assert fixed.epsilon_lower_bound == audit_bounds.epsilon_lower_bound(
      400, 80, audit_statistics.count_correct(scores, included, 40, 40), 1e-5, 0.95)


# ---- membership-inference AUC -----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  members = rng.integers(0, 6, size=50 + seed).astype(float) + 0.5 * seed
  nonmembers = rng.integers(0, 5, size=70).astype(float)
  labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
  expected = metrics.roc_auc_score(labels, np.r_[members, nonmembers])
  assert audit_statistics.membership_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)


def test_auc_extremes():
  assert audit_statistics.membership_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
  assert audit_statistics.membership_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
  assert audit_statistics.membership_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


# ---- canaries -----------------------------------------------------------------------------------

def _rows(x):
  return {row.tobytes() for row in np.asarray(x)}


@pytest.fixture(scope="module")
def digits():
  return data_lib.load()


def test_canaries_are_private_examples_mislabelled_and_included_half_the_time(digits):
  result = audit_canaries.add_canaries(digits, 400, seed=3)
  canaries, private = result.canaries, result.splits.private
  assert len(canaries.labels) == 400 and np.all(canaries.labels != canaries.true_labels)
  assert set(np.unique(canaries.labels)) == set(range(10))
  assert 160 <= canaries.included.sum() <= 240  # Binomial(400, 1/2): 10 standard deviations
  # The new private part: the non-canary private examples plus exactly the included canaries,
  # with their wrong labels; the accountant's example count follows it.
  assert result.splits.info.num_private == len(private[1]) == (
      len(digits.private[1]) - 400 + canaries.included.sum())
  trained = {(row.tobytes(), int(label)) for row, label in zip(*private)}
  for x, label, true_label, included in zip(canaries.x, canaries.labels, canaries.true_labels,
                                            canaries.included):
    assert ((x.tobytes(), int(label)) in trained) == included
    assert (x.tobytes(), int(true_label)) not in trained
  # Canaries come from the private part only: never public, never test, and the members (the
  # private examples trained on otherwise) are not canaries.
  assert _rows(canaries.x) <= _rows(digits.private[0])
  assert not _rows(canaries.x) & (_rows(digits.public[0]) | _rows(digits.test[0])
                                  | _rows(result.members[0]))
  assert result.splits.public is digits.public and result.splits.test is digits.test
  again = audit_canaries.add_canaries(digits, 400, seed=3)
  assert np.array_equal(again.canaries.included, canaries.included)
  assert not np.array_equal(audit_canaries.add_canaries(digits, 400, seed=4).canaries.included,
                            canaries.included)


# ---- settings and errors before training --------------------------------------------------------

@pytest.mark.parametrize("settings, flag", [
    (dict(canaries=0), "--canaries"),
    (dict(confidence=1.5), "--confidence"),
    (dict(k_plus=5), "--k_minus"),
    (dict(canaries=10, k_plus=6, k_minus=5), "--k_plus"),
    (dict(k_plus=0, k_minus=0), "--k_plus"),
])
def test_invalid_audit_settings_name_the_flag(settings, flag):
  with pytest.raises(ConfigError, match=flag):
    audit.AuditConfig(**settings)


@pytest.mark.parametrize("changes, audit_settings, match", [
    (dict(ema_decay=0.9), {}, "--ema_decay"),
    ({}, dict(canaries=5000), "--canaries"),
])
def test_audit_refuses_what_it_cannot_audit_before_training(digits, changes, audit_settings,
                                                            match, monkeypatch):
  monkeypatch.setattr(audit.training, "train", lambda *a, **k: pytest.fail("trained"))
  config = dataclasses.replace(TrainConfig(export_dir=None), **changes)
  with pytest.raises(ConfigError, match=match):
    audit.audit_training(config, audit.AuditConfig(**audit_settings), splits=digits)
  no_test = dataclasses.replace(digits, test=None)
  with pytest.raises(ConfigError, match="--test_split"):
    audit.audit_training(TrainConfig(export_dir=None), splits=no_test)


# ---- real audits --------------------------------------------------------------------------------

# One pipeline, with and without noise: a dense MLP on digits, 100 epochs (~1,160 Poisson steps
# of expected batch 100), long enough for the non-private model to memorize its mislabelled
# canaries. RDP keeps the per-epoch epsilon of the budget cheap.
_AUDITED = dict(mode="none", public_epochs=0, epochs=100.0, learning_rate=1.0,
                accountant="rdp", seed=0, verbose=0)


@pytest.mark.slow  # 10 s: a training with 200 canaries
def test_audit_of_a_non_private_run_has_power():
  config = TrainConfig(epsilon=None, noise_multiplier=0.0, export_dir=None, **_AUDITED)
  result = audit.audit_training(config, audit.AuditConfig(canaries=200))
  assert not result.metadata.private and result.export_path is None
  # Measured: 79 of 80 guesses correct, bound 2.53 (3 candidates, each at 98.3%).
  assert result.audit["epsilon_lower_bound"] > 2.0, result.audit
  assert result.audit["correct"] > 0.9 * result.audit["guesses"]


@pytest.fixture(scope="module")
def epsilon_1_audit(tmp_path_factory):
  export_dir = str(tmp_path_factory.mktemp("audit") / "export")
  config = TrainConfig(epsilon=1.0, export_dir=export_dir, **_AUDITED)
  return audit.audit_training(config, audit.AuditConfig(canaries=200))


@pytest.mark.slow  # its fixture: a 15 s training with canaries
def test_audit_of_an_epsilon_1_run_stays_below_1(epsilon_1_audit):
  result = epsilon_1_audit
  assert result.metadata.private and result.metadata.epsilon <= 1.0
  assert result.audit["epsilon_lower_bound"] <= 1.0, result.audit  # measured: 0.0
  assert 0.0 <= result.audit["mia_auc"] <= 1.0


@pytest.mark.slow  # its fixture: a 15 s training with canaries
def test_export_carries_the_audit_apart_from_the_unchanged_proven_epsilon(epsilon_1_audit):
  result = epsilon_1_audit
  proven = result.train_result.metadata
  exported = inspection.inspect_export(os.path.dirname(result.export_path)).latest.metadata
  assert exported == result.metadata
  assert exported.epsilon == proven.epsilon and exported.private and exported.delta == proven.delta
  assert exported.delta == pytest.approx(1e-5, rel=1e-6)  # plus the sampler's overflow term
  assert dataclasses.replace(exported, empirical=None) == proven
  record = exported.empirical["audit"]
  assert record == result.audit
  assert record["m"] == 200 and record["delta"] == 1e-5 and record["confidence"] == 0.95
  assert record["mia_members"] == record["mia_nonmembers"] == 359  # the whole test part
  assert exported.num_private_examples == 1258 - 200 + record["included"]
  # The warmup requests hold no canary, member or test row: synthetic zeros only.
  logs = serving_files.read_warmup_file(
      os.path.join(result.export_path, "assets.extra", "tf_serving_warmup_requests"))
  batches = [tf.make_ndarray(log.predict_log.request.inputs["inputs"]) for log in logs
             if log.predict_log.request.model_spec.signature_name == "serving_default"]
  assert [b.shape for b in batches] == [(1, 64), (8, 64)] and not any(b.any() for b in batches)
