"""Parameter freezing (pre-pruning): one mask, chosen before DP training, for the whole run."""

from tfdp_prune import _mask_callback
from tfdp_prune import _validate
from tfdp_prune import mask_modes
from tfdp_prune import tfmot_interop
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

FROZEN_VALUES = mask_modes.FROZEN_VALUES


class ParameterFreezing(_mask_callback.MaskCallback):
  """At the start of every `fit`: optionally train on the PUBLIC data without privacy for
  `public_epochs`, then choose the mask once with `rule` and set it on the DP optimizer.

  frozen_value="zero" prunes the frozen coordinates (they are 0 after train begin and stay
  exactly 0); "keep" leaves them at their current value (fine-tuning a subset).
  The public pre-training uses its own plain SGD optimizer (`public_learning_rate`,
  `public_batch_size`) and the model's loss, averaged over the batch; it never sees private data.
  """

  mask_mode = mask_modes.FREEZE

  def __init__(self, rule, public_data=None, frozen_value="zero", public_epochs=0,
               public_learning_rate=0.1, public_batch_size=64, maskable=None):
    super().__init__(rule, public_data, maskable)
    if frozen_value not in FROZEN_VALUES:
      raise ValueError(f"Expected frozen_value to be one of {FROZEN_VALUES}. Received: "
                       f"frozen_value={frozen_value!r}.")
    if public_epochs:
      _validate.positive_int("public_epochs", public_epochs)
      if public_data is None:
        raise ValueError(f"public_epochs={public_epochs} needs public_data to train on.")
    _validate.positive("public_learning_rate", public_learning_rate)
    _validate.positive_int("public_batch_size", public_batch_size)
    self.frozen_value = frozen_value
    self.public_epochs = public_epochs
    self.public_learning_rate = public_learning_rate
    self.public_batch_size = public_batch_size

  def on_train_begin(self, logs=None):
    if self.public_epochs:
      tfmot_interop.take_over_schedules(self.model)  # no-op without tfmot wrappers
      pretrain_on_public_data(self.model, self.public_data, self.public_epochs,
                              self.public_learning_rate, self.public_batch_size)
    variables, masks = self._select(round_index=0)
    if self.frozen_value == "zero":
      for variable, mask in zip(variables, masks):
        variable.assign(tf.where(mask, variable, tf.zeros_like(variable)))

  def _frozen_value(self):
    return self.frozen_value

  def _prunes(self):
    return self.frozen_value == "zero"

  def get_config(self):
    return dict(super().get_config(), frozen_value=self.frozen_value,
                public_epochs=self.public_epochs,
                public_learning_rate=self.public_learning_rate,
                public_batch_size=self.public_batch_size)


def pretrain_on_public_data(model, public_data, epochs, learning_rate, batch_size):
  """Non-private SGD on public data with the model's (per-example) loss, averaged.

  Under the model's tf.distribute strategy every replica takes the whole public batch and the
  optimizer sums the replicas' gradients, so each replica's loss is divided by their number."""
  loss_fn = model.loss
  strategy = model.distribute_strategy
  with strategy.scope():
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
  variables = model.trainable_variables

  def replica_step(x, y):
    with tf.GradientTape() as tape:
      loss = (tf.reduce_mean(loss_fn(y, model(x, training=True)))
              / strategy.num_replicas_in_sync)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

  @tf.function
  def step(x, y):
    strategy.run(replica_step, (x, y))

  if isinstance(public_data, tf.data.Dataset):
    batches = public_data
  else:
    batches = tf.data.Dataset.from_tensor_slices(tuple(public_data)).batch(batch_size)
  for _ in range(epochs):
    for x, y in batches:
      step(x, y)
