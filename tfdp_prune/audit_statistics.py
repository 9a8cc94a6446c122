"""The statistics of a one-run audit, from scores: the guesses, their best epsilon lower bound,
and the membership-inference AUC. Pure numpy; the bound itself is `audit_bounds`, the audited
run `audit`.
"""

import dataclasses
from typing import Tuple

import numpy as np

from tfdp_prune import audit_bounds

# Total guesses (k+ + k-) of the default grid, as fractions of m, each split evenly.
_GUESS_FRACTIONS = (0.1, 0.2, 0.4)


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
  """The guesses of a one-run audit and the lower bound they prove (see `audit`'s
  module docstring).

  `candidates` is the number of (k+, k-) pairs tried; each was tested at `test_confidence`
  = 1 - (1 - confidence) / candidates."""

  m: int
  k_plus: int
  k_minus: int
  guesses: int
  correct: int
  confidence: float
  delta: float
  candidates: int
  test_confidence: float
  epsilon_lower_bound: float


def guess_grid(m: int) -> Tuple[Tuple[int, int], ...]:
  """The default (k+, k-) candidates for m canaries: k+ = k- = fraction * m / 2 for each of
  `_GUESS_FRACTIONS` (fixed before any score is seen), duplicates and empty guesses dropped."""
  pairs = []
  for fraction in _GUESS_FRACTIONS:
    half = max(1, int(round(fraction * m / 2)))
    if 2 * half <= m and (half, half) not in pairs:
      pairs.append((half, half))
  return tuple(pairs) or ((1, 0),)


def count_correct(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> int:
  """Correct guesses when the k+ highest scores are guessed included and the k- lowest excluded.

  Ties are broken by position (a stable sort); the canaries' order is random and independent of
  their inclusion, so this uses nothing but the scores.
  """
  scores, included = np.asarray(scores), np.asarray(included, bool)
  if k_plus + k_minus > len(scores):
    raise ValueError(f"Expected k_plus + k_minus <= {len(scores)} canaries. Received: "
                     f"k_plus={k_plus}, k_minus={k_minus}.")
  order = np.argsort(-scores, kind="stable")
  guessed_in, guessed_out = order[:k_plus], order[len(order) - k_minus:]
  return int(included[guessed_in].sum() + (~included[guessed_out]).sum())


def one_run_audit(scores: np.ndarray, included: np.ndarray, *, delta: float,
                  confidence: float = 0.95, guess_counts=None) -> OneRunAudit:
  """The best epsilon lower bound over the (k+, k-) candidates `guess_counts` (default
  `guess_grid(m)`), each tested at confidence 1 - (1 - confidence) / len(candidates)."""
  m = len(scores)
  candidates = tuple(guess_counts) if guess_counts is not None else guess_grid(m)
  test_confidence = 1.0 - (1.0 - confidence) / len(candidates)
  best = None
  for k_plus, k_minus in candidates:
    correct = count_correct(scores, included, k_plus, k_minus)
    bound = audit_bounds.epsilon_lower_bound(m, k_plus + k_minus, correct, delta, test_confidence)
    if best is None or bound > best.epsilon_lower_bound:
      best = OneRunAudit(m=m, k_plus=k_plus, k_minus=k_minus, guesses=k_plus + k_minus,
                         correct=correct, confidence=confidence, delta=delta,
                         candidates=len(candidates), test_confidence=test_confidence,
                         epsilon_lower_bound=bound)
  return best


def membership_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
  """P[member score > non-member score] + P[equal] / 2 over all pairs (the ROC AUC, computed
  exactly by the Mann-Whitney rank sum with average ranks for ties)."""
  members = np.asarray(member_scores, np.float64).ravel()
  nonmembers = np.asarray(nonmember_scores, np.float64).ravel()
  if not len(members) or not len(nonmembers):
    raise ValueError(f"Expected members and non-members. Received {len(members)} and "
                     f"{len(nonmembers)} scores.")
  pooled = np.concatenate([members, nonmembers])
  _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
  # The average of ranks first..last (1-based) of each group of equal scores.
  last = np.cumsum(counts)
  average_rank = (last - (counts - 1) / 2.0)[inverse]
  rank_sum = average_rank[:len(members)].sum()
  return float((rank_sum - len(members) * (len(members) + 1) / 2.0)
               / (len(members) * len(nonmembers)))
