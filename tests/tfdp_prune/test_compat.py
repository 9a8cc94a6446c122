"""Import orders, the public surface, and the Keras generation checks."""

import importlib.util
import os
import subprocess
import sys

import pytest

import tfdp_prune
from tfdp_prune import compat

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code, **env):
  environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  environment.update(env, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                        text=True, timeout=300)


_TRAIN_ONE_STEP = """
import numpy as np, tf_keras
model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
model.compile(optimizer=tfdp_prune.DPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.1),
              loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                 reduction="none"))
tfdp_prune.make_private(model).fit(np.ones((4, 3)), np.zeros(4), verbose=0)
print("trained", int(model.optimizer.iterations.numpy()))
"""


# Each subprocess imports TensorFlow (10-20 s on 2 cores), so each checks all it can: importing
# tfdp_prune first is checked by the next test, importing Keras 3 first by the Keras 3 tests.
@pytest.mark.parametrize("first", [
    pytest.param("import tensorflow; import tfdp_prune", marks=pytest.mark.slow),  # 12 s
    pytest.param("import tensorflow_model_optimization; import tfdp_prune",
                 marks=pytest.mark.slow),
])
def test_import_works_whatever_was_imported_first(first):
  result = _run(first + "\n" + _TRAIN_ONE_STEP)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trained 1" in result.stdout


def test_importing_tfdp_prune_sets_no_tf_use_legacy_keras_and_imports_no_tf_privacy_nor_tfmot():
  # The library and the tfdp-train binary's module; TF Privacy is optional (the tf-privacy extra).
  # Also: masks chosen from public data (a ParameterFreezing callback) never import tfmot.
  result = _run("import os, sys, tfdp_prune, tfdp_prune.trainers.train\n"
                "print(os.environ.get('TF_USE_LEGACY_KERAS'))\n"
                "print(sorted(m for m in sys.modules if m.startswith('tensorflow_privacy')))\n"
                + _TRAIN_ONE_STEP.replace(
                    "verbose=0)", "verbose=0, callbacks=[tfdp_prune.ParameterFreezing("
                    "tfdp_prune.MagnitudeRule(0.5), public_data=(np.ones((4, 3)), np.zeros(4)))])")
                + "print('tfmot imported:', 'tensorflow_model_optimization' in sys.modules)\n")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-4:] == ["None", "[]", "trained 1",
                                                     "tfmot imported: False"]


def test_every_public_name_resolves():
  for name in tfdp_prune.__all__:
    assert getattr(tfdp_prune, name) is not None


_NO_TF_PRIVACY = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_privacy") is None,
    reason="tensorflow-privacy is not installed (pip install -e \".[test,tf-privacy]\")")


def test_tf_privacy_absent_is_an_import_error_that_says_how_to_install_it(monkeypatch):
  # As in a base install (no tf-privacy extra): the module cannot be found.
  for name in [name for name in sys.modules if name.startswith("tensorflow_privacy.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "tensorflow_privacy", None)
  with pytest.raises(ImportError, match=r"tfdp_prune\[tf-privacy\]") as error:
    compat.tf_privacy()
  assert error.value.name == "tensorflow_privacy"
  assert str(error.value) == compat.TF_PRIVACY_FIX


@pytest.mark.slow  # 12 s: a subprocess importing TensorFlow
@_NO_TF_PRIVACY
def test_tf_privacy_needs_tf_keras_as_tf_keras_and_says_how():
  code = "from tfdp_prune import compat; compat.tf_privacy()"
  result = _run(code)
  assert result.returncode != 0
  assert "TF_USE_LEGACY_KERAS=1" in result.stderr
  ok = _run(code + """
import tf_keras
cls = compat.tf_privacy().dp_optimizer_keras_vectorized.VectorizedDPKerasSGDOptimizer
print(issubclass(cls, tf_keras.optimizers.legacy.Optimizer))""", TF_USE_LEGACY_KERAS="1")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert ok.stdout.strip().endswith("True")


# Both slow (11 s each, own processes): the default run stays under 10 minutes.
@pytest.mark.parametrize("keras_3", [
    pytest.param("import keras", marks=pytest.mark.slow),
    pytest.param("from tensorflow import keras", marks=pytest.mark.slow)])
def test_after_keras_3_tf_keras_models_train_and_keras_3_models_get_the_fix(keras_3):
  # Keras 3 imported first: tfdp_prune still trains a tf_keras model; a Keras 3 model given to
  # make_private, or compiled with our optimizer (the README's order: compile, then
  # make_private), gets an error that says how to build a tf_keras model. Keras 3's compile
  # refuses the optimizer first, with a message that formats it: that first error must carry
  # the fix. It ends the script, as it would the user's.
  result = _run(keras_3 + "\nimport tfdp_prune\n" + _TRAIN_ONE_STEP + """
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
try:
  tfdp_prune.make_private(model)
except TypeError as error:
  print(error)
optimizer = tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0)
print("elsewhere:", f"{optimizer}")
model.compile(optimizer=optimizer,
              loss=keras.losses.SparseCategoricalCrossentropy(reduction="none"))
""")
  assert "trained 1" in result.stdout, result.stderr[-3000:]
  assert "Keras 3 model" in result.stdout, result.stderr[-3000:]
  assert compat.KERAS_3_FIX in result.stdout  # the import line, or TF_USE_LEGACY_KERAS=1
  assert result.returncode != 0
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("ValueError: Could not interpret optimizer identifier: DPSGD (a "
                          "tfdp_prune DP optimizer for tf_keras models; this model is a Keras 3 "
                          "model)"), result.stderr[-3000:]
  assert "`import tf_keras as keras`" in error and "TF_USE_LEGACY_KERAS=1" in error
  # Formatted anywhere but in Keras 3, the optimizer reads as usual.
  assert "elsewhere: <tfdp_prune.optimizer.DPSGD object at" in result.stdout


def test_a_non_model_is_a_type_error():
  with pytest.raises(TypeError, match="Expected a tf_keras.Model"):
    compat.ensure_tf_keras_model(object())
