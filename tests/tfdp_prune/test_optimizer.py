import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats

import tfdp_prune
from tfdp_prune import dp_settings
from tfdp_prune import randomness
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.optimizer import DPOptimizerMixin
from tests.tfdp_prune import _testing as T


# ---- per-example gradients: the clipped sum equals a loop over single examples -----------------

def _conv_model():
  return keras.Sequential([
      keras.Input((6, 6, 2)),
      keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
      keras.layers.Flatten(),
      keras.layers.Dense(3),
  ]), np.random.default_rng(1).normal(size=(12, 6, 6, 2)).astype("float32")


def _group_norm_model():
  return keras.Sequential([
      keras.Input((6, 6, 2)),
      keras.layers.Conv2D(8, 3, use_bias=False),
      keras.layers.GroupNormalization(groups=4),
      keras.layers.Activation("relu"),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(3),
  ]), np.random.default_rng(2).normal(size=(12, 6, 6, 2)).astype("float32")


def _embedding_model():
  return keras.Sequential([
      keras.Input((5,), dtype="int32"),
      keras.layers.Embedding(20, 4),
      keras.layers.GlobalAveragePooling1D(),
      keras.layers.Dense(3),
  ]), np.random.default_rng(3).integers(0, 20, size=(12, 5)).astype("int32")


def _dense_model():
  return T.dense_model(), T.dense_data(n=12)[0]


@pytest.mark.parametrize("engine", [tfdp_prune.VectorizedEngine, tfdp_prune.PerLayerEngine])
@pytest.mark.parametrize("build", [_dense_model, _conv_model, _group_norm_model, _embedding_model])
def test_clipped_sum_equals_a_loop_over_single_examples(build, engine):
  keras.utils.set_random_seed(0)
  model, x = build()
  y = np.random.default_rng(0).integers(0, 3, size=len(x)).astype("int32")
  variables = model.trainable_variables
  masks = T.random_masks(variables, keep=0.6)
  loss_fn = T.per_example_loss()
  clip = 0.05  # small enough that every example is clipped
  output = engine().clipped_sum(
      model, loss_fn, x, y, tf.ones([len(x)]), variables,
      [tf.constant(m, tf.float32) for m in masks], clip)
  expected = T.single_example_reference(model, loss_fn, x, y, masks, clip)
  for got, want in zip(output.clipped.grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert int(output.clipped.num_non_finite) == 0


# ---- equivalence to plain SGD when DP is switched off ------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_without_noise_clip_or_mask_it_is_plain_sgd(steps):
  x, y = T.dense_data(n=16 * steps)
  dp = T.dp_model(T.dense_model(seed=5), l2_norm_clip=1e9, noise_multiplier=0.0,
                  learning_rate=0.5)
  plain = T.dense_model(seed=5)
  plain.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  for model in (dp, plain):
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
  assert dp.optimizer.iterations.numpy() == steps
  for got, want in zip(T.weights(dp), T.weights(plain)):
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---- masks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer_class,kwargs", [
    (tfdp_prune.DPKerasSGDOptimizer, dict(momentum=0.9, weight_decay=0.01)),
    (tfdp_prune.DPKerasAdamOptimizer, dict(weight_decay=0.01, amsgrad=True)),
])
def test_frozen_coordinates_and_their_slots_stay_bit_exact(optimizer_class, kwargs):
  x, y = T.dense_data(n=20 * 8)
  model = T.dp_model(T.dense_model(), optimizer_class=optimizer_class, noise_multiplier=1.0,
                     learning_rate=0.05, **kwargs)
  optimizer = model.optimizer
  variables = model.trainable_variables
  model.fit(x[:16], y[:16], batch_size=8, verbose=0)  # dense steps: every slot is non-zero now
  masks = T.random_masks(variables, keep=0.3)
  optimizer.set_update_masks(variables, masks)
  slots = {v.ref(): optimizer._registry.slots(v) for v in variables}
  assert all(len(s) >= 2 if optimizer_class is tfdp_prune.DPKerasAdamOptimizer else len(s) == 1
             for s in slots.values())
  before = [(v.numpy().copy(), [s.numpy().copy() for s in slots[v.ref()]]) for v in variables]
  assert all(np.all(value != 0) for _, values in before for value in values)

  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  assert optimizer.iterations.numpy() == 22

  for v, mask, (value, slot_values) in zip(variables, masks, before):
    frozen = ~mask
    np.testing.assert_array_equal(v.numpy()[frozen], value[frozen])
    assert np.all(v.numpy()[mask] != value[mask])  # trained coordinates all moved
    for slot, slot_value in zip(slots[v.ref()], slot_values):
      np.testing.assert_array_equal(slot.numpy()[frozen], slot_value[frozen])


def test_noise_std_is_sigma_clip_over_batch_on_updated_coordinates_only():
  # An all-padding batch has a zero clipped sum: the update is -lr * noise / batch_size.
  sigma, clip, batch, lr = 1.3, 0.8, 8, 1.0
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((100,)), keras.layers.Dense(100, use_bias=False)])
  # Seeded (insecure) so that the KS test's outcome is deterministic.
  T.dp_model(model, l2_norm_clip=clip, noise_multiplier=sigma, learning_rate=lr,
             insecure_noise_seed=7)
  variables = model.trainable_variables
  model.optimizer.build(variables)
  mask = T.random_masks(variables, keep=0.5)[0]
  model.optimizer.set_update_masks(variables, [mask])
  before = variables[0].numpy().copy()
  x = np.random.default_rng(0).normal(size=(batch, 100)).astype("float32")
  y = np.zeros(batch, "int32")
  model.fit(x, y, sample_weight=np.zeros(batch), batch_size=batch, verbose=0)
  delta = variables[0].numpy() - before

  np.testing.assert_array_equal(delta[~mask], 0.0)
  updated = delta[mask]
  expected = sigma * clip / batch * lr
  assert stats.kstest(updated, "norm", args=(0, expected)).pvalue > 1e-3
  for wrong in (expected * 2 / 3, expected * 3 / 2):
    assert stats.kstest(updated, "norm", args=(0, wrong)).pvalue < 1e-6


def test_masks_are_validated():
  model = T.dp_model(T.dense_model())
  variables = model.trainable_variables
  optimizer = model.optimizer
  with pytest.raises(RuntimeError, match="optimizer.build"):
    optimizer.set_update_masks(variables, T.random_masks(variables))
  optimizer.build(variables)
  with pytest.raises(ValueError, match=r"shape \(8, 16\).*Received shape \(16, 8\)"):
    optimizer.set_update_masks(variables[:1], [np.ones((16, 8), bool)])
  with pytest.raises(ValueError, match="dtype string"):
    optimizer.set_update_masks(variables[:1], [np.full((8, 16), "a")])
  with pytest.raises(ValueError, match="values 0 or 1"):
    optimizer.set_update_masks(variables[:1], [np.full((8, 16), 0.5)])
  with pytest.raises(ValueError, match="one mask per variable"):
    optimizer.set_update_masks(variables, [np.ones((8, 16), bool)])
  with pytest.raises(ValueError, match="not one this optimizer was built for"):
    optimizer.set_update_masks([tf.Variable(np.ones((8, 16), "float32"))],
                               [np.ones((8, 16), bool)])


def test_masks_cannot_change_inside_a_logical_batch():
  x, y = T.dense_data(n=16)
  model = T.dp_model(T.dense_model(), gradient_accumulation_steps=2)
  variables = model.trainable_variables
  masks = T.random_masks(variables)
  model.fit(x[:8], y[:8], batch_size=8, verbose=0)  # one of two physical batches
  assert not model.optimizer.at_logical_batch_start()
  with pytest.raises(RuntimeError, match="between logical batches.*1 of the 2 physical"):
    model.optimizer.set_update_masks(variables, masks)
  model.fit(x[8:], y[8:], batch_size=8, verbose=0)
  model.optimizer.set_update_masks(variables, masks)  # at the boundary: accepted
  for got, want in zip(model.optimizer.update_masks(variables), masks):
    np.testing.assert_array_equal(got.numpy(), want.astype("float32"))


# ---- padding, empty batches, non-finite gradients --------------------------------------------

def test_weight_zero_examples_change_nothing():
  x, y = T.dense_data(n=8)
  garbage = np.full((8, 8), 1e30, "float32")  # would dominate any sum it entered
  x_padded = np.concatenate([x, garbage])
  y_padded = np.concatenate([y, np.zeros(8, "int32")])
  weight = np.concatenate([np.ones(8), np.zeros(8)])
  kwargs = dict(noise_multiplier=0.0, expected_batch_size=8, l2_norm_clip=0.5)
  plain = T.dp_model(T.dense_model(seed=1), **kwargs)
  padded = T.dp_model(T.dense_model(seed=1), **kwargs)
  plain.fit(x, y, batch_size=8, verbose=0)
  padded.fit(x_padded, y_padded, sample_weight=weight, batch_size=16, verbose=0)
  for got, want in zip(T.weights(padded), T.weights(plain)):
    np.testing.assert_allclose(got, want, atol=1e-7)
  assert padded.optimizer.iterations.numpy() == 1


def test_an_all_padding_batch_is_a_valid_step():
  x, y = T.dense_data(n=8)
  model = T.dp_model(T.dense_model(), noise_multiplier=0.0)
  before = T.weights(model)
  history = model.fit(x, y, sample_weight=np.zeros(8), batch_size=8, verbose=0)
  assert model.optimizer.iterations.numpy() == 1
  assert history.history["dp_non_finite_examples"] == [0]
  for got, want in zip(T.weights(model), before):
    np.testing.assert_array_equal(got, want)


def test_non_finite_gradients_are_zeroed_and_counted():
  x, y = T.dense_data(n=8)
  x[3] = np.inf  # tanh(inf) is finite, but its gradient w.r.t. the first kernel is not
  model = T.dp_model(T.dense_model(), noise_multiplier=0.0)
  history = model.fit(x, y, batch_size=8, verbose=0)
  assert history.history["dp_non_finite_examples"] == [1]
  assert all(np.all(np.isfinite(w)) for w in T.weights(model))

  x[3] = 0.0
  reference = T.dp_model(T.dense_model(), noise_multiplier=0.0)
  reference.fit(np.delete(x, 3, 0), np.delete(y, 3), batch_size=7, verbose=0,
                sample_weight=np.ones(7))
  # Same sum of the 7 finite examples; divided by 8 rows instead of 7.
  for got, want, start in zip(T.weights(model), T.weights(reference),
                              T.weights(T.dense_model())):
    np.testing.assert_allclose(got - start, (want - start) * 7 / 8, atol=1e-6)


@pytest.mark.parametrize("engine", ["per_layer", "vectorized"])
def test_logged_loss_and_metrics_exclude_dropped_non_finite_examples(engine):
  x, y = T.dense_data(n=8)
  x[3] = np.nan  # its loss and its gradient are NaN: the example is dropped
  model = T.dp_model(T.dense_model(), noise_multiplier=0.0, per_example_engine=engine)
  history = model.fit(x, y, batch_size=8, verbose=0)
  assert history.history["dp_non_finite_examples"] == [1]
  reference = T.dp_model(T.dense_model(), noise_multiplier=0.0, per_example_engine=engine)
  expected = reference.fit(np.delete(x, 3, 0), np.delete(y, 3), batch_size=7, verbose=0)
  # The mean loss over the 7 examples trained on, at the same (initial) weights.
  assert np.isfinite(history.history["loss"][0])
  np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=1e-6)
  assert all(np.all(np.isfinite(w)) for w in T.weights(model))


# ---- accumulation -----------------------------------------------------------------------------

def test_accumulated_physical_batches_are_one_logical_step():
  x, y = T.dense_data(n=256)
  # The same (seeded, insecure) noise in both, to compare them.
  kwargs = dict(noise_multiplier=1.0, l2_norm_clip=0.3, insecure_noise_seed=11)
  one = T.dp_model(T.dense_model(seed=2), **kwargs)
  four = T.dp_model(T.dense_model(seed=2), gradient_accumulation_steps=4, **kwargs)
  one.fit(x, y, batch_size=256, shuffle=False, verbose=0)
  start = T.weights(four)
  four.fit(x[:192], y[:192], batch_size=64, shuffle=False, verbose=0)
  for got, want in zip(T.weights(four), start):  # three physical batches: nothing applied yet
    np.testing.assert_array_equal(got, want)
  four.fit(x[192:], y[192:], batch_size=64, shuffle=False, verbose=0)
  assert one.optimizer.iterations.numpy() == four.optimizer.iterations.numpy() == 1
  for got, want in zip(T.weights(four), T.weights(one)):
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---- per-variable state follows the variable, not its position --------------------------------

def _three_equal_layers(seed=0):
  """Three Dense layers with variables of equal shapes: a positional mix-up raises no error."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="first"),
                           keras.layers.Dense(4, name="second"), keras.layers.Dense(4, name="third")])


def _freeze_first_layer_and_recompile(**optimizer_kwargs):
  """The issue's reproduction: masks set for all variables, then `first.trainable = False` and a
  recompile with the SAME optimizer."""
  model = T.dp_model(_three_equal_layers(), **optimizer_kwargs)
  optimizer = model.optimizer
  variables = model.trainable_variables
  optimizer.build(variables)
  first, second, third = model.layers
  masks = [np.zeros((4, 4), bool), np.zeros(4, bool),  # first: frozen by its mask
           T.random_masks([second.kernel], keep=0.5, seed=1)[0], np.ones(4, bool),
           np.ones((4, 4), bool), np.ones(4, bool)]
  optimizer.set_update_masks(variables, masks)
  first.trainable = False
  model.compile(optimizer=optimizer, loss=T.per_example_loss())
  return model, dict(zip([v.ref() for v in variables], masks))


def test_recompiled_trainable_subset_gets_its_own_masks_and_noise():
  x, y = T.dense_data(n=8, inputs=4, classes=4)
  model, mask_of = _freeze_first_layer_and_recompile(noise_multiplier=1e9, learning_rate=1.0)
  first, second, third = model.layers
  before = {v.ref(): v.numpy().copy() for v in first.weights + second.weights + third.weights}
  model.fit(x, y, batch_size=8, verbose=0)
  # Noise std on the update: 1e9 * C / 8 * lr = 1.25e8; a gradient alone moves by < 1. A noised
  # coordinate lands below 1e2 with probability 6e-7 (1e6 gave 6e-4 each: one CI run in ~50 failed).
  for variable in first.weights:  # no longer trainable: no update, no noise
    np.testing.assert_array_equal(variable.numpy(), before[variable.ref()])
  for variable in second.weights + third.weights:
    moved = np.abs(variable.numpy() - before[variable.ref()])
    mask = mask_of[variable.ref()]
    np.testing.assert_array_equal(moved[~mask], 0.0)  # its own mask: frozen coordinates stay
    assert np.all(moved[mask] > 1e2), (variable.name, moved)  # its own noise on the others


def test_each_variable_accumulates_its_own_clipped_gradient():
  x, y = T.dense_data(n=8, inputs=4, classes=4)
  model, mask_of = _freeze_first_layer_and_recompile(gradient_accumulation_steps=2)
  optimizer = model.optimizer
  variables = model.trainable_variables
  masks = [mask_of[v.ref()].astype("float32") for v in variables]
  expected = T.single_example_reference(model, T.per_example_loss(), x, y, masks, 1.0)
  model.fit(x, y, batch_size=8, verbose=0)  # one physical batch of two: accumulated only
  for variable, want in zip(variables, expected):
    np.testing.assert_allclose(optimizer.accumulator(variable).numpy(), want, atol=1e-5)
  for variable in model.layers[0].weights:
    np.testing.assert_array_equal(optimizer.accumulator(variable).numpy(), 0.0)


def test_a_trainable_variable_the_optimizer_was_not_built_for_is_refused():
  x, y = T.dense_data(n=8, inputs=4, classes=4)
  model = _three_equal_layers()
  model.layers[0].trainable = False
  T.dp_model(model)
  model.fit(x, y, batch_size=8, verbose=0)  # builds the optimizer for second and third only
  model.layers[0].trainable = True
  model.compile(optimizer=model.optimizer, loss=T.per_example_loss())
  before = T.weights(model)
  with pytest.raises(ValueError, match=r"not built for: \['first/kernel.*new optimizer"):
    model.fit(x, y, batch_size=8, verbose=0)
  for got, want in zip(T.weights(model), before):
    np.testing.assert_array_equal(got, want)


def test_changing_the_trainable_set_inside_a_logical_batch_is_refused():
  x, y = T.dense_data(n=8, inputs=4, classes=4)
  model = T.dp_model(_three_equal_layers(), gradient_accumulation_steps=2)
  model.fit(x, y, batch_size=8, verbose=0)  # half a logical batch
  model.layers[0].trainable = False
  model.compile(optimizer=model.optimizer, loss=T.per_example_loss())
  with pytest.raises(tf.errors.InvalidArgumentError, match="partly accumulated"):
    model.fit(x, y, batch_size=8, verbose=0)


def test_a_stale_partial_sum_of_an_untrained_variable_is_dropped_at_the_logical_batch_end():
  x, y = T.dense_data(n=16, inputs=4, classes=4)
  model, _ = _freeze_first_layer_and_recompile(gradient_accumulation_steps=2)
  first = model.layers[0]
  stale = model.optimizer.accumulator(first.kernel)
  stale.assign(np.ones((4, 4), "float32"))  # as if left by a trainable `first` mid-batch
  model.fit(x[:8], y[:8], batch_size=8, verbose=0)
  np.testing.assert_array_equal(stale.numpy(), 1.0)  # inside the logical batch: untouched
  model.fit(x[8:], y[8:], batch_size=8, verbose=0)
  np.testing.assert_array_equal(stale.numpy(), 0.0)  # its end: never released later


# ---- checkpointed state ------------------------------------------------------------------------

def test_masks_noise_state_and_accumulators_are_checkpointed(tmp_path):
  """Noise from OS entropy: the resumed optimizer (another entropy draw) continues the original
  noise stream only because the generator's state comes back with the checkpoint."""
  x, y = T.dense_data(n=96)
  kwargs = dict(noise_multiplier=1.0, gradient_accumulation_steps=2)

  def build():
    model = T.dp_model(T.dense_model(seed=4), **kwargs)
    model.optimizer.build(model.trainable_variables)
    return model

  model = build()
  masks = T.random_masks(model.trainable_variables, seed=9)
  model.optimizer.set_update_masks(model.trainable_variables, masks)
  model.fit(x[:48], y[:48], batch_size=16, shuffle=False, verbose=0)  # 1.5 logical steps
  path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "c"))
  model.fit(x[48:], y[48:], batch_size=16, shuffle=False, verbose=0)

  resumed = build()
  tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
  for restored, mask in zip(resumed.optimizer.update_masks(resumed.trainable_variables), masks):
    np.testing.assert_array_equal(restored.numpy(), mask.astype("float32"))
  resumed.fit(x[48:], y[48:], batch_size=16, shuffle=False, verbose=0)
  assert resumed.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() == 3
  for got, want in zip(T.weights(resumed), T.weights(model)):
    np.testing.assert_array_equal(got, want)


# ---- configuration and errors -----------------------------------------------------------------

def test_get_config_round_trips():
  optimizer = tfdp_prune.DPKerasAdamOptimizer(
      l2_norm_clip=0.5, noise_multiplier=1.2, learning_rate=0.01, expected_batch_size=64.0,
      gradient_accumulation_steps=4)
  config = optimizer.get_config()
  restored = tfdp_prune.DPKerasAdamOptimizer.from_config(config)
  assert restored.get_config() == config
  assert config["l2_norm_clip"] == 0.5 and config["gradient_accumulation_steps"] == 4
  assert config["insecure_noise_seed"] is None and "seed" not in config
  assert type(restored.per_example_engine) is tfdp_prune.PerLayerEngine  # the default


def test_any_tf_keras_optimizer_class_can_be_made_private():
  cls = tfdp_prune.make_dp_optimizer_class(keras.optimizers.RMSprop)
  assert cls.__name__ == "DPRMSprop"
  assert keras.saving.get_registered_name(cls) == "tfdp_prune>DPRMSprop"
  assert issubclass(cls, DPOptimizerMixin)  # the same DP state and step as DPKerasSGDOptimizer
  x, y = T.dense_data(n=16)
  model = T.dp_model(T.dense_model(), optimizer_class=cls, noise_multiplier=0.5)
  model.fit(x, y, batch_size=8, verbose=0)
  assert model.optimizer.iterations.numpy() == 2
  with pytest.raises(TypeError, match="tf_keras optimizer class"):
    tfdp_prune.make_dp_optimizer_class(keras.optimizers.legacy.SGD)


@pytest.mark.parametrize("dp_class,base", [
    (tfdp_prune.DPKerasSGDOptimizer, keras.optimizers.SGD),
    (tfdp_prune.DPKerasAdamOptimizer, keras.optimizers.Adam),
])
def test_the_dp_classes_spell_out_their_arguments_with_the_base_defaults(dp_class, base):
  dp_params = inspect.signature(dp_class.__init__).parameters
  base_params = inspect.signature(base.__init__).parameters
  assert list(dp_params)[1:4] == ["l2_norm_clip", "noise_multiplier", "num_microbatches"]
  assert {"expected_batch_size", "gradient_accumulation_steps", "insecure_noise_seed",
          "per_example_engine"} <= set(dp_params)
  spelled = [name for name in dp_params
             if name in base_params and name not in ("self", "kwargs")]
  # The base's leading arguments, in its order (so positional calls carry over), its defaults.
  assert spelled == [name for name in base_params if name != "self"][:len(spelled)]
  assert len(spelled) >= 3
  for name in spelled:
    assert dp_params[name].default == base_params[name].default, name
  assert dp_class.__init__.__module__ == "tfdp_prune.optimizer"
  assert keras.saving.get_registered_name(dp_class) == f"tfdp_prune>DP{base.__name__}"
  assert dp_class.__name__ == f"DP{base.__name__}"  # the name checkpoints record


@pytest.mark.parametrize("kwargs,message", [
    (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip > 0"),
    (dict(l2_norm_clip=-1.0, noise_multiplier=1.0), "l2_norm_clip > 0"),
    (dict(l2_norm_clip=float("nan"), noise_multiplier=1.0), "l2_norm_clip > 0"),
    (dict(l2_norm_clip=1.0, noise_multiplier=-0.1), "noise_multiplier >= 0"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=0), "num_microbatches"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, gradient_accumulation_steps=0),
     "gradient_accumulation_steps"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8.0, num_microbatches=2),
     "cannot be combined"),
])
def test_invalid_arguments_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tfdp_prune.DPKerasSGDOptimizer(**kwargs)


def test_num_microbatches_that_does_not_divide_the_batch_is_an_error():
  x, y = T.dense_data(n=10)
  model = T.dp_model(T.dense_model(), num_microbatches=4)
  with pytest.raises(ValueError, match="num_microbatches=4 must divide"):
    model.fit(x, y, batch_size=10, verbose=0)


class _RecordingEngine(tfdp_prune.PerLayerEngine):
  """Records the clipping unit each traced step asked for."""

  def __init__(self):
    super().__init__()
    self.microbatches = []

  def clipped_sum(self, *args, **kwargs):
    self.microbatches.append(args[8] if len(args) > 8 else kwargs.get("num_microbatches"))
    return super().clipped_sum(*args, **kwargs)


@pytest.mark.parametrize("static_batch", [True, False])
def test_num_microbatches_equal_to_the_batch_size_is_per_example_clipping(static_batch):
  x, y = T.dense_data(n=16)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=static_batch)
  engine = _RecordingEngine()
  ported = T.dp_model(T.dense_model(seed=3), num_microbatches=8, per_example_engine=engine,
                      l2_norm_clip=0.1)
  reference = T.dp_model(T.dense_model(seed=3), l2_norm_clip=0.1)
  ported.fit(data, verbose=0)
  reference.fit(data, verbose=0)
  # The per-example (fast) path is traced; a batch of unknown size also traces the grouped one.
  assert set(engine.microbatches) == ({None} if static_batch else {None, 8})
  for got, want in zip(T.weights(ported), T.weights(reference)):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_num_microbatches_with_padding_rows_is_refused_before_the_update():
  x, y = T.dense_data(n=8)
  model = T.dp_model(T.dense_model(), num_microbatches=4)
  before = T.weights(model)
  weight = np.array([1, 1, 1, 1, 1, 1, 0, 0], "float32")  # padded, as Poisson batches are
  with pytest.raises(tf.errors.InvalidArgumentError, match="padding rows"):
    model.fit(x, y, sample_weight=weight, batch_size=8, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 0
  for got, want in zip(T.weights(model), before):
    np.testing.assert_array_equal(got, want)
  model.fit(x, y, batch_size=8, verbose=0)  # fixed-size batches without padding: accepted
  assert int(model.optimizer.iterations.numpy()) == 1


def test_batch_normalization_is_rejected_with_the_fix():
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                            keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2)])
  with pytest.raises(ValueError, match="'bn'.*GroupNormalization"):
    tfdp_prune.make_private(model)


@pytest.mark.parametrize("loss,message", [
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reduction='none'"),
    ("sparse_categorical_crossentropy", "per-example loss"),
])
def test_a_reduced_loss_is_an_error(loss, message):
  x, y = T.dense_data(n=8)
  model = T.dense_model()
  model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(1.0, 1.0), loss=loss)
  tfdp_prune.make_private(model)
  with pytest.raises(ValueError, match=message):
    model.fit(x, y, verbose=0)


@pytest.mark.parametrize("train", ["fit", "train_on_batch"])
def test_the_first_step_is_traced_once(train):
  """The DP optimizer's variables exist before the step is traced: created inside its first
  trace, they would make tf.function trace the step again (the first step's tracing doubled)."""
  x, y = T.dense_data(n=8)
  model = T.dp_model(T.dense_model(), optimizer_class=tfdp_prune.DPKerasAdamOptimizer)
  if train == "fit":
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
  else:
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
  assert model.train_function.experimental_get_tracing_count() == 1


def test_training_without_the_dp_step_is_refused():
  x, y = T.dense_data(n=8)
  model = T.dense_model()
  model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(1.0, 1.0), loss=T.per_example_loss())
  with pytest.raises(RuntimeError, match="make_private"):
    model.fit(x, y, verbose=0)


def test_a_non_dp_optimizer_is_refused_by_the_dp_step():
  x, y = T.dense_data(n=8)
  model = T.dense_model()
  model.compile(optimizer="sgd", loss=T.per_example_loss())
  tfdp_prune.make_private(model)
  with pytest.raises(ValueError, match="tfdp_prune DP optimizer"):
    model.fit(x, y, verbose=0)


def test_one_class_per_base_class_and_saved_models_load_without_custom_objects(tmp_path):
  assert tfdp_prune.make_dp_optimizer_class(keras.optimizers.SGD) is tfdp_prune.DPKerasSGDOptimizer
  model = T.dense_model()
  model.compile(optimizer=tfdp_prune.DPKerasAdamOptimizer(0.7, 1.1, learning_rate=0.01),
                loss=T.per_example_loss())
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert type(loaded.optimizer) is tfdp_prune.DPKerasAdamOptimizer
  assert loaded.optimizer.get_config() == model.optimizer.get_config()


def test_training_metrics_ignore_padding_rows():
  x, y = T.dense_data(n=8)
  model = T.dense_model()
  model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(1.0, 0.0, learning_rate=0.0),
                loss=T.per_example_loss(), metrics=["accuracy"])
  tfdp_prune.make_private(model)
  predicted = np.argmax(model.predict(x, verbose=0), axis=1)
  y_padded = np.concatenate([predicted, (predicted + 1) % 3])  # padding rows all wrong
  history = model.fit(np.concatenate([x, x]), y_padded, batch_size=16, verbose=0,
                      sample_weight=np.concatenate([np.ones(8), np.zeros(8)]))
  assert history.history["accuracy"] == [1.0]
  expected_loss = float(np.mean(T.per_example_loss()(predicted, model(x)).numpy()))
  assert history.history["loss"][0] == pytest.approx(expected_loss, rel=1e-5)


# ---- where the noise comes from (DESIGN.md rule 11) ---------------------------------------------

def _noise_state(optimizer, variables):
  optimizer.build(variables)
  return optimizer._noise_generator.state.numpy().view(np.uint64).tolist()  # pylint: disable=protected-access


def test_the_noise_generator_state_is_192_bits_of_os_entropy(monkeypatch):
  words = [3, 2**63 + 5, 2**64 - 1]
  calls = []
  monkeypatch.setattr(randomness, "os_entropy_words",
                      lambda count: calls.append(count) or list(words))
  model = T.dp_model(T.dense_model(), noise_multiplier=1.0)
  assert _noise_state(model.optimizer, model.trainable_variables) == words and calls == [3]
  assert model.optimizer.mechanism_randomness == "os_entropy"


def _pure_noise_update(model):
  """One step on an all-padding batch: the update is the noise alone."""
  before = T.weights(model)
  x, y = T.dense_data(n=8)
  model.fit(x, y, sample_weight=np.zeros(8), batch_size=8, verbose=0)
  return np.concatenate([(a - b).ravel() for a, b in zip(T.weights(model), before)])


def test_default_noise_differs_between_optimizers_built_alike():
  updates, states = [], []
  for _ in range(2):
    keras.utils.set_random_seed(0)  # the same global seeds: they must not matter
    model = T.dp_model(T.dense_model(), noise_multiplier=1.0, learning_rate=1.0)
    states.append(_noise_state(model.optimizer, model.trainable_variables))
    updates.append(_pure_noise_update(model))
  assert states[0] != states[1]
  assert np.all(updates[0] != 0) and not np.any(updates[0] == updates[1])


_STATE_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tfdp_prune
    from tests.tfdp_prune import _testing as T
    from tfdp_prune.compat import keras
    keras.utils.set_random_seed(0)
    model = T.dp_model(T.dense_model(), noise_multiplier=1.0, learning_rate=1.0)
    model.optimizer.build(model.trainable_variables)
    print("STATE", model.optimizer._noise_generator.state.numpy().view(np.uint64).tolist())
""")


def test_default_noise_state_is_not_a_function_of_the_arguments_across_processes():
  """Another process, the same arguments and the same global seeds: another noise state."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
  result = subprocess.run([sys.executable, "-c", _STATE_SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env, cwd=repo)
  assert result.returncode == 0, result.stderr[-3000:]
  other = eval(result.stdout.split("STATE", 1)[1])  # pylint: disable=eval-used
  keras.utils.set_random_seed(0)
  model = T.dp_model(T.dense_model(), noise_multiplier=1.0, learning_rate=1.0)
  mine = _noise_state(model.optimizer, model.trainable_variables)
  assert len(other) == len(mine) == 3
  assert all(a != b for a, b in zip(other, mine))  # every one of the 3 words differs


def test_the_insecure_noise_seed_reproduces_the_noise_and_warns():
  updates = []
  for _ in range(2):
    with pytest.warns(randomness.InsecureRandomnessWarning, match="insecure_noise_seed"):
      model = T.dp_model(T.dense_model(), noise_multiplier=1.0, learning_rate=1.0,
                         insecure_noise_seed=12)
    assert model.optimizer.mechanism_randomness == "insecure_seed"
    assert model.optimizer.get_config()["insecure_noise_seed"] == 12
    updates.append(_pure_noise_update(model))
  np.testing.assert_array_equal(updates[0], updates[1])
  with pytest.raises(ValueError, match="insecure_noise_seed"):
    tfdp_prune.DPKerasSGDOptimizer(1.0, 1.0, insecure_noise_seed=-1)


class _UsersSGD(tfdp_prune.DPKerasSGDOptimizer):

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)


@pytest.mark.parametrize("optimizer_class", [
    tfdp_prune.DPKerasSGDOptimizer, tfdp_prune.DPKerasAdamOptimizer,
    tfdp_prune.make_dp_optimizer_class(keras.optimizers.RMSprop), _UsersSGD])
def test_the_insecure_seed_warning_points_at_the_line_that_builds_the_optimizer(optimizer_class):
  with pytest.warns(randomness.InsecureRandomnessWarning) as record:
    line = inspect.currentframe().f_lineno + 1
    optimizer_class(1.0, 1.0, insecure_noise_seed=3)
  assert [(w.filename, w.lineno) for w in record] == [(__file__, line)]


@pytest.mark.parametrize("dp_class", [tfdp_prune.DPKerasSGDOptimizer,
                                      tfdp_prune.DPKerasAdamOptimizer])
def test_the_spelled_out_dp_arguments_have_the_settings_defaults(dp_class):
  params = inspect.signature(dp_class.__init__).parameters
  for field in dataclasses.fields(dp_settings.DPSettings):
    if field.default is not dataclasses.MISSING:
      assert params[field.name].default == field.default, field.name
  optimizer = dp_class(1.0, 1.0)
  assert optimizer.dp_settings.to_config() == dp_settings.DPSettings(
      l2_norm_clip=1.0, noise_multiplier=1.0).to_config()


def test_a_misspelled_dp_argument_is_refused():
  with pytest.raises(TypeError, match="gradient_acumulation_steps"):
    tfdp_prune.make_dp_optimizer_class(keras.optimizers.RMSprop)(
        1.0, 1.0, gradient_acumulation_steps=2)


@pytest.mark.parametrize("optimizer_class", [tfdp_prune.DPKerasSGDOptimizer,
                                             tfdp_prune.DPKerasAdamOptimizer])
def test_the_removed_seed_argument_says_what_to_use(optimizer_class):
  message = "no longer takes `seed=`.*OS entropy.*insecure_noise_seed"
  with pytest.raises(TypeError, match=message):
    optimizer_class(1.0, 1.0, seed=0)
  with pytest.raises(TypeError, match=message):
    optimizer_class(1.0, 1.0, seed=None)
  old_config = dict(optimizer_class(1.0, 1.0).get_config(), seed=5)  # a config saved before
  with pytest.raises(TypeError, match=message):
    optimizer_class.from_config(old_config)


def test_require_dp_optimizer_returns_it_or_names_who_needs_one():
  from tfdp_prune import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  model = T.dp_model(T.dense_model())
  assert optimizer_lib.require_dp_optimizer(model, "The test") is model.optimizer
  assert optimizer_lib.is_dp_optimizer(model.optimizer)
  plain = T.dense_model()
  plain.compile(optimizer="sgd", loss=T.per_example_loss())
  assert not optimizer_lib.is_dp_optimizer(plain.optimizer)
  for candidate in (plain, T.dense_model()):  # another optimizer; not compiled at all
    with pytest.raises(ValueError, match=r"^The test needs a model compiled with a tfdp_prune "
                                         r"DP optimizer .* Call model.compile"):
      optimizer_lib.require_dp_optimizer(candidate, "The test")

  class CustomError(ValueError):
    pass

  with pytest.raises(CustomError, match="Use a DP one."):
    optimizer_lib.require_dp_optimizer(plain, "The test", error=CustomError, fix="Use a DP one.")
