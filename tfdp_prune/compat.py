"""The one module that imports Keras and TF Privacy; everything else imports them from here.

tfdp_prune is written against the Keras 2 API of `tf_keras`, imported directly. It never reads or
sets TF_USE_LEGACY_KERAS, so it works whatever was imported before it (tensorflow, keras, tfmot):
`tf.keras` may be Keras 3 in the process and tfdp_prune still builds on `tf_keras`.

TF Privacy is optional (the `tf-privacy` extra) and imported lazily, only by `tf_privacy()`,
through its own escape hatch (`sys.skip_tf_privacy_import`): its package `__init__` imports
tensorflow_estimator modules that TF >= 2.16 no longer has. Its Keras classes subclass
`tf.keras`, so they need `tf.keras` to be tf_keras, which only TF_USE_LEGACY_KERAS=1 set before
tensorflow's first import gives.
"""

import importlib
import importlib.util
import sys
import types

import tensorflow as tf
import tf_keras as keras

__all__ = ["keras", "tf", "tf_privacy", "tfmot", "ensure_tf_keras_model", "KERAS_3_FIX",
           "TF_PRIVACY_FIX", "is_keras_3_frame"]

# How to get a tf_keras model, wherever a Keras 3 model meets tfdp_prune.
KERAS_3_FIX = (
    "tfdp_prune trains models built with tf_keras (Keras 2) until Keras 3 is supported. Build "
    "the model, its layers, losses and metrics with `import tf_keras as keras` (instead of "
    "`import keras` or `from tensorflow import keras`), or set the environment variable "
    "TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported (then `tf.keras` is tf_keras), "
    "e.g. `TF_USE_LEGACY_KERAS=1 python train.py`.")

_TF_PRIVACY_MODULES = {
    "dp_optimizer_keras": "tensorflow_privacy.privacy.optimizers.dp_optimizer_keras",
    "dp_optimizer_keras_vectorized":
        "tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized",
    "dp_keras_model": "tensorflow_privacy.privacy.keras_models.dp_keras_model",
    "gaussian_query": "tensorflow_privacy.privacy.dp_query.gaussian_query",
}


# How to get TF Privacy, wherever TF Privacy interop is asked for without it installed.
TF_PRIVACY_FIX = (
    "TF Privacy interop needs tensorflow-privacy 0.9.0, which tfdp_prune does not install by "
    "default: `pip install \"tfdp_prune[tf-privacy]\"` (its metadata requires Python < 3.12 "
    "and numpy < 2). tfdp_prune itself does not need it.")


def tf_privacy() -> types.SimpleNamespace:
  """Returns TF Privacy's Keras submodules, imported without its broken package `__init__`.

  Raises:
    ImportError: tensorflow-privacy is not installed (the message says how to install it).
    RuntimeError: `tf.keras` is Keras 3 in this process (the message says how to fix it).
  """
  if importlib.util.find_spec("tensorflow_privacy") is None:
    raise ImportError(TF_PRIVACY_FIX, name="tensorflow_privacy")
  if tf.keras.Model is not keras.Model:
    raise RuntimeError(
        "TF Privacy's Keras classes subclass `tf.keras`, which is Keras 3 in this process; they "
        "need tf_keras. Set the environment variable TF_USE_LEGACY_KERAS=1 before tensorflow is "
        "first imported (e.g. `TF_USE_LEGACY_KERAS=1 python ...`). tfdp_prune itself does not "
        "need it.")
  sys.skip_tf_privacy_import = True
  return types.SimpleNamespace(**{
      name: importlib.import_module(path) for name, path in _TF_PRIVACY_MODULES.items()})


_TFMOT_MODULES = {
    "sparsity": "tensorflow_model_optimization.sparsity.keras",
    "pruning_wrapper": "tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper",
    "pruning_impl": "tensorflow_model_optimization.python.core.sparsity.keras.pruning_impl",
}


def tfmot() -> types.SimpleNamespace:
  """Returns tfmot's pruning modules. Importing tfmot sets TF_USE_LEGACY_KERAS=1 in the
  environment, so tfdp_prune only calls this once tfmot is already imported (a model holds its
  wrappers; see `tfmot_interop`)."""
  return types.SimpleNamespace(**{
      name: importlib.import_module(path) for name, path in _TFMOT_MODULES.items()})


def ensure_tf_keras_model(model) -> None:
  """Raises a TypeError that says how to build a tf_keras model when `model` is not one."""
  if isinstance(model, keras.Model):
    return
  module = type(model).__module__
  hint = ""
  if module.startswith("keras"):
    hint = (" It is a Keras 3 model (from the `keras` package, or `tf.keras` without "
            f"TF_USE_LEGACY_KERAS=1). {KERAS_3_FIX}")
  raise TypeError(
      f"Expected a tf_keras.Model. Received: {type(model).__module__}.{type(model).__name__}."
      + hint)


def is_keras_3_frame(frame) -> bool:
  """Whether `frame` runs code of the Keras 3 package (`keras.*`; tf_keras is `tf_keras.*`)."""
  return frame.f_globals.get("__name__", "").startswith("keras.")
