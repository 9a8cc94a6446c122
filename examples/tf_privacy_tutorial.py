"""TF Privacy's Keras tutorial ("Implement Differential Privacy with TensorFlow Privacy": DP-SGD
on the MNIST CNN), ported to tfdp_prune. Its model, loss, optimizer arguments and
hyperparameters are unchanged; every changed line is marked `# CHANGED:`.

Offline by default: scikit-learn's digits (1,797 8x8 images, shipped with the package) resized
to 28x28 so that the tutorial's CNN runs as written. `--dataset=mnist` reads MNIST with
`tf_keras.datasets.mnist.load_data()` (a download, or its cache in ~/.keras/datasets).

  python examples/tf_privacy_tutorial.py                      # digits, the tutorial's 3 epochs
  python examples/tf_privacy_tutorial.py --dataset=mnist --epochs=15
  python examples/tf_privacy_tutorial.py --sampling=poisson   # the amplified (Poisson) epsilon
"""

import argparse

import numpy as np
import tf_keras as keras  # CHANGED: the model is tf_keras (Keras 2), not tf.keras (Keras 3)
from sklearn.datasets import load_digits

import tfdp_prune  # CHANGED: the optimizer comes from tfdp_prune, not tensorflow_privacy

# The tutorial's hyperparameters.
L2_NORM_CLIP = 1.5
NOISE_MULTIPLIER = 1.3
NUM_MICROBATCHES = 250  # the batch size: per-example clipping
LEARNING_RATE = 0.25
BATCH_SIZE = 250
DELTA = 1e-5


def load(dataset):
  """(train_data, train_labels), (test_data, test_labels): 28x28x1 floats in [0, 1], one-hot
  labels, as the tutorial prepares them."""
  if dataset == "mnist":
    try:
      (train_data, train_labels), (test_data, test_labels) = keras.datasets.mnist.load_data()
    except Exception as error:  # pylint: disable=broad-except  (no network, no cache)
      raise SystemExit(f"--dataset=mnist needs MNIST from the network or ~/.keras/datasets "
                       f"({type(error).__name__}: {error}). Use --dataset=digits offline.")
    train_data = train_data.astype("float32") / 255
    test_data = test_data.astype("float32") / 255
  else:
    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8, 1).astype("float32") / 16.0
    images = keras.layers.Resizing(28, 28)(images).numpy()  # the tutorial's input size
    # A multiple of the batch size for training: num_microbatches must divide every batch.
    train_data, test_data = images[:1500], images[1500:]
    train_labels, test_labels = labels[:1500], labels[1500:]
  train_data, test_data = train_data.reshape(-1, 28, 28, 1), test_data.reshape(-1, 28, 28, 1)
  return ((train_data, keras.utils.to_categorical(train_labels, num_classes=10)),
          (test_data, keras.utils.to_categorical(test_labels, num_classes=10)))


def main(dataset="digits", epochs=3, sampling="shuffle", steps_per_epoch=None):
  (train_data, train_labels), (test_data, test_labels) = load(dataset)

  model = keras.Sequential([
      keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu",
                          input_shape=(28, 28, 1)),
      keras.layers.MaxPool2D(2, 1),
      keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
      keras.layers.MaxPool2D(2, 1),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation="relu"),
      keras.layers.Dense(10),
  ])

  # CHANGED: the batches come from a sampler whose privacy is accounted as what it does. The
  # tutorial's `model.fit(..., batch_size=250)` shuffles fixed batches, and its epsilon
  # (compute_dp_sgd_privacy) assumes Poisson sampling, which those batches are not.
  if sampling == tfdp_prune.PoissonSampler.sampling:
    sampler = tfdp_prune.PoissonSampler((train_data, train_labels),
                                        sampling_probability=BATCH_SIZE / len(train_data))
    microbatches = {"expected_batch_size": sampler.expected_batch_size}  # CHANGED: see README
  else:
    sampler = tfdp_prune.ShuffleSampler((train_data, train_labels), batch_size=BATCH_SIZE)
    microbatches = {"num_microbatches": NUM_MICROBATCHES}

  optimizer = tfdp_prune.DPKerasSGDOptimizer(
      l2_norm_clip=L2_NORM_CLIP,
      noise_multiplier=NOISE_MULTIPLIER,
      learning_rate=LEARNING_RATE,
      **microbatches)
  loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                              reduction=keras.losses.Reduction.NONE)
  model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
  tfdp_prune.make_private(model)  # CHANGED: model.fit now runs the DP train step

  # CHANGED: the epsilon of the batches actually drawn, in every epoch's logs.
  budget = tfdp_prune.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=NOISE_MULTIPLIER, steps=0, delta=DELTA),
      sampler=sampler)
  model.fit(sampler.dataset(), epochs=epochs, validation_data=(test_data, test_labels),
            steps_per_epoch=steps_per_epoch or sampler.physical_steps_per_epoch,
            callbacks=[budget], verbose=2)

  _, accuracy = model.evaluate(test_data, test_labels, verbose=0)
  print(f"test accuracy: {accuracy:.4f}")
  print(f"epsilon: {budget.epsilon():.2f} at delta {DELTA} ({budget.ledger.spec.statement()})")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--sampling", default=tfdp_prune.ShuffleSampler.sampling,
                      choices=[tfdp_prune.ShuffleSampler.sampling,
                               tfdp_prune.PoissonSampler.sampling])
  parser.add_argument("--steps_per_epoch", type=int, default=None,
                      help="fewer steps per epoch (a quick check); default: one pass")
  main(**vars(parser.parse_args()))
