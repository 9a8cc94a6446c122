"""What `make_private` adds to a model's logs: `dp_non_finite_examples` in training logs only;
`evaluate` returns exactly what the model was compiled with."""

import glob
import os

import numpy as np

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T


def _model():
  model = T.dense_model()
  model.compile(optimizer=T.tfdp_prune.DPKerasSGDOptimizer(1.0, 0.0, learning_rate=0.1),
                loss=T.per_example_loss(), metrics=["accuracy"])
  return T.tfdp_prune.make_private(model)


def test_evaluate_returns_what_the_model_was_compiled_with():
  x, y = T.dense_data(n=16)
  model = _model()
  history = model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), verbose=0)
  assert set(history.history) == {"loss", "accuracy", "dp_non_finite_examples", "val_loss",
                                  "val_accuracy"}
  _, accuracy = model.evaluate(x, y, verbose=0)  # tfmot's guide unpacks exactly two values
  assert 0.0 <= accuracy <= 1.0
  assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "accuracy"}
  assert model.metrics_names == ["loss", "accuracy"]


def test_the_count_of_dropped_examples_is_per_epoch():
  x, y = T.dense_data(n=8)
  x[3] = np.inf  # its gradient is not finite: dropped once per epoch
  model = _model()
  history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
  assert history.history["dp_non_finite_examples"] == [1, 1]
  assert model.train_on_batch(x, y, return_dict=True)["dp_non_finite_examples"] == 1


def _tags(event_dir):
  tags = set()
  for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


def test_tensorboard_logs_the_count_for_training_not_validation(tmp_path):
  x, y = T.dense_data(n=16)
  model = _model()
  model.fit(x, y, batch_size=8, validation_data=(x, y), verbose=0,
            callbacks=[keras.callbacks.TensorBoard(str(tmp_path))])
  assert "epoch_dp_non_finite_examples" in _tags(tmp_path / "train")
  validation = _tags(tmp_path / "validation")
  assert "epoch_accuracy" in validation
  assert not any("dp_non_finite" in tag for tag in validation)
