"""Privacy accounting: the (epsilon, delta) guarantee of a DP training run, as dp_accounting events.

`PrivacySpec` describes a run as a DpEvent (Poisson, or shuffled batches without amplification)
and gives its epsilon; `PrivacyLedger` counts steps; `max_steps` and
`calibrate_noise_multiplier` search for a target epsilon. What depends on the sampling is asked of
the spec's scheme (`sampling_schemes`); this module's own code uses no TensorFlow.

Design: docs/sampling-and-accounting.md
"""

import dataclasses
import functools
import math
from typing import Any, Dict, Optional

from absl import logging
from dp_accounting import dp_event
from dp_accounting import privacy_accountant
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from tfdp_prune import _pld
from tfdp_prune import _search
from tfdp_prune import _validate
from tfdp_prune import versioned_json
from tfdp_prune.sampling_schemes import base as schemes_base
from tfdp_prune.sampling_schemes import registry as schemes

# The built-in samplings (`sampling_schemes.registry.names()` also has the registered ones).
SAMPLINGS = schemes.BUILT_IN_NAMES
ACCOUNTANTS = ("pld", "rdp")
ADD_OR_REMOVE_ONE = schemes_base.ADD_OR_REMOVE_ONE
REPLACE_ONE = schemes_base.REPLACE_ONE
DEFAULT_PLD_DISCRETIZATION = 1e-4  # dp_accounting's own default.
# Calibration's search range: below _MIN_NOISE it stops ((almost) no noise meets the target).
_MIN_NOISE = 2.0**-19
_MAX_NOISE = 2.0**30
# Searches run first on PLD grids this many times coarser, up to this grid (see `_guides`).
_GUIDE_FACTORS = (100, 10)
_COARSEST_GUIDE = 0.02
# Calibration with PLD tries no sigma whose one-step PLD has more points than this (about 20 s
# to build, where the largest one epsilon() accepts takes minutes): 0.1-0.25 at the default grid.
_CALIBRATION_MAX_POINTS = 2**20

# dp_accounting cannot compute the PLD of the settings; too large (an epsilon far beyond any
# useful one) is the subclass PLDTooLargeError.
PLDError = _pld.PLDError
PLDTooLargeError = _pld.PLDTooLargeError


class UnreachableEpsilonError(ValueError):
  """No noise multiplier in calibration's range meets the target epsilon for these settings."""

_ENVELOPE = versioned_json.Envelope(version=1, version_key="version",
                                     name="tfdp_prune.PrivacySpec", name_key="format")
_RELATIONS = {ADD_OR_REMOVE_ONE: privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE,
              REPLACE_ONE: privacy_accountant.NeighboringRelation.REPLACE_ONE}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacySpec:
  """The privacy-relevant settings of a DP-SGD run, and the guarantee they give.

  Attributes:
    noise_multiplier: sigma; the noise std is sigma * clip norm. 0 means no privacy (epsilon inf).
    steps: logical steps taken (one per logical batch, accumulation included; 0 is allowed).
    delta: the target delta, in (0, 1).
    sampling: a registered scheme's name (`sampling_schemes`): "poisson" or "shuffle" (see the
      module docstring: shuffle is NOT a Poisson guarantee and gets no amplification).
    sampling_probability: q in (0, 1]; required for "poisson", must be None for "shuffle".
    batch_size, num_examples: the fixed batch size b and the dataset size n; required for
      "shuffle" (b <= n), must be None for "poisson" (pass q = b / n instead).
    accountant: "pld" (default) or "rdp".
    pld_discretization: value_discretization_interval of the PLD accountant (ignored by RDP).
    overflow_probability: "poisson" only: p, a bound on the probability that one step's draw
      exceeds the sampler's fixed-shape cap (the run then stops); 0 when no draw can. It adds
      (1 + e^epsilon) * steps * p to the delta of the guarantee (`total_delta()`).
  """

  noise_multiplier: float
  steps: int
  delta: float
  sampling: str = "poisson"
  sampling_probability: Optional[float] = None
  batch_size: Optional[int] = None
  num_examples: Optional[int] = None
  accountant: str = "pld"
  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION
  overflow_probability: float = 0.0

  def __post_init__(self):
    _validate.non_negative("noise_multiplier", self.noise_multiplier)
    _validate.non_negative_int("steps", self.steps)
    _validate.open_unit_interval("delta", self.delta)
    _validate.one_of("sampling", self.sampling, schemes.names())
    _validate.one_of("accountant", self.accountant, ACCOUNTANTS)
    _validate.positive("pld_discretization", self.pld_discretization)
    _validate.fraction("overflow_probability", self.overflow_probability)
    self.scheme.validate(self)
    for name in ("noise_multiplier", "delta", "sampling_probability", "pld_discretization",
                 "overflow_probability"):
      if getattr(self, name) is not None:  # Canonical floats: equal specs serialize alike.
        object.__setattr__(self, name, float(getattr(self, name)))

  @property
  def scheme(self) -> schemes_base.SamplingScheme:
    """The sampling scheme named by `sampling` (`sampling_schemes.registry`)."""
    return schemes.get(self.sampling)

  @property
  def adjacency(self) -> str:
    """The neighbouring relation the epsilon holds under: add_or_remove_one or replace_one."""
    return self.scheme.adjacency

  @property
  def passes(self) -> Optional[int]:
    """The passes over the data the scheme counts (shuffle: ceil(steps / floor(n / b))); None if
    it counts none."""
    return self.scheme.passes(self)

  def with_steps(self, steps: int) -> "PrivacySpec":
    return dataclasses.replace(self, steps=steps)

  def dp_event(self) -> dp_event.DpEvent:
    """The dp_accounting event of the whole run (NoOpDpEvent when no step was taken)."""
    if self.steps == 0:
      return dp_event.NoOpDpEvent()
    return self.scheme.dp_event(self)

  def make_accountant(self) -> privacy_accountant.PrivacyAccountant:
    """A fresh dp_accounting accountant of the configured kind and adjacency."""
    relation = _RELATIONS[self.adjacency]
    if self.accountant == "rdp":
      return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=relation, value_discretization_interval=self.pld_discretization)

  def epsilon(self) -> float:
    """Epsilon at `delta` for the run so far, computed by dp_accounting (inf if sigma is 0).

    Raises:
      PLDError: with PLD, dp_accounting cannot compute it (PLDTooLargeError: the PLD would be
        too large, an epsilon far beyond any useful one; accountant='rdp' can).
    """
    return _epsilon(self)

  def overflow_delta(self) -> float:
    """(1 + e^epsilon) * steps * overflow_probability: what the sampler's cap adds to delta."""
    if self.overflow_probability == 0 or self.steps == 0:
      return 0.0
    epsilon = self.epsilon()
    if epsilon > 700:  # e^epsilon overflows a float; the term is then at least 1 anyway
      return math.inf
    return (1.0 + math.exp(epsilon)) * self.steps * self.overflow_probability

  def total_delta(self) -> float:
    """The delta of the guarantee (epsilon(), total_delta()): `delta` plus `overflow_delta()`,
    at most 1. Equal to `delta` when the sampler cannot overflow (and for shuffle)."""
    return min(1.0, self.delta + self.overflow_delta())

  def statement(self) -> str:
    """One sentence saying what the epsilon means, with its sampling and adjacency."""
    common = (f"noise multiplier {self.noise_multiplier}, {self.steps} steps, delta {self.delta}, "
              f"{self.accountant.upper()} accountant (dp_accounting); covers every intermediate "
              "model")
    return self.scheme.statement(self, common)

  def to_dict(self, *, with_statement: bool = True) -> Dict[str, Any]:
    """A JSON-compatible dict: the settings, the serialized DpEvent, adjacency and statement.

    `with_statement=False` leaves the statement out (`from_dict` does not need it): with an
    overflow term the statement computes epsilon, a PLD evaluation, too slow for the privacy
    ledger's line before every step."""
    result = _ENVELOPE.header()
    result.update(dataclasses.asdict(self))
    result["adjacency"] = self.adjacency
    result["dp_event"] = event_to_dict(self.dp_event())
    if with_statement:
      result["statement"] = self.statement()
    return result

  @classmethod
  def from_dict(cls, data: Dict[str, Any]) -> "PrivacySpec":
    """Inverse of `to_dict`; refuses a dict whose event or adjacency disagrees with its settings."""
    _ENVELOPE.check(data, "a privacy spec dict (from PrivacySpec.to_dict())")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(data) - set(names) - {*_ENVELOPE.keys, "adjacency", "dp_event", "statement"}
    if unknown:
      raise ValueError(f"Unknown keys in privacy spec dict: {sorted(unknown)}.")
    spec = cls(**{name: data[name] for name in names if name in data})
    if "adjacency" in data and data["adjacency"] != spec.adjacency:
      raise ValueError(f"Stored adjacency={data['adjacency']!r} does not match the settings, "
                       f"which give adjacency={spec.adjacency!r}.")
    if "dp_event" in data and event_from_dict(data["dp_event"]) != spec.dp_event():
      raise ValueError(f"Stored dp_event={data['dp_event']!r} does not match the settings, "
                       f"which give {spec.dp_event()!r}.")
    return spec


@functools.lru_cache(maxsize=256)
def _epsilon(spec: PrivacySpec) -> float:
  if spec.steps == 0:
    return 0.0
  if spec.accountant == "pld" and spec.noise_multiplier > 0:
    if _pld_shortcut_applies(spec):  # as PLDAccountant computes it, and equal to it (_pld)
      return _pld.epsilon(*spec.scheme.pld_step(spec), spec.steps, spec.delta,
                          spec.pld_discretization)
    _pld.check_one_step(*_pld_mechanism(spec))
  return float(spec.make_accountant().compose(spec.dp_event()).get_epsilon(spec.delta))


def _pld_shortcut_applies(spec: PrivacySpec) -> bool:
  """Whether `_pld.epsilon` (the add-or-remove Poisson Gaussian of `pld_step`, composed `steps`
  times) is the epsilon of the spec's own event: the scheme claims it, and its event and
  adjacency are that (a subclass that changes either gets the accountant's answer)."""
  if not spec.scheme.pld_steps_compose or spec.adjacency != ADD_OR_REMOVE_ONE:
    return False
  std, q = spec.scheme.pld_step(spec)
  return spec.dp_event() == dp_event.SelfComposedDpEvent(
      event=dp_event.PoissonSampledDpEvent(sampling_probability=q,
                                           event=dp_event.GaussianDpEvent(std)),
      count=spec.steps)


def max_steps(spec: PrivacySpec, target_epsilon: float, cap: int) -> int:
  """The largest s <= cap with `spec.with_steps(s).epsilon() <= target_epsilon`.

  Returns cap when even cap steps stay within the target, 0 when one step exceeds it.
  Otherwise the answer s is checked before it is returned: epsilon(s) <= target <
  epsilon(s + 1), both computed by `PrivacySpec.epsilon()` itself. The true epsilon never
  decreases with the steps; dp_accounting's PLD value need not be exactly monotone (FFT
  rounding), so s is a crossing found by the search, and a larger step count may be within the
  target again. What a `PrivacyLedger` reports is monotone all the same (its running maximum).

  How (only the speed depends on it): the same search on coarser PLD grids first (100x, 10x:
  cheap; their answers are often the fine grid's or close to it, far off where one step's
  privacy loss spans few grid points), each answer the next grid's first guess; then
  `_search.largest_within` on `spec` itself, which evaluates the guess and its neighbour first.
  Epsilons of 0 (few steps, large delta) and inf are ordinary values of the search.

  Raises:
    PLDError: the PLD at the answer cannot be computed (PLDTooLargeError: a huge target).
    RuntimeError: epsilon is not monotone in the steps near the answer.
  """
  _validate.positive("target_epsilon", target_epsilon)
  _validate.positive_int("cap", cap)
  guess = _guess_max_steps(spec, target_epsilon, cap)
  steps = _search.largest_within(_value_of_steps(spec), target_epsilon, cap, guess)
  if steps < cap and not (spec.with_steps(steps).epsilon() <= target_epsilon
                          < spec.with_steps(steps + 1).epsilon()):  # a guard: never an assert
    raise RuntimeError(f"Epsilon is not monotone in the steps near {steps} for {spec}.")
  return steps


def _guess_max_steps(spec: PrivacySpec, target_epsilon: float, cap: int) -> Optional[int]:
  guess = None
  for guide in _guides(spec):
    guess = _search.largest_within(_value_of_steps(guide), target_epsilon, cap, guess)
  return guess


def _value_of_steps(spec: PrivacySpec):
  return lambda steps: _epsilon_or_inf(spec.with_steps(steps))


def _guides(spec: PrivacySpec):
  """Cheaper specs whose answers are usually close to spec's, coarsest first: for PLD, the same
  spec on grids 100x and 10x coarser (where one step's privacy loss spans many grid points, a
  connect-the-dots PLD epsilon moves by O(d^2) with its grid d)."""
  if spec.accountant != "pld":
    return []
  return [dataclasses.replace(spec, pld_discretization=spec.pld_discretization * factor)
          for factor in _GUIDE_FACTORS if spec.pld_discretization * factor <= _COARSEST_GUIDE]


def _epsilon_or_inf(spec: PrivacySpec) -> float:
  """For a search: a PLD that cannot be computed (too large: epsilons far beyond any useful
  one; or dp_accounting fails on it) counts as above any target. Safe for both searches,
  whose answers are always computed for real (`max_steps`, `calibrate_noise_multiplier`)."""
  try:
    return spec.epsilon()
  except _pld.PLDError:
    return math.inf


def calibrate_noise_multiplier(target_epsilon: float, delta: float,
                               sampling_probability: Optional[float] = None,
                               steps: Optional[int] = None, accountant: str = "pld", *,
                               sampling: str = "poisson", batch_size: Optional[int] = None,
                               num_examples: Optional[int] = None,
                               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                               tol: float = 1e-4) -> float:
  """The smallest noise multiplier (to within `tol`) whose epsilon is <= target_epsilon.

  The returned sigma is always one whose epsilon this function computed, with
  `PrivacySpec(noise_multiplier=sigma, ...).epsilon()` (the accountant, sampling and settings
  the ledger uses), and found <= target_epsilon: never a neighbour of a checked value. Its
  tightness is checked the same way: a sigma in [result - tol, result) was computed and found
  above the target. Epsilons of 0 (large delta, few steps) and inf are handled as values.

  How (only the speed depends on it): with PLD, the same calibration on grids 100x and 10x
  coarser first (cheap; their sigma is often within tol of the fine grid's), each answer the
  next grid's first guess; then `_search.smallest_fitting` with `PrivacySpec.epsilon()`, which
  evaluates the guess and the guess - tol first. With RDP (or no usable guess) powers of two
  from 1 bracket sigma first.

  The search range is [2**-19, 2**30]; with PLD its bottom is raised to the least noise whose
  one-step PLD has at most 2**20 points (0.1-0.25 at the default grid: about 20 s to build).
  When the bottom of the range already meets the target, that (checked) sigma is returned,
  with a warning when it is such a raised bottom.

  Args:
    target_epsilon: the epsilon not to exceed (> 0).
    delta: the delta of the guarantee.
    sampling_probability, steps, accountant, sampling, batch_size, num_examples,
      pld_discretization: as in `PrivacySpec` (for sampling="shuffle" pass batch_size and
      num_examples instead of sampling_probability).
    tol: the tolerance of the search, in sigma.

  Raises:
    ValueError: an invalid setting.
    UnreachableEpsilonError: no sigma <= 2**30 meets the target.
    PLDError: the PLD at the answer (or just below it) cannot be computed.
  """
  _validate.positive("target_epsilon", target_epsilon)
  _validate.positive_int("steps", steps)
  _validate.positive("tol", tol)
  template = PrivacySpec(noise_multiplier=1.0, steps=steps, delta=delta, sampling=sampling,
                         sampling_probability=sampling_probability, batch_size=batch_size,
                         num_examples=num_examples, accountant=accountant,
                         pld_discretization=pld_discretization)
  value = _value_of_noise(template)
  unreachable = lambda: UnreachableEpsilonError(
      f"No noise multiplier <= 2**30 reaches target_epsilon={target_epsilon} at "
      f"delta={delta} with {steps} steps (even that much noise gives epsilon "
      f"{value(_MAX_NOISE):.3g}).")
  if _above_at_most_noise(value, target_epsilon):  # one evaluation instead of a search's 30
    raise unreachable()
  lowest = _lowest_noise(template)
  guess = _guess_noise_multiplier(template, target_epsilon, tol, lowest)
  try:
    low, sigma = _search.smallest_fitting(value, target_epsilon, tol, lowest, _MAX_NOISE, guess)
  except _search.NotFoundError:
    raise unreachable() from None
  checked = dataclasses.replace(template, noise_multiplier=sigma)
  if not checked.epsilon() <= target_epsilon:  # a privacy guard: never an assert
    raise RuntimeError(f"Calibration found sigma={sigma} with epsilon {checked.epsilon()} > "
                       f"target {target_epsilon}; not returned.")
  if low is None and lowest > _MIN_NOISE:
    logging.warning("calibrate_noise_multiplier: even sigma=%r, the least noise calibration "
                    "tries with PLD (larger PLDs take minutes), meets target_epsilon=%r; "
                    "returning it (less noise would do; accountant='rdp' can go lower).", sigma,
                    target_epsilon)
  elif low is not None:  # was less noise above the target, or only impossible to account for?
    try:
      dataclasses.replace(template, noise_multiplier=low).epsilon()
    except PLDError as error:
      logging.warning("calibrate_noise_multiplier: returning sigma=%r (checked), but less noise "
                      "could not be accounted for, so it may be more than tol=%r above the "
                      "least noise that meets the target: %s", sigma, tol, error)
  return sigma


def _guess_noise_multiplier(template: PrivacySpec, target_epsilon: float, tol: float,
                            lowest: float) -> Optional[float]:
  guess = None
  for guide in _guides(template):
    if _above_at_most_noise(_value_of_noise(guide), target_epsilon):
      return guess  # a coarser grid is more pessimistic: the spec's own grid reaches it
    try:
      low, guess = _search.smallest_fitting(_value_of_noise(guide), target_epsilon, tol,
                                            lowest, _MAX_NOISE, guess)
    except _search.NotFoundError:  # a coarser grid is more pessimistic: the spec's may reach it
      return guess
  return guess


def _above_at_most_noise(value, target_epsilon: float) -> bool:
  """Whether even the most noise searched (2**30) gives an epsilon above the target, i.e. no
  search can succeed (the searches assume, as `_search` does, that epsilon does not grow with
  sigma). A shortcut only: False when the accountant cannot tell (RDP at 2**30 rounds a
  divergence of about 0 to a negative one and raises), and the search decides."""
  try:
    return not value(_MAX_NOISE) <= target_epsilon
  except ValueError:
    return False


def _value_of_noise(template: PrivacySpec):
  return lambda sigma: _epsilon_or_inf(dataclasses.replace(template,
                                                           noise_multiplier=float(sigma)))


def _pld_mechanism(spec: PrivacySpec):
  """(std, q, d) of the Gaussian PLD the PLD accountant builds for spec: one Poisson step, or
  (shuffle) one Gaussian of std sigma / 2 / sqrt(passes) for all the passes."""
  return (*spec.scheme.pld_step(spec), spec.pld_discretization)


def _lowest_noise(template: PrivacySpec) -> float:
  """_MIN_NOISE, or with PLD the least sigma (to 1%) whose one-step PLD has at most
  _CALIBRATION_MAX_POINTS points."""
  if template.accountant != "pld":
    return _MIN_NOISE
  too_large = lambda sigma: _pld.one_step_points(*_pld_mechanism(
      dataclasses.replace(template, noise_multiplier=sigma))) > _CALIBRATION_MAX_POINTS
  if not too_large(_MIN_NOISE):
    return _MIN_NOISE
  low, high = _MIN_NOISE, 1.0
  while too_large(high):
    low, high = high, 2 * high
  while high > 1.01 * low:  # bisection on a cheap function: no PLD is built
    middle = math.sqrt(low * high)
    low, high = (middle, high) if too_large(middle) else (low, middle)
  return high


def steps_for_epochs(epochs: float, num_examples: int, expected_batch_size: float) -> int:
  """Logical steps for `epochs` passes: ceil(epochs * num_examples / expected_batch_size).

  With Poisson sampling at q = expected_batch_size / num_examples this is epochs / q steps.
  """
  _validate.positive("epochs", epochs)
  _validate.positive_int("num_examples", num_examples)
  _validate.positive("expected_batch_size", expected_batch_size)
  exact = epochs * num_examples / expected_batch_size
  nearest = round(exact)
  if abs(exact - nearest) <= 1e-9 * max(1.0, exact):  # 0.1 * 1000 / 10 is 10, not 11.
    return max(1, int(nearest))
  return int(math.ceil(exact))


class PrivacyLedger:
  """Counts logical steps under fixed privacy settings; its state is a plain dict.

  One `record_steps()` per logical batch (accumulated micro-steps are not steps). For
  checkpoint/resume, save `get_state()` and call `restore(state)` (or `from_state`) when
  resuming: epsilon then continues from the steps already taken. Restoring a state whose
  settings (sigma, q, delta, sampling, accountant, ...) differ from this ledger's is an error,
  since the steps already taken were accounted with the old settings.
  """

  def __init__(self, spec: PrivacySpec):
    if not isinstance(spec, PrivacySpec):
      raise TypeError(f"Expected a PrivacySpec. Received: {spec!r}.")
    self._spec = spec
    self._reported = (0, 0.0)  # (steps, epsilon): the largest epsilon reported so far

  @property
  def spec(self) -> PrivacySpec:
    return self._spec

  @property
  def steps(self) -> int:
    return self._spec.steps

  @property
  def largest_reported_epsilon(self) -> float:
    """The largest epsilon `epsilon()` has reported (0.0 before any); no evaluation."""
    return self._reported[1]

  def record_steps(self, count: int = 1) -> None:
    _validate.positive_int("count", count)
    self._spec = self._spec.with_steps(self._spec.steps + count)

  def epsilon(self) -> float:
    """Epsilon after the steps so far, never less than one this ledger reported for fewer steps.

    The true epsilon never decreases with the steps; dp_accounting's PLD value need not be
    exactly monotone (FFT rounding), so the ledger reports the running maximum of the values it
    computed: each is an upper bound on the true epsilon at its own step count, hence also at
    any larger one. The step limit (`max_steps`) is checked on `PrivacySpec.epsilon()` itself;
    `PrivacyBudget` also stops once a reported epsilon exceeds its target."""
    epsilon = _running_max(self._spec.epsilon(), self._reported, self._spec.steps)
    if self._reported[0] <= self._spec.steps:
      self._reported = (self._spec.steps, epsilon)
    return epsilon

  def epsilon_after(self, more_steps: int) -> float:
    """Epsilon if `more_steps` further steps were taken (to stop before a budget is exceeded),
    never less than one this ledger reported for fewer steps."""
    _validate.non_negative_int("more_steps", more_steps)
    steps = self._spec.steps + more_steps
    return _running_max(self._spec.with_steps(steps).epsilon(), self._reported, steps)

  def get_state(self) -> Dict[str, Any]:
    return self._spec.to_dict()

  def restore(self, state: Dict[str, Any]) -> None:
    restored = PrivacySpec.from_dict(state)
    if restored.with_steps(0) != self._spec.with_steps(0):
      raise ValueError(f"Cannot resume: the checkpointed privacy settings {restored} differ from "
                       f"this ledger's {self._spec.with_steps(restored.steps)}; the steps taken "
                       "were accounted with the checkpointed settings.")
    self._spec = restored
    if self._reported[0] > restored.steps:  # reported for more steps than it now counts
      self._reported = (0, 0.0)

  @classmethod
  def from_state(cls, state: Dict[str, Any]) -> "PrivacyLedger":
    return cls(PrivacySpec.from_dict(state))


def _running_max(epsilon: float, reported, steps: int) -> float:
  """`epsilon` at `steps`, raised to an epsilon reported at no more steps."""
  reported_steps, reported_epsilon = reported
  return max(epsilon, reported_epsilon) if reported_steps <= steps else epsilon


def event_to_dict(event: dp_event.DpEvent) -> Dict[str, Any]:
  """A JSON-compatible dict of a DpEvent, in the layout of dp_accounting's `to_named_tuple`."""
  return _plain(event.to_named_tuple())


def event_from_dict(data: Dict[str, Any]) -> dp_event.DpEvent:
  """Inverse of `event_to_dict`. Only classes of `dp_accounting.dp_event` are accepted."""
  if not isinstance(data, dict) or data.get("module_name") != dp_event.__name__:
    raise ValueError(f"Expected a DpEvent dict with module_name={dp_event.__name__!r}. "
                     f"Received: {data!r}.")
  cls = getattr(dp_event, str(data.get("class_name")), None)
  if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
    raise ValueError(f"Unknown DpEvent class_name={data.get('class_name')!r}.")
  fields = {key: _unplain(value) for key, value in data.items()
            if key not in ("module_name", "class_name")}
  return cls(**fields)


def _plain(value):
  if isinstance(value, tuple) and hasattr(value, "_asdict"):
    return {key: _plain(item) for key, item in value._asdict().items()}
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  return value


def _unplain(value):
  if isinstance(value, dict):
    return event_from_dict(value)
  if isinstance(value, list):
    return [_unplain(item) for item in value]
  return value
