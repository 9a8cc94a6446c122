"""The README quickstart: DP training on scikit-learn's digits with a mask chosen from public data."""

import numpy as np
import tf_keras as keras
from sklearn.datasets import load_digits

import tfdp_prune
import tfdp_prune.export

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype("float32")
# A small public part (no privacy needed), the private part, and a test set.
public, private, test = (x[:200], y[:200]), (x[200:1500], y[200:1500]), (x[1500:], y[1500:])

# Poisson sampling: each private example joins each step with probability q. The draws (and
# the optimizer's noise) come from OS entropy: no seed of the DP mechanism exists to publish.
sampler = tfdp_prune.PoissonSampler(private, sampling_probability=100 / 1300)

keras.utils.set_random_seed(0)  # the initialization only: not part of the DP mechanism
model = keras.Sequential([
    keras.Input((64,)),
    keras.layers.Dense(128, activation="relu"),
    keras.layers.Dense(10),
])
model.compile(
    optimizer=tfdp_prune.DPKerasSGDOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.0, learning_rate=0.5, momentum=0.9,
        expected_batch_size=sampler.expected_batch_size),
    # DP needs one loss per example: reduction="none".
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"),
    metrics=["accuracy"],
)
tfdp_prune.make_private(model)  # model.fit now runs the DP train step

# Before DP training: train on the public part (no privacy cost), then freeze the 80% of each
# kernel with the smallest weights at zero. DP-SGD then trains and noises only the rest.
freezing = tfdp_prune.ParameterFreezing(
    tfdp_prune.MagnitudeRule(sparsity=0.8), public_data=public, public_epochs=20)
# Epsilon of the sampling actually done, in the logs of every epoch. Built with the sampler,
# it refuses to start a fit whose optimizer disagrees with it on the logical batch.
budget = tfdp_prune.PrivacyBudget(
    sampler.privacy_spec(noise_multiplier=1.0, steps=0, delta=1e-5), target_epsilon=8.0,
    sampler=sampler)

model.fit(sampler.dataset(), steps_per_epoch=sampler.physical_steps_per_epoch, epochs=15,
          callbacks=[freezing, budget], verbose=2)
print("test accuracy:", model.evaluate(*test, verbose=0)[1])
print(f"epsilon: {budget.epsilon():.2f} at delta {budget.delta:.3g} "
      f"({budget.ledger.spec.statement()})")

# Export for TF Serving (tfdp_export/<version>/), labelled from the budget: epsilon, delta, steps,
# sampling, noise, where the noise and sampling drew their randomness, and the masks' rule and
# public data, as the mask callback recorded them on the optimizer. Refused if they disagree.
path = tfdp_prune.export.export_saved_model(model, "tfdp_export", budget=budget)
label = tfdp_prune.export.read_metadata(path)
print(f"exported: {path}, labelled {label.guarantee.split('. ')[0]} after {label.steps} steps, "
      f"masks: {label.mask_mode} {label.mask_rule['name']}")
# Expected output (measured on 9 runs, 2 shared CPU cores, 15 to 55 s each; the noise and the
# batches are drawn anew in every run, so the accuracy varies from run to run):
#   test accuracy: 0.835 to 0.869 (mean 0.85)
#   epsilon: 7.42 at delta 1e-05 (Example-level DP ... 195 steps ...)
#   exported: tfdp_export/1, labelled (7.422, 1e-05)-DP after 195 steps, masks: freeze magnitude
# (195 logical steps are 15 epochs of 13: the budget's target epsilon 8 is not reached.)
