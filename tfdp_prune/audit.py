"""Empirical privacy audit of one training run: an epsilon lower bound and a membership AUC.

  result = tfdp_prune.audit.audit_training(config, AuditConfig(canaries=200))

This module runs the audit (one `training.train` call); the statistics are in
`audit_statistics` and `audit_bounds`, the canaries in `audit_canaries`.

Design: docs/audit.md
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tfdp_prune import audit_canaries
from tfdp_prune import audit_statistics
from tfdp_prune import _validate
from tfdp_prune import data as data_lib
from tfdp_prune import metadata as metadata_lib
from tfdp_prune import train_config
from tfdp_prune import training
from tfdp_prune.export import saved_model as export_lib
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

METHOD = "one-run audit (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846)"
CANARY_TYPE = "input-space: held-out private examples with a random wrong label"
# The default export directory of an audit is the config's with this suffix (the audited model
# was trained with mislabelled canaries: it must not become the served version by accident).
EXPORT_SUFFIX = "_audit"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditConfig:
  """The audit's settings; the field names are `tfdp-audit`'s flag names.

  Attributes:
    canaries: m, the number of canaries taken out of the private part.
    canary_seed: seed of the canaries' choice, wrong labels and inclusion.
    confidence: the confidence of the epsilon lower bound.
    k_plus, k_minus: fixed guess counts ("included" for the k+ highest scores, "excluded" for
      the k- lowest); both None: the best of `guess_grid(m)`, Bonferroni-corrected.
  """

  # The help texts are the flags' ({default}: the field's default).
  canaries: int = train_config.setting(
      200, "Canaries m taken out of the private part, each put back mislabelled with "
      "probability 1/2 (default: {default}).")
  canary_seed: int = train_config.setting(
      0, "Seed of the canaries' choice, labels and inclusion (default: {default}).")
  confidence: float = train_config.setting(
      0.95, "Confidence of the epsilon lower bound (default: {default}).")
  k_plus: Optional[int] = train_config.setting(
      None, "Guess 'included' for this many highest-scoring canaries (with --k_minus; default: "
      "the best of a fixed grid, Bonferroni-corrected).")
  k_minus: Optional[int] = train_config.setting(
      None, "Guess 'excluded' for this many lowest-scoring canaries (with --k_plus).")

  def __post_init__(self):
    train_config.check_setting(_validate.positive_int, "canaries", self.canaries)
    train_config.check_setting(_validate.non_negative_int, "canary_seed", self.canary_seed)
    train_config.check_setting(_validate.open_unit_interval, "confidence", self.confidence)
    if (self.k_plus is None) != (self.k_minus is None):
      raise ConfigError(f"Give both --k_plus and --k_minus (fixed guess counts) or neither (the "
                        f"best of a fixed grid, Bonferroni-corrected). Received: "
                        f"--k_plus={self.k_plus}, --k_minus={self.k_minus}.")
    if self.k_plus is not None:
      train_config.check_setting(_validate.non_negative_int, "k_plus", self.k_plus)
      train_config.check_setting(_validate.non_negative_int, "k_minus", self.k_minus)
      if not 1 <= self.k_plus + self.k_minus <= self.canaries:
        raise ConfigError(f"Expected 1 <= --k_plus + --k_minus <= --canaries (each canary is "
                          f"guessed at most once). Received: --k_plus={self.k_plus}, "
                          f"--k_minus={self.k_minus}, --canaries={self.canaries}.")

  def guess_counts(self) -> Tuple[Tuple[int, int], ...]:
    """The (k+, k-) candidates: the fixed pair, or the default grid."""
    if self.k_plus is not None:
      return ((self.k_plus, self.k_minus),)
    return audit_statistics.guess_grid(self.canaries)


@dataclasses.dataclass(frozen=True, eq=False)
class AuditResult:
  """The audited run (`training.TrainResult`, trained without export), the audit record (what
  went into `metadata.empirical["audit"]`), the metadata with it, and the export's path."""

  train_result: training.TrainResult
  audit: Dict[str, Any]
  metadata: metadata_lib.PrivacyMetadata
  export_path: Optional[str]


# ---- scoring ----------------------------------------------------------------------------------

def log_probabilities(model, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """log p(label | x) under `model` (which outputs logits), float64: the attack's score."""
  logits = np.asarray(model.predict(x, batch_size=256, verbose=0), np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return log_softmax[np.arange(len(labels)), labels]


# ---- the audited run ---------------------------------------------------------------------------

def audit_training(config: TrainConfig, audit_config: Optional[AuditConfig] = None, *,
                   splits: Optional[data_lib.DataSplits] = None) -> AuditResult:
  """Trains `config` once with canaries, audits it, and exports it (with `config.export_dir`)
  with the audit in its metadata; see the module docstring.

  Args:
    config: the run to audit (its export settings are used for the one export at the end).
    audit_config: the audit's settings; None: `AuditConfig()`.
    splits: data already loaded; None loads `config.dataset`.
  """
  audit_config = AuditConfig() if audit_config is None else audit_config
  if not isinstance(config, TrainConfig):
    raise TypeError(f"Expected a tfdp_prune.TrainConfig. Received: {type(config).__name__}.")
  if not isinstance(audit_config, AuditConfig):
    raise TypeError(f"Expected a tfdp_prune.audit.AuditConfig. Received: "
                    f"{type(audit_config).__name__}.")
  if config.ema_decay:
    raise ConfigError(f"tfdp-audit cannot audit --ema_decay={config.ema_decay} runs yet: the "
                      "exported model would be the EMA average, which training does not hand "
                      "back to score. Drop --ema_decay.")
  training.check_export_target(config)  # an existing version is refused before training
  splits = splits if splits is not None else training.load_data(config)
  if splits.test is None or not len(splits.test[1]):
    raise ConfigError("Expected a test part (the membership-inference non-members: examples "
                      "never trained on). Received --test_split= (none). Give a --test_split.")
  data = audit_canaries.add_canaries(splits, audit_config.canaries, audit_config.canary_seed)
  train_result = training.train(dataclasses.replace(config, export_dir=None),
                                splits=data.splits)
  model, metadata = train_result.model, train_result.metadata

  canaries = data.canaries
  audit = audit_statistics.one_run_audit(
      log_probabilities(model, canaries.x, canaries.labels), canaries.included,
      delta=config.delta, confidence=audit_config.confidence,
      guess_counts=audit_config.guess_counts())
  members, nonmembers = _mia_examples(data.members, splits.test, audit_config.canary_seed)
  auc = audit_statistics.membership_auc(log_probabilities(model, *members),
                                        log_probabilities(model, *nonmembers))
  record = audit_record(audit, audit_config, auc, len(members[1]), len(nonmembers[1]),
                        int(canaries.included.sum()))
  metadata = metadata.with_empirical({**(metadata.empirical or {}), "audit": record})
  export_path = None
  if config.export_dir:
    export_path = export_lib.export_saved_model(
        model, config.export_dir, metadata, version=config.export_version,
        overwrite=config.overwrite)  # synthetic warmup requests: no test or canary rows
  if config.verbose:
    print(summary(metadata, export_path))
  return AuditResult(train_result=train_result, audit=record, metadata=metadata,
                     export_path=export_path)


def audit_record(audit: audit_statistics.OneRunAudit, audit_config: AuditConfig,
                 mia_auc: float, mia_members: int, mia_nonmembers: int,
                 included: int) -> Dict[str, Any]:
  """The JSON-compatible record stored as `metadata.empirical["audit"]`."""
  return {
      "method": METHOD,
      "canary_type": CANARY_TYPE,
      "score": "log-probability of the canary's (wrong) label",
      "m": audit.m,
      "included": included,
      "canary_seed": audit_config.canary_seed,
      "k_plus": audit.k_plus,
      "k_minus": audit.k_minus,
      "guesses": audit.guesses,
      "correct": audit.correct,
      "guess_selection": ("fixed a priori" if audit.candidates == 1 else
                          f"best of {audit.candidates} fixed (k+, k-) pairs, Bonferroni"),
      "candidates": audit.candidates,
      "confidence": audit.confidence,
      "test_confidence": audit.test_confidence,
      "delta": audit.delta,
      "epsilon_lower_bound": audit.epsilon_lower_bound,
      "mia_auc": mia_auc,
      "mia_score": "log-probability of the true label (minus the loss)",
      "mia_members": mia_members,
      "mia_nonmembers": mia_nonmembers,
      "mia_nonmember_source": "test part (never trained on)",
      "note": "measured, NOT proven: a lower bound on epsilon at the stated confidence",
  }


def summary(metadata: metadata_lib.PrivacyMetadata, export_path: Optional[str]) -> str:
  """The lines `tfdp-audit` prints after training's own: the audit next to the proven epsilon."""
  audit = metadata.empirical["audit"]
  proven = (f"epsilon = {metadata.epsilon:.4g}, delta = {training.delta_text(metadata)}"
            if metadata.private else "NON-PRIVATE (epsilon = inf)")
  lines = [
      f"proven: {proven}",
      f"audit (measured, not proven): epsilon >= {audit['epsilon_lower_bound']:.4f} at "
      f"{audit['confidence']:g} confidence, delta = {audit['delta']:g} ({audit['correct']} of "
      f"{audit['guesses']} guesses correct, k+ = {audit['k_plus']}, k- = {audit['k_minus']}, "
      f"m = {audit['m']} canaries, {audit['guess_selection']})",
      f"membership inference (loss threshold): AUC = {audit['mia_auc']:.4f} "
      f"({audit['mia_members']} members, {audit['mia_nonmembers']} non-members)"]
  if export_path:
    lines.append(f"exported: {export_path}")
  return "\n".join(lines)


def run(config_name: str = "default", audit_settings: Optional[Dict[str, Any]] = None,
        **overrides) -> AuditResult:
  """`tfdp-audit`'s one call: the named config with the given training settings, audited with
  `audit_settings` (AuditConfig fields). Without an `export_dir` override the export goes to
  the config's export directory + "_audit"."""
  audit_config = AuditConfig(**(audit_settings or {}))
  if "export_dir" not in overrides:
    default = train_config.named_config(config_name).export_dir
    overrides["export_dir"] = default + EXPORT_SUFFIX if default else None
  return audit_training(train_config.resolve(config_name, overrides), audit_config)


# ---- internals ----------------------------------------------------------------------------------

def _mia_examples(members, test, seed):
  """As many members (a seeded sample of the non-canary private examples trained on) as
  non-members (the test part, or a sample of it when it is the larger)."""
  count = min(len(members[1]), len(test[1]))
  rng = np.random.default_rng([seed, 1])  # a stream apart from the canaries'
  chosen = np.sort(rng.choice(len(members[1]), count, replace=False))
  held_out = np.sort(rng.choice(len(test[1]), count, replace=False))
  return ((members[0][chosen], members[1][chosen]), (test[0][held_out], test[1][held_out]))
