import numpy as np
import pytest

from tfdp_prune import clipping
from tfdp_prune import dp_settings
from tfdp_prune import dp_step
from tfdp_prune import noise
from tfdp_prune import per_example
from tfdp_prune.compat import tf


# ---- 1. per-example clipped sum -----------------------------------------------------------------

class _UnitReportingEngine(per_example.PerExampleEngine):
  """Returns, as its only "gradient", the clipping unit it was asked for (0 = per example) and
  the clip it was given, so that a test can see which path ran even inside a `cond`."""

  def clipped_sum(self, model, loss_fn, x, y, sample_weight, variables, masks, l2_norm_clip,
                  num_microbatches=None):
    unit = tf.constant(float(num_microbatches or 0))
    clipped = clipping.ClippedSum([unit, tf.constant(l2_norm_clip)], tf.shape(sample_weight)[0],
                                  tf.constant(0))
    return per_example.EngineOutput(clipped, sample_weight, x)


def _settings(**kwargs):
  return dp_settings.DPSettings(l2_norm_clip=0.25, noise_multiplier=1.0,
                                per_example_engine=_UnitReportingEngine(), **kwargs)


def _run(settings, rows, weights=None):
  x = tf.zeros([rows, 2])
  weights = tf.ones([rows]) if weights is None else tf.constant(weights, tf.float32)
  output = dp_step.per_example_clipped_sum(None, None, x, x, weights, [], [], settings)
  unit, clip = (float(g) for g in output.clipped.grads)
  return unit, clip


def test_the_clipped_sum_uses_the_settings_clip_and_clipping_unit():
  assert _run(_settings(), rows=8) == (0.0, 0.25)  # per example
  assert _run(_settings(num_microbatches=4), rows=8) == (4.0, 0.25)


def test_as_many_microbatches_as_rows_is_the_per_example_path_static_or_dynamic():
  settings = _settings(num_microbatches=4)
  assert _run(settings, rows=4) == (0.0, 0.25)

  @tf.function(input_signature=[tf.TensorSpec([None, 2]), tf.TensorSpec([None])])
  def unknown_rows(x, weights):
    output = dp_step.per_example_clipped_sum(None, None, x, x, weights, [], [], settings)
    return output.clipped.grads[0]

  assert float(unknown_rows(tf.zeros([4, 2]), tf.ones([4]))) == 0.0
  assert float(unknown_rows(tf.zeros([8, 2]), tf.ones([8]))) == 4.0


def test_real_microbatches_refuse_padding_rows_when_the_step_runs():
  settings = _settings(num_microbatches=4)

  @tf.function  # traced with a batch whose weights are only known when it runs
  def step(x, weights):
    clipped = dp_step.per_example_clipped_sum(None, None, x, x, weights, [], [],
                                              settings).clipped
    return clipped.num_units

  assert int(step(tf.zeros([8, 2]), tf.ones([8]))) == 8
  with pytest.raises(tf.errors.InvalidArgumentError, match="padding rows"):
    step(tf.zeros([8, 2]), tf.constant([1, 1, 1, 0, 1, 1, 1, 1], tf.float32))


# ---- 2. accumulate ------------------------------------------------------------------------------

def test_accumulate_adds_the_sums_and_counts_the_units():
  accumulators = [tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])]
  units = tf.Variable(5.0)
  dp_step.accumulate(accumulators, [tf.constant([0.5, -2.0]), tf.constant([[1.0]])], units,
                     tf.constant(3))
  np.testing.assert_array_equal(accumulators[0], [1.5, 0.0])
  np.testing.assert_array_equal(accumulators[1], [[4.0]])
  assert float(units) == 8.0


@pytest.mark.parametrize("at_end", [True, False])
def test_reset_at_end_zeroes_the_sums_only_at_a_logical_batch_end(at_end):
  accumulator, units = tf.Variable([1.5, -2.0]), tf.Variable(7.0)
  dp_step.reset_at_end(tf.constant(at_end), [accumulator], [accumulator.read_value()], units)
  np.testing.assert_array_equal(accumulator, [0.0, 0.0] if at_end else [1.5, -2.0])
  assert float(units) == (0.0 if at_end else 7.0)


# ---- 3. noise -----------------------------------------------------------------------------------

@pytest.mark.parametrize("replicas", [1, 2, 8])
def test_the_replicas_noise_sums_to_std_sigma_times_clip(replicas):
  stddev = dp_step.replica_noise_stddev(1.5, 0.4, replicas)
  assert replicas * stddev ** 2 == pytest.approx((1.5 * 0.4) ** 2, rel=1e-12)


def test_noise_is_drawn_at_a_logical_batch_end_only():
  accumulated = [tf.constant([1.0, 2.0, 3.0, 4.0])]
  masks = [tf.constant([1.0, 0.0, 1.0, 0.0])]
  generator = tf.random.Generator.from_seed(7)
  state = generator.state.numpy().copy()

  before_end = dp_step.noisy_sum_at_end(tf.constant(False), accumulated, masks, 2.0, generator)
  np.testing.assert_array_equal(before_end[0], [0.0] * 4)
  np.testing.assert_array_equal(generator.state, state)  # no draw was spent

  at_end = dp_step.noisy_sum_at_end(tf.constant(True), accumulated, masks, 2.0, generator)
  expected = noise.add_gaussian_noise(accumulated, masks, 2.0,
                                      tf.random.Generator.from_seed(7))
  np.testing.assert_array_equal(at_end[0], expected[0])
  np.testing.assert_array_equal(at_end[0].numpy()[1::2], [2.0, 4.0])  # frozen: no noise
  assert np.all(at_end[0].numpy()[0::2] != [1.0, 3.0])


# ---- 4. scale -----------------------------------------------------------------------------------

def test_poisson_sampling_divides_by_the_expected_batch_whatever_the_rows():
  for rows in (0.0, 3.0, 500.0):
    assert float(dp_step.average_divisor(64.0, tf.constant(rows))) == 64.0
  assert float(dp_step.average_divisor(64.0)) == 64.0  # no count needed


def test_fixed_batches_divide_by_the_rows_and_an_empty_batch_by_one():
  assert float(dp_step.average_divisor(None, tf.constant(48.0))) == 48.0
  assert float(dp_step.average_divisor(None, tf.constant(0.0))) == 1.0


def test_scale_divides_each_gradient_in_its_own_dtype():
  scaled = dp_step.scale([tf.constant([3.0, -6.0]), tf.constant([1.5], tf.float16)],
                         tf.constant(3.0))
  np.testing.assert_array_equal(scaled[0], [1.0, -2.0])
  assert scaled[1].dtype == tf.float16
  np.testing.assert_array_equal(scaled[1], [0.5])


# ---- 6. restore frozen --------------------------------------------------------------------------

def test_keep_frozen_takes_the_update_on_trained_coordinates_only_bit_for_bit():
  before = tf.constant([0.1, 0.2, 0.3, 0.4])
  updated = tf.constant([9.0, 9.0, 9.0, 9.0])
  kept = dp_step.keep_frozen(updated, before, tf.constant([1.0, 0.0, 0.0, 1.0]))
  np.testing.assert_array_equal(kept, np.array([9.0, 0.2, 0.3, 9.0], np.float32))
