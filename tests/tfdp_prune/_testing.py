"""Small models and helpers shared by the tests (not a test module)."""

import functools
import os
import types
import zlib

import numpy as np

import tfdp_prune
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf


@functools.lru_cache(maxsize=None)
def mirrored_strategy(replicas):
  """A MirroredStrategy over `replicas` logical CPUs (tests/conftest.py), or None if there are
  fewer. One per replica count for the whole session: two MirroredStrategy objects over the
  same devices in one process reuse collective instance keys, which TF rejects."""
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
  return tf.distribute.MirroredStrategy(devices) if len(devices) == replicas else None


def per_example_loss():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def dense_model(seed=0, inputs=8, hidden=16, classes=3):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((inputs,)),
      keras.layers.Dense(hidden, activation="tanh"),
      keras.layers.Dense(classes),
  ])


def dense_data(n=64, inputs=8, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, inputs)).astype("float32"),
          rng.integers(0, classes, size=n).astype("int32"))


def dp_model(model, **optimizer_kwargs):
  """Compiles `model` with DPKerasSGDOptimizer(**optimizer_kwargs) and makes it private."""
  kwargs = dict(l2_norm_clip=1.0, noise_multiplier=0.0, learning_rate=0.1)
  kwargs.update(optimizer_kwargs)
  optimizer_class = kwargs.pop("optimizer_class", tfdp_prune.DPKerasSGDOptimizer)
  model.compile(optimizer=optimizer_class(**kwargs), loss=per_example_loss())
  return tfdp_prune.make_private(model)


def random_masks(variables, keep=0.5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.random(v.shape) < keep for v in variables]


def weights(model):
  return [v.numpy().copy() for v in model.trainable_variables]


def single_example_reference(model, loss_fn, x, y, masks, l2_norm_clip):
  """The clipped sum with a plain Python loop over single examples: the definition."""
  variables = model.trainable_variables
  total = [np.zeros(v.shape, np.float64) for v in variables]
  for i in range(len(y)):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(loss_fn(y[i:i + 1], model(x[i:i + 1], training=True)))
    grads = [tf.convert_to_tensor(g).numpy() * m
             for g, m in zip(tape.gradient(loss, variables), masks)]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    factor = min(1.0, l2_norm_clip / norm) if norm > 0 else 1.0
    total = [t + factor * g for t, g in zip(total, grads)]
  return total


class GuardedPrivateData:
  """A private tf.data.Dataset that raises if it is read while `forbidden` is set: wrap the
  mask computations in `forbid()` to prove they never read private data."""

  def __init__(self, x, y, batch_size):
    self.forbidden = False

    def generate():
      for i in range(0, len(y), batch_size):
        if self.forbidden:
          raise RuntimeError("private data read during a mask computation")
        yield x[i:i + batch_size], y[i:i + batch_size]

    dataset = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec((None,) + x.shape[1:], tf.float32), tf.TensorSpec((None,), tf.int32)))
    # No read-ahead: the generator runs only when fit asks for the next batch.
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    self.dataset = dataset.with_options(options)

  def forbid(self, function):
    def guarded(*args, **kwargs):
      self.forbidden = True
      try:
        return function(*args, **kwargs)
      finally:
        self.forbidden = False
    return guarded


# tfds.testing.mock_data's own generator ignores the split: every split and slice of every
# dataset with the same features yields the same examples. This one honours the slice and makes
# each (dataset, split, index) a different image, like real data; mock_data still supplies the
# builders' metadata (features, class names) offline. CIFAR images are 32x32x3, others 28x28x1.
FAKE_TFDS_SIZES = {"train": 200, "test": 50}


def fake_tfds_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
  """An `as_dataset_fn` for `tfds.testing.mock_data` (see above)."""
  del decoders, read_config, shuffle_files
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  infos = {name: types.SimpleNamespace(num_examples=n, shard_lengths=[n])
           for name, n in FAKE_TFDS_SIZES.items()}
  shape = (32, 32, 3) if self.name.startswith("cifar") else (28, 28, 1)
  images, labels = [], []
  for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(infos):
    end = FAKE_TFDS_SIZES[part.splitname] if part.to is None else part.to
    for index in range(part.from_ or 0, end):
      rng = np.random.default_rng([zlib.crc32(self.name.encode()),
                                   zlib.crc32(part.splitname.encode()), index])
      images.append(rng.integers(0, 256, shape, dtype=np.uint8))
      labels.append(index % 10)
  return tf.data.Dataset.from_tensor_slices({"image": np.stack(images),
                                             "label": np.array(labels, np.int64)})


class RunningCenter(keras.layers.Layer):
  """Subtracts a running mean of its inputs, which it updates in training: batch-norm's moving
  mean under another name, written from the batch."""

  def build(self, input_shape):
    self.running = self.add_weight("running", shape=input_shape[-1:], initializer="zeros",
                                   trainable=False)

  def call(self, inputs, training=None):
    if training:
      self.running.assign(0.9 * self.running + 0.1 * tf.reduce_mean(inputs, axis=0))
    return inputs - self.running


class SubclassedWithRunningCenter(keras.Model):
  """No declared inputs: the check can only run when the train step is traced."""

  def __init__(self):
    super().__init__()
    self.dense = keras.layers.Dense(4)
    self.center = RunningCenter(name="center")
    self.out = keras.layers.Dense(3)

  def call(self, inputs, training=None):
    return self.out(self.center(self.dense(inputs), training=training))


# ---- a user's own files (folders of class folders of PNGs, CSV, NPZ), written by the test ------

def write_png(path, image):
  """Writes a uint8 (height, width, channels) array as a PNG file, creating its folder."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(np.asarray(image, np.uint8)))


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=10, size=(16, 16),
                       channels=1, seed=0):
  """root/<class>/<i>.png with random pixels, brighter for later classes (learnable); returns
  {path: uint8 image}."""
  rng = np.random.default_rng(seed)
  images = {}
  for label, name in enumerate(classes):
    for i in range(per_class):
      image = rng.integers(0, 128, (*size, channels)) + 60 * label
      images[os.path.join(str(root), name, f"{i:03d}.png")] = np.clip(image, 0, 255).astype(
          np.uint8)
  for path, image in images.items():
    write_png(path, image)
  return images


def write_csv(path, header, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.write(",".join(header) + "\n")
    f.writelines(",".join(str(value) for value in row) + "\n" for row in rows)
  return str(path)
