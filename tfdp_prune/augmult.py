"""Augmentation multiplicity (De et al. 2022, section 3.1): K augmented views per example.

`augmult_map(k, seed)` maps a batched image dataset to K views per example; the per-example
engine averages each example's K losses before clipping (`has_views`), so it costs no privacy.

Design: docs/training.md
"""

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


def augment_views(images, k: int, seed, padding: int = 4) -> tf.Tensor:
  """K augmented views of every image: [batch, H, W, C] -> [batch, K, H, W, C].

  Each view is a crop of size H x W, at a uniformly random offset, of the image reflect-padded by
  `padding` pixels on each side (numpy's and TF's "reflect": the edge pixel is not repeated),
  flipped left-right with probability 1/2. `seed` is a shape [2] integer tensor; the views are a
  pure function of (images, seed). A single image [H, W, C] gives [K, H, W, C].
  """
  if not (isinstance(k, int) and k >= 1):
    raise ValueError(f"Expected k to be an integer >= 1. Received: k={k!r}.")
  if not (isinstance(padding, int) and padding >= 0):
    raise ValueError(f"Expected padding to be an integer >= 0. Received: padding={padding!r}.")
  images = tf.convert_to_tensor(images)
  if images.shape.rank == 3:
    return augment_views(images[tf.newaxis], k, seed, padding)[0]
  if images.shape.rank != 4:
    raise ValueError("Expected images of shape [batch, height, width, channels] or [height, "
                     f"width, channels]. Received shape {images.shape}.")
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  n = batch * k
  # Every view of image i is row i * k + j of the repeated batch.
  tiled = tf.repeat(images, k, axis=0)
  padded = tf.pad(tiled, [[0, 0], [padding, padding], [padding, padding], [0, 0]],
                  mode="REFLECT")
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2))
  offsets = tf.random.stateless_uniform([n, 2], crop_seed, minval=0, maxval=2 * padding + 1,
                                        dtype=tf.int32)
  rows = offsets[:, :1] + tf.range(height)[tf.newaxis]  # [n, H]
  cols = offsets[:, 1:] + tf.range(width)[tf.newaxis]  # [n, W]
  crops = tf.gather(padded, rows, axis=1, batch_dims=1)  # [n, H, W + 2p, C]
  crops = tf.gather(crops, cols, axis=2, batch_dims=1)  # [n, H, W, C]
  flip = tf.random.stateless_uniform([n], flip_seed) < 0.5
  views = tf.where(flip[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(crops, axis=[2]),
                   crops)
  return tf.reshape(views, tf.concat([[batch, k], tf.shape(images)[1:]], axis=0))


def augmult_map(k: int, seed=None, padding: int = 4):
  """A `tf.data` map function: `(x, y[, sample_weight])` batches -> the same with x as views.

  Use on a BATCHED dataset: `dataset.batch(b).map(augmult_map(k=16, seed=0))`. x goes from
  [batch, H, W, C] to [batch, K, H, W, C]; y and the sample weight are unchanged (one per
  example). Each batch draws a new seed from a generator seeded with `seed` (None:
  nondeterministic), so every epoch sees new views, and two datasets built with the same seed
  give the same views (keep the map sequential, the default, for that).
  """
  if seed is None:
    generator = tf.random.Generator.from_non_deterministic_state()
  else:
    generator = tf.random.Generator.from_seed(seed)

  def map_fn(x, *rest):
    batch_seed = generator.make_seeds(1)[:, 0]
    return (augment_views(x, k, batch_seed, padding),) + rest

  return map_fn


def has_views(model: keras.Model, x) -> bool:
  """True when the batch `x` holds augmult views for `model`: a single input tensor whose rank is
  one more than the model's declared input rank ([batch, K, ...] for inputs [batch, ...]).

  Needs a model with a declared input (functional, or Sequential built on `keras.Input`); for
  others it returns False and the batch is passed to the model as it is.
  """
  inputs = getattr(model, "inputs", None)
  flat = tf.nest.flatten(x)
  if not inputs or len(inputs) != 1 or len(flat) != 1:
    return False
  data_rank = tf.TensorShape(getattr(flat[0], "shape", None)).rank  # tensors and numpy arrays
  model_rank = inputs[0].shape.rank
  return data_rank is not None and model_rank is not None and data_rank == model_rank + 1
