import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import masks
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_each_rule_gives_exactly_the_asked_sparsity(sparsity, scope):
  model = T.dense_model()
  variables = [v for v in model.trainable_variables if len(v.shape) == 2]
  public = T.dense_data(n=32, seed=1)
  for rule in (masks.MagnitudeRule(sparsity, scope), masks.RandomRule(sparsity, scope, seed=1),
               masks.PublicGradientRule(sparsity, scope, loss=T.per_example_loss()),
               masks.PublicGradientRule(sparsity, scope, times_weight=True,
                                        loss=T.per_example_loss())):
    result = rule.masks(model, variables, public_data=public)
    total = sum(m.size for m in result)
    frozen = sum(m.size - m.sum() for m in result)
    if scope == "global":
      assert frozen == round(sparsity * total), type(rule).__name__
    else:
      for m in result:
        assert m.size - m.sum() == round(sparsity * m.size), type(rule).__name__
    assert all(m.dtype == bool for m in result)


def test_ties_are_broken_deterministically_and_keep_the_exact_count():
  scores = np.zeros((4, 5))
  first = masks.top_k_mask(scores, 7)
  assert first.sum() == 7
  np.testing.assert_array_equal(first, masks.top_k_mask(scores.copy(), 7))
  assert first.ravel()[:7].all()  # lower flat index wins a tie


def test_magnitude_keeps_the_largest_absolute_values():
  weights = np.array([[0.1, -3.0, 2.0], [-0.5, 0.0, 1.0]])
  (mask,) = masks.masks_from_scores([np.abs(weights)], sparsity=0.5)
  np.testing.assert_array_equal(mask, [[False, True, True], [False, False, True]])


def test_layer_and_global_scopes_differ_when_layer_scales_differ():
  small, large = np.full((10,), 0.01), np.full((10,), 10.0)
  small[:5] += 0.001
  large[:5] += 1.0
  layer = masks.masks_from_scores([small, large], 0.5, "layer")
  global_ = masks.masks_from_scores([small, large], 0.5, "global")
  assert layer[0].sum() == 5 and layer[1].sum() == 5
  assert global_[0].sum() == 0 and global_[1].sum() == 10


def test_random_masks_are_reproducible_and_seed_and_round_dependent():
  variables = T.dense_model().trainable_variables[:1]
  mask = lambda seed, round_index=0: masks.RandomRule(0.5, seed=seed).masks(
      None, variables, round_index)[0]
  np.testing.assert_array_equal(mask(1), mask(1))
  assert not np.array_equal(mask(1), mask(2))
  assert not np.array_equal(mask(1, 0), mask(1, 1))


def test_public_gradient_scores_are_the_summed_public_gradient():
  model = T.dense_model()
  variables = model.trainable_variables
  x, y = T.dense_data(n=10, seed=2)
  loss = T.per_example_loss()
  from_batches = masks.public_gradient(model, variables, (x, y), loss, batch_size=3)
  with tf.GradientTape() as tape:
    total = tf.reduce_sum(loss(y, model(x)))
  for got, want in zip(from_batches, tape.gradient(total, variables)):
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), float("inf"), "0.5", None, True])
def test_invalid_sparsity_is_a_clear_error(sparsity):
  with pytest.raises(ValueError, match=r"sparsity in \[0, 1\)"):
    masks.MagnitudeRule(sparsity)


def test_invalid_scope_and_rule_names_are_clear_errors():
  with pytest.raises(ValueError, match="scope"):
    masks.RandomRule(0.5, scope="model")
  with pytest.raises(ValueError, match="rule to be one of"):
    masks.get("largest")


def test_public_gradient_without_public_data_is_an_error():
  with pytest.raises(ValueError, match="needs public data"):
    masks.PublicGradientRule(0.5).masks(T.dense_model(), [], public_data=None)


@pytest.mark.parametrize("rule", [
    masks.MagnitudeRule(0.7, "global"), masks.RandomRule(0.2, seed=3),
    masks.PublicGradientRule(0.9, times_weight=True,
                             loss=keras.losses.MeanSquaredError(reduction="none")),
])
def test_rules_round_trip_through_config(rule):
  restored = masks.deserialize(masks.serialize(rule))
  assert type(restored) is type(rule)
  assert masks.serialize(restored) == masks.serialize(rule)
  assert isinstance(restored, tfdp_prune.MaskRule)


def test_layer_and_global_magnitude_differ_on_a_model_with_unequal_layer_scales():
  model = T.dense_model()
  first, second = [v for v in model.trainable_variables if "kernel" in v.name]
  second.assign(second * 100.0)
  layer = masks.MagnitudeRule(0.5, "layer").masks(model, [first, second])
  global_ = masks.MagnitudeRule(0.5, "global").masks(model, [first, second])
  assert layer[0].mean() == 0.5 and layer[1].mean() == 0.5
  # 128 + 48 coordinates, 88 kept: the 48 of the large layer and only 40 of the small one.
  assert global_[1].all() and global_[0].sum() == 40
