"""Test-session setup: two logical CPUs, so MirroredStrategy tests can run two replicas; and a
check that the package under test is this checkout's, assembled from its three directories.

Devices can only be configured before TensorFlow initializes them, hence here, at collection.
"""

import os

# Under pytest-xdist every worker shares the machine's cores with the others: one intra-op
# thread each (and in the subprocesses they start) avoids oversubscription (two workers on 2
# cores: two concurrent test files 10% faster, measured). Set before TensorFlow starts.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
  os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each subpackage lives in this checkout (pyproject.toml's package-dir), and where it lives
# once assembled (an installed wheel, Bazel's runfiles).
_SUBPACKAGE_DIRS = {"tfdp_prune.trainers": "trainers", "tfdp_prune.export": "export"}


def _stray(module_name: str, checkout_dir: str) -> bool:
  """Whether `module_name` comes from elsewhere than this checkout's `checkout_dir` (or its
  assembled place), or is missing although this checkout has its sources (not installed)."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    return os.path.isdir(os.path.join(_REPO, checkout_dir))
  here = os.path.dirname(os.path.abspath(module.__file__))
  assembled = os.path.join(_REPO, *module_name.split("."))
  return here not in (os.path.join(_REPO, checkout_dir), assembled)


def pytest_configure(config):
  """tfdp_prune.trainers and .export live in top-level directories that only an install maps into
  the package; PYTHONPATH alone, or another checkout's install, would test other code."""
  del config
  stray = [name for name, directory in _SUBPACKAGE_DIRS.items() if _stray(name, directory)]
  if stray:
    pytest.exit(f"{', '.join(stray)} not importable from this checkout ({_REPO}): install it "
                f"with `pip install -e .` here (see README.md, Layout).", returncode=4)
