"""A new run that keeps an old run's privacy spend on record (`--carry_spend_from`).

When a run's checkpoints are damaged (or lost), the privacy it spent is still on record in its
append-only ledger (`privacy_ledger_file.LEDGER`). A new run on the same private data may continue
from there: its ledger begins at the old steps, so its epsilon, its step limit, its metadata and
its model card count them. This is plain self-composition of one mechanism (the steps of both
runs are steps of the same DP-SGD mechanism on the same data, so the accountant counts them as
one run's), which is why the old spend must have been made with the same mechanism (noise
multiplier, sampling method and rate, accountant and its grid, delta) on the same private data;
composing different mechanisms is not supported, and is refused.
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional

from tfdp_prune import accounting
from tfdp_prune import privacy_ledger_file
from tfdp_prune.train_config import ConfigError

# What identifies the private part in a run's record (`DataInfo.to_dict()`): the same names,
# split and size; for digits (one split, ordered by the seed) also the seed.
_PRIVATE_DATA_KEYS = ("dataset", "private_split", "num_private")
_DIGITS = "digits"


@dataclasses.dataclass(frozen=True)
class CarriedSpend:
  """The old run's spend: its ledger `state` (a `PrivacySpec` dict with its steps) and `source`
  (`{"path": the old ledger, "sha256": its digest, "steps": its steps}`, for the new ledger, the
  metadata's statement and the model card)."""

  state: Dict[str, Any]
  source: Dict[str, Any]

  @property
  def steps(self) -> int:
    return int(self.state["steps"])


def read(old_directory: str, old_record: Optional[Dict[str, Any]],
         spec: accounting.PrivacySpec, data_info: Dict[str, Any]) -> CarriedSpend:
  """The spend on record in `old_directory`'s ledger, checked to be carriable into a run of
  `spec` (steps=0) on the private data `data_info` (`DataInfo.to_dict()`).

  Args:
    old_directory: the old run's checkpoint directory (its checkpoints may be damaged).
    old_record: the old run's record (`run.json`, or a checkpoint's copy), or None if neither
      can be read.

  Raises:
    ConfigError: no ledger there, no record of the old run's data, another mechanism, or other
      private data.
    checkpoint_errors.CheckpointError: the old ledger is damaged (then nothing can be carried).
  """
  ledger = privacy_ledger_file.read_ledger(old_directory)
  ledger_path = os.path.join(old_directory, privacy_ledger_file.LEDGER)
  flag = f"{privacy_ledger_file.CARRY_FLAG}={old_directory}"
  if ledger is None:
    raise ConfigError(
        f"Expected a privacy ledger {ledger_path} (written "
        f"by tfdp-train --checkpoint_dir). Received: {flag}, which holds none. Pass the "
        "checkpoint directory of the run whose spend is to be carried.")
  if old_record is None:
    raise ConfigError(
        f"Expected the old run's record (run.json, or a checkpoint's copy) in {old_directory}, "
        f"to check that its spend was made on the same private data. Received: {flag} without "
        "a readable one. Restore run.json from a backup.")
  old_spec = accounting.PrivacySpec.from_dict(ledger["state"])
  problems = mechanism_differences(old_spec, spec) + data_differences(
      old_record.get("data_info") or {}, data_info)
  if problems:
    raise ConfigError(
        f"Expected the spend in {flag} to be of the same mechanism on the same private data as "
        f"this run (steps of one DP-SGD mechanism compose by counting them; composing different "
        f"mechanisms is not supported). Received: {'; '.join(problems)}. Run with the old "
        "settings (--noise_multiplier, --batch_size, --sampling, --accountant, --delta, the "
        "data flags), or start from scratch without carrying.")
  source = {"path": os.path.abspath(ledger_path),
            "sha256": privacy_ledger_file.ledger_file_digest(old_directory),
            "steps": int(ledger["state"]["steps"])}
  return CarriedSpend(state=ledger["state"], source=source)


def mechanism_differences(old: accounting.PrivacySpec, new: accounting.PrivacySpec) -> List[str]:
  """The settings (all of `PrivacySpec` but its steps) in which two specs differ."""
  old_settings = dataclasses.asdict(old.with_steps(0))
  new_settings = dataclasses.asdict(new.with_steps(0))
  return [f"{name}: {old_settings[name]!r} there, {new_settings[name]!r} now"
          for name in old_settings if old_settings[name] != new_settings[name]]


def data_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """How two runs' private parts differ, by what their records hold."""
  keys = _PRIVATE_DATA_KEYS + (("seed",) if new.get("dataset") == _DIGITS else ())
  return [f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
          for key in keys if old.get(key) != new.get(key)]


def statement(source: Dict[str, Any]) -> str:
  """The sentence the metadata's statement (and so the model card) ends with."""
  return (f" {source['steps']} of these steps were spent by an earlier run on the same data "
          f"and are carried into this guarantee (privacy ledger {source['path']}, SHA-256 "
          f"{source['sha256']}).")
