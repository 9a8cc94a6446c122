"""Checks that a model can be trained with DP at all, before any step runs (DESIGN.md rules 7
and 13): a tf_keras model, no batch normalization, no 16-bit floats, and no state written from
the batch."""

import weakref
from typing import List, NamedTuple, Optional

import numpy as np
from absl import logging

from tfdp_prune.compat import ensure_tf_keras_model
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

# Layers whose output for one example depends on the other examples of the batch: one example's
# gradient then leaks into every other example's, and per-example clipping bounds nothing. Named
# here for a clear message even when such a layer writes nothing (e.g. frozen); the general rule
# is `check_no_state_written_from_batch`, which looks at what the layer does.
_CROSS_EXAMPLE_LAYERS = (keras.layers.BatchNormalization,
                         keras.layers.experimental.SyncBatchNormalization)
_FIX = ("Replace it with a per-example normalization, e.g. `keras.layers.GroupNormalization("
        "groups=...)` or `keras.layers.LayerNormalization()`, or remove it. No opt-out is "
        "offered: the guarantee would not hold.")
_PROBE_ROWS = 2  # rows of a probe batch (unless the model declares a static batch size)
_FREE_DIM = 4  # probe size of a non-batch dimension the input leaves open (None)
# Mixed precision is refused: under mixed_float16 Keras wraps the optimizer in a dynamic loss
# scale, which moves with whether the private batch's gradient overflowed (state written from
# the batch, released without noise); and the engines form per-example gradients, norms and
# clipped sums in the layer's compute dtype, where 16 bits overflow at 65504 (float16).
_HALF_PRECISION = (tf.float16, tf.bfloat16)
_FULL_PRECISION_FIX = (
    "Expected float32 or float64: tfdp_prune does not support mixed precision. Under "
    "mixed_float16 Keras scales the loss by a factor that moves with whether the private "
    "batch's gradient overflowed (released without noise), and per-example gradients and norms "
    "in 16 bits overflow. Build the model after "
    "`keras.mixed_precision.set_global_policy('float32')`, or give the layer dtype='float32'.")
# Input signatures already checked, per model (weakly held: models come and go).
_CHECKED = weakref.WeakKeyDictionary()


class _Write(NamedTuple):
  """A model variable that the training forward pass wrote from the batch."""
  variable: tf.Variable
  source: str  # "values" or "size"


def check_dp_model(model) -> None:
  """Raises if `model` is not a tf_keras model, holds a batch-normalization layer, computes or
  keeps weights in 16-bit floats (`check_full_precision`), or (when its inputs are declared,
  e.g. `keras.Input`) writes state from the batch in training mode.

  Models whose inputs are not declared yet (subclassed models) get the state check when the DP
  train step is traced, before their first step (`check_no_state_written_from_batch`).

  Raises:
    ValueError: naming the layer and the fix.
  """
  ensure_tf_keras_model(model)
  for layer in model.submodules:
    if isinstance(layer, _CROSS_EXAMPLE_LAYERS):
      raise ValueError(
          f"Layer '{layer.name}' ({type(layer).__name__}) normalizes across the examples of a "
          "batch, so one example's gradient depends on all others and per-example clipping "
          "gives no privacy guarantee; its moving statistics are also written from the batch "
          f"and would be released without noise. {_FIX}")
  check_full_precision(model)
  spec = declared_input_spec(model)
  if spec is not None:
    # The batch size is not known yet: only writes from the batch's values are checked now.
    check_no_state_written_from_batch(model, spec, fixed_batch_size=True, defer_failures=True)


def check_full_precision(model) -> None:
  """Raises if a layer of `model` computes in float16 or bfloat16 (a mixed-precision dtype
  policy) or the model holds a 16-bit weight: see `_HALF_PRECISION`.

  Raises:
    ValueError: naming the layer or weight, its dtype, and the fix.
  """
  layers = [model] + [m for m in model.submodules if isinstance(m, keras.layers.Layer)]
  for layer in layers:
    if layer.compute_dtype is not None and tf.as_dtype(layer.compute_dtype) in _HALF_PRECISION:
      policy = getattr(layer.dtype_policy, "name", layer.dtype_policy)
      raise ValueError(f"Layer '{layer.name}' computes in {layer.compute_dtype} (dtype policy "
                       f"'{policy}'). {_FULL_PRECISION_FIX}")
  for weight in model.weights if model.built else []:  # unbuilt: checked again at the step
    if weight.dtype.base_dtype in _HALF_PRECISION:
      raise ValueError(f"Weight '{weight.name}' is {weight.dtype.base_dtype.name}. "
                       f"{_FULL_PRECISION_FIX}")


def declared_input_spec(model):
  """The nest of `tf.TensorSpec` of the model's declared inputs, or None if it has none."""
  try:
    inputs = model.input
  except (AttributeError, ValueError):  # a subclassed model, or never called
    return None
  if inputs is None:
    return None
  return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), inputs)


def check_no_state_written_from_batch(model, input_spec, fixed_batch_size: bool,
                                      defer_failures: bool = False) -> None:
  """Raises if the model's TRAINING forward pass writes any of its variables from the batch.

  Such state (batch-norm moving statistics of any kind, a running mean of the inputs, a
  counter of rows) is released with the model without noise (DESIGN.md rule 13). The check
  looks at behaviour, not at class names: starting from the same state each time, it runs
  `model(x, training=True)` eagerly on probe batches of `input_spec`'s shapes and dtypes
  (synthetic values, never data) and compares every model variable afterwards:

  - different values after two probes of different values: written from the batch's values;
  - unless `fixed_batch_size` (every batch has the same static number of rows, as the
    samplers' padded batches have), different values after a probe with another number of
    rows: written from the batch size, which is private when batches are not padded.

  A variable written the same way whatever the batch (a step counter, tfmot's pruning step and
  mask application) is allowed. Every variable is restored to its value before the check. A
  write behind a condition that the probe does not take (e.g. every 100th step) is not seen.
  Each (model, input signature) is checked once.

  Args:
    model: a tf_keras model.
    input_spec: a nest of `tf.TensorSpec` like the model's input (batch dimension first).
    fixed_batch_size: whether every batch fed to the model has the same number of rows.
    defer_failures: if the probe cannot run the model (e.g. it needs a callback to run
      first), return silently instead of raising: the check runs again at the train step.

  Raises:
    ValueError: naming the layer that writes state from the batch, and the fix; or, unless
      `defer_failures`, when the forward pass cannot be run on the probe inputs.
  """
  key = (_signature(input_spec), bool(fixed_batch_size))
  checked = _CHECKED.setdefault(model, set())
  if key in checked:
    return
  try:
    writes = _writes_from_batch(model, input_spec, fixed_batch_size)
  except Exception as error:  # pylint: disable=broad-except  (any failure of the user's model)
    if defer_failures:
      logging.info("tfdp_prune: the state check of %s is deferred to the train step: %s",
                   model.name, error)
      return
    raise ValueError(
        f"Could not run the training forward pass of model '{model.name}' on probe inputs "
        f"{input_spec} (random floats in (0, 1), integers 0/1) to check that it writes no state "
        f"from the batch (DESIGN.md rule 13): {type(error).__name__}: {error}") from error
  if writes:
    raise ValueError(_message(model, writes))
  checked.add(key)


def _writes_from_batch(model, input_spec, fixed_batch_size) -> List[_Write]:
  build(model, input_spec)
  variables = _unique(model.variables)
  before = [_value(v) for v in variables]
  rows = _probe_rows(model, input_spec)
  try:
    first = _after_probe(model, variables, before, _probe(input_spec, rows, variant=0))
    second = _after_probe(model, variables, before, _probe(input_spec, rows, variant=1))
    other_size = None
    if not fixed_batch_size and _static_rows(input_spec) is None:
      other_size = _after_probe(model, variables, before,
                                _probe(input_spec, rows + 1, variant=0))
  finally:
    _restore(variables, before)
  writes = []
  for i, variable in enumerate(variables):
    if not _equal(first[i], second[i]):
      writes.append(_Write(variable, "values"))
    elif other_size is not None and not _equal(first[i], other_size[i]):
      writes.append(_Write(variable, "size"))
  return writes


def build(model, input_spec) -> None:
  """Creates the variables of a model never called (a subclassed one, a Sequential without an
  input shape) for inputs like `input_spec`, without running it eagerly: Keras traces the call
  in a scratch graph, so no write is executed."""
  if model.built:
    return
  model.build(tf.nest.map_structure(lambda s: s.shape, input_spec))


def _after_probe(model, variables, before, inputs) -> list:
  """Every variable's value after one training call on `inputs`, from the state `before`."""
  _restore(variables, before)
  model(inputs, training=True)
  return [_value(v) for v in variables]


def _probe(input_spec, rows: int, variant: int):
  """Synthetic inputs: variant 1 differs from variant 0 in every value (complements for
  integers and booleans: ids stay in {0, 1}, inside any vocabulary). Floats lie in (0, 1),
  variant 0 below 0.5 and variant 1 above: float inputs that carry token ids (TF Privacy's
  Embedding test model declares them float32) become id 0, inside any vocabulary."""

  def make(spec):
    dims = spec.shape.as_list()
    shape = [rows] + [d if d is not None else _FREE_DIM for d in dims[1:]] if dims else []
    bits = np.random.default_rng(0).integers(0, 2, size=shape)
    if variant:
      bits = 1 - bits
    if spec.dtype.is_floating or spec.dtype.is_complex:
      values = np.random.default_rng(variant).uniform(0.05, 0.45, size=shape) + 0.5 * variant
    elif spec.dtype == tf.string:
      values = np.where(bits == 1, "b", "a")
    else:  # integers and booleans
      values = bits
    return tf.cast(tf.constant(values), spec.dtype)

  return tf.nest.map_structure(make, input_spec)


def _message(model, writes: List[_Write]) -> str:
  lines = []
  for write in writes:
    layer = _owner(model, write.variable)
    kind = "trainable" if write.variable.trainable else "non-trainable"
    source = ("the values of the batch" if write.source == "values" else
              "the number of rows of the batch (private when batches are not padded to a fixed "
              "size; the tfdp_prune samplers' batches are)")
    lines.append(f"layer '{layer.name}' ({type(layer).__name__}) writes its {kind} variable "
                 f"'{write.variable.name}' from {source}")
  return (
      f"Model '{model.name}': in the training forward pass, " + "; ".join(lines) + ". Such "
      "state is released with the model (exports, checkpoints) without noise, so the privacy "
      "guarantee would not cover it (DESIGN.md rule 13; batch-normalization statistics are the "
      f"usual case). {_FIX} State written the same way whatever the batch (a step counter) is "
      "allowed.")


def _owner(model, variable):
  """The innermost layer (the one with the fewest weights) that holds `variable`."""
  holders = [layer for layer in [model] + list(model.submodules)
             if isinstance(layer, keras.layers.Layer)
             and any(w is variable for w in layer.weights)]
  return min(holders, key=lambda layer: len(layer.weights)) if holders else model


def _probe_rows(model, input_spec) -> int:
  """The model's own static batch size if it declares one, else a small batch (at most the
  data's): the probes cost a few forward passes, not a few physical batches."""
  declared = declared_input_spec(model)
  if declared is not None and _static_rows(declared) is not None:
    return _static_rows(declared)
  return min(_PROBE_ROWS, _static_rows(input_spec) or _PROBE_ROWS)


def _static_rows(input_spec) -> Optional[int]:
  for spec in tf.nest.flatten(input_spec):
    if spec.shape.rank and spec.shape[0] is not None:
      return int(spec.shape[0])
  return None


def _signature(input_spec) -> str:
  return repr(tf.nest.map_structure(lambda s: (tuple(s.shape.as_list() if s.shape.rank is not None
                                                     else ()), s.dtype.name), input_spec))


def _unique(variables) -> list:
  seen, unique = set(), []
  for variable in variables:
    if variable.ref() not in seen:
      seen.add(variable.ref())
      unique.append(variable)
  return unique


def _value(variable) -> np.ndarray:
  return np.array(variable.read_value())


def _restore(variables, values) -> None:
  """Assigns `values` back to the variables that differ from them (only those: the others
  need no write)."""
  for variable, value in zip(variables, values):
    if not _equal(_value(variable), value):
      variable.assign(value)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
  try:
    return np.array_equal(a, b, equal_nan=True)
  except TypeError:  # non-numeric (e.g. string) values
    return np.array_equal(a, b)
