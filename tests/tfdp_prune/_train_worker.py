"""Trains with `tfdp_prune.training.train` in its own process (a fresh tf.distribute setup):
  python _train_worker.py <strategy> <out_dir>
Two logical CPUs make MirroredStrategy run two replicas. Writes <out_dir>/weights.npz and exports
to <out_dir>/export. The sampling is seeded (--insecure_mechanism_seed) so that the two processes
draw the same batches."""

import os
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from tfdp_prune import training  # pylint: disable=g-import-not-at-top
from tfdp_prune.train_config import TrainConfig  # pylint: disable=g-import-not-at-top

strategy, out_dir = sys.argv[1], sys.argv[2]
result = training.train(TrainConfig(
    strategy=strategy, steps=3, epochs=None, public_epochs=1, epsilon=None,
    noise_multiplier=0.0, verbose=0, export_dir=os.path.join(out_dir, "export"),
    insecure_mechanism_seed=0))
np.savez(os.path.join(out_dir, "weights.npz"),
         *[v.numpy() for v in result.model.trainable_variables])
