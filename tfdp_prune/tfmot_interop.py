"""Models wrapped with tfmot's `prune_low_magnitude`: our public-data masks replace tfmot's.

`adopt_masks(model, variables, masks)` makes each `PruneLowMagnitude` wrapper hold our mask and
stop following its own schedule; the mask callbacks call it. tfmot is never imported here.

Design: docs/tfmot-interop.md
"""

import sys
import weakref
from typing import Sequence

import numpy as np

from tfdp_prune import compat
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

_TFMOT_PACKAGE = "tensorflow_model_optimization"

# Wrappers whose schedule `adopt_masks` already replaced (weakly held: models come and go).
_ADOPTED = weakref.WeakSet()


class PublicMaskSchedule:
  """A tfmot pruning schedule that never updates the mask: the mask is set from public data by
  tfdp_prune. Reports the wrapper's current sparsity (the frozen fraction of its masks), so
  tfmot's `PruningSummaries` stays meaningful. Called like a tfmot `PruningSchedule`:
  `schedule(step) -> (should_prune, sparsity)`. It lives only in the wrapper's `pruning_obj`:
  the wrapper's `pruning_schedule` attribute (its saved config) stays the user's, so a saved
  wrapped model loads with tfmot alone."""

  def __init__(self, mask_variables: Sequence[tf.Variable]):
    self._mask_variables = list(mask_variables)

  def __call__(self, step):
    del step  # the mask never changes with the step
    if not self._mask_variables:
      return tf.constant(False), tf.constant(0.0)
    kept = tf.add_n([tf.reduce_sum(tf.cast(m, tf.float32)) for m in self._mask_variables])
    total = float(sum(int(np.prod(m.shape)) for m in self._mask_variables))
    return tf.constant(False), 1.0 - kept / total


def pruning_wrappers(model: keras.Model) -> list:
  """The tfmot `PruneLowMagnitude` wrappers in `model` (nested models included), in the order
  of their weights in `model.variables`; [] when tfmot was never imported, without importing
  it."""
  if _TFMOT_PACKAGE not in sys.modules:
    return []
  wrapper_class = compat.tfmot().pruning_wrapper.PruneLowMagnitude
  wrappers = [m for m in model.submodules if isinstance(m, wrapper_class)]
  position = {v.ref(): i for i, v in enumerate(model.variables)}
  first = lambda w: min((position.get(v.ref(), len(position)) for v in w.variables),
                        default=len(position))
  return sorted(wrappers, key=first)


def adopt_masks(model: keras.Model, variables: Sequence[tf.Variable], masks) -> list:
  """Makes the tfmot pruning wrappers of `model` hold `masks` and never re-prune on their own.

  Args:
    model: a tf_keras model, wrapped with tfmot's `prune_low_magnitude` in whole or in part.
      Without wrappers this does nothing (and never imports tfmot).
    variables: variables of `model` (e.g. the maskable ones, `MaskableSpec().variables(model)`).
    masks: one boolean (or 0/1) array per variable, True = kept, False = pruned (zero). The mask
      of each variable that a wrapper prunes is written into that wrapper's mask variable;
      variables no wrapper prunes (biases, unwrapped layers) are skipped.

  Every wrapper of the model (whether or not one of `variables` is its weight) gets a schedule
  that never fires, and its step counter is started (-1 -> 0) so that training without tfmot's
  `UpdatePruningStep` callback passes the wrapper's check. A train function traced before with
  tfmot's schedule is discarded. This does not zero any weight: the caller does (as
  `ParameterFreezing` does), or tfmot does at its wrapper's next forward pass.

  Returns the wrapper mask variables written, aligned with `variables` (None where skipped).
  """
  variables, masks = list(variables), list(masks)
  if len(variables) != len(masks):
    raise ValueError(f"Expected one mask per variable. Received {len(masks)} masks for "
                     f"{len(variables)} variables.")
  wrappers = take_over_schedules(model)
  mask_of = {weight.ref(): mask_variable for wrapper in wrappers
             for weight, mask_variable, _ in wrapper.pruning_vars}
  written = []
  for variable, mask in zip(variables, masks):
    mask_variable = mask_of.get(variable.ref())
    if mask_variable is not None:
      mask = np.asarray(mask)
      if mask.shape != tuple(mask_variable.shape):
        raise ValueError(f"Expected a mask of shape {tuple(mask_variable.shape)} for variable "
                         f"'{variable.name}'. Received shape {mask.shape}.")
      mask_variable.assign(tf.cast(mask.astype(bool), mask_variable.dtype))
    written.append(mask_variable)
  return written


def take_over_schedules(model: keras.Model) -> list:
  """The first half of `adopt_masks`, for code that trains a wrapped model before any mask is
  chosen (public pre-training): every tfmot wrapper of `model` keeps its current mask and never
  updates it again; its step counter is started. Returns the wrappers ([] without any)."""
  wrappers = pruning_wrappers(model)
  if not wrappers:
    return []
  tfmot = compat.tfmot()
  replaced = False
  for wrapper in wrappers:
    if not wrapper.built:
      raise ValueError(f"The tfmot wrapper '{wrapper.name}' is not built yet; build the model "
                       "(call it once, or give it an Input) before adopting masks.")
    if wrapper not in _ADOPTED:
      _never_prune(wrapper, tfmot)
      _ADOPTED.add(wrapper)
      replaced = True
    if int(wrapper.pruning_step.numpy()) < 0:
      wrapper.pruning_step.assign(0)  # what UpdatePruningStep does at its train begin
  if replaced and getattr(model, "train_function", None) is not None:
    # A traced train step would still run the replaced schedule; fit reads this attribute at
    # every step, so a new (not yet traced) function takes over even inside a running fit.
    model.train_function = model.make_train_function(force=True)
  return wrappers


def _never_prune(wrapper, tfmot):
  """Gives `wrapper` a pruning object whose schedule never updates the mask. Block sparsity and
  m-by-n sparsity only shape tfmot's own mask updates, so the new object needs neither (with
  m-by-n set, tfmot would update the mask at step 1 whatever the schedule says)."""
  wrapper.pruning_obj = tfmot.pruning_impl.Pruning(
      training_step_fn=lambda: wrapper.pruning_step,
      pruning_vars=wrapper.pruning_vars,
      pruning_schedule=PublicMaskSchedule([m for _, m, _ in wrapper.pruning_vars]),
      block_size=(1, 1),
      block_pooling_type="AVG")
