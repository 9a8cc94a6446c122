"""The README quickstart: DP training of a masked MLP on scikit-learn's digits."""

import numpy as np
import tf_keras as keras
from sklearn.datasets import load_digits

import tfdp_prune

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype("float32")
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((64,)),
    keras.layers.Dense(128, activation="relu"),
    keras.layers.Dense(10),
])
model.compile(
    optimizer=tfdp_prune.DPKerasSGDOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.5, momentum=0.9, seed=0),
    # DP needs one loss per example: reduction="none".
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
    metrics=["accuracy"],
)
tfdp_prune.make_private(model)  # model.fit now runs the DP train step

# Train 20% of each kernel (here: a random mask) and every bias.
optimizer = model.optimizer
optimizer.build(model.trainable_variables)
rng = np.random.default_rng(0)
masks = [rng.random(v.shape) < 0.2 if len(v.shape) > 1 else np.ones(v.shape, bool)
         for v in model.trainable_variables]
optimizer.set_update_masks(model.trainable_variables, masks)

model.fit(x_train, y_train, batch_size=100, epochs=15, verbose=2)
print("test accuracy:", model.evaluate(x_test, y_test, verbose=0)[1])
