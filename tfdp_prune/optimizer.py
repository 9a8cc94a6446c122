"""DP Keras optimizers that train only the coordinates selected by an update mask.

One logical step (see DESIGN.md, "One training step"):
  per-example gradients (a `per_example.PerExampleEngine`) -> x update mask -> clip each example
  to `l2_norm_clip` -> sum -> accumulate `gradient_accumulation_steps` physical batches ->
  + N(0, (noise_multiplier * l2_norm_clip)^2) on updated coordinates only -> / expected batch
  size -> the base optimizer's update, after which frozen coordinates and their slots are put back
  bit for bit.

The model's train step drives it (`tfdp_prune.make_private(model)` installs that step); the
optimizer refuses plain `minimize`/`apply_gradients`, which would skip clipping and noise.
"""

import dataclasses
import functools
import math
import sys

from tfdp_prune import _validate
from tfdp_prune import clipping
from tfdp_prune import engines
from tfdp_prune import mask_provenance
from tfdp_prune import noise
from tfdp_prune import randomness
from tfdp_prune.compat import KERAS_3_FIX
from tfdp_prune.compat import is_keras_3_frame
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

_DP_ARGS = ("l2_norm_clip", "noise_multiplier", "num_microbatches", "expected_batch_size",
            "gradient_accumulation_steps", "insecure_noise_seed", "per_example_engine")


class DPOptimizerMixin:
  """Marks the classes made by `make_dp_optimizer_class`; its methods are on those classes."""


@functools.lru_cache(maxsize=None)
def make_dp_optimizer_class(cls):
  """Returns a DP version of the tf_keras optimizer class `cls` (e.g. `tf_keras.optimizers.SGD`).

  The returned class takes TF Privacy's arguments first (`l2_norm_clip`, `noise_multiplier`,
  `num_microbatches`), then `cls`'s own, then these keyword-only ones:
    expected_batch_size: for Poisson sampling, the expected number of examples in one LOGICAL
      batch over all replicas (q * N); the noisy sum is divided by it. None divides by the actual
      number of rows (padding included), for fixed-size batches.
    gradient_accumulation_steps: physical batches summed into one logical batch, i.e. one noisy
      update and one accounting step.
    insecure_noise_seed: None (default): the noise generator's state is 192 bits of OS entropy
      (`noise.make_noise_generator`), never derivable from anything published. An integer makes
      the noise reproducible from it, which is INSECURE (whoever knows the seed can subtract
      the noise): tests and debugging only; it logs a warning and `mechanism_randomness` says
      "insecure_seed". Either way the generator's state is checkpointed with the optimizer and
      advances at every draw. (The former `seed=` argument raises a TypeError.)
    per_example_engine: how per-example gradients are obtained: "per_layer" (default; one
      forward/backward pass and per-layer norms, `per_layer.PerLayerEngine`) or "vectorized"
      (the reference: every example's full gradient via tf.vectorized_map).

  Per-variable DP state (update mask, accumulator, the base optimizer's slots) is found by the
  variable's identity, never by its position in `model.trainable_variables`: after
  `layer.trainable = False` and a recompile with the same optimizer, the remaining variables
  keep their own state, and the others get no update and no noise. A trainable variable the
  optimizer was not built for is refused before the step (see `state_positions`).

  The class is made once per `cls` and registered with Keras as "tfdp_prune>DP<cls name>", so
  models saved with it load without `custom_objects`.
  """
  if not (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)):
    raise TypeError(
        "Expected a tf_keras optimizer class such as tf_keras.optimizers.SGD (the Keras 2 "
        "optimizers of `tf_keras.optimizers`, not `tf_keras.optimizers.legacy` nor Keras 3). "
        f"Received: {cls!r}.")

  class DPOptimizer(cls, DPOptimizerMixin):
    __doc__ = f"Differentially private {cls.__name__} with update masks.\n\n" + (
        make_dp_optimizer_class.__doc__)

    def __init__(self, l2_norm_clip, noise_multiplier, num_microbatches=None, *args,
                 expected_batch_size=None, gradient_accumulation_steps=1,
                 insecure_noise_seed=None, per_example_engine="per_layer", **kwargs):
      if "seed" in kwargs:
        raise randomness.removed_seed_error(f"The DP optimizer DP{cls.__name__}",
                                            "insecure_noise_seed")
      _validate.positive("l2_norm_clip", l2_norm_clip)
      _validate.non_negative("noise_multiplier", noise_multiplier)
      if num_microbatches is not None:
        _validate.positive_int("num_microbatches", num_microbatches)
      if expected_batch_size is not None:
        _validate.positive("expected_batch_size", expected_batch_size)
        if num_microbatches is not None:
          raise ValueError(
              "expected_batch_size (Poisson sampling, variable batch) cannot be combined with "
              f"num_microbatches={num_microbatches} (fixed groups of the batch). Received both; "
              "drop num_microbatches to clip per example.")
      _validate.positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
      insecure_noise_seed = randomness.check_insecure_seed("insecure_noise_seed",
                                                           insecure_noise_seed)
      if insecure_noise_seed is not None:
        randomness.warn_insecure("the DP noise", "insecure_noise_seed")
      kwargs.setdefault("name", f"DP{cls.__name__}")
      # XLA would compile the base update rule per variable; the masked restore and the noise
      # are plain TF ops, so keep the whole step in one graph.
      kwargs.setdefault("jit_compile", False)
      super().__init__(*args, **kwargs)
      self.l2_norm_clip = float(l2_norm_clip)
      self.noise_multiplier = float(noise_multiplier)
      self.num_microbatches = num_microbatches
      self.expected_batch_size = expected_batch_size
      self.gradient_accumulation_steps = gradient_accumulation_steps
      self.insecure_noise_seed = insecure_noise_seed
      self.per_example_engine = engines.get(per_example_engine)
      self._registry = _VariableRegistry()
      self._creating_dp_state = False
      self._mask_provenance = None  # what chose the masks; None: all True, or set by hand

    # ---- state ---------------------------------------------------------------------------

    def add_variable_from_reference(self, model_variable, variable_name, shape=None,
                                    initial_value=None):
      slot = super().add_variable_from_reference(model_variable, variable_name, shape,
                                                 initial_value)
      if not self._creating_dp_state:  # a slot of the base optimizer: frozen with its variable
        if slot.shape != model_variable.shape:
          raise NotImplementedError(
              f"{cls.__name__} keeps slot '{variable_name}' of shape {slot.shape} for a variable "
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
      config.update(l2_norm_clip=self.l2_norm_clip, noise_multiplier=self.noise_multiplier,
                    num_microbatches=self.num_microbatches,
                    expected_batch_size=self.expected_batch_size,
                    gradient_accumulation_steps=self.gradient_accumulation_steps,
                    insecure_noise_seed=self.insecure_noise_seed,
                    per_example_engine=engines.serialize(self.per_example_engine))
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
      """Adds one physical batch's clipped sum (this replica's) and, at the end of a logical
      batch, applies the noisy average. Call in replica context (inside a train step)."""
      with tf.init_scope():
        self.build(variables)
      positions = self.state_positions(variables)
      with tf.control_dependencies(self._same_variables_within_logical_batch(positions)):
        for position, grad in zip(positions, clipped.grads):
          self._accumulators[position].assign_add(grad)
        self._accumulated_units.assign_add(tf.cast(clipped.num_units, tf.float32))
      at_end = tf.equal((self._micro_steps + 1) % self.gradient_accumulation_steps, 0)
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

      The all-reduce runs at every physical step, outside any `cond`: collectives inside a
      `cond` branch are not reliable under tf.distribute.
      """
      context = tf.distribute.get_replica_context()
      # Independent noise on each of R replicas with std sigma*C/sqrt(R) sums to std sigma*C.
      stddev = self.noise_multiplier * self.l2_norm_clip / math.sqrt(
          context.num_replicas_in_sync)
      accumulators = [self._accumulators[i] for i in positions]
      accumulated = [a.read_value() for a in accumulators]
      local = tf.cond(
          at_end,
          lambda: noise.add_gaussian_noise(accumulated, [self._update_masks[i].read_value()
                                                         for i in positions],
                                           stddev, self._noise_generator),
          lambda: [tf.zeros_like(a) for a in accumulated])
      divisor = (tf.constant(self.expected_batch_size, tf.float32)
                 if self.expected_batch_size is not None
                 # max(., 1): a logical batch of zero rows is a valid (pure-noise) step.
                 else tf.maximum(1.0, context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                         self._accumulated_units.read_value())))
      for accumulator, value in zip(accumulators, accumulated):
        accumulator.assign(tf.where(at_end, tf.zeros_like(value), value))
      self._clear_other_accumulators(at_end, positions)
      self._accumulated_units.assign(tf.where(at_end, 0.0, self._accumulated_units))
      return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                [g / tf.cast(divisor, g.dtype) for g in local])

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

  DPOptimizer.__name__ = f"DP{cls.__name__}"
  DPOptimizer.__qualname__ = DPOptimizer.__name__
  return keras.saving.register_keras_serializable(package="tfdp_prune")(DPOptimizer)


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
  keep_frozen = lambda var, old, mask: var.assign(tf.where(mask > 0, var, old))
  for group, olds, mask in zip(guarded, before, masks):
    for var, old in zip(group, olds):
      strategy.extended.update(var, keep_frozen, args=(old, mask), group=False)


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


def _needs_dp_step(method):
  return RuntimeError(
      f"{method}() on a tfdp_prune DP optimizer would skip per-example clipping and noise. "
      "Train through the DP train step: `tfdp_prune.make_private(model)` after `model.compile("
      "optimizer=<this optimizer>, loss=<per-example loss>)`, then `model.fit(...)` or "
      "`model.train_on_batch(...)`.")


DPKerasSGDOptimizer = make_dp_optimizer_class(keras.optimizers.SGD)
DPKerasAdamOptimizer = make_dp_optimizer_class(keras.optimizers.Adam)


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
  if not is_dp_optimizer(optimizer):
    raise error(f"{who} needs a model compiled with a tfdp_prune DP optimizer "
                f"(tfdp_prune.DPKerasSGDOptimizer, DPKerasAdamOptimizer, or "
                f"make_dp_optimizer_class(cls)). Received: optimizer={optimizer!r}. {fix}")
  return optimizer
