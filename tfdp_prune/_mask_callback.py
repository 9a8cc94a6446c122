"""What the two mask callbacks share: compute masks with a rule, hand them to the DP optimizer
with a record of what chose them (`mask_provenance`), and report their sparsity in the fit
logs."""

import numpy as np

from tfdp_prune import mask_provenance
from tfdp_prune import masks as masks_lib
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune import overlap
from tfdp_prune import public_data as public_data_lib
from tfdp_prune import tfmot_interop
from tfdp_prune.compat import keras
from tfdp_prune.maskable import MaskableSpec

SPARSITY_LOG = "mask_sparsity"


class MaskCallback(keras.callbacks.Callback):
  """Base of ParameterFreezing and ParameterSelection (not for direct use)."""

  mask_mode = None  # mask_modes.FREEZE or SELECT: the metadata's mask_mode

  def __init__(self, rule, public_data=None, maskable=None):
    super().__init__()
    if not isinstance(rule, masks_lib.MaskRule):
      raise ValueError("Expected rule to be a MaskRule (tfdp_prune.MagnitudeRule(sparsity=...), "
                       f"RandomRule, PublicGradientRule). Received: rule={rule!r}.")
    if isinstance(rule, masks_lib.PublicGradientRule) and public_data is None:
      raise ValueError("The public_gradient rule needs public_data=(x, y) or a tf.data.Dataset "
                       "of (x, y) batches of PUBLIC examples. Received: public_data=None.")
    if public_data is not None:  # every accepted form, before any training
      public_data_lib.check(public_data, source=f"{type(self).__name__}(public_data=...)")
    self.rule = rule
    self.public_data = public_data
    self.maskable = maskable if maskable is not None else MaskableSpec()
    self.masks = None  # the masks last set, aligned with `self.masked_variables`
    self.masked_variables = None
    self._public_identity = None  # (public_data, its fingerprints): computed once

  def _optimizer(self):
    optimizer = optimizer_lib.require_dp_optimizer(
        self.model, f"{type(self).__name__} (which sets update masks on it)")
    if not self.model.built:  # building the optimizer now would give it no variables
      raise ValueError(
          f"{type(self).__name__} needs the weights of model '{self.model.name}' to set its "
          "masks before the first step, and the model has none yet (declared without an input "
          "shape). `model.fit` builds it from the shapes of its training data (a tf.data "
          "Dataset, arrays, or a keras.utils.Sequence; not a Python generator); otherwise "
          "declare the input (`keras.Input(shape)` as the first layer) or call "
          "`model.build((None, *input_shape))` before training.")
    optimizer.build(self.model.trainable_variables)
    return optimizer

  def _select(self, round_index):
    """Computes masks with the rule and sets them on the optimizer."""
    optimizer = self._optimizer()
    variables = self.maskable.variables(self.model)
    masks = self.rule.masks(self.model, variables, round_index, self.public_data)
    optimizer.set_update_masks(variables, masks, provenance=self.provenance())
    pruned = masks if self._prunes() else [np.ones(np.shape(m), bool) for m in masks]
    tfmot_interop.adopt_masks(self.model, variables, pruned)  # no-op without tfmot wrappers
    self.masked_variables, self.masks = variables, masks
    return variables, masks

  def provenance(self) -> mask_provenance.MaskProvenance:
    """What chooses this callback's masks: mode, rule and the public data's identity."""
    examples, fingerprint = self._public_identity_of_data()
    return mask_provenance.MaskProvenance(
        mode=self.mask_mode,
        rule=mask_provenance.rule_record(self.rule, self._select_every(), self._frozen_value()),
        public_examples=examples, public_fingerprint=fingerprint)

  def _public_identity_of_data(self):
    """(per-example fingerprints, PublicDataFingerprint) of the public data, or (None, None);
    computed once per public_data object (selection asks at every re-selection)."""
    if self.public_data is None:
      return None, None
    if self._public_identity is None or self._public_identity[0] is not self.public_data:
      examples = overlap.fingerprint_examples(self.public_data)
      self._public_identity = (self.public_data, examples,
                               overlap.PublicDataFingerprint.from_fingerprints(examples))
    return self._public_identity[1:]

  def _select_every(self):
    """Logical steps between two selections; None: the mask is chosen once."""
    return None

  def _frozen_value(self):
    """What a frozen coordinate holds, for the record ("zero" or "keep"); None: not recorded
    (selection keeps the unselected coordinates at their current values by definition)."""
    return None

  def _prunes(self) -> bool:
    """Whether the frozen coordinates are pruned (held at zero), which tfmot's masks mean."""
    return False

  def sparsity_logs(self) -> dict:
    """`mask_sparsity`: frozen fraction of ALL trainable coordinates; `mask_sparsity/<var>`:
    frozen fraction of each masked variable."""
    if self.masks is None:
      return {}
    overall, per_variable = masks_lib.frozen_fractions(self.model, self.masked_variables,
                                                       self.masks)
    logs = {f"{SPARSITY_LOG}/{name}": value for name, value in per_variable.items()}
    logs[SPARSITY_LOG] = overall
    return logs

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs.update(self.sparsity_logs())

  def get_config(self) -> dict:
    return {"rule": masks_lib.serialize(self.rule), "maskable": self.maskable.get_config()}

  @classmethod
  def _config_kwargs(cls, config, public_data):
    config = dict(config)
    config["rule"] = masks_lib.deserialize(config["rule"])
    config["maskable"] = MaskableSpec.from_config(config["maskable"])
    return dict(config, public_data=public_data)

  @classmethod
  def from_config(cls, config, public_data=None):
    """Public data is not part of the config: pass it again."""
    return cls(**cls._config_kwargs(config, public_data))
