"""The run record, `checkpoint_dir/run.json`: the settings a checkpointed run was trained under.

Written once, atomically, when a run starts; a resume is checked against it (and against the
copy the newest checkpoint carries), so that a checkpoint is never resumed under settings that
would misreport its privacy. `tfdp-export` rebuilds a checkpointed model from it.
"""

import json
import os
from typing import Any, Dict

from tfdp_prune import accounting
from tfdp_prune import atomic_files
from tfdp_prune import checkpoint_format
from tfdp_prune import data as data_lib
from tfdp_prune import versioned_json
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

RUN_RECORD = "run.json"
_RUN_RECORD_ENVELOPE = versioned_json.Envelope(version=1)
# Settings that may change between a run and its resumption: output and placement, and the
# length (a longer run under the same noise multiplier; with a target epsilon another length
# calibrates another sigma, and the privacy_spec check refuses it).
_RESUMABLE_CHANGES = ("checkpoint_dir", "export_dir", "export_version", "overwrite", "verbose",
                      "strategy", "data_dir", "steps", "epochs", "export_choice")


def write_or_check_run_record(config: TrainConfig, info: data_lib.DataInfo,
                              spec: accounting.PrivacySpec, planned_steps: int,
                              expected_batch_size: float) -> Dict[str, Any]:
  """Writes the run's record into the checkpoint directory, or checks that the existing one
  describes the same run (a checkpoint resumed under other settings would misreport privacy);
  returns the record, for `DPCheckpoint(run_record=...)`. `spec` is the run's privacy spec
  (steps=0), `planned_steps` its logical steps, `expected_batch_size` its sampler's.

  The newest checkpoint carries the record it was trained under: a resume is checked against it
  as well (and against it alone if `run.json` was removed; `run.json` is then written again).
  Settings are compared as resolved: spelling out a default (`--sparsity=0.8`) is no change.

  Raises:
    ConfigError: other settings than the recorded ones; `run.json` unreadable; `run.json`
      missing beside checkpoints that carry no record.
    checkpoint_errors.CheckpointError: the newest checkpoint is damaged.
  """
  record = {**_RUN_RECORD_ENVELOPE.header(), "config": config.to_dict(),
            "data_info": info.to_dict(), "privacy_spec": spec.to_dict(),
            "planned_steps": planned_steps, "expected_batch_size": expected_batch_size}
  record = json.loads(json.dumps(record))  # as it reads back
  directory = config.checkpoint_dir
  path = os.path.join(directory, RUN_RECORD)
  newest = checkpoint_format.latest_checkpoint(directory)
  recorded = [] if newest is None or newest.metadata.get("run_record") is None else [
      (os.path.join(newest.path, checkpoint_format.SIDECAR), newest.metadata["run_record"])]
  if os.path.exists(path):
    recorded.insert(0, (path, read_run_record(directory)))
  elif newest is not None and not recorded:
    raise ConfigError(
        f"Expected {path} beside the checkpoints in --checkpoint_dir={directory} (the settings "
        f"they were trained under), and {newest.path} carries none. Received a directory without "
        "it. Restore run.json from a backup, or use a new --checkpoint_dir.")
  for source, existing in recorded:
    differences = _record_differences(existing, record)
    if differences:
      raise ConfigError(
          f"--checkpoint_dir={directory} holds a run with other settings ({source}: "
          f"{'; '.join(differences)}). Resume with the same settings, or use a new "
          "--checkpoint_dir.")
  if not os.path.exists(path):
    os.makedirs(directory, exist_ok=True)
    kept = recorded[0][1] if recorded else record  # the settings the checkpoints were under
    atomic_files.replace_file(path, json.dumps(kept, indent=1, sort_keys=True))
  return recorded[0][1] if recorded else record


def read_run_record(checkpoint_dir: str) -> Dict[str, Any]:
  """The run's record, `checkpoint_dir/run.json` (ConfigError naming it if missing or
  unreadable)."""
  path = os.path.join(checkpoint_dir, RUN_RECORD)
  if not os.path.isfile(path):
    raise ConfigError(f"Expected {path} (written by tfdp-train --checkpoint_dir). Received a "
                      "directory without it: was this directory written by tfdp-train?")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError(f"a JSON {type(record).__name__}, not an object")
  except (OSError, ValueError) as e:
    raise ConfigError(
        f"The run record {path} is unreadable ({e}). Restore it from a backup (the newest "
        f"checkpoint's {checkpoint_format.SIDECAR} holds a copy under \"run_record\"), or use a "
        "new --checkpoint_dir. Nothing was changed.") from e
  problem = _RUN_RECORD_ENVELOPE.problem(record, path)
  if problem is not None:
    raise ConfigError(problem)
  return record


def _record_differences(existing, new) -> list:
  differences = []
  old_config, new_config = _resolved(existing["config"]), _resolved(new["config"])
  for name in sorted(set(old_config) | set(new_config)):
    if name not in _RESUMABLE_CHANGES and old_config.get(name) != new_config.get(name):
      differences.append(f"--{name}: {old_config.get(name)!r} there, {new_config.get(name)!r} now")
  for name in ("data_info", "privacy_spec", "expected_batch_size"):
    if existing.get(name) != new.get(name):
      differences.append(f"{name} differs")
  return differences


def _resolved(config: Dict[str, Any]) -> Dict[str, Any]:
  """A config's settings with the defaults that apply filled in, as training uses them."""
  try:
    resolved = TrainConfig.from_dict(config)
  except (ConfigError, TypeError):
    return dict(config)
  return dict(config, rule=resolved.effective_rule, sparsity=resolved.effective_sparsity,
              select_every=resolved.effective_select_every,
              frozen_value=resolved.effective_frozen_value,
              # Records from before the public-only guard held no public part out.
              public_validation_fraction=config.get("public_validation_fraction", 0.0),
              physical_batch_size=config.get("physical_batch_size") or config.get("batch_size"))
