"""Test-session setup: two logical CPUs, so MirroredStrategy tests can run two replicas.

Devices can only be configured before TensorFlow initializes them, hence here, at collection.
"""

import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
