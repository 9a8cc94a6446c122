"""Update-mask rules: which coordinates DP training updates, chosen without private data.

A rule scores every coordinate of the maskable variables; the mask keeps the highest scores.
Scores come from the current weights (post-processing of already-DP weights, or pre-trained
ones), from randomness, or from gradients on PUBLIC data, so choosing costs no privacy.
The functions here are pure (numpy in, numpy out) and usable without `fit`.
"""

import abc
from typing import Optional, Sequence

import numpy as np

from tfdp_prune import _validate
from tfdp_prune import public_data as public_data_lib
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf

SCOPES = ("layer", "global")


def check_sparsity(sparsity) -> float:
  """Sparsity is the frozen fraction: a number in [0, 1)."""
  _validate.fraction("sparsity", sparsity,
                     " (the fraction of coordinates frozen; 1.0 would train nothing)")
  return float(sparsity)


def check_scope(scope) -> str:
  _validate.one_of("scope", scope, SCOPES)
  return scope


def keep_count(size: int, sparsity: float) -> int:
  """Coordinates kept (trained) out of `size` at `sparsity`: the frozen count is rounded."""
  return size - int(round(sparsity * size))


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
  """True at the k highest scores. Ties go to the lower flat index, so the result is
  deterministic and has exactly k True entries."""
  flat = np.asarray(scores, np.float64).ravel()
  order = np.argsort(-flat, kind="stable")
  mask = np.zeros(flat.size, bool)
  mask[order[:k]] = True
  return mask.reshape(np.shape(scores))


def masks_from_scores(scores: Sequence[np.ndarray], sparsity: float,
                      scope: str = "layer") -> list:
  """Boolean masks keeping the highest scores: in each tensor separately (`scope="layer"`, the
  same sparsity everywhere) or across all tensors at once (`scope="global"`, one threshold)."""
  sparsity = check_sparsity(sparsity)
  if check_scope(scope) == "layer":
    return [top_k_mask(s, keep_count(np.size(s), sparsity)) for s in scores]
  flat = np.concatenate([np.ravel(s) for s in scores]) if scores else np.zeros(0)
  kept = top_k_mask(flat, keep_count(flat.size, sparsity))
  splits = np.cumsum([np.size(s) for s in scores])[:-1]
  return [part.reshape(np.shape(s)) for part, s in zip(np.split(kept, splits), scores)]


class MaskRule(abc.ABC):
  """Scores coordinates; `masks` turns the scores into masks of the configured sparsity."""

  name = None  # set by each rule; the key in `get`

  def __init__(self, sparsity: float, scope: str = "layer"):
    self.sparsity = check_sparsity(sparsity)
    self.scope = check_scope(scope)

  @abc.abstractmethod
  def scores(self, model: keras.Model, variables: Sequence[tf.Variable], round_index: int,
             public_data=None) -> list:
    """One score array per variable; higher = more worth training."""

  def masks(self, model, variables, round_index=0, public_data=None) -> list:
    """Masks for `variables` (True = trained). `round_index` counts re-selections."""
    return masks_from_scores(self.scores(model, variables, round_index, public_data),
                             self.sparsity, self.scope)

  def get_config(self) -> dict:
    return {"sparsity": self.sparsity, "scope": self.scope}

  @classmethod
  def from_config(cls, config):
    return cls(**config)


class MagnitudeRule(MaskRule):
  """Keeps the largest |w| of the current weights."""

  name = "magnitude"

  def scores(self, model, variables, round_index, public_data=None):
    return [np.abs(v.numpy()) for v in variables]


class RandomRule(MaskRule):
  """Keeps uniformly random coordinates; the same (seed, round) gives the same mask."""

  name = "random"

  def __init__(self, sparsity, scope="layer", seed: int = 0):
    super().__init__(sparsity, scope)
    self.seed = seed

  def scores(self, model, variables, round_index, public_data=None):
    rng = np.random.default_rng([self.seed, round_index])
    return [rng.random(v.shape) for v in variables]

  def get_config(self):
    return dict(super().get_config(), seed=self.seed)


class PublicGradientRule(MaskRule):
  """Keeps the largest |g| (or |w * g| with `times_weight`), g the gradient of the summed
  per-example loss over the whole PUBLIC dataset at the current weights."""

  name = "public_gradient"

  def __init__(self, sparsity, scope="layer", times_weight: bool = False,
               loss: Optional[keras.losses.Loss] = None):
    super().__init__(sparsity, scope)
    self.times_weight = times_weight
    self.loss = loss

  def scores(self, model, variables, round_index, public_data=None):
    if public_data is None:
      raise ValueError("The public_gradient rule needs public data: pass public_data=(x, y) or "
                       "a tf.data.Dataset of (x, y) batches to the mask callback.")
    public_data_lib.check(public_data, source="PublicGradientRule's public_data")
    gradient = public_gradient(model, variables, public_data, self.loss or model.loss)
    if self.times_weight:
      return [np.abs(g * v.numpy()) for g, v in zip(gradient, variables)]
    return [np.abs(g) for g in gradient]

  def get_config(self):
    return dict(super().get_config(), times_weight=self.times_weight,
                loss=keras.losses.serialize(self.loss) if self.loss is not None else None)

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    if config.get("loss") is not None:
      config["loss"] = keras.losses.deserialize(config["loss"])
    return cls(**config)


def public_gradient(model, variables, public_data, loss_fn, batch_size: int = 256) -> list:
  """Sum over the public examples of the per-example loss gradient w.r.t. `variables`."""
  total = [np.zeros(v.shape, np.float64) for v in variables]
  for x, y in _batches(public_data, batch_size):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(loss_fn(y, model(x, training=False)))
    grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    total = [t + tf.convert_to_tensor(g).numpy() for t, g in zip(total, grads)]
  return total


def _batches(data, batch_size):
  if isinstance(data, tf.data.Dataset):
    for batch in data:
      yield batch[0], batch[1]
    return
  x, y = data
  for start in range(0, len(y), batch_size):
    window = slice(start, start + batch_size)
    if isinstance(x, dict):  # named inputs
      yield {name: values[window] for name, values in x.items()}, y[window]
    else:
      yield x[window], y[window]


_RULES = {cls.name: cls for cls in (MagnitudeRule, RandomRule, PublicGradientRule)}
# The rule names a user can choose (`get`, --rule): the keys of the registry above.
RULES = tuple(_RULES)


def get(rule, **kwargs) -> MaskRule:
  """A rule from an instance, or from its name plus keyword arguments."""
  if isinstance(rule, MaskRule):
    return rule
  if rule in _RULES:
    return _RULES[rule](**kwargs)
  raise ValueError(f"Expected rule to be one of {sorted(_RULES)} or a MaskRule. Received: "
                   f"rule={rule!r}.")


def serialize(rule: MaskRule) -> dict:
  return {"name": rule.name, "config": rule.get_config()}


def deserialize(config: dict) -> MaskRule:
  return _RULES[config["name"]].from_config(config["config"])


def frozen_fractions(model, variables, masks):
  """(frozen fraction of ALL trainable coordinates of `model`, {variable name: frozen fraction
  of that variable}) for `masks` (1/True = trained) of `variables`."""
  total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  per_variable = {}
  frozen_total = 0
  for variable, mask in zip(variables, masks):
    frozen = int(np.size(mask) - np.count_nonzero(mask))
    frozen_total += frozen
    per_variable[variable.name.split(":")[0]] = frozen / np.size(mask)
  return frozen_total / total, per_variable
