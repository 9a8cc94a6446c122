"""Builds a model declared without input shapes (`Sequential([Dense(1)])`) from the spec of its
training data, before `fit`'s callbacks need its weights.

Keras creates such a model's weights at its first batch, inside the train function; callbacks
run before it (`on_train_begin`), and the mask callbacks must set a mask on every trainable
variable before the first step is clipped and noised. `make_private` therefore builds the model
for the first batch's shapes when `fit` (or `train_on_batch`) starts, with the same
`model.build` Keras would use; the DP optimizer's variables then exist before the step is
traced, which is then traced once.
"""

from typing import Optional

from tfdp_prune import model_checks
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


def build_for_data(model: keras.Model, x) -> None:
  """Builds `model` for the inputs of the training data `x` (what `fit` takes as `x`), unless it
  is built already or `x` is a kind whose spec cannot be read without consuming it (a Python
  generator): then Keras builds it at the first step, as before."""
  if model.built:
    return
  spec = input_spec_of(x)
  if spec is not None:
    with model.distribute_strategy.scope():  # where fit would create the variables
      model_checks.build(model, spec)


def input_spec_of(x) -> Optional[object]:
  """The nest of `tf.TensorSpec` of the model inputs in `x` (batch dimension None), or None.

  `x` as `fit` takes it: a `tf.data.Dataset` of `x` or `(x, y[, sample_weight])` batches, a
  `keras.utils.Sequence` of such batches, or arrays/tensors (a nest of them) of all examples.
  """
  if isinstance(x, tf.data.Dataset):
    return _inputs_part(x.element_spec)
  if isinstance(x, keras.utils.Sequence):
    return _inputs_part(tf.nest.map_structure(_spec_of_array, x[0]))
  try:
    return tf.nest.map_structure(_spec_of_array, x)
  except (TypeError, ValueError):  # a generator or anything else that is not array-like
    return None


def _inputs_part(batch_spec):
  """The model inputs of one batch: the first element of an `(x, y[, w])` tuple."""
  if isinstance(batch_spec, tuple) and 1 <= len(batch_spec) <= 3:
    return batch_spec[0]
  return batch_spec


def _spec_of_array(array) -> tf.TensorSpec:
  if not hasattr(array, "shape") or not hasattr(array, "dtype"):
    raise TypeError(f"not an array: {type(array).__name__}")
  shape = tf.TensorShape(array.shape)
  if shape.rank is None or shape.rank == 0:
    raise ValueError("not a batch of examples")
  return tf.TensorSpec([None] + shape.as_list()[1:], tf.as_dtype(array.dtype))
