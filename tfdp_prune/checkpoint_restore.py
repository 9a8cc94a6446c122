"""Resuming a DP run: the newest intact checkpoint back into the model, optimizer, budget and
sampler, checked against what the checkpoint records, without ever lowering the spent privacy.
"""

import os
from typing import Any, Dict, Optional

from absl import logging

from tfdp_prune import checkpoint_records as records
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune.checkpoint_errors import CheckpointError
from tfdp_prune.checkpoint_format import check_trackables
from tfdp_prune.checkpoint_format import checkpoint_objects
from tfdp_prune.checkpoint_format import damaged_choices
from tfdp_prune.checkpoint_format import latest_checkpoint
from tfdp_prune.compat import tf
from tfdp_prune.privacy_ledger_file import LEDGER
from tfdp_prune.privacy_ledger_file import read_carried
from tfdp_prune.privacy_ledger_file import read_ledger


def restore_latest(directory: str, model, budget=None, sampler=None,
                   trackables: Optional[Dict[str, Any]] = None) -> Optional[int]:
  """Restores the newest complete checkpoint of `directory` into `model` (weights and DP
  optimizer state), `budget` (its ledger) and checks `sampler` against it.

  Args:
    directory: the directory `DPCheckpoint` writes to.
    model: a built model compiled with the same tfdp_prune DP optimizer settings as the run that
      wrote the checkpoint. Its optimizer is built here if it is not yet, so that every
      optimizer variable (masks, noise generator, accumulators) exists and is restored now.
    budget: a `PrivacyBudget` with the run's spec, or None. Its ledger continues from the
      checkpoint's; it is never lowered (a budget that already counted more steps keeps them).
    sampler: the sampler the run continues with, or None. Its class and `get_config()` must equal
      the checkpointed ones (same rate, cap, accumulation, number of examples and randomness
      switch), else a ValueError: another sampler would not continue the same Poisson draws.
      Its secret is replaced by the checkpointed one, so that `sampler.dataset(start_step=s)`
      continues the run's draws. To rebuild it from the checkpoint: `PoissonSampler.from_config(
      latest_checkpoint(directory).metadata["sampler"]["config"], data)`.
    trackables: more state saved by `DPCheckpoint(trackables=...)` under the same names, e.g.
      {"ema": ema.state} (build it first); a name the checkpoint lacks is a ValueError.

  Returns:
    None when `directory` has no complete checkpoint (nothing is changed: start from step 0);
    else the restored logical step s (= `model.optimizer.iterations`), from which to resume the
    data: `sampler.dataset(start_step=s)`.
  """
  optimizer = optimizer_lib.require_dp_optimizer(model, "restore_latest")
  info = latest_checkpoint(directory)  # CheckpointError if the newest checkpoint is damaged
  ledger = read_ledger(directory)
  if budget is not None:  # the steps it restores may include an earlier run's, named here
    budget.carried_spend = read_carried(directory)
  if info is None:
    if ledger is not None and ledger["iterations"] > 0:
      raise CheckpointError(
          f"{os.path.join(directory, LEDGER)} records {ledger['state']['steps']} logical "
          f"steps already spent, but {directory} holds no checkpoint to continue from. "
          f"{damaged_choices(directory)}")
    if ledger is not None and budget is not None:  # a carried spend, no step of this run yet
      budget.restore(ledger["state"])
    return None
  metadata = info.metadata
  if not model.built:
    raise ValueError("restore_latest needs a built model (its variables must exist): build it "
                     "(e.g. with keras.Input) before restoring.")
  records.check_model(metadata.get("model"), records.model_record(model, optimizer), info.path)
  records.check_settings(metadata["optimizer"], records.dp_settings(optimizer), info.path)
  if sampler is not None:
    saved = metadata.get("sampler")
    if saved is None:
      raise ValueError(f"Checkpoint {info.path} was written without a sampler; cannot check "
                       f"that {type(sampler).__name__} continues its data. Pass sampler=None.")
    current = records.sampler_record(sampler)
    if current != saved:
      raise ValueError(
          f"The sampler differs from the checkpointed one, so it would not continue the same "
          f"draws. Checkpointed: {saved}. Received: {current}. Rebuild it with "
          f"{saved['class']}.from_config(<checkpointed config>, data).")
  trackables = check_trackables(trackables)
  missing = sorted(set(trackables) - set(metadata.get("trackables", [])))
  if missing:
    raise ValueError(f"Checkpoint {info.path} holds no {missing}; it holds "
                     f"{metadata.get('trackables', [])} besides the model and optimizer.")
  optimizer.build(model.trainable_variables)
  records.check_state_layout(metadata.get("optimizer_state_layout"),
                             records.state_layout(model, optimizer), info.path)
  try:
    status = tf.train.Checkpoint(**checkpoint_objects(model, trackables, sampler)).read(
        info.state_prefix)
    status.assert_existing_objects_matched()
  except tf.errors.DataLossError as e:  # TF's own checksums (sidecars before SHA-256)
    raise CheckpointError(f"Checkpoint {info.path} is corrupt ({e}). "
                          f"{damaged_choices(directory)}") from e
  except (tf.errors.OpError, ValueError, AssertionError) as e:
    raise ValueError(f"Checkpoint {info.path} does not fit this model and optimizer: it belongs "
                     f"to another model ({type(e).__name__}: {e}).") from e
  step = int(optimizer.iterations.numpy())
  if step != info.step:
    raise RuntimeError(f"Checkpoint {info.path} restored iterations={step}, but its sidecar says "
                       f"step {info.step}: the checkpoint is inconsistent.")
  if not optimizer.at_logical_batch_start():
    raise RuntimeError(f"Checkpoint {info.path} was taken inside a logical batch; tfdp_prune "
                       "checkpoints are taken between logical batches only.")
  if budget is not None:
    if metadata.get("budget") is None:
      logging.warning("restore_latest: checkpoint %s holds no privacy ledger; the budget counts "
                      "the restored optimizer's %d steps when training begins.", info.path, step)
    else:
      budget.restore(metadata["budget"])
    if ledger is not None and ledger["state"]["steps"] > budget.get_state()["steps"]:
      # Steps after this checkpoint ran before a crash (or after a checkpoint now lost): the
      # run continues from this checkpoint, the spent budget does not go back. The re-run steps
      # draw the same batches and noise (both restored from the checkpoint), so they count once.
      logging.warning("restore_latest: %s records %d logical steps, more than checkpoint %s "
                      "(%d); the budget keeps the %d.", LEDGER, ledger["state"]["steps"],
                      info.path, step, ledger["state"]["steps"])
      budget.restore(ledger["state"], replayed_until=ledger["iterations"])
  logging.info("restore_latest: resumed from %s (logical step %d).", info.path, step)
  return step

