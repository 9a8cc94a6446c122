"""The privacy budget callback: epsilon in the fit logs, and a stop BEFORE the target is exceeded.

`PrivacyBudget(spec, target_epsilon=None, num_examples=None, sampler=None)` counts logical
steps; `PrivacyBudgetExhaustedError` when a step would start beyond the budget.

Design: docs/sampling-and-accounting.md
"""

import functools
import warnings
from typing import Any, Dict, Optional

from absl import logging

from tfdp_prune import _validate
from tfdp_prune import accounting
from tfdp_prune import agreement
from tfdp_prune import metadata as metadata_lib
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune import privacy_label
from tfdp_prune.compat import keras

EPSILON_LOG = "epsilon"
DELTA_LOG = "delta"
# More logical steps than any run takes: a budget that allows this many is never reached.
STEPS_CAP = 2**31


class PrivacyBudgetExhaustedError(RuntimeError):
  """A training step was about to run although it would exceed the target epsilon."""


class PrivacyBudget(keras.callbacks.Callback):
  """Tracks epsilon over logical steps; optionally stops before a target epsilon is exceeded.

  Args:
    spec: an `accounting.PrivacySpec` with the run's settings (noise multiplier, sampling,
      delta, accountant) and steps=0; the steps come from the optimizer. `spec.noise_multiplier`
      must be the DP optimizer's, and the sampling must describe the LOGICAL batches (with
      accumulation: q = expected logical batch / n, or batch_size = the logical batch).
    target_epsilon: None (only report epsilon) or the epsilon never to exceed.
    num_examples: the private dataset size n, to check delta < 1/n (a warning otherwise) and
      the optimizer's Poisson `expected_batch_size` = q n. Defaults to `spec.num_examples`
      (sampling="shuffle"), else the sampler's.
    log_every_epoch: write `epsilon` and `delta` into the epoch logs.
    sampler: the `PoissonSampler`/`ShuffleSampler` whose dataset feeds `fit`. When training
      begins, the spec, the optimizer and the sampler must agree on the logical batch
      (`agreement.check_agreement`): sampling and its parameters, gradient accumulation steps,
      expected batch size, microbatches. Without it, only the spec and the optimizer are
      compared (a warning says so). Not part of `get_config()`: pass it to `from_config`.

  `max_steps` is computed once per (settings, target) in a process (`accounting.max_steps`:
  seconds with PLD, see README "Benchmarks"); epoch logs cost one evaluation per new step count.
  """

  def __init__(self, spec: accounting.PrivacySpec, target_epsilon: Optional[float] = None,
               num_examples: Optional[int] = None, log_every_epoch: bool = True, *,
               sampler=None):
    super().__init__()
    if not isinstance(spec, accounting.PrivacySpec):
      raise ValueError("Expected spec to be a tfdp_prune.PrivacySpec (with steps=0). "
                       f"Received: spec={spec!r}.")
    if spec.steps != 0:
      raise ValueError(
          "Expected spec.steps=0: the budget counts the steps from the DP optimizer's "
          "iterations (a restored optimizer's steps are counted too); to resume a ledger, use "
          f"PrivacyBudget.restore(state). Received: spec.steps={spec.steps}.")
    if target_epsilon is not None:
      _validate.positive("target_epsilon", target_epsilon)
      target_epsilon = float(target_epsilon)
    if num_examples is not None:
      _validate.positive_int("num_examples", num_examples)
      if spec.num_examples is not None and num_examples != spec.num_examples:
        raise ValueError(f"Expected num_examples={num_examples} to equal spec.num_examples="
                         f"{spec.num_examples}, or None.")
    else:
      num_examples = spec.num_examples
    if sampler is not None:
      if not hasattr(sampler, "privacy_spec"):
        raise ValueError("Expected sampler to be a tfdp_prune PoissonSampler or ShuffleSampler "
                         f"(or None). Received: sampler={sampler!r}.")
      if num_examples is None:
        num_examples = sampler.num_examples
      elif num_examples != sampler.num_examples:
        raise ValueError(f"Expected num_examples={num_examples} to equal the sampler's "
                         f"num_examples={sampler.num_examples}, or None.")
    if not isinstance(log_every_epoch, bool):
      raise ValueError(f"Expected log_every_epoch to be a bool. Received: "
                       f"log_every_epoch={log_every_epoch!r}.")
    self.spec = spec
    self.target_epsilon = target_epsilon
    self.num_examples = num_examples
    self.log_every_epoch = log_every_epoch
    self.sampler = sampler
    # {"path", "sha256", "steps"} of an earlier run's spend that the ledger this budget was
    # restored from began with (set by `checkpointing.restore_latest`): the label names it.
    self.carried_spend = None
    self._ledger = accounting.PrivacyLedger(spec)
    self._synced_iterations = None  # the optimizer iterations already in the ledger
    self._replayed_until = 0  # optimizer iterations up to which steps re-run ledgered ones
    if num_examples is not None and spec.delta >= 1.0 / num_examples:
      warnings.warn(
          f"delta={spec.delta} >= 1/num_examples={1.0 / num_examples:.3g}: at such a delta, "
          "publishing a random example outright is (0, delta)-DP, so the guarantee means "
          "little. Choose delta well below 1/n (commonly 1/n^1.1 or less).", UserWarning,
          stacklevel=2)

  # ---- the budget -------------------------------------------------------------------------

  @property
  def ledger(self) -> accounting.PrivacyLedger:
    return self._ledger

  @property
  def steps(self) -> int:
    """Logical steps accounted so far (synchronized with the model's optimizer)."""
    self._sync()
    return self._ledger.steps

  @property
  def delta(self) -> float:
    """The delta of the guarantee after the logical steps taken so far: the spec's delta plus
    the sampler's overflow term, if any (`PrivacySpec.total_delta()`)."""
    self._sync()
    return self._ledger.spec.total_delta()

  @property
  def max_steps(self) -> Optional[int]:
    """The most logical steps whose epsilon is <= target_epsilon (None without a target)."""
    if self.target_epsilon is None:
      return None
    return max_steps_within(self.spec, self.target_epsilon)

  @property
  def remaining_steps(self) -> Optional[int]:
    """Logical steps still allowed by the target (None without a target)."""
    if self.target_epsilon is None:
      return None
    return max(0, self.max_steps - self.steps)

  @property
  def exhausted(self) -> bool:
    """True when one more logical step would exceed target_epsilon: the step limit is reached,
    or an epsilon the ledger reported (a running maximum, see `PrivacyLedger.epsilon`) already
    exceeds the target."""
    return self.target_epsilon is not None and (
        self.remaining_steps == 0 or self._ledger.largest_reported_epsilon > self.target_epsilon)

  def epsilon(self) -> float:
    """Epsilon at `delta` after the logical steps taken so far."""
    self._sync()
    return self._ledger.epsilon()

  def logs(self) -> Dict[str, float]:
    """What goes into the epoch logs: {"epsilon": ..., "delta": ...}."""
    return {EPSILON_LOG: self.epsilon(), DELTA_LOG: self.delta}

  def privacy_metadata(self, model) -> metadata_lib.PrivacyMetadata:
    """The label of `model` trained under this budget (what `export_saved_model(budget=...)`
    exports): see `privacy_label.from_budget`.

    Raises:
      metadata.LabelError: the model, its optimizer, the sampler and this budget cannot be
        labelled truthfully (the message says why and how to fix it).
    """
    return privacy_label.from_budget(model, self)

  def get_state(self) -> Dict[str, Any]:
    """The ledger (settings and steps) as a JSON-compatible dict, for checkpoints."""
    self._sync()
    return self._ledger.get_state()

  def restore(self, state: Dict[str, Any], replayed_until: int = 0) -> None:
    """Continues from a saved ledger (same settings, else ValueError). Never lowers the spent
    budget: a state with fewer steps than already accounted is ignored, with a warning.

    `replayed_until`: the optimizer iterations up to which the coming steps re-run steps that
    `state` already counts (a run restored from a checkpoint older than its privacy ledger: the
    checkpoint brings back the noise generator's state and the sampler's secret, so the same
    steps draw the same batches and noise); they are not counted twice."""
    self._replayed_until = max(self._replayed_until, int(replayed_until))
    restored = accounting.PrivacyLedger(self.spec)
    restored.restore(state)
    self._sync()
    if restored.steps < self._ledger.steps:
      logging.warning("PrivacyBudget.restore: the state has %d steps, fewer than the %d already "
                      "accounted; keeping %d (the spent budget is never lowered).",
                      restored.steps, self._ledger.steps, self._ledger.steps)
      return
    self._ledger.restore(state)  # keeps the epsilons it reported (a running maximum)

  # ---- callback hooks ---------------------------------------------------------------------

  def on_train_begin(self, logs=None):
    optimizer = self._optimizer()
    if self.target_epsilon is not None:
      steps_per_execution = getattr(self.model, "steps_per_execution", None)
      if (getattr(self.model, "autotune_steps_per_execution", False)
          or (steps_per_execution is not None and int(steps_per_execution.numpy()) != 1)):
        raise ValueError(
            "PrivacyBudget with a target_epsilon needs steps_per_execution=1 (the default): it "
            "stops between batches, and one execution of several batches could cross the "
            "target. Compile the model without steps_per_execution.")
    iterations = int(optimizer.iterations.numpy())
    if self._ledger.steps < iterations:  # steps taken before (e.g. a restored optimizer)
      self._ledger.record_steps(iterations - self._ledger.steps)
    self._synced_iterations = iterations
    if self.target_epsilon is not None:
      self._refuse_if_exhausted()

  def on_train_batch_begin(self, batch, logs=None):
    if self.target_epsilon is not None:
      self._refuse_if_exhausted()

  def on_train_batch_end(self, batch, logs=None):
    if self.target_epsilon is not None and self.exhausted:
      self.model.stop_training = True
      logging.info("PrivacyBudget: stopping after %d logical steps, epsilon %.6g <= target %g "
                   "(one more step: %.6g).", self._ledger.steps, self._ledger.epsilon(),
                   self.target_epsilon, self._ledger.epsilon_after(1))

  def on_epoch_end(self, epoch, logs=None):
    if self.log_every_epoch and logs is not None:
      logs.update(self.logs())

  def on_train_end(self, logs=None):
    self._sync()

  # ---- config -----------------------------------------------------------------------------

  def get_config(self) -> Dict[str, Any]:
    """The settings (not the spent budget: that is `get_state()`)."""
    return {"spec": self.spec.to_dict(), "target_epsilon": self.target_epsilon,
            "num_examples": self.num_examples, "log_every_epoch": self.log_every_epoch}

  @classmethod
  def from_config(cls, config: Dict[str, Any], sampler=None) -> "PrivacyBudget":
    """The sampler (which holds data) is not part of the config: pass it again."""
    config = dict(config)
    config["spec"] = accounting.PrivacySpec.from_dict(config["spec"])
    return cls(**config, sampler=sampler)

  # ---- internals --------------------------------------------------------------------------

  def _optimizer(self):
    optimizer = optimizer_lib.require_dp_optimizer(
        self.model, "PrivacyBudget (which counts the optimizer's logical steps)")
    agreement.check_agreement(optimizer, sampler=self.sampler, spec=self.spec,
                              num_examples=self.num_examples)
    if self.sampler is None:
      logging.warning(
          "PrivacyBudget without sampler=: it cannot check that each of the optimizer's updates "
          "(%d physical batches) holds exactly one draw of the %s sampling it accounts for. "
          "Pass the sampler whose dataset feeds fit: PrivacyBudget(spec, sampler=sampler).",
          optimizer.gradient_accumulation_steps, self.spec.sampling)
    return optimizer

  def _sync(self) -> None:
    """Adds the logical steps the optimizer took since the last look to the ledger."""
    if self._synced_iterations is None or self.model is None:
      return
    iterations = int(self.model.optimizer.iterations.numpy())
    counted_from = max(self._synced_iterations, self._replayed_until)
    if iterations > counted_from:
      self._ledger.record_steps(iterations - counted_from)
    self._synced_iterations = iterations  # lower after a restored (older) optimizer: not a refund

  def _refuse_if_exhausted(self) -> None:
    if self.exhausted:
      self.model.stop_training = True
      raise PrivacyBudgetExhaustedError(
          f"The privacy budget is spent: {self._ledger.steps} logical steps give epsilon "
          f"{self._ledger.epsilon():.6g} <= target_epsilon={self.target_epsilon}, and one more "
          f"step would give {self._ledger.epsilon_after(1):.6g}. No further training step may "
          "run on this data (check `budget.exhausted` before calling fit).")


@functools.lru_cache(maxsize=64)
def max_steps_within(spec: accounting.PrivacySpec, target_epsilon: float) -> int:
  """The largest s with `spec.with_steps(s).epsilon() <= target_epsilon` (STEPS_CAP if even
  that many steps stay within the target; 0 if one step already exceeds it).

  `accounting.max_steps` checks the answer before returning it: epsilon(s) <= target <
  epsilon(s + 1), both computed by `PrivacySpec.epsilon()` itself (where dp_accounting's PLD
  value is not exactly monotone in the steps, s is such a crossing; see there). Epsilons of 0
  (few steps at a large delta) and inf are handled.
  """
  return accounting.max_steps(spec, target_epsilon, STEPS_CAP)
