"""WSConv2DRule's closed-form transposed Jacobian of the weight standardization, against
autodiff through `WSConv2D.standardized_kernel` (the engine's end-to-end checks against the
vectorized reference are in test_per_layer.py)."""

import numpy as np
import pytest

from tfdp_prune import models
from tfdp_prune import ws_conv_rule
from tfdp_prune.compat import tf


def _autodiff_vjp(layer, kernel, cotangent):
  with tf.GradientTape() as tape:
    tape.watch(kernel)
    standardized = layer.standardized_kernel(kernel)
  return tape.gradient(standardized, kernel, output_gradients=cotangent)


# A kernel of small variance, so that epsilon's place (inside the square root) matters.
@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_standardization_vjp_matches_autodiff_per_example_and_summed(scale):
  rng = np.random.default_rng(0)
  layer = models.WSConv2D(5, 3)
  layer.build([None, 6, 6, 4])
  kernel = tf.constant(rng.normal(0.3, scale, size=(3, 3, 4, 5)), tf.float32)
  # Cotangents partly along the kernel and its mean, the directions the Jacobian removes.
  cotangents = tf.constant(rng.normal(size=(3, 3, 3, 4, 5)), tf.float32) + 2.0 * kernel + 1.0
  vjp = ws_conv_rule.standardization_vjp(*layer.standardize(kernel))

  per_example = vjp(cotangents).numpy()
  for i in range(3):
    expected = _autodiff_vjp(layer, kernel, cotangents[i]).numpy()
    np.testing.assert_allclose(per_example[i], expected, rtol=1e-4, atol=1e-5 * np.abs(
        expected).max())
  # Linear: the summed cotangent maps to the sum (the clipped sum relies on it).
  np.testing.assert_allclose(vjp(tf.reduce_sum(cotangents, 0)).numpy(), per_example.sum(0),
                             rtol=1e-4, atol=1e-5 * np.abs(per_example).max())
