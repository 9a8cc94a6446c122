"""Prints, as JSON, the tensor memory a traced DP step holds between steps, the size of one of
its activations, and the bytes of one variable of each distinct shape:
  python _held_memory_worker.py
In its own process: TF_CPU_ALLOCATOR_USE_BFC must be set before TensorFlow starts, for
`get_memory_info` to count CPU tensors."""

import json
import os

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tf_keras as keras  # pylint: disable=g-import-not-at-top

import tfdp_prune  # pylint: disable=g-import-not-at-top
from tfdp_prune import models  # pylint: disable=g-import-not-at-top

BATCH, SHAPE = 32, (32, 32, 16)


def allocated():
  return tf.config.experimental.get_memory_info("CPU:0")["current"]


# Layers of every windowed path: 32 x 32 positions take the per-example loop, 6 x 6 the
# materialized gradients; the wide Dense has a kernel of 1.2 MB.
model = keras.Sequential([
    keras.Input(SHAPE), keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
    models.WSConv2D(16, 3, padding="same"), keras.layers.AveragePooling2D(4),
    keras.layers.Conv2D(16, 3), keras.layers.Flatten(), keras.layers.Dense(512),
    keras.layers.Dense(10)])
model.compile(
    optimizer=tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0,
                                             learning_rate=0.1),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"))
tfdp_prune.make_private(model)
rng = np.random.default_rng(0)
data = iter(tf.data.Dataset.from_tensors(
    (rng.random((BATCH,) + SHAPE, dtype=np.float32), rng.integers(0, 10, size=BATCH))).repeat())
step = model.make_train_function()
step.get_concrete_function(data)
model.optimizer.build(model.trainable_variables)
before = allocated()
for _ in range(2):
  step(data)["loss"].numpy()
shapes = {tuple(v.shape) for v in model.trainable_variables}
print(json.dumps({"held": allocated() - before, "activation": 4 * BATCH * int(np.prod(SHAPE)),
                  "one_per_shape": sum(4 * int(np.prod(s)) for s in shapes)}))
