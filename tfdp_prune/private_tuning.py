"""Private hyperparameter search: a random number of DP trials on the private data, the best by a
noisy score on a held-out private validation part; the whole search is accounted
(`tuning_accounting`: Papernot & Steinke 2022). Its draws come from OS entropy, never a seed.

Design: docs/private-tuning.md
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import randomness
from tfdp_prune import tuning_accounting

NONE = "none"
PRIVATE = "private"
# Settings a candidate may set: none of them changes a trial's privacy (sigma, q, steps, delta).
TUNABLE = ("learning_rate", "momentum", "l2_norm_clip")


class EmptySearchError(RuntimeError):
  """The search drew K = 0 trials (Poisson only): it outputs no model, as the analysed
  mechanism does."""


@dataclasses.dataclass(frozen=True)
class Trial:
  """One trial: which candidate it ran, its noisy score (a DP output) and what it produced."""

  candidate_index: int
  score: float
  result: Any


@dataclasses.dataclass(frozen=True)
class Outcome:
  """The search's output: the best trial (None when K = 0) and K, the number of trials run."""

  best: Optional[Trial]
  trials_run: int


def parse_candidates(text: Optional[str]) -> Tuple[Dict[str, float], ...]:
  """'learning_rate=0.1;learning_rate=0.5,momentum=0' -> ({'learning_rate': 0.1}, {...}).

  Raises:
    ValueError: an empty list, a malformed pair, a setting not in TUNABLE, a non-number.
  """
  example = "e.g. --tune_candidates='learning_rate=0.1;learning_rate=0.5,momentum=0'"
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"Expected --tune_candidates: ';'-separated candidates, each ','-separated "
                     f"name=value ({example}). Received: --tune_candidates={text!r}.")
  candidates = []
  for part in text.split(";"):
    candidate = {}
    for pair in part.split(","):
      name, _, value = pair.partition("=")
      name = name.strip()
      if name not in TUNABLE:
        raise ValueError(f"Expected --tune_candidates to set only {', '.join(TUNABLE)} (settings "
                         f"that leave a trial's privacy unchanged; {example}). Received: "
                         f"{pair.strip()!r} in --tune_candidates={text!r}.")
      try:
        candidate[name] = float(value)
      except ValueError:
        raise ValueError(f"Expected a number in {pair.strip()!r} of --tune_candidates "
                         f"({example}).") from None
    candidates.append(candidate)
  return tuple(candidates)


def entropy_rng() -> np.random.Generator:
  """A generator seeded with 256 bits of OS entropy: K, the candidates, the validation split
  and the score noise must not be derivable from anything published (DESIGN.md rule 11)."""
  return np.random.default_rng(randomness.os_entropy_words(4))


def draw_trial_count(distribution: str, mean_trials: float, rng: np.random.Generator) -> int:
  """K: Poisson with mean mean_trials (may be 0), or geometric on {1, 2, ...} with that mean
  (the truncated negative binomial with eta = 1, gamma = 1 / mean). Independent of the data."""
  _validate.one_of("distribution", distribution, tuning_accounting.DISTRIBUTIONS)
  if distribution == tuning_accounting.POISSON:
    return int(rng.poisson(mean_trials))
  return int(rng.geometric(1.0 / mean_trials))


def draw_candidate(num_candidates: int, rng: np.random.Generator) -> int:
  """A candidate's index, uniform over the fixed list (independent of the data)."""
  _validate.positive_int("num_candidates", num_candidates)
  return int(rng.integers(num_candidates))


def split_validation(private, fraction: float, rng: np.random.Generator):
  """(train, validation) parts of `private`: each example goes to validation independently with
  probability `fraction`. Per-example coin flips (not a permutation of n) keep neighbouring
  datasets' other examples on the same side, so one example changes one part only. The
  validation part is private data: its use (the noisy score) is part of each trial, accounted.

  Raises:
    ValueError: a part came out empty (too few private examples for this fraction).
  """
  _validate.open_unit_interval("fraction", fraction)
  x, y = private
  held_out = rng.random(len(y)) < fraction
  if held_out.all() or not held_out.any():
    raise ValueError(f"Expected both the training and the validation part of the {len(y)} "
                     f"private examples to be non-empty at --tune_validation_fraction="
                     f"{fraction}. Received: one is empty; use more data or another fraction.")
  return (x[~held_out], y[~held_out]), (x[held_out], y[held_out])


def count_correct(model, validation, batch_size: int = 256) -> int:
  """How many validation examples `model` classifies correctly (sensitivity 1 in one example)."""
  x, y = validation
  logits = model.predict(x, batch_size=batch_size, verbose=0)
  return int(np.sum(np.argmax(logits, axis=-1) == np.asarray(y)))


def noisy_score(correct: int, score_noise_multiplier: float, rng: np.random.Generator) -> float:
  """correct + N(0, score_noise_multiplier^2): the Gaussian mechanism on a count."""
  return float(correct + rng.normal(0.0, score_noise_multiplier))


def search(candidates: Sequence[Dict[str, float]], trials: int,
           train_trial: Callable[[Dict[str, float]], Any], score: Callable[[Any], float],
           rng: np.random.Generator) -> Outcome:
  """Runs `trials` trials, each on a candidate drawn uniformly; returns the one of highest
  `score` (a noisy, DP score: ranking by a non-private one would not be covered by the theorem).
  Only the best trial is output; the others are dropped (the theorem covers this output). The
  candidate draw is inside each trial, so every trial is the same randomized algorithm Q, as
  the theorems require."""
  _validate.non_negative_int("trials", trials)
  best = None
  for _ in range(trials):
    index = draw_candidate(len(candidates), rng)
    result = train_trial(dict(candidates[index]))
    trial = Trial(candidate_index=index, score=score(result), result=result)
    if best is None or trial.score > best.score:
      best = trial
  return Outcome(best=best, trials_run=trials)


def empty_search_message(mean_trials: float) -> str:
  return (f"The private search drew K = 0 trials (Poisson with mean {mean_trials:g}: probability "
          f"e^-{mean_trials:g} = {math.exp(-mean_trials):.3g}), so it outputs no model, as the "
          "mechanism Theorem 6 analyses does. Nothing was trained. Running again is a new search "
          "whose spend adds to this one's; --tune_distribution=geometric always runs at least "
          "one trial.")
