import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import tfmot_interop
from tfdp_prune.compat import keras
from tests.tfdp_prune import _testing as T

tfmot_sparsity = pytest.importorskip("tensorflow_model_optimization").sparsity.keras


def _wrapped_model(frequency=1, **optimizer_kwargs):
  """A model wrapped whole by prune_low_magnitude whose OWN schedule would re-prune 50% by
  magnitude at every step, compiled with the DP optimizer."""
  model = tfmot_sparsity.prune_low_magnitude(
      T.dense_model(seed=1),
      pruning_schedule=tfmot_sparsity.ConstantSparsity(0.5, begin_step=0, frequency=frequency))
  kwargs = dict(noise_multiplier=1.0, momentum=0.9)
  kwargs.update(optimizer_kwargs)
  return T.dp_model(model, **kwargs)


def _kernels(model):
  return [w.layer.kernel for w in tfmot_interop.pruning_wrappers(model)]


def _tfmot_masks(model):
  return [m.numpy() for w in tfmot_interop.pruning_wrappers(model)
          for _, m, _ in w.pruning_vars]


def test_the_maskable_variables_of_a_wrapped_model_are_the_inner_kernels():
  model = _wrapped_model()
  assert len(tfmot_interop.pruning_wrappers(model)) == 2
  assert ([v.ref() for v in tfdp_prune.MaskableSpec().variables(model)]
          == [k.ref() for k in _kernels(model)])


def test_a_tfmot_wrapped_model_trains_with_our_freezing_mask_and_strips_cleanly():
  x, y = T.dense_data(n=64)
  model = _wrapped_model()
  # Random 80% sparsity: tfmot's schedule (50% by magnitude, every step) would choose another
  # mask, and UpdatePruningStep is deliberately not passed.
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(0.8, seed=3))
  start = [k.numpy().copy() for k in _kernels(model)]
  model.fit(x, y, batch_size=8, epochs=2, callbacks=[freezing], verbose=0)
  assert model.optimizer.iterations.numpy() == 16
  kernels = [k.numpy() for k in _kernels(model)]
  for kernel, before, mask, tfmot_mask in zip(kernels, start, freezing.masks,
                                              _tfmot_masks(model)):
    assert mask.mean() == pytest.approx(0.2, abs=0.02)
    np.testing.assert_array_equal(kernel[~mask], 0.0)  # pruned per OUR mask
    assert np.all(kernel[mask] != before[mask])  # the kept coordinates trained
    np.testing.assert_array_equal(tfmot_mask, mask.astype(np.float32))

  plain = tfmot_sparsity.strip_pruning(model)
  assert not tfmot_interop.pruning_wrappers(plain)
  assert [type(layer) for layer in plain.layers] == [keras.layers.Dense] * 2
  np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0),
                             atol=1e-6)
  for layer, kernel in zip(plain.layers, kernels):
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def test_a_tfmot_wrapped_model_trains_with_parameter_selection_and_prunes_nothing():
  x, y = T.dense_data(n=64)
  model = _wrapped_model()
  start = [k.numpy().copy() for k in _kernels(model)]
  selection = tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(0.9, seed=4), select_every=1)
  model.fit(x, y, batch_size=8, callbacks=[selection], verbose=0)
  for kernel, before, tfmot_mask in zip(_kernels(model), start, _tfmot_masks(model)):
    np.testing.assert_array_equal(tfmot_mask, 1.0)  # selection never prunes: nothing is zero
    assert not np.any(kernel.numpy() == 0.0)
    # 8 steps at 10% each: most coordinates moved, some (~0.9^8 = 43%) never did
    moved = kernel.numpy() != before
    assert 0.3 < moved.mean() < 0.8
  plain = tfmot_sparsity.strip_pruning(model)
  np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0),
                             atol=1e-6)


def test_our_mask_overrides_a_schedule_that_already_pruned_in_an_earlier_fit():
  x, y = T.dense_data(n=32)
  model = _wrapped_model(noise_multiplier=0.0)
  model.fit(x, y, batch_size=8, callbacks=[tfmot_sparsity.UpdatePruningStep()], verbose=0)
  assert all(m.mean() == 0.5 for m in _tfmot_masks(model))  # tfmot's schedule pruned
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(0.8, seed=6))
  model.fit(x, y, batch_size=8, callbacks=[freezing], verbose=0)  # its traced step is stale
  for kernel, mask, tfmot_mask in zip(_kernels(model), freezing.masks, _tfmot_masks(model)):
    np.testing.assert_array_equal(tfmot_mask, mask.astype(np.float32))
    np.testing.assert_array_equal(kernel.numpy()[~mask], 0.0)


def test_public_pretraining_of_a_fresh_wrapped_model_needs_no_tfmot_callback():
  x, y = T.dense_data(n=32)
  model = _wrapped_model()
  freezing = tfdp_prune.ParameterFreezing(
      tfdp_prune.PublicGradientRule(0.6), public_data=T.dense_data(n=16, seed=9),
      public_epochs=1)
  model.fit(x, y, batch_size=8, callbacks=[freezing], verbose=0)
  for kernel, mask, tfmot_mask in zip(_kernels(model), freezing.masks, _tfmot_masks(model)):
    np.testing.assert_array_equal(tfmot_mask, mask.astype(np.float32))
    np.testing.assert_array_equal(kernel.numpy()[~mask], 0.0)


def test_adopted_masks_are_kept_by_the_wrapper_and_tfmots_callbacks_and_checkpoints(tmp_path):
  x, y = T.dense_data(n=32)
  model = _wrapped_model(noise_multiplier=0.0)
  freezing = tfdp_prune.ParameterFreezing(tfdp_prune.RandomRule(0.7, seed=5))
  # With tfmot's own callback too; then the mask variables go through a checkpoint.
  model.fit(x, y, batch_size=8, callbacks=[freezing, tfmot_sparsity.UpdatePruningStep()],
            verbose=0)
  for mask, tfmot_mask in zip(freezing.masks, _tfmot_masks(model)):
    np.testing.assert_array_equal(tfmot_mask, mask.astype(np.float32))
  path = str(tmp_path / "weights")
  model.save_weights(path)
  restored = _wrapped_model()
  restored.load_weights(path).expect_partial()  # its optimizer is not built yet
  for mask, tfmot_mask in zip(freezing.masks, _tfmot_masks(restored)):
    np.testing.assert_array_equal(tfmot_mask, mask.astype(np.float32))


def test_adopt_masks_without_wrappers_does_nothing_and_checks_its_arguments():
  model = T.dense_model()
  variables = tfdp_prune.MaskableSpec().variables(model)
  assert tfmot_interop.adopt_masks(model, variables, T.random_masks(variables)) == [None] * 2
  wrapped = _wrapped_model()
  variables = tfdp_prune.MaskableSpec().variables(wrapped)
  with pytest.raises(ValueError, match="one mask per variable"):
    tfmot_interop.adopt_masks(wrapped, variables, [])
  with pytest.raises(ValueError, match="Expected a mask of shape"):
    tfmot_interop.adopt_masks(wrapped, variables, [np.ones((2, 2), bool)] * 2)


# That tfdp_prune never imports tfmot on its own (masks from public data included) is checked
# in the TensorFlow-importing subprocess of test_compat.py (one import, several checks).
