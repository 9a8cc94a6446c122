import numpy as np
import pytest
from scipy import stats

import tfdp_prune
from tfdp_prune import augmult
from tfdp_prune import models
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T

PAD = 4


def _images(n, height=8, width=8, channels=3, seed=0):
  return np.random.default_rng(seed).normal(size=(n, height, width, channels)).astype("float32")


def _candidates(image):
  """Every crop of the reflect-padded image, unflipped and flipped, with its (row offset,
  column offset, flipped)."""
  height, width = image.shape[:2]
  padded = np.pad(image, [(PAD, PAD), (PAD, PAD), (0, 0)], mode="reflect")
  crops, keys = [], []
  for oy in range(2 * PAD + 1):
    for ox in range(2 * PAD + 1):
      crop = padded[oy:oy + height, ox:ox + width]
      crops += [crop, crop[:, ::-1]]
      keys += [(oy, ox, False), (oy, ox, True)]
  return np.stack(crops), keys


def _find_crops(views, image):
  """For each view of `image`, the (row offset, column offset, flipped) whose crop of the
  reflect-padded image it is, or None. For images of 12 x 12 and more, with random pixels, the
  answer is unique (smaller ones have coinciding crops, e.g. reflected edge columns)."""
  crops, keys = _candidates(image)
  found = []
  for view in views:
    matches = np.flatnonzero(np.all(crops == view, axis=(1, 2, 3)))
    found.append(keys[matches[0]] if len(matches) else None)
  return found


# ---- the augmentation ---------------------------------------------------------------------------

def test_views_have_the_right_shape_and_are_crops_of_the_reflect_padded_image():
  images = _images(6)
  views = augmult.augment_views(images, 5, seed=[1, 2], padding=PAD).numpy()
  assert views.shape == (6, 5, 8, 8, 3)
  assert all(f is not None for i in range(6) for f in _find_crops(views[i], images[i]))
  assert augmult.augment_views(images[0], 5, seed=[1, 2]).shape == (5, 8, 8, 3)
  unpadded = augmult.augment_views(images, 2, seed=[1, 2], padding=0).numpy()
  np.testing.assert_array_equal(  # no padding: each view is the image or its mirror image
      np.minimum(np.abs(unpadded - images[:, None]),
                 np.abs(unpadded - images[:, None, :, ::-1])), 0.0)


def test_crop_offsets_cover_the_padded_image_and_flips_happen_half_the_time():
  n, k = 150, 8
  images = _images(n, height=12, width=12, channels=1)
  views = augmult.augment_views(images, k, seed=[3, 4], padding=PAD).numpy()
  found = [f for i in range(n) for f in _find_crops(views[i], images[i])]
  assert all(f is not None for f in found)
  offsets = {(oy, ox) for oy, ox, _ in found}
  assert len(offsets) == (2 * PAD + 1) ** 2  # all 81 offsets, corners included
  flips = sum(flipped for _, _, flipped in found)
  assert stats.binomtest(flips, len(found), 0.5).pvalue > 1e-3
  for wrong in (0.4, 0.6):  # rejects a biased coin
    assert stats.binomtest(flips, len(found), wrong).pvalue < 1e-3
  # Views of one image differ from each other.
  assert all(len(set(_find_crops(views[i], images[i]))) > 1 for i in range(n))


def test_same_seed_same_views_other_seed_other_views():
  images = _images(4)
  a = augmult.augment_views(images, 3, seed=[7, 0]).numpy()
  b = augmult.augment_views(images, 3, seed=[7, 0]).numpy()
  c = augmult.augment_views(images, 3, seed=[8, 0]).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def _dataset(x, y, k, seed, batch_size=4):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).map(
      augmult.augmult_map(k, seed))


def test_augmult_map_is_seeded_keeps_labels_and_draws_new_views_each_epoch():
  x, y = _images(8), np.arange(8, dtype="int32")
  first = list(_dataset(x, y, 3, seed=5).as_numpy_iterator())
  again = list(_dataset(x, y, 3, seed=5).as_numpy_iterator())
  other = list(_dataset(x, y, 3, seed=6).as_numpy_iterator())
  assert [views.shape for views, _ in first] == [(4, 3, 8, 8, 3)] * 2
  np.testing.assert_array_equal(np.concatenate([labels for _, labels in first]), y)
  for (va, _), (vb, _) in zip(first, again):
    np.testing.assert_array_equal(va, vb)
  assert not np.array_equal(first[0][0], other[0][0])
  # The two batches got different seeds, and a second pass over the dataset new views.
  dataset = _dataset(x, y, 3, seed=5)
  epoch_1 = [v for v, _ in dataset.as_numpy_iterator()]
  epoch_2 = [v for v, _ in dataset.as_numpy_iterator()]
  assert not np.array_equal(epoch_1[0], epoch_2[0])
  for views, images in zip(epoch_1 + epoch_2, [x[:4], x[4:]] * 2):
    assert all(f is not None for i in range(4) for f in _find_crops(views[i], images[i]))

  with_weights = tf.data.Dataset.from_tensor_slices((x, y, np.ones(8, "float32"))).batch(4)
  views, labels, weights = next(iter(with_weights.map(augmult.augmult_map(2, seed=0))))
  assert views.shape == (4, 2, 8, 8, 3) and labels.shape == (4,) and weights.shape == (4,)


# ---- the engine: views are averaged BEFORE clipping ---------------------------------------------

def _ws_model(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((6, 6, 2)),
      models.WSConv2D(8, 3, strides=2, padding="same"),
      keras.layers.GroupNormalization(groups=4),
      keras.layers.Activation("relu"),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(3),
  ])


def _view_grads(model, loss_fn, views, label, masks):
  """Masked gradient of each view's loss, and of the MEAN of the views' losses (float64)."""
  variables = model.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    losses = loss_fn(np.repeat(label[None], len(views)), model(views, training=True))
    mean = tf.reduce_mean(losses)
    per_view = [losses[j] for j in range(len(views))]
  flat = lambda grads: [tf.convert_to_tensor(g).numpy().astype(np.float64) * m
                        for g, m in zip(grads, masks)]
  return [flat(tape.gradient(l, variables)) for l in per_view], flat(tape.gradient(mean, variables))


def _clip(grads, clip):
  norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
  factor = min(1.0, clip / norm) if norm > 0 else 1.0
  return [factor * g for g in grads]


def _norm(grads):
  return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads)))


def _engine(model, x, y, masks, clip, weight=None, engine=tfdp_prune.VectorizedEngine):
  weight = tf.ones([len(x)]) if weight is None else tf.constant(weight, tf.float32)
  return engine().clipped_sum(
      model, T.per_example_loss(), x, y, weight, model.trainable_variables,
      [tf.constant(m, tf.float32) for m in masks], clip)


@pytest.mark.parametrize("engine", [tfdp_prune.VectorizedEngine, tfdp_prune.PerLayerEngine])
def test_clipped_sum_with_views_equals_a_loop_that_clips_the_mean_of_each_examples_views(engine):
  k, n = 4, 6
  model = _ws_model()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(n, k, 6, 6, 2)).astype("float32")
  y = rng.integers(0, 3, size=n).astype("int32")
  weight = np.array([1, 1, 0, 1, 1, 1], "float32")  # example 2 is padding
  masks = T.random_masks(model.trainable_variables, keep=0.6)
  loss_fn = T.per_example_loss()
  mean_grads = [_view_grads(model, loss_fn, x[i], y[i], masks)[1] for i in range(n)]
  norms = sorted(_norm(g) for g in mean_grads)
  clip = (norms[2] + norms[3]) / 2  # some examples are clipped, some are not

  output = _engine(model, x, y, masks, clip, weight, engine)

  expected = [np.zeros(v.shape) for v in model.trainable_variables]
  for i in range(n):
    if weight[i]:
      expected = [e + g for e, g in zip(expected, _clip(mean_grads[i], clip))]
  for got, want in zip(output.clipped.grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert int(output.clipped.num_units) == n  # one clipping unit per example, not per view
  # Losses: the mean of the views' losses; predictions (for metrics): the first view's.
  first_view = model(x[:, 0], training=True).numpy()
  np.testing.assert_allclose(output.predictions.numpy(), first_view, atol=1e-5)
  mean_losses = [np.mean(loss_fn(np.repeat(y[i], k), model(x[i], training=True)).numpy())
                 for i in range(n)]
  np.testing.assert_allclose(output.losses.numpy(), np.array(mean_losses) * weight, atol=1e-5)


@pytest.mark.parametrize("engine", [tfdp_prune.VectorizedEngine, tfdp_prune.PerLayerEngine])
def test_views_are_averaged_before_clipping_not_clipped_one_by_one(engine):
  # One example, 4 views, a clip below every view's gradient norm: the example's clipped
  # gradient has norm exactly C. Clipping each view and averaging gives a norm < C (the views'
  # gradients point in different directions); clipping each view as an example sums to > C.
  k, clip = 4, 0.01
  model = _ws_model(seed=3)
  masks = T.random_masks(model.trainable_variables, keep=1.0)
  x = np.random.default_rng(4).normal(size=(1, k, 6, 6, 2)).astype("float32")
  y = np.array([1], "int32")
  per_view, mean_grad = _view_grads(model, T.per_example_loss(), x[0], y[0], masks)
  assert min(_norm(g) for g in per_view) > 2 * clip

  got = _engine(model, x, y, masks, clip, engine=engine).clipped.grads
  assert _norm(got) == pytest.approx(clip, rel=1e-5)
  for g, m in zip(got, mean_grad):  # the mean-loss gradient, scaled to norm C
    np.testing.assert_allclose(g, m * clip / _norm(mean_grad), atol=1e-6)
  clipped_views = [_clip(g, clip) for g in per_view]
  average_of_clipped = [sum(parts) / k for parts in zip(*clipped_views)]
  assert _norm(average_of_clipped) < 0.95 * clip
  views_as_examples = _engine(model, x[0], np.repeat(y, k), masks, clip).clipped.grads
  assert _norm(views_as_examples) > 1.5 * clip


def test_one_view_is_the_plain_example():
  model = _ws_model()
  rng = np.random.default_rng(5)
  x = rng.normal(size=(5, 6, 6, 2)).astype("float32")
  y = rng.integers(0, 3, size=5).astype("int32")
  masks = T.random_masks(model.trainable_variables, keep=0.7)
  plain = _engine(model, x, y, masks, 0.1)
  one_view = _engine(model, x[:, None], y, masks, 0.1)
  for got, want in zip(one_view.clipped.grads, plain.clipped.grads):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_views_are_recognized_by_the_rank_of_the_data():
  model = _ws_model()
  assert augmult.has_views(model, tf.zeros([2, 3, 6, 6, 2]))
  assert not augmult.has_views(model, tf.zeros([2, 6, 6, 2]))
  assert not augmult.has_views(model, [tf.zeros([2, 3, 6, 6, 2])] * 2)


# ---- model.fit ------------------------------------------------------------------------------------

def _fit_on_views(model, input_shape, k=2):
  model.compile(
      optimizer=tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=0.5,
                                                learning_rate=0.1),
      loss=T.per_example_loss(), metrics=["accuracy"])
  tfdp_prune.make_private(model)
  x = _images(8, *input_shape)
  y = np.random.default_rng(0).integers(0, 3, size=8).astype("int32")
  before = T.weights(model)
  history = model.fit(_dataset(x, y, k=k, seed=0), epochs=2, verbose=0)
  assert model.optimizer.iterations.numpy() == 4
  assert np.all(np.isfinite(history.history["loss"]))
  assert set(history.history) >= {"loss", "accuracy", "dp_non_finite_examples"}
  assert all(np.any(a != b) for a, b in zip(T.weights(model), before))
  assert np.isfinite(model.evaluate(x, y, verbose=0)[0])  # evaluation on plain images


# End-to-end, 7-11 s: in the slow set (CI runs it), for a default run under 10 minutes.
@pytest.mark.slow
def test_fit_with_make_private_on_an_augmult_dataset():
  _fit_on_views(_ws_model(), (6, 6, 2), k=3)


@pytest.mark.slow  # about 25 s of tracing, as without augmult; the test above is the fast one
def test_fit_a_tiny_wide_resnet_on_an_augmult_dataset():
  keras.utils.set_random_seed(0)
  _fit_on_views(models.wide_resnet(depth=10, width=1, num_classes=3, input_shape=(8, 8, 3)),
                (8, 8, 3))
