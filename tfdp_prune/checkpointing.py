"""One checkpoint for a DP run: model, optimizer, privacy ledger and sampler, written atomically.

A checkpoint directory holds, per saved logical step s, a directory `ckpt-<s>` with
  state.index, state.data-*   `tf.train.Checkpoint(model=..., optimizer=..., sampler=...)`: the
                              weights and every optimizer variable: `iterations` (logical steps),
                              the update masks, the noise generator's state (DESIGN.md rule 8),
                              the gradient accumulators and the micro-step counter, the base
                              optimizer's slots; and the sampler's secret (`sampler.state`);
  checkpoint.json             the sidecar: the logical step, the `PrivacyBudget` ledger (rule 9),
                              the sampler's class and `get_config()` (its settings, not its
                              secret), the optimizer's DP settings, the tfdp_prune version, and
                              the size of every file above;
  COMPLETE                    the completion marker, written last;
and a pointer file `latest` naming the newest committed checkpoint (for people and tools).

A checkpoint holds the mechanism's secrets (the noise generator's state, the sampler's secret),
so that a resumed run continues the same noise and the same draws: keep checkpoints private,
like the data. Nothing of them goes into an export.

Atomic writes (a kill at any instant leaves either the old or the new checkpoint, never a torn
one): everything is written into a temporary directory `.tmp-*` inside the checkpoint directory,
every file and the directory are fsync'ed, the directory is renamed to `ckpt-<s>` (one rename,
atomic on POSIX), the parent is fsync'ed, then `latest` is replaced the same way (temporary file,
fsync, `os.replace`). Old checkpoints are first renamed to `.tmp-*` and only then deleted, so a
kill during a deletion cannot leave a `ckpt-*` directory with missing files either.

Readers trust only COMPLETE checkpoints: a `ckpt-<s>` directory with the marker, a sidecar that
parses and names step s, and every listed file present with its recorded size. `.tmp-*`
directories and incomplete `ckpt-*` directories are never read; the writer (`DPCheckpoint`, one
per directory) deletes them when training begins. `latest_checkpoint` picks the complete
checkpoint with the most logical steps (`latest` may lag by one after a kill between the rename
and the pointer update; that checkpoint is complete all the same).

Checkpoints are taken only between logical batches (`optimizer.at_logical_batch_start()`), so
the accumulators are zero and a resumed run restarts its sampler exactly at a logical step:

  model = build_and_compile()                       # the same architecture and DP optimizer
  budget = tfdp_prune.PrivacyBudget(spec, target_epsilon=...)
  sampler = tfdp_prune.PoissonSampler(data, q, gradient_accumulation_steps=K)
  step = restore_latest(directory, model, budget=budget, sampler=sampler) or 0
  model.fit(sampler.dataset(start_step=step), steps_per_epoch=K * (total_steps - step),
            callbacks=[budget, DPCheckpoint(directory, every_steps=10, budget=budget,
                                            sampler=sampler)])

Resuming continues epsilon and the step count: the ledger comes back from the sidecar and is
never lowered (`PrivacyBudget.restore`), `iterations` comes back with the optimizer.
Randomness that lives outside the optimizer and the sampler (e.g. Dropout's) is not part of the
checkpoint: a resumed run with such layers is valid but not bit-identical to an uninterrupted one.
"""

import dataclasses
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, Optional

from absl import logging

from tfdp_prune import _validate
from tfdp_prune import version
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.optimizer import DPOptimizerMixin

FORMAT_VERSION = 1
POINTER = "latest"
SIDECAR = "checkpoint.json"
MARKER = "COMPLETE"
STATE_PREFIX = "state"
_TMP_PREFIX = ".tmp-"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_RESERVED = ("model", "optimizer", "sampler")  # the names of checkpoint objects of our own
# The optimizer settings that decide what a logical step means for privacy: a resumed run must
# use the same ones, or the checkpointed ledger would describe another mechanism.
_DP_SETTINGS = ("l2_norm_clip", "noise_multiplier", "num_microbatches", "expected_batch_size",
                "gradient_accumulation_steps")


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

  Temporary (`.tmp-*`) and incomplete `ckpt-*` directories are ignored (never deleted here: a
  reader may run beside the writer)."""
  if not os.path.isdir(directory):
    return None
  best = None
  for name in os.listdir(directory):
    match = _CKPT_RE.match(name)
    if not match or (best is not None and int(match.group(1)) <= best.step):
      continue
    info = _read_complete(os.path.join(directory, name), int(match.group(1)))
    if info is not None:
      best = info
  return best


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
  optimizer = _dp_optimizer(model, "restore_latest")
  info = latest_checkpoint(directory)
  if info is None:
    return None
  metadata = info.metadata
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
  if not model.built:
    raise ValueError("restore_latest needs a built model (its variables must exist): build it "
                     "(e.g. with keras.Input) before restoring.")
  trackables = _check_trackables(trackables)
  missing = sorted(set(trackables) - set(metadata.get("trackables", [])))
  if missing:
    raise ValueError(f"Checkpoint {info.path} holds no {missing}; it holds "
                     f"{metadata.get('trackables', [])} besides the model and optimizer.")
  optimizer.build(model.trainable_variables)
  _check_state_layout(metadata.get("optimizer_state_layout"), _state_layout(model, optimizer),
                      info.path)
  status = tf.train.Checkpoint(**_checkpoint_objects(model, trackables, sampler)).read(
      info.state_prefix)
  status.assert_existing_objects_matched()
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
    keep: the number of newest checkpoints kept (older ones are deleted).
    trackables: more state to save in the same checkpoint, by name: e.g. {"ema": ema.state}
      for `ExponentialMovingAverage` (Keras callbacks are not trackable; their state is).

  At train begin, leftovers of an interrupted writer (`.tmp-*` directories, incomplete `ckpt-*`)
  are deleted. `save()` writes a checkpoint at once (between logical batches only).
  """

  def __init__(self, directory: str, every_steps: Optional[int] = None, every_epoch: bool = False,
               budget=None, sampler=None, keep: int = 3,
               trackables: Optional[Dict[str, Any]] = None):
    super().__init__()
    if every_steps is not None:
      _validate.positive_int("every_steps", every_steps)
    if not isinstance(every_epoch, bool):
      raise ValueError(f"Expected every_epoch to be a bool. Received: every_epoch={every_epoch!r}.")
    if every_steps is None and not every_epoch:
      raise ValueError("Expected every_steps=<int> or every_epoch=True (when to save). Received "
                       "neither.")
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
    self._last_saved = None
    self._pending = False

  def get_config(self) -> Dict[str, Any]:
    """The settings (the budget and sampler objects are not part of it)."""
    return {"directory": self.directory, "every_steps": self.every_steps,
            "every_epoch": self.every_epoch, "keep": self.keep}

  @classmethod
  def from_config(cls, config: Dict[str, Any], budget=None, sampler=None,
                  trackables=None) -> "DPCheckpoint":
    return cls(**config, budget=budget, sampler=sampler, trackables=trackables)

  # ---- callback hooks ---------------------------------------------------------------------

  def on_train_begin(self, logs=None):
    optimizer = _dp_optimizer(self.model, "DPCheckpoint")
    if (self.sampler is not None and self.sampler.gradient_accumulation_steps
        != optimizer.gradient_accumulation_steps):
      raise ValueError(
          f"The sampler's gradient_accumulation_steps={self.sampler.gradient_accumulation_steps} "
          f"differs from the optimizer's {optimizer.gradient_accumulation_steps}.")
    os.makedirs(self.directory, exist_ok=True)
    clean_incomplete(self.directory)
    self._last_saved = int(optimizer.iterations.numpy())  # nothing new to save yet
    self._pending = False

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
    optimizer = _dp_optimizer(self.model, "DPCheckpoint")
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
        "format_version": FORMAT_VERSION,
        "tfdp_prune_version": _library_version(),
        "step": step,
        "optimizer": _dp_settings(optimizer),
        "optimizer_state_layout": _state_layout(self.model, optimizer),
        "budget": ledger,
        "sampler": _sampler_record(self.sampler) if self.sampler is not None else None,
        "trackables": sorted(self.trackables),
    }
    path = write_checkpoint(self.directory, self.model, metadata, keep=self.keep,
                            trackables=self.trackables, sampler=self.sampler)
    self._last_saved = step
    self._pending = False
    return path


def write_checkpoint(directory: str, model, metadata: Dict[str, Any], keep: int = 3,
                     trackables: Optional[Dict[str, Any]] = None, sampler=None) -> str:
  """Writes `ckpt-<metadata["step"]>` atomically (see the module docstring): the model, its
  optimizer, `trackables` (by name) and the sampler's secret (`sampler.state`, if a sampler is
  given), with `metadata` as the sidecar; points `latest` at it and keeps the `keep` newest
  complete checkpoints. Returns the checkpoint's directory."""
  step = int(metadata["step"])
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f"{_TMP_PREFIX}ckpt-{step}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    tf.train.Checkpoint(**_checkpoint_objects(model, _check_trackables(trackables),
                                              sampler)).write(os.path.join(tmp, STATE_PREFIX))
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    _write_file(os.path.join(tmp, SIDECAR),
                json.dumps(dict(metadata, files=files), indent=1, sort_keys=True))
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
  _prune(directory, keep)
  return final


def clean_incomplete(directory: str) -> None:
  """Deletes `.tmp-*` entries and incomplete `ckpt-*` directories (leftovers of a killed
  writer). Only the directory's one writer may call this: it would delete a write in progress."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    match = _CKPT_RE.match(name)
    if name.startswith(_TMP_PREFIX):
      logging.info("DPCheckpoint: deleting the leftover %s.", path)
      _remove(path)
    elif match and _read_complete(path, int(match.group(1))) is None:
      logging.warning("DPCheckpoint: deleting the incomplete checkpoint %s.", path)
      _remove(path)


# ---- internals ----------------------------------------------------------------------------------

def _read_complete(path, step) -> Optional[CheckpointInfo]:
  """The checkpoint at `path` if it is complete (marker, sidecar for `step`, files intact)."""
  try:
    if not os.path.isfile(os.path.join(path, MARKER)):
      return None
    with open(os.path.join(path, SIDECAR), encoding="utf-8") as f:
      metadata = json.load(f)
    if (not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION
        or metadata.get("step") != step or not isinstance(metadata.get("files"), dict)
        or not any(n.startswith(STATE_PREFIX + ".index") for n in metadata["files"])):
      return None
    for name, size in metadata["files"].items():
      if os.path.getsize(os.path.join(path, name)) != size:
        return None
  except (OSError, ValueError):
    return None
  return CheckpointInfo(path=path, step=step, metadata=metadata)


def _prune(directory, keep):
  complete = []
  for name in os.listdir(directory):
    match = _CKPT_RE.match(name)
    if match and _read_complete(os.path.join(directory, name), int(match.group(1))):
      complete.append((int(match.group(1)), name))
  for _, name in sorted(complete)[:-keep]:
    _remove(os.path.join(directory, name))


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


def _dp_optimizer(model, who):
  optimizer = getattr(model, "optimizer", None)
  if not isinstance(optimizer, DPOptimizerMixin):
    raise ValueError(f"{who} checkpoints a model compiled with a tfdp_prune DP optimizer; the "
                     f"model is compiled with {optimizer!r}.")
  return optimizer


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
