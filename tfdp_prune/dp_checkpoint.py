"""`DPCheckpoint`: the callback that saves a DP run during `fit` and keeps its privacy ledger.

Before every logical step it appends the spend to the ledger (`privacy_ledger_file`); between
logical batches it writes checkpoints (`checkpoint_format`) that `restore_latest` resumes.
"""

import json
import os
from typing import Any, Dict, Optional

from tfdp_prune import _validate
from tfdp_prune import accounting
from tfdp_prune import checkpoint_records as records
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune.checkpoint_format import SIDECAR_ENVELOPE
from tfdp_prune.checkpoint_format import check_trackables
from tfdp_prune.checkpoint_format import clean_incomplete
from tfdp_prune.checkpoint_format import write_checkpoint
from tfdp_prune.compat import keras
from tfdp_prune.privacy_ledger_file import LEDGER
from tfdp_prune.privacy_ledger_file import append_ledger
from tfdp_prune.privacy_ledger_file import read_ledger


class DPCheckpoint(keras.callbacks.Callback):
  """Saves model, DP optimizer, privacy ledger and sampler settings atomically during `fit`.

  Args:
    directory: where the checkpoints go (created if missing). One writer per directory.
    every_steps: save after every `every_steps` logical steps (at the first logical-batch
      boundary at or after each multiple), or None.
    every_epoch: save at the end of every epoch (at the next logical-batch boundary if the epoch
      ends inside a logical batch).
    budget: the run's `PrivacyBudget` (also in fit's callbacks), or None. Its ledger goes into
      every checkpoint; a ledger behind the optimizer's steps is refused.
    sampler: the `PoissonSampler`/`ShuffleSampler` feeding fit, or None. Its settings (sidecar)
      and its secret (`sampler.state`, in the TF checkpoint) go into every checkpoint, so that a
      resumed run is checked to continue, and continues, the same draws.
    keep: the number of newest intact checkpoints kept: older intact ones are deleted after a
      new one is written; None keeps all. A damaged checkpoint is never deleted.
    run_record: a JSON-compatible record of the run's settings (e.g. `tfdp-train`'s resolved
      config), saved in every sidecar so that the checkpoint carries what it was trained under.

  With a budget, the spent privacy is also recorded in the append-only ledger
  `directory/privacy_ledger.jsonl` (`read_ledger`): before every logical step runs, a line with
  the ledger's state after that step is appended and fsync'ed, so that a crash or a damaged
  checkpoint never rolls the spent budget back (`restore_latest` continues from the ledger's
  steps when they exceed the checkpoint's).
    trackables: more state to save in the same checkpoint, by name: e.g. {"ema": ema.state}
      for `ExponentialMovingAverage` (Keras callbacks are not trackable; their state is).

  At train begin, leftovers of an interrupted writer (`.tmp-*` entries) are deleted. `save()`
  writes a checkpoint at once (between logical batches only).
  """

  def __init__(self, directory: str, every_steps: Optional[int] = None, every_epoch: bool = False,
               budget=None, sampler=None, keep: Optional[int] = 3,
               trackables: Optional[Dict[str, Any]] = None,
               run_record: Optional[Dict[str, Any]] = None):
    super().__init__()
    if every_steps is not None:
      _validate.positive_int("every_steps", every_steps)
    if not isinstance(every_epoch, bool):
      raise ValueError(f"Expected every_epoch to be a bool. Received: every_epoch={every_epoch!r}.")
    if every_steps is None and not every_epoch:
      raise ValueError("Expected every_steps=<int> or every_epoch=True (when to save). Received "
                       "neither.")
    if keep is not None:
      _validate.positive_int("keep", keep)
    if budget is not None and not (hasattr(budget, "get_state") and hasattr(budget, "restore")):
      raise ValueError(f"Expected budget to be a tfdp_prune.PrivacyBudget or None. Received: "
                       f"budget={budget!r}.")
    if sampler is not None and not (hasattr(sampler, "get_config") and hasattr(sampler, "state")):
      raise ValueError(f"Expected sampler to be a tfdp_prune sampler or None. Received: "
                       f"sampler={sampler!r}.")
    self.directory = os.fspath(directory)
    self.every_steps = every_steps
    self.every_epoch = every_epoch
    self.budget = budget
    self.sampler = sampler
    self.keep = keep
    self.trackables = check_trackables(trackables)
    self.run_record = None if run_record is None else json.loads(json.dumps(run_record))
    self._last_saved = None
    self._ledger_iterations = 0
    self._reserve = 1
    self._pending = False

  def get_config(self) -> Dict[str, Any]:
    """The settings (the budget and sampler objects are not part of it)."""
    return {"directory": self.directory, "every_steps": self.every_steps,
            "every_epoch": self.every_epoch, "keep": self.keep, "run_record": self.run_record}

  @classmethod
  def from_config(cls, config: Dict[str, Any], budget=None, sampler=None,
                  trackables=None) -> "DPCheckpoint":
    return cls(**config, budget=budget, sampler=sampler, trackables=trackables)

  # ---- callback hooks ---------------------------------------------------------------------

  def on_train_begin(self, logs=None):
    optimizer = optimizer_lib.require_dp_optimizer(self.model, "DPCheckpoint")
    if (self.sampler is not None and self.sampler.gradient_accumulation_steps
        != optimizer.gradient_accumulation_steps):
      raise ValueError(
          f"The sampler's gradient_accumulation_steps={self.sampler.gradient_accumulation_steps} "
          f"differs from the optimizer's {optimizer.gradient_accumulation_steps}.")
    os.makedirs(self.directory, exist_ok=True)
    clean_incomplete(self.directory)
    self._last_saved = int(optimizer.iterations.numpy())  # nothing new to save yet
    self._pending = False
    if self.budget is not None:
      self._start_ledger(optimizer)

  def on_train_batch_begin(self, batch, logs=None):
    if self.budget is None:
      return
    # Before the batch runs: the logical steps it may complete are on record first.
    current = int(self.model.optimizer.iterations.numpy())
    iterations = current + self._reserve
    if iterations > self._ledger_iterations:
      counted = self.budget.steps  # synchronized with the optimizer
      # Iterations up to the ledger's re-run steps it already counts (see `restore_latest`).
      steps = counted + iterations - max(current, self._ledger_iterations)
      spec = self.budget.ledger.spec.with_steps(steps)
      # Without the statement: it can cost a PLD evaluation, and this runs before every step.
      append_ledger(self.directory, spec.to_dict(with_statement=False), iterations)
      self._ledger_iterations = iterations

  def _start_ledger(self, optimizer):
    record = read_ledger(self.directory)
    ledger = None if record is None else record["state"]
    state = self.budget.get_state()
    if ledger is not None:
      recorded = accounting.PrivacySpec.from_dict(ledger)
      if recorded.with_steps(0) != self.budget.spec.with_steps(0):
        raise ValueError(
            f"{os.path.join(self.directory, LEDGER)} records privacy spent under other settings "
            f"({recorded}) than this budget's ({self.budget.spec}). Use another directory.")
      if ledger["steps"] > state["steps"]:
        raise ValueError(
            f"{os.path.join(self.directory, LEDGER)} records {ledger['steps']} logical steps "
            f"spent, but this run's budget counts {state['steps']}: resume with "
            f"restore_latest({self.directory!r}, model, budget=budget) before fit, or use "
            "another directory (the spent budget is never rolled back).")
    self._ledger_iterations = record["iterations"] if record is not None else 0
    # Physical batches per execution can complete up to ceil(n / K) logical steps.
    per_execution = getattr(self.model, "steps_per_execution", None)
    n = 1 if per_execution is None else int(per_execution.numpy())
    self._reserve = -(-n // optimizer.gradient_accumulation_steps)

  def on_train_batch_end(self, batch, logs=None):
    optimizer = self.model.optimizer
    if not optimizer.at_logical_batch_start():
      return
    step = int(optimizer.iterations.numpy())
    due = self._pending or (self.every_steps is not None
                            and step // self.every_steps > self._last_saved // self.every_steps)
    if due and step != self._last_saved:
      self.save()

  def on_epoch_end(self, epoch, logs=None):
    if not self.every_epoch:
      return
    if self.model.optimizer.at_logical_batch_start():
      if int(self.model.optimizer.iterations.numpy()) != self._last_saved:
        self.save()
    else:
      self._pending = True

  # ---- saving -----------------------------------------------------------------------------

  def save(self) -> str:
    """Writes a checkpoint of the current logical step now; returns its directory."""
    optimizer = optimizer_lib.require_dp_optimizer(self.model, "DPCheckpoint")
    if not optimizer.at_logical_batch_start():
      raise RuntimeError("DPCheckpoint saves between logical batches only (the optimizer is "
                         "inside an accumulated logical batch).")
    step = int(optimizer.iterations.numpy())
    ledger = None
    if self.budget is not None:
      ledger = self.budget.get_state()
      if int(ledger["steps"]) < step:
        raise RuntimeError(
            f"The budget's ledger counts {ledger['steps']} logical steps, fewer than the "
            f"optimizer's {step}: a checkpoint would under-report epsilon. Pass the same "
            "PrivacyBudget to fit's callbacks.")
    metadata = {
        **SIDECAR_ENVELOPE.header(),
        "tfdp_prune_version": records.library_version(),
        "step": step,
        "optimizer": records.dp_settings(optimizer),
        "optimizer_state_layout": records.state_layout(self.model, optimizer),
        "budget": ledger,
        "sampler": records.sampler_record(self.sampler) if self.sampler is not None else None,
        "trackables": sorted(self.trackables),
        "model": records.model_record(self.model, optimizer),
        "run_record": self.run_record,
    }
    path = write_checkpoint(self.directory, self.model, metadata, keep=self.keep,
                            trackables=self.trackables, sampler=self.sampler)
    self._last_saved = step
    self._pending = False
    return path
