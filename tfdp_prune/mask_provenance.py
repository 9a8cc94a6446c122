"""What chose a DP optimizer's update masks: the record an export reads to label them.

The mask callbacks (`ParameterFreezing`, `ParameterSelection`) pass a `MaskProvenance` to
`optimizer.set_update_masks(..., provenance=...)`; the optimizer keeps it with a digest of the
masks it then holds. Masks set without one (by hand, or restored from a checkpoint) have no
recorded rule, and a digest that no longer matches means the masks changed after the rule set
them: `privacy_label.from_budget` refuses both rather than guess what chose them.
"""

import collections
import dataclasses
import hashlib
from typing import Any, Dict, Optional, Sequence

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import mask_modes
from tfdp_prune import overlap


@dataclasses.dataclass(frozen=True, eq=False)
class MaskProvenance:
  """The rule, mode and public data behind a set of update masks.

  Attributes:
    mode: "freeze" (chosen once) or "select" (re-chosen every `select_every` steps).
    rule: `rule_record(rule, select_every, frozen_value)`: the record the privacy metadata's `mask_rule` holds.
    public_fingerprint: the identity of the public data the callback used (pre-training and the
      rule), or None when it had none.
    public_examples: the per-example fingerprints of that public data, kept in memory only (for
      the overlap check against the private data); never published.
    masks_digest: `masks_digest` of ALL the optimizer's masks right after they were set (the
      optimizer fills it in).
  """

  mode: str
  rule: Dict[str, Any]
  public_fingerprint: Optional[overlap.PublicDataFingerprint] = None
  public_examples: Optional[collections.Counter] = None
  masks_digest: Optional[str] = None

  def __post_init__(self):
    _validate.one_of("mode", self.mode, mask_modes.MASKED)


def rule_record(rule, select_every: Optional[int],
                frozen_value: Optional[str] = None) -> Dict[str, Any]:
  """The `mask_rule` of the privacy metadata: the rule's name and sparsity, how often it
  re-selects (None: chosen once), the rule's full config (scope, seed, ...) and, for a freezing
  mask, what the frozen coordinates hold ("zero" or "keep"; the key is left out otherwise, as
  in records written before it existed)."""
  record = {"name": rule.name, "sparsity": rule.sparsity, "select_every": select_every,
            "config": rule.get_config()}
  if frozen_value is not None:
    record["frozen_value"] = frozen_value
  return record


def masks_digest(masks: Sequence[Any]) -> str:
  """sha256 of the masks' shapes and trained/frozen pattern, in order (1/True = trained)."""
  digest = hashlib.sha256()
  for mask in masks:
    trained = np.asarray(mask) > 0
    digest.update(repr(trained.shape).encode())
    digest.update(np.packbits(trained).tobytes())
  return digest.hexdigest()
