"""One checkpoint for a DP run: model, optimizer, privacy ledger and sampler, written atomically.

A checkpoint directory holds, per saved logical step s, a directory `ckpt-<s>` with
  state.index, state.data-*   `tf.train.Checkpoint(model=..., optimizer=..., sampler=...)`: the
                              weights and every optimizer variable: `iterations` (logical steps),
                              the update masks, the noise generator's state (DESIGN.md rule 8),
                              the gradient accumulators and the micro-step counter, the base
                              optimizer's slots; and the sampler's secret (`sampler.state`);
  checkpoint.json             the sidecar: the logical step, the `PrivacyBudget` ledger (rule 9),
                              the sampler's class and `get_config()` (its settings, not its
                              secret), the optimizer's DP settings, the model's weight shapes
                              and optimizer class, the run's record (`run_record=`), the
                              tfdp_prune version, and the size and SHA-256 of every file above;
  COMPLETE                    the completion marker, written last;
a pointer file `latest` naming the newest committed checkpoint (for people and tools), and the
append-only privacy ledger `privacy_ledger.jsonl` (DESIGN.md rule 15): before each logical step
runs, a line with the spent budget after it (and its SHA-256) is appended and fsync'ed, so that
no crash, damaged or lost checkpoint rolls the spent privacy back.

A checkpoint holds the mechanism's secrets (the noise generator's state, the sampler's secret),
so that a resumed run continues the same noise and the same draws: keep checkpoints private,
like the data. Nothing of them goes into an export.

Atomic writes (a kill at any instant leaves either the old or the new checkpoint, never a torn
one): everything is written into a temporary directory `.tmp-*` inside the checkpoint directory,
every file and the directory are fsync'ed, the directory is renamed to `ckpt-<s>` (one rename,
atomic on POSIX), the parent is fsync'ed, then `latest` is replaced the same way (temporary file,
fsync, `os.replace`). Intact checkpoints older than the `keep` newest intact ones are first
renamed to `.tmp-*` and only then deleted, so a kill during a deletion cannot leave a `ckpt-*`
directory with missing files either; a damaged checkpoint is never deleted.

Readers trust only COMPLETE checkpoints: a `ckpt-<s>` directory with the marker, a sidecar that
parses and names step s, and every listed file present with its recorded size and SHA-256.
`.tmp-*` entries are never read; the writer (`DPCheckpoint`, one per directory) deletes them when
training begins. `latest_checkpoint` picks the checkpoint with the most logical steps (`latest`
may lag by one after a kill between the rename and the pointer update; that checkpoint is
complete all the same); if that one is damaged, it is a `CheckpointError` naming it and the
choices (restore from a backup, or a new run in another directory that carries this one's spend:
`start_carried_ledger`, `tfdp-train --carry_spend_from`), never a silent fallback to an older
checkpoint. A ledger that begins with a carried spend records where it came from
(`read_carried`).

Checkpoints are taken only between logical batches (`optimizer.at_logical_batch_start()`), so
the accumulators are zero and a resumed run restarts its sampler exactly at a logical step:

  model = build_and_compile()                       # the same architecture and DP optimizer
  budget = tfdp_prune.PrivacyBudget(spec, target_epsilon=...)
  sampler = tfdp_prune.PoissonSampler(data, q, gradient_accumulation_steps=K)
  step = restore_latest(directory, model, budget=budget, sampler=sampler) or 0
  model.fit(sampler.dataset(start_step=step), steps_per_epoch=K * (total_steps - step),
            callbacks=[budget, DPCheckpoint(directory, every_steps=10, budget=budget,
                                            sampler=sampler)])

Resuming continues epsilon and the step count: the ledger comes back from the sidecar, or from
`privacy_ledger.jsonl` when more steps ran after the checkpoint, and is never lowered
(`PrivacyBudget.restore`); `iterations` comes back with the optimizer. Steps re-run after a
resume from a checkpoint older than the ledger draw the same batches and noise (restored from
the checkpoint) and count once; randomness outside the checkpoint (below) makes them differ.
Randomness that lives outside the optimizer and the sampler (e.g. Dropout's) is not part of the
checkpoint: a resumed run with such layers is valid but not bit-identical to an uninterrupted one.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, Optional

from absl import logging

from tfdp_prune import _validate
from tfdp_prune import accounting
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune import version
from tfdp_prune import versioned_json
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

FORMAT_VERSION = 1
_SIDECAR_ENVELOPE = versioned_json.Envelope(version=FORMAT_VERSION)
POINTER = "latest"
SIDECAR = "checkpoint.json"
MARKER = "COMPLETE"
STATE_PREFIX = "state"
LEDGER = "privacy_ledger.jsonl"
_TMP_PREFIX = ".tmp-"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_RESERVED = ("model", "optimizer", "sampler")  # the names of checkpoint objects of our own
# The optimizer settings that decide what a logical step means for privacy: a resumed run must
# use the same ones, or the checkpointed ledger would describe another mechanism.
_DP_SETTINGS = ("l2_norm_clip", "noise_multiplier", "num_microbatches", "expected_batch_size",
                "gradient_accumulation_steps")


class CheckpointError(ValueError):
  """A checkpoint, or the privacy ledger, of a checkpoint directory is corrupt or unreadable.

  Nothing is deleted or rolled back: the message names the file and the choices."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint or the ledger could not be written (a full disk, a read-only file system).

  What was written before is kept: no earlier checkpoint is lost, the ledger does not go back,
  and a step whose ledger line could not be written does not run."""


# What writing raises on a full disk or a read-only file system (TF's own writers raise OpErrors).
_WRITE_FAULTS = (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError)


def _write_failed(what: str, path: str, error: Exception) -> CheckpointWriteError:
  reason = getattr(error, "strerror", None) or getattr(error, "message", None) or error
  return CheckpointWriteError(
      f"Cannot write {what} {path} ({reason}). Nothing written before was "
      "lost: the earlier checkpoints and the privacy ledger are intact. Free space on that file "
      "system (or make it writable), then rerun with the same flags to resume.")


CARRY_FLAG = "--carry_spend_from"


def _choices(directory) -> str:
  """The ways on from a damaged checkpoint directory whose ledger is intact."""
  return (f"Nothing was deleted. Either restore {directory} from a backup, or start a new run "
          f"that keeps the old spend on record: tfdp-train {CARRY_FLAG}={directory} "
          f"--checkpoint_dir=<a new directory> (Python: TrainConfig(carry_spend_from=...)) "
          f"reads {os.path.join(directory, LEDGER)} and counts its steps in the new run's "
          "epsilon, step limit and export.")


def _ledger_choices(directory) -> str:
  """A damaged ledger cannot be carried: the spent privacy is unknown."""
  return (f"Nothing was deleted. The privacy already spent on this data cannot be read, so it "
          f"cannot be carried into a new run either: restore {os.path.join(directory, LEDGER)} "
          "from a backup.")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A complete checkpoint: its directory, logical step and sidecar (`checkpoint.json`)."""
  path: str
  step: int
  metadata: Dict[str, Any]

  @property
  def state_prefix(self) -> str:
    """The `tf.train.Checkpoint` prefix of the model and optimizer state."""
    return os.path.join(self.path, STATE_PREFIX)


# ---- reading ------------------------------------------------------------------------------------

def latest_checkpoint(directory: str) -> Optional[CheckpointInfo]:
  """The complete checkpoint with the most logical steps in `directory`, or None.

  Temporary (`.tmp-*`) directories are ignored. A `ckpt-*` directory newer than the newest
  intact checkpoint that is not intact itself (no completion marker, a sidecar that does not
  parse, a file of another size or SHA-256 than its sidecar records) raises `CheckpointError`
  naming it: falling back to an older checkpoint would roll the run back silently (the writer
  renames only complete checkpoints into place, so such a directory is damage, not a write in
  progress). Nothing is deleted here."""
  if not os.path.isdir(directory):
    return None
  found = []
  for name in os.listdir(directory):
    match = _CKPT_RE.match(name)
    if match:
      found.append((int(match.group(1)), os.path.join(directory, name)))
  for step, path in sorted(found, reverse=True):
    info, problem = _inspect(path, step)
    if info is None:
      raise CheckpointError(
          f"Checkpoint {path} is corrupt or unreadable ({problem}); resuming from an older one "
          f"would roll the run back. {_choices(directory)}")
    return info
  return None


def read_ledger(directory: str) -> Optional[Dict[str, Any]]:
  """The record with the most logical steps in `directory/LEDGER`, `{"state": <PrivacyLedger
  state>, "iterations": <the optimizer's iterations after those steps>}`, or None without a
  ledger file.

  The ledger is append-only: one line per record, the record and its SHA-256, fsync'ed before
  the steps it covers run. A last line without its
  newline is a write that a kill interrupted (its steps never ran) and is ignored; any other
  line that does not parse or match its digest raises `CheckpointError`."""
  records = _ledger_records(directory)
  if records is None:
    return None
  best = max(records, key=lambda body: body["state"]["steps"])
  return {"state": best["state"], "iterations": best["iterations"]}


def read_carried(directory: str) -> Optional[Dict[str, Any]]:
  """What the ledger of `directory` carried from an older run when it began (`{"path": the
  old ledger, "sha256": its digest then, "steps": its steps}`), or None (no ledger, or one that
  began at 0 steps). Raises CheckpointError as `read_ledger`."""
  records = _ledger_records(directory)
  return None if not records else records[0].get("carried")


def ledger_file_digest(directory: str) -> str:
  """The SHA-256 of `directory/LEDGER` as it is now (what a carried spend records)."""
  return _digest_file(os.path.join(directory, LEDGER))


def start_carried_ledger(directory: str, state: Dict[str, Any],
                         carried: Dict[str, Any]) -> None:
  """Begins the ledger of a new run's `directory` at an old run's spend: its first line records
  `state` (the old steps, before any step of the new run: iterations 0) and `carried` (where
  they come from). A ledger that already began with the same carried spend (a resumed new run)
  is left as it is; any other ledger there is refused: that directory belongs to another run."""
  os.makedirs(directory, exist_ok=True)
  existing = read_carried(directory)
  if existing is None and read_ledger(directory) is None:
    append_ledger(directory, state, 0, carried=carried)
    return
  if existing != carried:
    raise CheckpointError(
        f"{os.path.join(directory, LEDGER)} belongs to another run (it began "
        f"{'with no carried spend' if existing is None else f'carrying {existing}'}, not "
        f"{carried}). Pass a new directory for the run that carries the old spend.")


def _ledger_records(directory: str):
  """Every record of `directory/LEDGER` in order (`{"state", "iterations"[, "carried"]}`), or
  None without a ledger file; see `read_ledger` for what is refused."""
  path = os.path.join(directory, LEDGER)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise CheckpointError(f"Cannot read the privacy ledger {path} ({e}). "
                          f"{_ledger_choices(directory)}") from e
  lines = data.split(b"\n")
  lines.pop()  # after the last newline: empty, or a write a kill interrupted
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line.decode("utf-8"))
      body = {key: record[key] for key in ("state", "iterations", "carried") if key in record}
      if record["sha256"] != _digest_json(body) or not isinstance(body["state"].get("steps"),
                                                                    int):
        raise ValueError("its digest does not match")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"The privacy ledger {path} is corrupt at line {number} ({e}). "
                            f"{_ledger_choices(directory)}") from e
    records.append(body)
  return records


def append_ledger(directory: str, state: Dict[str, Any], iterations: int,
                  carried: Optional[Dict[str, Any]] = None) -> None:
  """Appends `state` (a `PrivacyLedger` state, the spent budget once the optimizer reaches
  `iterations`) to `directory/LEDGER` and makes it durable (fsync of the file, and of the
  directory when the file is new) before returning. `carried`: see `start_carried_ledger`."""
  path = os.path.join(directory, LEDGER)
  new = not os.path.exists(path)
  body = {"state": state, "iterations": int(iterations)}
  if carried is not None:
    body["carried"] = carried
  line = json.dumps(dict(body, sha256=_digest_json(body)), sort_keys=True) + "\n"
  try:
    _append_line(path, line)
    if new:
      _fsync(directory)
  except OSError as error:  # the step it covers has not run: the ledger did not go back
    raise _write_failed("the privacy ledger", path, error) from error


def _append_line(path: str, line: str) -> None:
  """Appends `line` to the ledger file and fsyncs it (a torn earlier append is cut first)."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    if size:  # drop the tail of an append a kill interrupted (it covered no step that ran)
      with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
          f.seek(0)
          keep = f.read().rfind(b"\n") + 1
          logging.warning("DPCheckpoint: %s ends in an interrupted write; truncating it to %d "
                          "bytes.", path, keep)
          os.ftruncate(fd, keep)
    view = memoryview(line.encode("utf-8"))
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)


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
  if info is None:
    if ledger is not None and ledger["iterations"] > 0:
      raise CheckpointError(
          f"{os.path.join(directory, LEDGER)} records {ledger['state']['steps']} logical "
          f"steps already spent, but {directory} holds no checkpoint to continue from. "
          f"{_choices(directory)}")
    if ledger is not None and budget is not None:  # a carried spend, no step of this run yet
      budget.restore(ledger["state"])
    return None
  metadata = info.metadata
  if not model.built:
    raise ValueError("restore_latest needs a built model (its variables must exist): build it "
                     "(e.g. with keras.Input) before restoring.")
  _check_model(metadata.get("model"), _model_record(model, optimizer), info.path)
  _check_settings(metadata["optimizer"], _dp_settings(optimizer), info.path)
  if sampler is not None:
    saved = metadata.get("sampler")
    if saved is None:
      raise ValueError(f"Checkpoint {info.path} was written without a sampler; cannot check "
                       f"that {type(sampler).__name__} continues its data. Pass sampler=None.")
    current = _sampler_record(sampler)
    if current != saved:
      raise ValueError(
          f"The sampler differs from the checkpointed one, so it would not continue the same "
          f"draws. Checkpointed: {saved}. Received: {current}. Rebuild it with "
          f"{saved['class']}.from_config(<checkpointed config>, data).")
  trackables = _check_trackables(trackables)
  missing = sorted(set(trackables) - set(metadata.get("trackables", [])))
  if missing:
    raise ValueError(f"Checkpoint {info.path} holds no {missing}; it holds "
                     f"{metadata.get('trackables', [])} besides the model and optimizer.")
  optimizer.build(model.trainable_variables)
  _check_state_layout(metadata.get("optimizer_state_layout"), _state_layout(model, optimizer),
                      info.path)
  try:
    status = tf.train.Checkpoint(**_checkpoint_objects(model, trackables, sampler)).read(
        info.state_prefix)
    status.assert_existing_objects_matched()
  except tf.errors.DataLossError as e:  # TF's own checksums (sidecars before SHA-256)
    raise CheckpointError(f"Checkpoint {info.path} is corrupt ({e}). "
                          f"{_choices(directory)}") from e
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


# ---- writing ------------------------------------------------------------------------------------

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
    self.trackables = _check_trackables(trackables)
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
        **_SIDECAR_ENVELOPE.header(),
        "tfdp_prune_version": _library_version(),
        "step": step,
        "optimizer": _dp_settings(optimizer),
        "optimizer_state_layout": _state_layout(self.model, optimizer),
        "budget": ledger,
        "sampler": _sampler_record(self.sampler) if self.sampler is not None else None,
        "trackables": sorted(self.trackables),
        "model": _model_record(self.model, optimizer),
        "run_record": self.run_record,
    }
    path = write_checkpoint(self.directory, self.model, metadata, keep=self.keep,
                            trackables=self.trackables, sampler=self.sampler)
    self._last_saved = step
    self._pending = False
    return path


def write_checkpoint(directory: str, model, metadata: Dict[str, Any],
                     keep: Optional[int] = 3,
                     trackables: Optional[Dict[str, Any]] = None, sampler=None) -> str:
  """Writes `ckpt-<metadata["step"]>` atomically (see the module docstring): the model, its
  optimizer, `trackables` (by name) and the sampler's secret (`sampler.state`, if a sampler is
  given), with `metadata` as the sidecar; points `latest` at it and keeps the `keep` newest
  complete checkpoints. Returns the checkpoint's directory."""
  step = int(metadata["step"])
  try:
    return _write_checkpoint(directory, step, model, metadata, keep, trackables, sampler)
  except _WRITE_FAULTS as error:  # a full disk, a read-only file system: the old ones intact
    raise _write_failed("the checkpoint", os.path.join(directory, f"ckpt-{step}"),
                        error) from error


def _write_checkpoint(directory, step, model, metadata, keep, trackables, sampler) -> str:
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f"{_TMP_PREFIX}ckpt-{step}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    tf.train.Checkpoint(**_checkpoint_objects(model, _check_trackables(trackables),
                                              sampler)).write(os.path.join(tmp, STATE_PREFIX))
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    digests = {name: _digest_file(os.path.join(tmp, name)) for name in files}
    _write_file(os.path.join(tmp, SIDECAR),
                json.dumps(dict(metadata, files=files, sha256=digests), indent=1, sort_keys=True))
    for name in files:
      _fsync(os.path.join(tmp, name))
    _write_file(os.path.join(tmp, MARKER), "complete\n")
    _fsync(tmp)
    final = os.path.join(directory, f"ckpt-{step}")
    replaced = None
    if os.path.exists(final):  # the same step saved again: move the old one aside first
      replaced = os.path.join(directory, f"{_TMP_PREFIX}replaced-{uuid.uuid4().hex[:8]}")
      os.rename(final, replaced)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync(directory)
  if replaced is not None:
    _remove(replaced)
  replace_file(os.path.join(directory, POINTER), f"ckpt-{step}\n")
  if keep is not None:
    _prune(directory, keep)
  return final


def clean_incomplete(directory: str) -> None:
  """Deletes `.tmp-*` entries (leftovers of a killed writer, never read). `ckpt-*` directories
  are never deleted here, damaged or not. Only the directory's one writer may call this: it
  would delete a write in progress."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name.startswith(_TMP_PREFIX):
      path = os.path.join(directory, name)
      logging.info("DPCheckpoint: deleting the leftover %s.", path)
      _remove(path)


# ---- internals ----------------------------------------------------------------------------------

def _read_complete(path, step) -> Optional[CheckpointInfo]:
  """The checkpoint at `path` if it is intact, else None."""
  return _inspect(path, step)[0]


def _inspect(path, step):
  """(the checkpoint at `path`, None) if it is intact (marker, sidecar for `step`, every file at
  its recorded size and SHA-256), else (None, what is wrong, naming the file)."""
  sidecar = os.path.join(path, SIDECAR)
  if not os.path.isfile(os.path.join(path, MARKER)):
    return None, f"no completion marker {os.path.join(path, MARKER)}"
  try:
    with open(sidecar, encoding="utf-8") as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    return None, f"{sidecar} is unreadable: {e}"
  if (_SIDECAR_ENVELOPE.problem(metadata) is not None
      or metadata.get("step") != step or not isinstance(metadata.get("files"), dict)
      or not any(n.startswith(STATE_PREFIX + ".index") for n in metadata["files"])):
    return None, f"{sidecar} does not describe a format {FORMAT_VERSION} checkpoint of step {step}"
  digests = metadata.get("sha256") or {}
  for name, size in metadata["files"].items():
    file = os.path.join(path, name)
    try:
      if os.path.getsize(file) != size:
        return None, f"{file} has {os.path.getsize(file)} bytes, its sidecar records {size}"
      if name in digests and _digest_file(file) != digests[name]:
        return None, f"{file} does not match the SHA-256 its sidecar records"
    except OSError as e:
      return None, f"{file} is unreadable: {e}"
  return CheckpointInfo(path=path, step=step, metadata=metadata), None


def _prune(directory, keep):
  """Deletes intact checkpoints older than the `keep` newest intact ones (never a damaged one,
  never one newer than the newest intact one)."""
  complete = []
  for name in os.listdir(directory):
    match = _CKPT_RE.match(name)
    if match and _read_complete(os.path.join(directory, name), int(match.group(1))):
      complete.append((int(match.group(1)), name))
  for _, name in sorted(complete)[:-keep]:
    _remove(os.path.join(directory, name))


def _digest_file(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _digest_json(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _remove(path):
  """Renames `path` to a `.tmp-*` name (atomic), then deletes it: never a half-deleted ckpt."""
  directory, name = os.path.split(path)
  if not name.startswith(_TMP_PREFIX):
    doomed = os.path.join(directory, f"{_TMP_PREFIX}delete-{uuid.uuid4().hex[:8]}-{name}")
    os.rename(path, doomed)
    _fsync(directory)
    path = doomed
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


def replace_file(path: str, text: str) -> None:
  """Replaces the file `path` by `text` atomically and durably: a temporary `.tmp-*` file in
  the same directory, fsync, one `os.replace`, fsync of the directory."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
  _write_file(tmp, text)
  os.replace(tmp, path)
  _fsync(directory or ".")


def _write_file(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _fsync(path):
  """Flushes a file's or a directory's entry to disk (a directory for its renames)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _check_trackables(trackables) -> Dict[str, Any]:
  trackables = dict(trackables or {})
  for name, value in trackables.items():
    if (not isinstance(name, str) or not name.isidentifier() or name in _RESERVED
        or not isinstance(value, tf.__internal__.tracking.Trackable)):
      raise ValueError(f"Expected trackables to map names (identifiers other than "
                       f"{', '.join(repr(r) for r in _RESERVED)}) to trackable objects "
                       f"(tf.Module, tf.Variable, ...). Received: {name!r}: {value!r}.")
  return trackables


def _state_layout(model, optimizer) -> list:
  """For each variable the optimizer's state was built for (in build order: the positions of its
  masks, accumulators and slots in the checkpoint), its position in `model.weights`: the same
  in every process that builds the same architecture, whatever the layer names."""
  position = {w.ref(): i for i, w in enumerate(model.weights)}
  return [position.get(v.ref(), -1) for v in optimizer.state_variables()]


def _check_state_layout(saved, current, path) -> None:
  """The optimizer's per-variable state is checkpointed by position: restoring it into an
  optimizer built for another trainable set would give one variable another's mask."""
  if saved is not None and list(saved) != list(current):
    raise ValueError(
        f"Checkpoint {path} holds DP optimizer state (update masks, accumulators, slots) for "
        f"the model weights at positions {saved} of `model.weights`, in that order; this "
        f"model's optimizer is built for {current}. Restoring would give variables each "
        "other's masks. Expected the same trainable layers as the run that wrote it: restore "
        "first, then change `trainable` and recompile with the same optimizer.")


def _checkpoint_objects(model, trackables, sampler) -> Dict[str, Any]:
  """What `tf.train.Checkpoint` saves and restores: model, optimizer, the sampler's secret."""
  objects = dict(trackables, model=model, optimizer=model.optimizer)
  if sampler is not None:
    objects["sampler"] = sampler.state
  return objects


def _model_record(model, optimizer) -> Dict[str, Any]:
  """What identifies the model a checkpoint belongs to: the optimizer's class and the shapes of
  `model.weights`, in order."""
  return {"optimizer": type(optimizer).__name__,
          "weight_shapes": [[int(d) for d in w.shape] for w in model.weights]}


def _check_model(saved, current, path) -> None:
  if saved is None or saved == current:
    return
  if saved["optimizer"] != current["optimizer"]:
    what = f"a {saved['optimizer']} optimizer, this model has a {current['optimizer']}"
  else:
    what = (f"{len(saved['weight_shapes'])} weights of shapes {saved['weight_shapes']}, this "
            f"model has {len(current['weight_shapes'])} of shapes {current['weight_shapes']}")
  raise ValueError(f"Checkpoint {path} belongs to another model: it holds {what}. Build and "
                   "compile the same architecture and optimizer as the run that wrote it, or "
                   "use another checkpoint directory.")


def _dp_settings(optimizer) -> Dict[str, Any]:
  return {name: getattr(optimizer, name) for name in _DP_SETTINGS}


def _check_settings(saved, current, path):
  differ = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
  if differ:
    details = ", ".join(f"{k}: checkpointed {a!r}, now {b!r}" for k, (a, b) in differ.items())
    raise ValueError(f"The DP optimizer's settings differ from checkpoint {path} ({details}); "
                     "the steps taken were accounted with the checkpointed settings. Compile "
                     "the model with the same DP settings to resume.")


def _sampler_record(sampler) -> Dict[str, Any]:
  # Through JSON, so that the record compares equal to one read back from a sidecar.
  return json.loads(json.dumps({"class": type(sampler).__name__,
                                "config": sampler.get_config()}))


def _library_version() -> str:
  return version.__version__
