import numpy as np
import pytest

from tfdp_prune import clipping
from tfdp_prune.compat import tf


def _grads(rng, batch=5):
  return [tf.constant(rng.normal(size=(batch, 3, 2)), tf.float32),
          tf.constant(rng.normal(size=(batch, 4)), tf.float32)]


def test_global_norm_covers_all_variables_of_one_example():
  grads = _grads(np.random.default_rng(0))
  expected = np.sqrt(sum(np.sum(np.reshape(g.numpy(), (5, -1)) ** 2, axis=1) for g in grads))
  np.testing.assert_allclose(clipping.per_example_global_norms(grads), expected, rtol=1e-6)


def test_clip_factors_scale_to_the_clip_and_leave_small_norms_alone():
  factors = clipping.clip_factors(tf.constant([0.0, 0.5, 2.0, 8.0]), 2.0)
  np.testing.assert_allclose(factors, [1.0, 1.0, 1.0, 0.25])


def test_norm_is_taken_after_masking():
  grads = [tf.constant([[3.0, 4.0]])]
  masks = [tf.constant([0.0, 1.0])]
  result = clipping.clipped_sum(grads, masks, l2_norm_clip=2.0, sample_weight=tf.ones([1]))
  # Masked gradient (0, 4) has norm 4 -> scaled by 1/2. Unmasked norm 5 would give 4 * 2/5.
  np.testing.assert_allclose(result.grads[0], [0.0, 2.0], atol=1e-7)


# 0: dropped rows are replaced only when the plain weighted sum is not finite (large tensors).
@pytest.mark.parametrize("replace_when_needed_from", [0, clipping.REPLACE_WHEN_NEEDED_MIN_ELEMENTS])
@pytest.mark.parametrize("run", [lambda f: f(), lambda f: tf.function(f)()], ids=["eager", "graph"])
def test_clipped_sum_drops_padding_and_counts_non_finite_examples(monkeypatch, run,
                                                                   replace_when_needed_from):
  monkeypatch.setattr(clipping, "REPLACE_WHEN_NEEDED_MIN_ELEMENTS", replace_when_needed_from)
  grads = [tf.constant([[1.0, 0.0], [np.nan, 1.0], [0.0, np.inf], [100.0, 0.0]])]
  weights = tf.constant([1.0, 1.0, 1.0, 0.0])
  result = run(lambda: clipping.clipped_sum(grads, [tf.ones([2])], 10.0, weights))
  np.testing.assert_array_equal(result.grads[0], [1.0, 0.0])
  assert int(result.num_non_finite) == 2
  assert int(result.num_units) == 4


def test_weighted_batch_sum_without_a_non_finite_row_is_the_plain_sum(monkeypatch):
  monkeypatch.setattr(clipping, "REPLACE_WHEN_NEEDED_MIN_ELEMENTS", 0)
  g = tf.constant([[1.0, 2.0], [3.0, 4.0], [1e30, -1e30]])
  summed = clipping.weighted_batch_sum(g, tf.constant([True, True, False]),
                                       tf.constant([0.5, 1.0, 1.0]))
  np.testing.assert_array_equal(summed, [3.5, 5.0])  # the dropped row's factor is 0


def test_weighted_batch_sum_of_rows_unknown_when_traced_counts_them_from_the_factors():
  """Per-example gradients out of a `tf.cond` (a materialized strategy's, whose frozen branch
  has 0 rows) have an unknown batch size: a large sum still replaces dropped rows only when it
  is not finite (a `cond`), not on every step (a select over the whole tensor)."""
  factors, kept = tf.constant([0.5, 1.0]), tf.constant([True, False])
  summed = tf.function(lambda g: clipping.weighted_batch_sum(g, kept, factors),
                       input_signature=[tf.TensorSpec([None, 200, 200])])
  ops = {op.type for op in summed.get_concrete_function().graph.get_operations()}
  assert ops & {"If", "StatelessIf"}, sorted(ops)
  g = np.ones((2, 200, 200), np.float32)
  g[1, 0, 0] = np.nan  # the dropped row
  np.testing.assert_array_equal(summed(tf.constant(g)), np.full((200, 200), 0.5))


def test_padding_with_non_finite_gradient_is_not_counted():
  result = clipping.clipped_sum([tf.constant([[np.nan]])], [tf.ones([1])], 1.0, tf.zeros([1]))
  assert int(result.num_non_finite) == 0
  np.testing.assert_array_equal(result.grads[0], [0.0])


def test_microbatches_are_the_clipping_unit():
  grads = [tf.constant([[4.0], [0.0], [0.0], [1.0]])]
  result = clipping.clipped_sum(grads, [tf.ones([1])], 1.0, tf.ones([4]), num_microbatches=2)
  # Microbatch means 2.0 and 0.5; clipped to 1.0 and 0.5.
  np.testing.assert_allclose(result.grads[0], [1.5])
  assert int(result.num_units) == 2


def test_microbatches_that_do_not_divide_the_batch_are_an_error():
  with pytest.raises(ValueError, match="must divide the batch size"):
    clipping.clipped_sum([tf.ones([5, 1])], [tf.ones([1])], 1.0, tf.ones([5]),
                         num_microbatches=2)
