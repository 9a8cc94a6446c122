"""Public data in every accepted form is checked like arrays; other forms are refused."""

import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import data as data_lib
from tfdp_prune import masks
from tfdp_prune import public_data
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T


def _arrays(n=8, nan_at=None):
  x = np.ones((n, 4), np.float32)
  if nan_at is not None:
    x[nan_at, 1] = np.nan
  return x, np.zeros(n, np.int32)


def _dataset(n=8, nan_at=None, batch=3):
  return tf.data.Dataset.from_tensor_slices(_arrays(n, nan_at)).batch(batch)


def _named(n=8, nan_at=None):
  x, y = _arrays(n, nan_at)
  return {"pixels": x, "extra": np.ones((n, 2), np.float32)}, y


GOOD = {"arrays": _arrays(), "dataset": _dataset(), "dict_inputs": _named(),
        "dataset_of_dict_inputs": tf.data.Dataset.from_tensor_slices(_named()).batch(3)}


@pytest.mark.parametrize("form", sorted(GOOD))
def test_every_accepted_form_passes(form):
  public_data.check(GOOD[form], source="test")


BAD = [
    ("dataset_with_nan", _dataset(nan_at=5), "finite public inputs.*batch 1"),
    ("empty_dataset", _dataset(n=0), "non-empty public part"),
    ("dataset_with_a_filter_that_leaves_nothing",
     _dataset().unbatch().filter(lambda x, y: y > 5).batch(2), "non-empty public part"),
    ("infinite_dataset", _dataset().repeat(), "finite dataset"),
    ("unbatched_dataset", _dataset().unbatch(), "BATCHES"),
    ("dataset_of_inputs_only", _dataset().map(lambda x, y: x), "\\(x, y\\) batches"),
    ("dict_inputs_with_nan", _named(nan_at=3), "finite public inputs.*input 'pixels'"),
    ("dict_inputs_of_another_length", ({"pixels": np.ones((7, 4))}, np.zeros(8)),
     "one label per example"),
    ("dataset_of_dict_inputs_with_nan",
     tf.data.Dataset.from_tensor_slices(_named(nan_at=7)).batch(3), "finite.*batch 2"),
    ("a_dict_instead_of_a_pair", {"x": np.ones((8, 4)), "y": np.zeros(8)},
     "Expected test in one of these forms.*tf.data.Dataset.*a dict with keys \\['x', 'y'\\]"),
    ("a_bare_array", np.ones((8, 4)), "one of these forms.*ndarray"),
    ("a_triple", (np.ones((8, 4)), np.zeros(8), np.ones(8)), "3 elements"),
]


@pytest.mark.parametrize("given, phrase", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_public_data_is_refused_with_its_cause(given, phrase):
  with pytest.raises(data_lib.DataError, match=phrase):
    public_data.check(given, source="test")


def test_a_dataset_of_another_input_shape_is_refused():
  with pytest.raises(data_lib.DataError, match="private inputs' shape \\(5,\\).*\\(4,\\)"):
    public_data.check(_dataset(), (5,), source="test")


@pytest.mark.parametrize("make", [
    lambda data: tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5), public_data=data),
    lambda data: tfdp_prune.ParameterSelection(tfdp_prune.RandomRule(0.5), select_every=2,
                                               public_data=data),
], ids=["ParameterFreezing", "ParameterSelection"])
def test_mask_callbacks_check_datasets_and_dict_inputs(make):
  with pytest.raises(data_lib.DataError, match="finite public inputs"):
    make(_dataset(nan_at=2))
  with pytest.raises(data_lib.DataError, match="non-empty"):
    make(_dataset(n=0))
  with pytest.raises(data_lib.DataError, match="one of these forms"):
    make({"x": np.ones((8, 4)), "y": np.zeros(8)})


def test_the_public_gradient_rule_checks_its_data_in_every_form():
  model = T.dense_model()
  rule = masks.PublicGradientRule(0.5)
  with pytest.raises(data_lib.DataError, match="finite public inputs"):
    rule.masks(model, model.trainable_variables, 0, _dataset(nan_at=0))


def test_the_public_gradient_reads_dict_inputs_in_batches():
  """(dict of inputs, labels) arrays are sliced per input (they used to be sliced as a dict)."""
  inputs = {"a": keras.Input((2,), name="a"), "b": keras.Input((2,), name="b")}
  logits = keras.layers.Dense(3)(keras.layers.Concatenate()([inputs["a"], inputs["b"]]))
  model = keras.Model(inputs, logits)
  rng = np.random.default_rng(0)
  x = {"a": rng.normal(size=(10, 2)).astype("float32"),
       "b": rng.normal(size=(10, 2)).astype("float32")}
  y = rng.integers(0, 3, 10)
  loss = T.per_example_loss()
  got = masks.public_gradient(model, model.trainable_variables, (x, y), loss, batch_size=3)
  with tf.GradientTape() as tape:
    total = tf.reduce_sum(loss(y, model(x)))
  for g, want in zip(got, tape.gradient(total, model.trainable_variables)):
    np.testing.assert_allclose(g, want.numpy(), atol=1e-5)


def test_train_checks_a_callbacks_dataset_against_the_private_inputs_shape():
  from tfdp_prune import training  # pylint: disable=g-import-not-at-top
  callback = tfdp_prune.ParameterFreezing(tfdp_prune.MagnitudeRule(0.5), public_data=_dataset())
  private = (np.ones((8, 5), np.float32), np.zeros(8, np.int32))
  with pytest.raises(data_lib.DataError, match="ParameterFreezing.*shape \\(5,\\).*\\(4,\\)"):
    training._check_callback_public_data([callback], private)
