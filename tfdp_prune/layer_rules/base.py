"""What a layer rule is: how the per-layer engine (`per_layer`) gets one layer's per-example
gradient norms and clipped sum from the layer's captured input and output gradient."""

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

from tfdp_prune import clipping
from tfdp_prune.compat import tf


@dataclasses.dataclass
class CapturedCall:
  """One call of one layer during the forward pass, as its rule recorded it.

  `inputs` and `outputs` have one row per model row: B rows, or B*K with K augmult views of
  each example (row b*K + k is view k of example b). The engine's output gradient `g` is taken
  with respect to `outputs`."""
  layer: Any
  rule: "LayerRule"
  inputs: tf.Tensor
  outputs: tf.Tensor
  call_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  reads: frozenset = frozenset()  # keys of the trainable variables the call read
  # Tensors the rule formed in the forward pass for its per-example gradients (a
  # normalization's xhat), by name; a rule must also work without them (a record made
  # elsewhere, e.g. by benchmarks/profile_step.py).
  saved: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExampleLoop:
  """Variables whose per-example gradients are formed one example at a time, in the engine's
  one loop over the batch (`example_loop`): there, example i's gradients of every such layer
  are formed and measured, and once i's clip factor is known (from all its norms), added into
  running sums weighted by it. So the sum is of exactly the tensors that were measured (no map
  applied to the sum afterwards, whose float32 rounding the norms would never have seen), and
  needs no second weight-gradient pass over the batch.

  `example(i)` gives (gradients, squared norm): example i's masked gradients of `variables`,
  shaped like `zeros`, and their squared norm. `trained`, a boolean tensor or None (always):
  where false, no per-example work at all (a fully frozen kernel): the norms are 0 and the sums
  zeros."""
  variables: list
  example: Callable  # i -> (masked gradients, their squared norm)
  zeros: list  # one zero tensor per variable (the sums' initial values)
  trained: Optional[tf.Tensor] = None


@dataclasses.dataclass
class Pieces:
  """One call's (or one group of calls') contribution: per-example squared norms [B] of the
  masked gradients of `variables`, and a function giving their clipped sums; and the
  variables whose norms and sums come from the engine's loop over examples (`loop`), if any."""
  variables: list
  squared_norms: Optional[tf.Tensor]
  clipped_sum: Optional[Callable]  # (factors [B], kept [B] bool) -> one sum per variable
  loop: Optional[ExampleLoop] = None


class LayerRule:
  """How the per-layer engine computes one layer's per-example gradients.

  A rule must give, for every example, the gradient of that example's loss with respect to each
  of `variables(layer)`, exactly: the engine clips with the norms it gets from here, so a rule
  that under-counts lets an example move the model by more than the clip norm. Test a new rule
  against `VectorizedEngine`, as tests/tfdp_prune/layer_rules/test_registry.py does.

  The minimum is `per_example_grads`. The defaults capture the layer's own `call` (its input
  and output), own all its trainable weights, and form norms and clipped sums from the
  materialized per-example gradients. Built-in rules override `capture` (to record a
  pre-activation output) and `pieces` (to never materialize batch x kernel).
  """

  layer_classes: tuple = ()  # the classes a built-in rule serves (`registry`)

  def applies(self, layer, inputs) -> bool:  # pylint: disable=unused-argument
    """Whether this rule serves this call; if not, the generic rule does."""
    return True

  def variables(self, layer) -> list:
    """The trainable variables whose gradients the rule gives, in its own order."""
    return list(layer.trainable_weights)

  def capture(self, layer, original_call, inputs, kwargs) -> Tuple[Any, CapturedCall]:
    """Runs the layer on `inputs`; returns its outputs and the call's record."""
    outputs = original_call(inputs, **kwargs)
    return outputs, CapturedCall(layer, self, inputs, outputs, kwargs)

  def per_example_grads(self, call: CapturedCall, g: tf.Tensor, batch) -> List[tf.Tensor]:
    """Per-example gradients [B, *variable.shape], one per `variables(call.layer)`.

    Args:
      call: the captured call (`call.inputs`, `call.outputs`: B*K rows, K views per example).
      g: the gradient of the weighted loss sum with respect to `call.outputs` (same shape).
      batch: B, the number of examples (a scalar tensor).
    """
    raise NotImplementedError(f"{type(self).__name__} must define per_example_grads.")

  def pieces(self, call: CapturedCall, g, batch, views, variables, masks) -> Pieces:
    """Norms and clipped sums of the masked gradients of `variables` (a subset of the rule's,
    with their float masks), for a call no other call shares a variable with."""
    del views  # the per-example gradients already sum over views
    return from_per_example(
        variables, select(self, call, self.per_example_grads(call, g, batch), variables, masks),
        batch)

  def merge_calls(self, calls, output_grads, batch):  # pylint: disable=unused-argument
    """Several calls of one layer as one call (CapturedCall, g), or None: their per-example
    gradients are then formed per call and added."""
    return None


def variable_key(variable):
  """A variable's identity (the variable under a mixed-precision AutoCastVariable)."""
  return getattr(variable, "_variable", variable).ref()


def select(rule, call, grads, variables, masks) -> list:
  """The masked per-example gradients of `variables`, from those of all the rule's (a mask of
  None leaves that variable's unmasked).

  Raises:
    ValueError: if the rule gave another number of gradients than it has variables, or one
      whose shape is not [batch, *variable.shape] (a user's rule, most likely).
  """
  owned = rule.variables(call.layer)
  if len(grads) != len(owned):
    raise ValueError(f"Expected {type(rule).__name__}.per_example_grads to return "
                     f"{len(owned)} tensors, one per variable of {call.layer.name}. Received: "
                     f"{len(grads)}.")
  for variable, grad in zip(owned, grads):
    if grad.shape.rank is not None and not grad.shape[1:].is_compatible_with(variable.shape):
      raise ValueError(f"Expected {type(rule).__name__}.per_example_grads to return shape "
                       f"[batch, *{variable.shape.as_list()}] for {variable.name}. Received: "
                       f"{grad.shape.as_list()}.")
  by_key = {variable_key(v): grad for v, grad in zip(owned, grads)}
  return [by_key[variable_key(v)] if m is None else by_key[variable_key(v)] * m
          for v, m in zip(variables, masks)]


def from_per_example(variables, grads, batch) -> Pieces:
  """Pieces from materialized masked per-example gradients [B, ...], one per variable."""
  squared = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(t), [batch, -1]), axis=1)
                      for t in grads])
  return Pieces(variables, squared,
                lambda factors, kept: [clipping.weighted_batch_sum(t, kept, factors)
                                       for t in grads])


def rows_per_example(t, batch):
  """[B*K, ...] -> [B, K, ...], K the views (1 without), trailing axes kept as they are."""
  return tf.reshape(t, tf.concat([[batch, -1], tf.shape(t)[1:]], 0))


def positions_per_example(t, batch):
  """[B*K, ..., d] -> [B, K*..., d]: every position of every view of an example in one axis."""
  return tf.reshape(t, tf.stack([batch, -1, tf.shape(t)[-1]]))
