"""Parameter averaging: an exponential moving average (EMA) of the weights, one update per
LOGICAL step (De et al. 2022 evaluate DP models with EMA 0.9999).

`ExponentialMovingAverage` is a Keras callback; `averaged_weights()` swaps the average in for
evaluation or export; its state (`ema.state`) goes into checkpoints. It costs no privacy.

Design: docs/training.md
"""

import contextlib
from typing import Any, Dict

from absl import logging

from tfdp_prune import _validate
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


class EMAState(tf.Module):
  """The checkpointable state of an `ExponentialMovingAverage` (see the module docstring)."""

  def __init__(self):
    super().__init__(name="ema_state")
    self.averages = []
    self.num_updates = None
    self.initialized = None

  @property
  def built(self) -> bool:
    return self.num_updates is not None


class ExponentialMovingAverage(keras.callbacks.Callback):
  """EMA of the trainable weights, one update per logical step (see the module docstring).

  Args:
    decay: the EMA coefficient in [0, 1) (0.9999 in De et al.).
    use_warmup: mu_t = min(decay, (1 + t) / (10 + t)) (jax_privacy's default).
    start_step: the average follows the weights until this many updates have passed.
    reset_on_train_begin: start a new average at every `fit` (default: continue it).
  """

  def __init__(self, decay: float = 0.9999, use_warmup: bool = True, start_step: int = 0,
               reset_on_train_begin: bool = False):
    super().__init__()
    _validate.non_negative("decay", decay)
    if not decay < 1:
      raise ValueError(f"Expected decay in [0, 1). Received: decay={decay!r}.")
    _validate.non_negative_int("start_step", start_step)
    for name, value in (("use_warmup", use_warmup),
                        ("reset_on_train_begin", reset_on_train_begin)):
      if not isinstance(value, bool):
        raise ValueError(f"Expected {name} to be True or False. Received: {name}={value!r}.")
    self.decay = float(decay)
    self.use_warmup = use_warmup
    self.start_step = int(start_step)
    self.reset_on_train_begin = reset_on_train_begin
    self.state = EMAState()
    self._update_fn = None
    self._seen_iterations = None
    self._backup = None
    self._warned = False

  # ---- the state ---------------------------------------------------------------------------

  def build(self, model=None) -> None:
    """Creates the state's variables for `model` (default: the callback's model). A no-op when
    they exist with the model's shapes; ValueError when the shapes differ."""
    if model is not None:
      self.set_model(model)
    variables = self._variables()
    if self.state.built:
      self._check_shapes(variables)
      return
    with tf.name_scope("ema"):
      self.state.averages = [
          tf.Variable(v.read_value(), trainable=False, name=v.name.split(":")[0] + "/ema")
          for v in variables]
      self.state.num_updates = tf.Variable(0, dtype=tf.int64, trainable=False,
                                           name="num_updates")
      self.state.initialized = tf.Variable(False, trainable=False, name="initialized")
    self._update_fn = None

  def reset(self) -> None:
    """Forgets the average: the next training batch starts a new one from the weights."""
    if self.model is not None and self.state.built and not self._shapes_match(self._variables()):
      self.state = EMAState()  # other shapes: new variables (re-add them to a checkpoint)
      self.build()
      return
    if self.state.built:
      self.state.initialized.assign(False)
      self.state.num_updates.assign(0)

  @property
  def num_updates(self) -> int:
    return int(self.state.num_updates.numpy()) if self.state.built else 0

  def averages(self):
    """The averaged values (tensors), aligned with `model.trainable_variables`."""
    self._require_initialized("averages")
    return [a.read_value() for a in self.state.averages]

  def current_decay(self) -> float:
    """mu of the next update."""
    t = self.num_updates - self.start_step
    mu = self.decay if t >= 0 else 0.0
    return min(mu, (1.0 + t) / (10.0 + t)) if self.use_warmup and t >= 0 else mu

  # ---- using the average -------------------------------------------------------------------

  def swap_in(self) -> None:
    """Puts the averaged weights into the model, keeping the raw ones for `swap_out`."""
    self._require_initialized("swap_in")
    if self._backup is not None:
      raise RuntimeError("The averaged weights are already swapped in; call swap_out() first.")
    variables = self._variables()
    self._backup = [tf.identity(v.read_value()) for v in variables]
    for variable, average in zip(variables, self.state.averages):
      variable.assign(average)

  def swap_out(self) -> None:
    """Restores the raw weights saved by `swap_in` (bit for bit)."""
    if self._backup is None:
      raise RuntimeError("swap_out() without swap_in(): the model holds its raw weights.")
    for variable, raw in zip(self._variables(), self._backup):
      variable.assign(raw)
    self._backup = None

  @contextlib.contextmanager
  def averaged_weights(self):
    """`with ema.averaged_weights(): model.evaluate(...)`: the average inside the block, the raw
    weights again after it (also when the block raises)."""
    self.swap_in()
    try:
      yield self.model
    finally:
      self.swap_out()

  def assign_to_model(self) -> None:
    """Writes the averaged weights into the model for good (e.g. before the final export)."""
    self._require_initialized("assign_to_model")
    if self._backup is not None:
      raise RuntimeError("The averaged weights are swapped in; call swap_out() first.")
    for variable, average in zip(self._variables(), self.state.averages):
      variable.assign(average)

  # ---- callback hooks ----------------------------------------------------------------------

  def set_model(self, model):
    super().set_model(model)
    self._update_fn = None  # the compiled update reads this model's variables

  def on_train_begin(self, logs=None):
    self.build()
    if self.reset_on_train_begin:
      self.reset()
    self._seen_iterations = self._iterations()

  def on_train_batch_begin(self, batch, logs=None):
    self._initialize_if_needed()

  def on_train_batch_end(self, batch, logs=None):
    if self._seen_iterations is None:  # a hand-written loop without on_train_begin
      self.on_train_begin()
    self._initialize_if_needed()
    iterations = self._iterations()
    advanced = iterations - self._seen_iterations
    self._seen_iterations = iterations
    if advanced <= 0:  # inside an accumulated logical batch, or a restored (older) optimizer
      return
    if advanced > 1 and not self._warned:
      self._warned = True
      logging.warning("ExponentialMovingAverage: %d logical steps between two batch ends "
                      "(steps_per_execution > 1); the average takes one update for them.",
                      advanced)
    self._update(self.current_decay())

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None and self.state.built:
      logs["ema_updates"] = float(self.num_updates)

  # ---- config ------------------------------------------------------------------------------

  def get_config(self) -> Dict[str, Any]:
    """The settings (the average itself is `state`, for checkpoints)."""
    return {"decay": self.decay, "use_warmup": self.use_warmup, "start_step": self.start_step,
            "reset_on_train_begin": self.reset_on_train_begin}

  @classmethod
  def from_config(cls, config: Dict[str, Any]) -> "ExponentialMovingAverage":
    return cls(**config)

  # ---- internals ---------------------------------------------------------------------------

  def _variables(self):
    if self.model is None:
      raise ValueError("ExponentialMovingAverage has no model: pass it to model.fit(callbacks="
                       "[...]) or call ema.build(model).")
    return self.model.trainable_variables

  def _shapes_match(self, variables) -> bool:
    return (len(variables) == len(self.state.averages) and all(
        v.shape == a.shape and v.dtype == a.dtype
        for v, a in zip(variables, self.state.averages)))

  def _check_shapes(self, variables) -> None:
    if self.reset_on_train_begin or self._shapes_match(variables):
      return
    raise ValueError(
        "Expected the model's trainable variables to match the average's: "
        f"{[tuple(a.shape) for a in self.state.averages]}. Received: "
        f"{[tuple(v.shape) for v in variables]}. Use a new ExponentialMovingAverage for another "
        "model, or reset_on_train_begin=True.")

  def _iterations(self) -> int:
    return int(self.model.optimizer.iterations.numpy())

  def _require_initialized(self, what) -> None:
    if not (self.state.built and bool(self.state.initialized.numpy())):
      raise RuntimeError(f"{what}: there is no average yet (it starts at the first training "
                         "batch, or comes from a restored checkpoint).")

  def _initialize_if_needed(self) -> None:
    if not self.state.built:
      self.build()
    if not bool(self.state.initialized.numpy()):
      for average, variable in zip(self.state.averages, self._variables()):
        average.assign(variable)
      self.state.initialized.assign(True)

  def _update(self, mu: float) -> None:
    if self._update_fn is None:
      averages, variables, state = self.state.averages, self._variables(), self.state

      @tf.function
      def update(mu):
        for average, variable in zip(averages, variables):
          one_minus = tf.cast(1.0 - mu, average.dtype)
          average.assign_sub(one_minus * (average - tf.cast(variable, average.dtype)))
        state.num_updates.assign_add(1)

      self._update_fn = update
    self._update_fn(tf.constant(mu, tf.float64))
