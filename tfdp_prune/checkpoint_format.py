"""A checkpoint directory's format: `ckpt-<s>` directories, written atomically, read if intact.

`write_checkpoint`, `latest_checkpoint` (a damaged newest checkpoint is a `CheckpointError`,
never a silent fallback), `clean_incomplete`. Checkpoints hold the mechanism's secrets: keep
them private.

Design: docs/checkpoints.md
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Dict, Optional

from absl import logging

from tfdp_prune import _digests
from tfdp_prune import atomic_files
from tfdp_prune import versioned_json
from tfdp_prune.checkpoint_errors import CheckpointError
from tfdp_prune.checkpoint_errors import write_failed
from tfdp_prune.compat import tf
from tfdp_prune.privacy_ledger_file import CARRY_FLAG
from tfdp_prune.privacy_ledger_file import LEDGER

FORMAT_VERSION = 1
SIDECAR_ENVELOPE = versioned_json.Envelope(version=FORMAT_VERSION)
POINTER = "latest"
SIDECAR = "checkpoint.json"
MARKER = "COMPLETE"
STATE_PREFIX = "state"
_TMP_PREFIX = atomic_files.TMP_PREFIX
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_RESERVED = ("model", "optimizer", "sampler")  # the names of checkpoint objects of our own

# What writing raises on a full disk or a read-only file system (TF's own writers raise OpErrors).
_WRITE_FAULTS = (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError)

def damaged_choices(directory) -> str:
  """The ways on from a damaged checkpoint directory whose ledger is intact."""
  return (f"Nothing was deleted. Either restore {directory} from a backup, or start a new run "
          f"that keeps the old spend on record: tfdp-train {CARRY_FLAG}={directory} "
          f"--checkpoint_dir=<a new directory> (Python: TrainConfig(carry_spend_from=...)) "
          f"reads {os.path.join(directory, LEDGER)} and counts its steps in the new run's "
          "epsilon, step limit and export.")


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
          f"would roll the run back. {damaged_choices(directory)}")
    return info
  return None


# ---- writing ------------------------------------------------------------------------------------

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
    raise write_failed("the checkpoint", os.path.join(directory, f"ckpt-{step}"),
                       error) from error


def _write_checkpoint(directory, step, model, metadata, keep, trackables, sampler) -> str:
  os.makedirs(directory, exist_ok=True)
  tmp = atomic_files.temporary_path(directory, f"ckpt-{step}-{os.getpid()}")
  os.mkdir(tmp)
  try:
    tf.train.Checkpoint(**checkpoint_objects(model, check_trackables(trackables),
                                             sampler)).write(os.path.join(tmp, STATE_PREFIX))
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    digests = {name: _digests.file_digest(os.path.join(tmp, name)) for name in files}
    atomic_files.write_durably(os.path.join(tmp, SIDECAR), json.dumps(
        dict(metadata, files=files, sha256=digests), indent=1, sort_keys=True))
    for name in files:
      atomic_files.fsync(os.path.join(tmp, name))
    atomic_files.write_durably(os.path.join(tmp, MARKER), "complete\n")
    atomic_files.fsync(tmp)
    final = os.path.join(directory, f"ckpt-{step}")
    replaced = None
    if os.path.exists(final):  # the same step saved again: move the old one aside first
      replaced = atomic_files.temporary_path(directory, "replaced")
      os.rename(final, replaced)
    atomic_files.rename_into_place(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if replaced is not None:
    atomic_files.remove(replaced)
  atomic_files.replace_file(os.path.join(directory, POINTER), f"ckpt-{step}\n")
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
      atomic_files.remove(path)


def check_trackables(trackables) -> Dict[str, Any]:
  """`trackables` as a dict, checked: identifiers (not ours) mapped to trackable objects."""
  trackables = dict(trackables or {})
  for name, value in trackables.items():
    if (not isinstance(name, str) or not name.isidentifier() or name in _RESERVED
        or not isinstance(value, tf.__internal__.tracking.Trackable)):
      raise ValueError(f"Expected trackables to map names (identifiers other than "
                       f"{', '.join(repr(r) for r in _RESERVED)}) to trackable objects "
                       f"(tf.Module, tf.Variable, ...). Received: {name!r}: {value!r}.")
  return trackables


def checkpoint_objects(model, trackables, sampler) -> Dict[str, Any]:
  """What `tf.train.Checkpoint` saves and restores: model, optimizer, the sampler's secret."""
  objects = dict(trackables, model=model, optimizer=model.optimizer)
  if sampler is not None:
    objects["sampler"] = sampler.state
  return objects


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
  if (SIDECAR_ENVELOPE.problem(metadata) is not None
      or metadata.get("step") != step or not isinstance(metadata.get("files"), dict)
      or not any(n.startswith(STATE_PREFIX + ".index") for n in metadata["files"])):
    return None, f"{sidecar} does not describe a format {FORMAT_VERSION} checkpoint of step {step}"
  digests = metadata.get("sha256") or {}
  for name, size in metadata["files"].items():
    file = os.path.join(path, name)
    try:
      if os.path.getsize(file) != size:
        return None, f"{file} has {os.path.getsize(file)} bytes, its sidecar records {size}"
      if name in digests and _digests.file_digest(file) != digests[name]:
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
    atomic_files.remove(os.path.join(directory, name))
