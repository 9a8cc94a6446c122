"""Parameter selection (gradient dropping): a new mask every `select_every` logical steps."""

from tfdp_prune import _mask_callback
from tfdp_prune import _validate
from tfdp_prune import mask_modes


class ParameterSelection(_mask_callback.MaskCallback):
  """Chooses the coordinates to update every `select_every` logical steps (optimizer
  iterations), before the step: from the current weights (magnitude: post-processing of DP
  outputs, free), from randomness, or from public-data gradients. Unselected coordinates keep
  their value; only selected ones receive noise and move. With gradient accumulation, a new mask
  is only set between logical batches, never inside one.
  """

  mask_mode = mask_modes.SELECT

  def __init__(self, rule, select_every=1, public_data=None, maskable=None):
    super().__init__(rule, public_data, maskable)
    _validate.positive_int("select_every", select_every)
    self.select_every = select_every

  def _select_every(self):
    return self.select_every

  def on_train_begin(self, logs=None):
    self._round = 0
    self._selected_at = None  # the optimizer iteration the current mask was chosen for

  def on_train_batch_begin(self, batch, logs=None):
    optimizer = self._optimizer()
    iteration = int(optimizer.iterations.numpy())
    if (optimizer.at_logical_batch_start() and iteration % self.select_every == 0
        and iteration != self._selected_at):
      self._select(self._round)
      self._round += 1
      self._selected_at = iteration

  def get_config(self):
    return dict(super().get_config(), select_every=self.select_every)
