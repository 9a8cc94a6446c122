"""The privacy metadata of a DP run, built from the objects that ran it.

One builder (`build`) for both ways of training, so that the same run gets the same label:
`tfdp-train` (`training.build_metadata`: its config and the data it loaded) and a hand-written
`model.fit` (`from_budget(model, budget)`: the `PrivacyBudget`'s ledger and sampler, the model's
DP optimizer, and the `mask_provenance` its mask callbacks left on it). `from_budget` refuses
what it cannot label truthfully (see there). README: "Export and deploy with TF Serving".
"""

import dataclasses
import math
from typing import Any, Dict, Optional

import numpy as np

from tfdp_prune import accounting
from tfdp_prune import agreement
from tfdp_prune import carried_spend
from tfdp_prune import mask_modes
from tfdp_prune import metadata as metadata_lib
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune import overlap
from tfdp_prune import randomness
from tfdp_prune.maskable import MaskableSpec
from tfdp_prune.masks import frozen_fractions

# The statement's prefix for a run whose noise or sampling was seeded through the Python API.
INSECURE_STATEMENT = (
    f"{metadata_lib.INSECURE_PREFIX}: the DP noise or the batch sampling was derived from a seed "
    "(insecure_noise_seed / insecure_sampling_seed), so whoever knows or guesses that seed can "
    "reproduce and remove it; the guarantee that follows holds only against an adversary who "
    "cannot. ")
_NON_PRIVATE_FIX = ("To export it labelled NON-PRIVATE (epsilon = inf), call "
                    "export_saved_model(model, base) without budget=.")


# Defined with the schema, so that the export stage can catch it without importing this module.
LabelError = metadata_lib.LabelError


@dataclasses.dataclass(frozen=True)
class DataRecord:
  """What the metadata says about the data: sizes, names (None when unknown) and the public
  data's identity (`PublicDataFingerprint.to_dict()`, or None without public data)."""

  num_private: int
  num_public: int = 0
  num_test: int = 0
  public_fingerprint: Optional[Dict[str, Any]] = None
  dataset: Optional[str] = None
  public_dataset: Optional[str] = None
  public_split: Optional[str] = None
  private_split: Optional[str] = None
  seed: Optional[int] = None


def build(spec: accounting.PrivacySpec, model, *, expected_batch_size: float, data: DataRecord,
          mask_mode: str, mask_rule: Optional[Dict[str, Any]], mechanism_randomness: str,
          insecure_statement: str = INSECURE_STATEMENT,
          carried_statement: str = "") -> metadata_lib.PrivacyMetadata:
  """The `PrivacyMetadata` of `spec.steps` logical steps of `model`'s DP optimizer.

  delta is that of the guarantee (`spec.total_delta()`, the sampler's overflow term included);
  a run whose noise or sampling was seeded has a statement that starts with
  `insecure_statement` (INSECURE...); `carried_statement` (a carried earlier spend, which
  `spec.steps` counts) is appended. No seed of the mechanism is recorded.
  """
  epsilon = spec.epsilon()
  private = spec.noise_multiplier > 0 and math.isfinite(epsilon)
  masks = mask_summary(model, model.optimizer)
  statement = (spec.statement() if private else
               f"NON-PRIVATE: noise multiplier {spec.noise_multiplier}, no privacy guarantee.")
  if private and mechanism_randomness == randomness.INSECURE_SEED:
    statement = insecure_statement + statement
  statement += carried_statement
  return metadata_lib.PrivacyMetadata(
      private=private, epsilon=epsilon if private else math.inf, delta=spec.total_delta(),
      accountant=spec.accountant, statement=statement,
      privacy_spec=spec.to_dict(), noise_multiplier=spec.noise_multiplier,
      l2_norm_clip=model.optimizer.l2_norm_clip, sampling=spec.sampling,
      sampling_probability=spec.sampling_probability, batch_size=float(expected_batch_size),
      steps=spec.steps, epochs=spec.steps * expected_batch_size / data.num_private,
      dataset=data.dataset, public_dataset=data.public_dataset, public_split=data.public_split,
      private_split=data.private_split, num_private_examples=data.num_private,
      num_public_examples=data.num_public, num_test_examples=data.num_test,
      public_fingerprint=data.public_fingerprint, mask_mode=mask_mode, mask_rule=mask_rule,
      mask_sparsity=masks["mask_sparsity"],
      mask_sparsity_per_variable=masks["mask_sparsity_per_variable"],
      mechanism_randomness=mechanism_randomness, seed=data.seed,
      library_versions=metadata_lib.library_versions(), created=metadata_lib.utc_now())


def mechanism_randomness(*sources: str) -> str:
  """INSECURE_SEED if any component (optimizer, sampler, config) was seeded, else OS_ENTROPY."""
  return (randomness.INSECURE_SEED if randomness.INSECURE_SEED in sources
          else randomness.OS_ENTROPY)


def mask_summary(model, optimizer) -> Dict[str, Any]:
  """Frozen fraction of all trainable coordinates, and of each maskable variable (and of any
  other variable with a frozen coordinate), from the optimizer's current masks."""
  variables = MaskableSpec().variables(model)
  known = {v.ref() for v in variables}
  others = [v for v in optimizer.state_variables() if v.ref() not in known]
  variables += [v for v, m in zip(others, optimizer.update_masks(others))
                if not np.all(m.numpy() > 0)]
  overall, per_variable = frozen_fractions(
      model, variables, [m.numpy() for m in optimizer.update_masks(variables)])
  return {"mask_sparsity": overall, "mask_sparsity_per_variable": per_variable}


def from_budget(model, budget) -> metadata_lib.PrivacyMetadata:
  """The label of `model` trained by `model.fit` under `budget` (a `PrivacyBudget` built with
  `sampler=`; `budget.privacy_metadata(model)` calls this): epsilon and delta of the ledger's
  steps, the sampling, the optimizer's noise multiplier and clip, where the noise and sampling
  drew their randomness, the masks (mode, rule, sparsity) and the public data's identity that the
  mask callbacks recorded.

  Raises:
    LabelError: the model has no DP optimizer; the budget has no sampler; the budget counted
      another model's steps, none, or fewer than the optimizer took; the optimizer, the sampler
      and the budget's spec disagree (noise multiplier, expected batch size, sampling rate,
      accumulation); the optimizer holds masks without a record of the rule that chose them, or
      masks changed since; the mask callbacks' public data overlaps the private data.
  """
  optimizer = _dp_optimizer(model)
  sampler = _sampler(budget)
  spec = _counted_spec(model, budget, optimizer)
  try:
    agreement.check_agreement(optimizer, sampler=sampler, spec=budget.spec)
  except ValueError as error:
    raise LabelError(f"The export cannot be labelled with this budget: {error}") from None
  provenance = _checked_provenance(optimizer, sampler)
  fingerprint = provenance.public_fingerprint if provenance is not None else None
  return build(
      spec, model, expected_batch_size=sampler.expected_batch_size,
      data=DataRecord(num_private=sampler.num_examples,
                      num_public=fingerprint.num_examples if fingerprint is not None else 0,
                      public_fingerprint=fingerprint.to_dict() if fingerprint else None),
      mask_mode=provenance.mode if provenance is not None else mask_modes.NONE,
      mask_rule=provenance.rule if provenance is not None else None,
      mechanism_randomness=mechanism_randomness(optimizer.mechanism_randomness,
                                                sampler.mechanism_randomness),
      carried_statement=(carried_spend.statement(budget.carried_spend)
                         if budget.carried_spend is not None else ""))


# ---- checks -----------------------------------------------------------------------------------

def _dp_optimizer(model):
  return optimizer_lib.require_dp_optimizer(
      model, "Labelling the export private from budget=", error=LabelError,
      fix=f"Its training added no DP noise that the budget could account for. {_NON_PRIVATE_FIX}")


def _sampler(budget):
  if budget.sampler is None:
    raise LabelError(
        "Expected budget=PrivacyBudget(..., sampler=sampler) (the sampler whose dataset fed fit): "
        "the label states where the sampling drew its randomness and checks the sampling against "
        "the ledger. Received a budget built without sampler=. Build the budget with the sampler "
        "before training.")
  return budget.sampler


def _counted_spec(model, budget, optimizer) -> accounting.PrivacySpec:
  """The ledger's spec, once it is known to count every logical step the optimizer took."""
  if budget.model is not None and budget.model is not model:
    raise LabelError(
        "Expected the budget that counted this model's training (the PrivacyBudget passed to "
        "its fit callbacks). Received a budget last used with another model "
        f"({budget.model.name!r}, not {model.name!r}). Pass that model's budget.")
  iterations = int(optimizer.iterations.numpy())
  steps = budget.steps  # synchronized with the optimizer it counted
  if steps == 0:
    ran = (f"the optimizer took {iterations} step(s) the budget never counted: pass the budget "
           "in fit's callbacks (callbacks=[..., budget])" if iterations else
           "no DP step was taken: nothing private was released yet")
    raise LabelError(f"Expected a budget whose ledger counts the run's logical steps. Received a "
                     f"ledger with 0 steps; {ran}. {_NON_PRIVATE_FIX}")
  if steps < iterations:
    raise LabelError(
        f"Expected the budget's ledger to count at least the optimizer's {iterations} logical "
        f"steps. Received a ledger of {steps} steps: the label would understate epsilon. Pass "
        "the budget that was in fit's callbacks for the whole training.")
  return budget.ledger.spec


def _checked_provenance(optimizer, sampler):
  """The record of the rule behind the optimizer's masks (None when none is frozen), checked
  against the masks now held and against the private data (DESIGN.md rule 4)."""
  provenance = optimizer.mask_provenance
  if provenance is None:
    variables = optimizer.state_variables()
    if all(np.all(m.numpy() > 0) for m in optimizer.update_masks(variables)):
      return None
    raise LabelError(
        "Expected update masks set by ParameterFreezing or ParameterSelection, which record the "
        "rule, sparsity, mode and public data that chose them. Received an optimizer with frozen "
        "coordinates but no such record (masks set with set_update_masks by hand, or restored "
        "from a checkpoint): the label cannot say what chose them, nor that it was public. Set "
        "the masks with a mask callback in this process, or pass metadata= built by hand.")
  if provenance.masks_digest != optimizer.masks_digest():
    raise LabelError(
        f"Expected the update masks that {provenance.rule['name']} rule set ({provenance.mode} "
        "mode). Received other masks: they changed after the callback set them (a checkpoint "
        "restored, or set_update_masks by hand). Let the mask callback set the masks last.")
  if provenance.public_examples is not None:
    try:
      overlap.check_disjoint(provenance.public_examples, sampler.data)
    except overlap.OverlapError as error:
      raise LabelError(
          f"{error.found} Expected the mask callback's public_data to be disjoint from the "
          "private data the sampler draws from: masks chosen from private examples are not "
          "free of privacy cost, and the label would not cover them. Remove these examples "
          "from public_data and train again.") from None
  return provenance
