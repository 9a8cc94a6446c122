"""DP Keras optimizers that train only the coordinates selected by an update mask.

One logical step runs the stages of `dp_step` (DESIGN.md, "One training step"): the train step
hands each physical batch's masked, clipped per-example sum to `apply_clipped_sum`, which
accumulates it over `gradient_accumulation_steps` physical batches, then adds
N(0, (noise_multiplier * l2_norm_clip)^2) on updated coordinates only, divides by the expected
batch size, and applies the base optimizer's update, after which frozen coordinates and their
slots are put back bit for bit. The settings are one `dp_settings.DPSettings`.

The model's train step drives it (`tfdp_prune.make_private(model)` installs that step); the
optimizer refuses plain `minimize`/`apply_gradients`, which would skip clipping and noise.
"""

import dataclasses
import functools
import sys

from tfdp_prune import dp_settings
from tfdp_prune import dp_step
from tfdp_prune import mask_provenance
from tfdp_prune import noise
from tfdp_prune import randomness
from tfdp_prune.compat import KERAS_3_FIX
from tfdp_prune.compat import is_keras_3_frame
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

# The DP arguments taken by keyword (expected_batch_size, gradient_accumulation_steps,
# insecure_noise_seed, per_example_engine): DPSettings' fields but the three positional ones.
_POSITIONAL_SETTINGS = ("l2_norm_clip", "noise_multiplier", "num_microbatches")
_KEYWORD_SETTINGS = tuple(field.name for field in dataclasses.fields(dp_settings.DPSettings)
                          if field.name not in _POSITIONAL_SETTINGS)


class DPOptimizerMixin:
  """The DP state and step shared by every tfdp_prune DP optimizer; put it BEFORE the base
  tf_keras optimizer class (`class DPSGD(DPOptimizerMixin, keras.optimizers.SGD)`), whose
  `apply_gradients` it reaches through `super()` for the masked update.

  Per-variable DP state (update mask, accumulator, the base optimizer's slots) is found by the
  variable's identity, never by its position in `model.trainable_variables`: after
  `layer.trainable = False` and a recompile with the same optimizer, the remaining variables
  keep their own state, and the others get no update and no noise. A trainable variable the
  optimizer was not built for is refused before the step (see `state_positions`).
  """

  def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None, *args, **kwargs):
    """The DP arguments (`dp_settings.DPSettings`'s fields: the first three positional, the
    others by keyword) build the one `DPSettings`; `args` and the other `kwargs` go to the base
    optimizer, which refuses a name it does not know."""
    base_name = _base_optimizer_class(type(self)).__name__
    if "seed" in kwargs:
      raise randomness.removed_seed_error(f"The DP optimizer DP{base_name}",
                                          "insecure_noise_seed")
    settings = dp_settings.DPSettings(
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        num_microbatches=num_microbatches,
        **{name: kwargs.pop(name) for name in _KEYWORD_SETTINGS if name in kwargs})
    if settings.insecure_noise_seed is not None:
      randomness.warn_insecure("the DP noise", "insecure_noise_seed",
                               stacklevel=_callers_stacklevel(self))
    kwargs.setdefault("name", f"DP{base_name}")
    # XLA would compile the base update rule per variable; the masked restore and the noise
    # are plain TF ops, so keep the whole step in one graph.
    kwargs.setdefault("jit_compile", False)
    super().__init__(*args, **kwargs)
    self.dp_settings = settings
    self._registry = _VariableRegistry()
    self._creating_dp_state = False
    self._mask_provenance = None  # what chose the masks; None: all True, or set by hand

  # ---- the settings, read-only (one `DPSettings`) ------------------------------------------

  l2_norm_clip = property(lambda self: self.dp_settings.l2_norm_clip)
  noise_multiplier = property(lambda self: self.dp_settings.noise_multiplier)
  num_microbatches = property(lambda self: self.dp_settings.num_microbatches)
  expected_batch_size = property(lambda self: self.dp_settings.expected_batch_size)
  gradient_accumulation_steps = property(
      lambda self: self.dp_settings.gradient_accumulation_steps)
  insecure_noise_seed = property(lambda self: self.dp_settings.insecure_noise_seed)
  per_example_engine = property(lambda self: self.dp_settings.per_example_engine)

  # ---- state ---------------------------------------------------------------------------

  def add_variable_from_reference(self, model_variable, variable_name, shape=None,
                                  initial_value=None):
    slot = super().add_variable_from_reference(model_variable, variable_name, shape,
                                               initial_value)
    if not self._creating_dp_state:  # a slot of the base optimizer: frozen with its variable
      if slot.shape != model_variable.shape:
        base_name = _base_optimizer_class(type(self)).__name__
        raise NotImplementedError(
            f"{base_name} keeps slot '{variable_name}' of shape {slot.shape} for a variable "
            f"of shape {model_variable.shape}; masked updates need per-coordinate slots. Use "
            "an optimizer whose slots have the shape of their variable (SGD, Adam, ...).")
      self._registry.add_slot(model_variable, slot)
    return slot

  def build(self, var_list):
    if getattr(self, "_built", False):
      return
    super().build(var_list)
    self._creating_dp_state = True
    try:
      self._update_masks = [
          self.add_variable_from_reference(v, "update_mask", initial_value=tf.ones_like(v))
          for v in var_list]
      self._accumulators = [_replica_local(tf.zeros(v.shape, v.dtype), v, "dp_accumulator")
                            for v in var_list]
    finally:
      self._creating_dp_state = False
    self._accumulated_units = _replica_local(tf.constant(0.0), None, "dp_accumulated_units")
    self._micro_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="dp_micro_steps")
    self._noise_generator = noise.make_noise_generator(self.insecure_noise_seed)
    self._registry.set_order(var_list)

  def set_update_masks(self, variables, masks, *, provenance=None):
    """Sets which coordinates of `variables` are trained: the ONE way masks change.

    `masks[i]` has the shape of `variables[i]`; True/1 = trained, False/0 = frozen. Variables
    not listed keep their mask (all True until set). The optimizer must be built first
    (`optimizer.build(model.trainable_variables)`). Masks are optimizer variables, so they are
    saved and restored with the optimizer's checkpoint.

    `provenance`: the `mask_provenance.MaskProvenance` of the rule that chose them (the mask
    callbacks pass one), kept as `mask_provenance` with a digest of all masks. None (masks
    set by hand) leaves no record: an export labelled from the budget then refuses them.

    Raises:
      RuntimeError: before `build`, or inside a logical batch (some of its physical batches
        already accumulated): one logical batch is clipped and noised under one mask.
    """
    if not getattr(self, "_built", False):
      raise RuntimeError(
          "set_update_masks needs the optimizer's variables: call "
          "`optimizer.build(model.trainable_variables)` first.")
    if not self.at_logical_batch_start():
      done = int(self._micro_steps.numpy()) % self.gradient_accumulation_steps
      raise RuntimeError(
          "Expected set_update_masks between logical batches: one logical batch is clipped "
          "and noised under one mask. Received it after "
          f"{done} of the {self.gradient_accumulation_steps} physical batches of a logical "
          "batch were accumulated. Set masks when `optimizer.at_logical_batch_start()` is "
          "True (the mask callbacks wait for it), e.g. after the logical batch completes.")
    variables, masks = list(variables), list(masks)
    if len(variables) != len(masks):
      raise ValueError(f"Expected one mask per variable. Received {len(masks)} masks for "
                       f"{len(variables)} variables.")
    for variable, mask in zip(variables, masks):
      index = self._registry.index(variable)
      if index is None:
        raise ValueError(f"Variable '{variable.name}' is not one this optimizer was built "
                         "for; pass variables from model.trainable_variables.")
      self._update_masks[index].assign(_mask_values(variable, mask))
    self._mask_provenance = None if provenance is None else dataclasses.replace(
        provenance, masks_digest=self.masks_digest())

  @property
  def mask_provenance(self):
    """The `MaskProvenance` given with the last `set_update_masks`, or None."""
    return self._mask_provenance

  def masks_digest(self) -> str:
    """`mask_provenance.masks_digest` of all the masks now held, in build order."""
    return mask_provenance.masks_digest([m.numpy() for m in self._update_masks])

  def at_logical_batch_start(self) -> bool:
    """True when no physical batch of the next logical batch has been accumulated yet: the
    moment a new mask can be set without splitting a logical batch between two masks."""
    if not getattr(self, "_built", False):
      return True  # nothing accumulated before the first step
    return int(self._micro_steps.numpy()) % self.gradient_accumulation_steps == 0

  def update_masks(self, variables):
    """The current update masks (1 = trained) of `variables`, in the variable dtype."""
    return [self._update_masks[i] for i in self.state_positions(variables)]

  def state_variables(self) -> list:
    """The variables the DP state was built for, in build order: the order of the mask and
    accumulator lists, hence of their keys in a checkpoint."""
    return self._registry.variables()

  def accumulator(self, variable):
    """The replica-local sum of `variable`'s clipped gradients in the current logical batch."""
    return self._accumulators[self.state_positions([variable])[0]]

  def state_positions(self, variables) -> list:
    """Where each of `variables` keeps its DP state (mask, accumulator), found by identity.

    The state lists are in build order (their positions are the checkpoint's keys); a model
    whose trainable set changed since (`layer.trainable = False` and a recompile) trains a
    subset, and each variable must still meet its OWN mask, accumulator and noise.

    Raises:
      ValueError: for a variable the optimizer was not built for (tf_keras optimizers cannot
        add variables after `build`).
    """
    if not getattr(self, "_built", False):
      raise RuntimeError("The optimizer has no DP state yet: call "
                         "`optimizer.build(model.trainable_variables)` first.")
    variables = list(variables)
    positions = [self._registry.index(v) for v in variables]
    unknown = [v.name for v, i in zip(variables, positions) if i is None]
    if unknown:
      raise ValueError(
          f"Expected trainable variables this DP optimizer was built for ({self._registry.size} "
          f"variables, at its first step or `build`). Received {len(unknown)} it was not built "
          f"for: {unknown} (e.g. a layer made trainable, or added, after the optimizer was "
          "built). A tf_keras optimizer cannot add variables after build, and a variable "
          "without its own update mask and accumulator cannot be trained privately. Fix: "
          "compile with a new optimizer (`model.compile(optimizer=<a new DP optimizer>, ...)`, "
          "whose masks start all True: set them again), or make the layer trainable before the "
          "optimizer is built.")
    return positions

  @property
  def mechanism_randomness(self) -> str:
    """Where the noise comes from: "os_entropy", or "insecure_seed" (reproducible)."""
    return randomness.source(self.insecure_noise_seed)

  def get_config(self):
    config = super().get_config()
    config.update(self.dp_settings.to_config())
    return config

  def __format__(self, format_spec):
    # `model.compile` of a Keras 3 model hands our (tf_keras) optimizer to Keras 3's
    # `optimizers.get`, which refuses it with f"Could not interpret optimizer identifier:
    # {identifier}": the user's first error, so the text formatted there says how to fix it.
    if is_keras_3_frame(sys._getframe(1)):  # pylint: disable=protected-access
      return (f"{type(self).__name__} (a tfdp_prune DP optimizer for tf_keras models; this "
              f"model is a Keras 3 model). {KERAS_3_FIX}")
    return super().__format__(format_spec)

  # ---- the DP step -----------------------------------------------------------------------

  def minimize(self, loss, var_list, tape=None):
    raise _needs_dp_step("minimize")

  def compute_gradients(self, loss, var_list, tape=None):
    raise _needs_dp_step("compute_gradients")

  def apply_gradients(self, grads_and_vars, name=None, **kwargs):
    raise _needs_dp_step("apply_gradients")

  def apply_clipped_sum(self, clipped, variables):
    """Stages 2 to 6 of `dp_step` for one physical batch's clipped sum (this replica's):
    accumulate it; at the end of a logical batch, noise, scale and all-reduce the sum, apply it
    with the base optimizer and restore the frozen coordinates. Call in replica context
    (inside a train step)."""
    with tf.init_scope():
      self.build(variables)
    positions = self.state_positions(variables)
    with tf.control_dependencies(self._same_variables_within_logical_batch(positions)):
      dp_step.accumulate([self._accumulators[i] for i in positions], clipped.grads,
                         self._accumulated_units, clipped.num_units)
    # Without accumulation every physical batch ends a logical batch: known when traced.
    at_end = (True if self.gradient_accumulation_steps == 1 else
              tf.equal((self._micro_steps + 1) % self.gradient_accumulation_steps, 0))
    update = self._noisy_average(at_end, positions)
    tf.distribute.get_replica_context().merge_call(
        functools.partial(self._advance, variables=variables), args=(update,))

  def _same_variables_within_logical_batch(self, positions) -> list:
    """Runtime guard (as control dependencies) for a step traced with another variable set
    than the previous trace: it may only start a logical batch, never continue one."""
    previous = self._registry.swap_traced_positions(positions)
    if previous is None or previous == tuple(positions):
      return []
    return [tf.debugging.assert_equal(
        self._micro_steps % self.gradient_accumulation_steps, tf.constant(0, tf.int64),
        message=("The trainable variables changed while a logical batch was partly "
                 f"accumulated (gradient_accumulation_steps={self.gradient_accumulation_steps}"
                 "): one logical batch must train one set of variables. Change `trainable` "
                 "and recompile between logical batches (`optimizer.at_logical_batch_start()`)."
                ))]

  def _noisy_average(self, at_end, positions):
    """The noisy average gradient over all replicas at the end of a logical batch, else zeros:
    one tensor per variable at `positions` (the variables being trained), each from its own
    accumulator with noise on its own mask. Variables not trained get no update and no noise.
    Resets the accumulators at the end.

    The all-reduces run at every physical step, outside any `cond`: collectives inside a
    `cond` branch are not reliable under tf.distribute.
    """
    context = tf.distribute.get_replica_context()
    settings = self.dp_settings
    accumulators = [self._accumulators[i] for i in positions]
    accumulated = [a.read_value() for a in accumulators]
    masks = [self._update_masks[i].read_value() for i in positions]
    stddev = dp_step.replica_noise_stddev(settings.noise_multiplier, settings.l2_norm_clip,
                                          context.num_replicas_in_sync)
    noisy = dp_step.noisy_sum_at_end(at_end, accumulated, masks, stddev, self._noise_generator)
    total_units = (None if settings.expected_batch_size is not None
                   else context.all_reduce(tf.distribute.ReduceOp.SUM,
                                           self._accumulated_units.read_value()))
    divisor = dp_step.average_divisor(settings.expected_batch_size, total_units)
    dp_step.reset_at_end(at_end, accumulators, accumulated, self._accumulated_units)
    self._clear_other_accumulators(at_end, positions)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, dp_step.scale(noisy, divisor))

  def _clear_other_accumulators(self, at_end, positions) -> None:
    """Zeroes, at a logical batch's end, the accumulators of variables not trained now.

    They are zero unless the variable set changed inside a logical batch unnoticed (e.g. a
    mid-batch checkpoint resumed with other trainable layers); a partial sum left there would
    be released with a later logical batch, whose examples it does not belong to. Without
    accumulation every step ends a logical batch and they stay zero.
    """
    trained = set(positions)
    others = [a for i, a in enumerate(self._accumulators) if i not in trained]
    if self.gradient_accumulation_steps == 1 or not others:
      return

    def clear():
      for accumulator in others:
        accumulator.assign(tf.zeros(accumulator.shape, accumulator.dtype))
      return tf.constant(True)

    tf.cond(at_end, clear, lambda: tf.constant(False))

  def _advance(self, strategy, update, variables):
    """Cross-replica: count the physical step; at a logical batch's end, apply `update`."""
    micro_steps = self._micro_steps.assign_add(1)

    def apply():
      strategy.extended.call_for_each_replica(
          functools.partial(self._masked_apply, variables=variables), args=(update,))
      return tf.constant(True)

    # A cond even without accumulation: it runs only once all its inputs (the update) are
    # computed, so a check of the step that fails (an assertion) leaves the weights and the
    # step count untouched.
    tf.cond(micro_steps % self.gradient_accumulation_steps == 0, apply,
            lambda: tf.constant(False))

  def _masked_apply(self, grads, variables):
    """The base optimizer's update (weight decay, slots, EMA included), then every frozen
    coordinate of each variable and of its slots is restored to its value before the update.
    `grads` are already summed over replicas."""
    guarded = [[v] + self._registry.slots(v) for v in variables]
    before = [[tf.identity(t) for t in group] for group in guarded]
    super().apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
    tf.distribute.get_replica_context().merge_call(
        functools.partial(_restore_frozen, guarded=guarded, masks=self.update_masks(variables)),
        args=(before,))


class _VariableRegistry:
  """Per model variable: its position in the built variable list (where its mask and accumulator
  are) and the base optimizer's slots; and the variable set of the last traced step.
  A plain object, so that checkpointing (which tracks the optimizer's dict and list attributes)
  does not try to save these mappings."""

  def __init__(self):
    self._order = []
    self._index = {}
    self._slots = {}
    self._traced_positions = None

  def swap_traced_positions(self, positions):
    """Records the positions of the variables a step was traced with; returns the previous
    trace's (None before the first)."""
    previous, self._traced_positions = self._traced_positions, tuple(positions)
    return previous

  def set_order(self, variables):
    self._order = list(variables)
    self._index = {v.ref(): i for i, v in enumerate(variables)}

  def variables(self) -> list:
    return list(self._order)

  @property
  def size(self) -> int:
    return len(self._index)

  def index(self, variable):
    """The variable's position in the built list, or None for a variable not built for."""
    return self._index.get(variable.ref())

  def add_slot(self, variable, slot):
    self._slots.setdefault(variable.ref(), []).append(slot)

  def slots(self, variable) -> list:
    return list(self._slots.get(variable.ref(), []))


def _restore_frozen(strategy, before, guarded, masks):
  """Cross-replica: each variable and slot in `guarded` gets `dp_step.keep_frozen` of itself
  and its value `before` the update, under its variable's mask."""
  restore = lambda var, old, mask: var.assign(dp_step.keep_frozen(var, old, mask))
  for group, olds, mask in zip(guarded, before, masks):
    for var, old in zip(group, olds):
      strategy.extended.update(var, restore, args=(old, mask), group=False)


def _replica_local(initial_value, colocate_with, name):
  """A variable each replica updates on its own; reading it across replicas gives the sum."""
  strategy = tf.distribute.get_strategy()
  scope = (strategy.extended.colocate_vars_with(colocate_with) if colocate_with is not None
           else tf.init_scope())
  with scope:
    return tf.Variable(initial_value, trainable=False, name=name,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM)


def _mask_values(variable, mask):
  mask = tf.convert_to_tensor(mask)
  if mask.shape != variable.shape:
    raise ValueError(f"Expected a mask of shape {variable.shape} for variable "
                     f"'{variable.name}'. Received shape {mask.shape}.")
  if not (mask.dtype.is_bool or mask.dtype.is_integer or mask.dtype.is_floating):
    raise ValueError(f"Expected a boolean (or 0/1) mask for '{variable.name}'. Received dtype "
                     f"{mask.dtype.name}.")
  if not mask.dtype.is_bool:
    if not bool(tf.reduce_all((mask == 0) | (mask == 1))):
      raise ValueError(f"Expected mask values 0 or 1 for '{variable.name}'. Received other "
                       "values; pass a boolean mask.")
  return tf.cast(mask, variable.dtype)


def _callers_stacklevel(optimizer) -> int:
  """The `warnings.warn` stacklevel of the line that constructed `optimizer`, as seen from
  `randomness.warn_insecure` called in its `__init__`: above every `__init__` frame of the
  object (the mixin's, a DP class's, a user's subclass's)."""
  frame, level = sys._getframe(1), 2  # pylint: disable=protected-access
  while frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is optimizer:
    frame, level = frame.f_back, level + 1
  return level


def _needs_dp_step(method):
  return RuntimeError(
      f"{method}() on a tfdp_prune DP optimizer would skip per-example clipping and noise. "
      "Train through the DP train step: `tfdp_prune.make_private(model)` after `model.compile("
      "optimizer=<this optimizer>, loss=<per-example loss>)`, then `model.fit(...)` or "
      "`model.train_on_batch(...)`.")


# The DP arguments every class below takes (documented in full on `dp_settings.DPSettings`):
#   l2_norm_clip, noise_multiplier, num_microbatches=None (positional, as in TF Privacy), then
#   the base optimizer's arguments, then keyword-only: expected_batch_size=None,
#   gradient_accumulation_steps=1, insecure_noise_seed=None (None: OS entropy; an integer is
#   INSECURE, for tests: it logs a warning and `mechanism_randomness` says "insecure_seed"; the
#   former `seed=` raises a TypeError), per_example_engine="per_layer" (or "vectorized").
# SGD and Adam spell these out in their signatures for editors and `help()` (a test checks their
# defaults against DPSettings'); the mixin builds the one DPSettings from them, and a class made
# by `make_dp_optimizer_class` takes the mixin's signature.
# Each class is registered with Keras as "tfdp_prune>DP<base name>", so that models saved with
# it load without `custom_objects`, and keeps that name as its `__name__` (checkpoints record it).


def _keras_name(name):
  """Names a DP optimizer class `name` (its `__name__`, the name checkpoints record) and
  registers it with Keras as "tfdp_prune>`name`"."""

  def register(cls):
    cls.__name__ = cls.__qualname__ = name
    return keras.saving.register_keras_serializable(package="tfdp_prune", name=name)(cls)

  return register


@_keras_name("DPSGD")
class DPKerasSGDOptimizer(DPOptimizerMixin, keras.optimizers.SGD):
  """Differentially private `tf_keras.optimizers.SGD` with update masks (see the module)."""

  def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None,
               learning_rate=0.01, momentum=0.0, nesterov=False, *,
               expected_batch_size=None, gradient_accumulation_steps=1,
               insecure_noise_seed=None, per_example_engine="per_layer", **kwargs):
    """`kwargs` are SGD's other arguments (weight_decay, clipnorm, name, ...)."""
    super().__init__(l2_norm_clip, noise_multiplier, num_microbatches,
                     learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                     expected_batch_size=expected_batch_size,
                     gradient_accumulation_steps=gradient_accumulation_steps,
                     insecure_noise_seed=insecure_noise_seed,
                     per_example_engine=per_example_engine, **kwargs)


@_keras_name("DPAdam")
class DPKerasAdamOptimizer(DPOptimizerMixin, keras.optimizers.Adam):
  """Differentially private `tf_keras.optimizers.Adam` with update masks (see the module)."""

  def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None,
               learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, *,
               expected_batch_size=None, gradient_accumulation_steps=1,
               insecure_noise_seed=None, per_example_engine="per_layer", **kwargs):
    """`kwargs` are Adam's other arguments (amsgrad, weight_decay, clipnorm, name, ...)."""
    super().__init__(l2_norm_clip, noise_multiplier, num_microbatches,
                     learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                     epsilon=epsilon, expected_batch_size=expected_batch_size,
                     gradient_accumulation_steps=gradient_accumulation_steps,
                     insecure_noise_seed=insecure_noise_seed,
                     per_example_engine=per_example_engine, **kwargs)


_DEFINED = {keras.optimizers.SGD: DPKerasSGDOptimizer,
            keras.optimizers.Adam: DPKerasAdamOptimizer}


@functools.lru_cache(maxsize=None)
def make_dp_optimizer_class(cls):
  """Returns the DP version of the tf_keras optimizer class `cls` (e.g.
  `tf_keras.optimizers.RMSprop`): `DPKerasSGDOptimizer` and `DPKerasAdamOptimizer` for SGD and
  Adam, otherwise a class made once per `cls` and registered as "tfdp_prune>DP<cls name>".

  It takes `l2_norm_clip`, `noise_multiplier`, `num_microbatches` first, then `cls`'s own
  arguments, then the keyword-only DP ones (see `DPKerasSGDOptimizer`, `dp_settings.DPSettings`).

  Raises:
    TypeError: if `cls` is not a Keras 2 (tf_keras) optimizer class.
  """
  if cls in _DEFINED:
    return _DEFINED[cls]
  if not (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)):
    raise TypeError(
        "Expected a tf_keras optimizer class such as tf_keras.optimizers.SGD (the Keras 2 "
        "optimizers of `tf_keras.optimizers`, not `tf_keras.optimizers.legacy` nor Keras 3). "
        f"Received: {cls!r}.")

  class DPOptimizer(DPOptimizerMixin, cls):
    __doc__ = f"Differentially private {cls.__name__} with update masks (see the module)."

  return _keras_name(f"DP{cls.__name__}")(DPOptimizer)


def _base_optimizer_class(dp_class) -> type:
  """The tf_keras optimizer class a DP optimizer class adds DP to (SGD for DPSGD)."""
  return next(c for c in dp_class.__mro__ if not issubclass(c, DPOptimizerMixin))


def is_dp_optimizer(optimizer) -> bool:
  """Whether `optimizer` is a tfdp_prune DP optimizer (one of `make_dp_optimizer_class`'s)."""
  return isinstance(optimizer, DPOptimizerMixin)


def require_dp_optimizer(model, who: str, *, error=ValueError,
                         fix: str = "Call model.compile(optimizer=...) with one."):
  """The optimizer `model` is compiled with, which `who` needs to be a tfdp_prune DP optimizer.

  Raises:
    `error` (ValueError unless given): the model has no optimizer, or another one; the message
      names `who`, what the model has, and `fix`.
  """
  optimizer = getattr(model, "optimizer", None)
  if is_dp_optimizer(getattr(optimizer, "inner_optimizer", None)):
    raise error(f"{who} needs the tfdp_prune DP optimizer itself. Received it wrapped in "
                f"{type(optimizer).__name__} (Keras wraps it so under the mixed_float16 dtype "
                "policy): its dynamic loss scale moves with whether the private batch's "
                "gradient overflowed, which the DP mechanism does not cover. Use the float32 "
                "policy (`keras.mixed_precision.set_global_policy('float32')` before building "
                "the model) and compile with the DP optimizer unwrapped.")
  if not is_dp_optimizer(optimizer):
    raise error(f"{who} needs a model compiled with a tfdp_prune DP optimizer "
                f"(tfdp_prune.DPKerasSGDOptimizer, DPKerasAdamOptimizer, or "
                f"make_dp_optimizer_class(cls)). Received: optimizer={optimizer!r}. {fix}")
  return optimizer
