"""export_saved_model: what TF Serving (and plain TensorFlow) gets, and how it is written.

The claims:
  - a fresh process with TensorFlow alone (no tfdp_prune, no Keras) serves the export: the
    probabilities are softmax(model(x)) to 1e-6, the class ids argmax; the privacy metadata reads
    back exactly, through the file, the `privacy_metadata` signature and `privacy_metadata_json()`;
  - saved_model_cli and TF Serving's REST request formats (row and columnar) see the signatures
    with the named input; the warmup requests replay through their signatures, and hold
    synthetic inputs (zeros) unless examples are passed explicitly as public, as the model card
    says; the old `warmup_inputs=` argument is refused;
  - exactly the model's weights are exported: no optimizer slots, update masks or tfmot pruning
    variables;
  - a model without DP metadata is labelled non-private;
  - writing is atomic: an exception or a SIGKILL in the middle leaves no version directory (the
    next export cleans up), an existing version is refused (byte-identical afterwards) unless
    overwrite=True, and an interrupted replacement gives the old version back;
  - versions count up; bad arguments are actionable errors raised before anything is written.
"""

import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.export import ExportError
from tfdp_prune.export import export_saved_model
from tfdp_prune.export import read_metadata
from tfdp_prune.export import saved_model
from tfdp_prune.export import serving_files
from tests.tfdp_prune import _testing as T
from tests.export import _export_testing as E

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
_FORBIDDEN = ("mask", "threshold", "pruning_step")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model = E.tiny_model()
  metadata = E.private_metadata()
  export_dir = str(tmp_path_factory.mktemp("export") / "models")
  path = export_saved_model(model, export_dir, metadata, input_name=E.INPUT_NAME)
  return types.SimpleNamespace(model=model, metadata=metadata, export_dir=export_dir, path=path)


@pytest.fixture(scope="module")
def loaded(exported):
  return tf.saved_model.load(exported.path)


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", **extra)
  return env


# ---- what is served -------------------------------------------------------------------------

def test_the_layout_is_tf_servings(exported):
  assert exported.path == os.path.join(exported.export_dir, "1")
  assert sorted(os.listdir(exported.export_dir)) == ["1"]
  for name in ("saved_model.pb", "variables/variables.index", "model_card.md",
               "assets.extra/privacy_metadata.json", "assets.extra/tf_serving_warmup_requests"):
    assert os.path.isfile(os.path.join(exported.path, name)), name
  with open(os.path.join(exported.path, "assets.extra", "privacy_metadata.json"),
            encoding="utf-8") as f:
    assert f.read() == exported.metadata.to_json()


def test_a_fresh_process_with_tensorflow_alone_serves_the_model_and_its_metadata(
    exported, tmp_path):
  x = E.examples(n=6)
  np.save(tmp_path / "x.npy", x)
  out = tmp_path / "out.json"
  result = subprocess.run(
      [sys.executable, os.path.join(_HERE, "_serving_client.py"), exported.path,
       str(tmp_path / "x.npy"), E.INPUT_NAME, str(out)],
      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  served = json.loads(out.read_text())
  assert served["imported"] == []
  logits = exported.model(x).numpy()
  assert served["probabilities_dtype"] == "float32" and served["class_id_dtype"] == "int64"
  np.testing.assert_allclose(served["probabilities"], E.softmax(logits), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(served["class_id"], np.argmax(logits, axis=1))
  assert served["privacy_metadata_json"] == exported.metadata.to_json()
  assert served["fields"] == {"epsilon": "7.42", "private": "true",
                              "all": exported.metadata.to_json(), "no_such_field": ""}
  assert served["one_field"] == "7.42"


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_saved_model_cli_shows_both_signatures_with_the_named_input(exported):
  result = subprocess.run(
      [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir",
       exported.path, "--all"], env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  serving = text[text.index("signature_def['serving_default']"):]
  serving = serving[:serving.index("Method name is")]
  assert f"inputs['{E.INPUT_NAME}']" in serving and "shape: (-1, 8)" in serving
  assert "outputs['probabilities']" in serving and "outputs['class_id']" in serving
  lookup = text[text.index("signature_def['privacy_metadata']"):]
  lookup = lookup[:lookup.index("Method name is")]
  assert "inputs['field']" in lookup and "DT_STRING" in lookup and "outputs['value']" in lookup


def _row_bodies(x):
  return {
      "row, values": {"instances": x.tolist()},
      "row, objects": {"instances": [{E.INPUT_NAME: row} for row in x.tolist()]},
  }


def _columnar_bodies(x):
  return {
      "columnar, the batch": {"inputs": x.tolist()},
      "columnar, named": {"inputs": {E.INPUT_NAME: x.tolist()}},
  }


@pytest.mark.parametrize("kind", ["row, values", "row, objects"])
def test_rest_row_format_bodies_give_the_models_answer(exported, loaded, kind):
  x = E.examples(n=3)
  response = E.rest_predict(loaded, json.dumps(_row_bodies(x)[kind]))
  logits = exported.model(x).numpy()
  predictions = response["predictions"]
  assert len(predictions) == 3
  np.testing.assert_allclose([p["probabilities"] for p in predictions], E.softmax(logits),
                             rtol=0, atol=1e-6)
  assert [p["class_id"] for p in predictions] == np.argmax(logits, axis=1).tolist()


@pytest.mark.parametrize("kind", ["columnar, the batch", "columnar, named"])
def test_rest_columnar_format_bodies_give_the_models_answer(exported, loaded, kind):
  x = E.examples(n=3)
  outputs = E.rest_predict(loaded, json.dumps(_columnar_bodies(x)[kind]))["outputs"]
  logits = exported.model(x).numpy()
  np.testing.assert_allclose(outputs["probabilities"], E.softmax(logits), rtol=0, atol=1e-6)
  assert outputs["class_id"] == np.argmax(logits, axis=1).tolist()


def test_rest_privacy_metadata_request(exported, loaded):
  body = {"signature_name": "privacy_metadata", "instances": ["epsilon", "all", "delta"]}
  predictions = E.rest_predict(loaded, json.dumps(body))["predictions"]
  assert predictions[0] == "7.42"
  assert json.loads(predictions[1]) == exported.metadata.to_dict()
  assert json.loads(predictions[2]) == 1e-5
  columnar = {"signature_name": "privacy_metadata", "inputs": {"field": ["private"]}}
  assert E.rest_predict(loaded, json.dumps(columnar))["outputs"] == ["true"]


@pytest.mark.parametrize("body", [
    {"signature_name": "privacy_metadata", "inputs": {"field": "epsilon"}},
    {"signature_name": "privacy_metadata", "inputs": "epsilon"},
], ids=["columnar, named scalar", "columnar, scalar"])
def test_rest_privacy_metadata_request_with_one_field_name(loaded, body):
  assert E.rest_predict(loaded, json.dumps(body))["outputs"] == "7.42"


def test_rest_privacy_metadata_request_in_row_objects(loaded):
  body = {"signature_name": "privacy_metadata",
          "instances": [{"field": "epsilon"}, {"field": "private"}]}
  assert E.rest_predict(loaded, json.dumps(body))["predictions"] == ["7.42", "true"]


def _session_run(path, signature, inputs):
  """Runs `signature` of the SavedModel at `path` the way TF Serving does: a C++ session fed the
  request's tensor as is (no Python-side check of its shape against the signature)."""
  from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-import-not-at-top
  with tf.compat.v1.Session(graph=tf.Graph()) as session:
    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    definition = meta_graph.signature_def[signature]
    (name, value), = inputs.items()
    options = config_pb2.CallableOptions()
    options.feed.append(definition.inputs[name].name)
    names = sorted(definition.outputs)
    options.fetch.extend(definition.outputs[n].name for n in names)
    run = session._make_callable_from_options(options)  # pylint: disable=protected-access
    return {n: np.asarray(v, dtype=object if isinstance(v, bytes) else None)
            for n, v in zip(names, run(value))}


def test_tf_servings_session_answers_one_field_name_with_one_value(exported):
  value = _session_run(exported.path, "privacy_metadata",
                       {"field": np.array("epsilon", dtype=object)})["value"]
  assert value.shape == () and value == b"7.42"
  values = _session_run(exported.path, "privacy_metadata",
                        {"field": np.array(["delta", "nothing"], dtype=object)})["value"]
  assert values.tolist() == [b"1e-05", b""]


_FIELD_ERROR = (r"privacy_metadata: expected `field` to be one field name \(a string, e.g. "
                r"epsilon\) or a list of names .*Received a string tensor of shape\] \[1 2\]")


def test_a_field_of_rank_2_is_refused_readably(exported, loaded):
  field = np.array([["epsilon", "delta"]], dtype=object)
  with pytest.raises(tf.errors.InvalidArgumentError, match=_FIELD_ERROR):
    loaded.signatures["privacy_metadata"](field=tf.constant(field))
  with pytest.raises(tf.errors.InvalidArgumentError, match=_FIELD_ERROR):
    _session_run(exported.path, "privacy_metadata", {"field": field})


@pytest.mark.parametrize("shape, received", [
    ((2, 5), r"\[2 5\]"),  # another model's input
    ((8,), r"\[8\]"),  # one example without its batch dimension
    ((1, 8, 1), r"\[1 8 1\]"),
    ((0, 3), r"\[0 3\]"),
])
def test_a_wrong_input_shape_is_refused_readably(exported, loaded, shape, received):
  x = np.zeros(shape, np.float32)
  match = (r"serving_default: expected `pixels` shaped \[batch, 8\] \(float32, one row per "
           r"example.*Received shape\] " + received)
  with pytest.raises(tf.errors.InvalidArgumentError, match=match):
    loaded.signatures["serving_default"](pixels=tf.constant(x))
  with pytest.raises(tf.errors.InvalidArgumentError, match=match):
    _session_run(exported.path, "serving_default", {E.INPUT_NAME: x})


def test_tf_servings_session_serves_the_right_shape(exported):
  x = E.examples(n=3)
  outputs = _session_run(exported.path, "serving_default", {E.INPUT_NAME: x})
  logits = exported.model(x).numpy()
  np.testing.assert_allclose(outputs["probabilities"], E.softmax(logits), rtol=0, atol=1e-6)
  empty = _session_run(exported.path, "serving_default", {E.INPUT_NAME: np.zeros((0, 8),
                                                                                np.float32)})
  assert empty["probabilities"].shape == (0, E.CLASSES)


def test_the_rest_emulator_refuses_what_tf_serving_refuses(loaded):
  x = E.examples(n=2).tolist()
  with pytest.raises(E.RestError, match="must only have keys"):
    E.rest_predict(loaded, json.dumps({"instances": [{"inputs": row} for row in x]}))
  with pytest.raises(E.RestError, match="Missing named input"):
    E.rest_predict(loaded, json.dumps({"inputs": {"inputs": x}}))
  with pytest.raises(E.RestError, match="exactly one"):
    E.rest_predict(loaded, json.dumps({"instances": x, "inputs": x}))
  with pytest.raises(E.RestError, match="not found"):
    E.rest_predict(loaded, json.dumps({"signature_name": "predict", "instances": x}))


def test_the_warmup_requests_replay_through_their_signatures(exported, loaded):
  logs = serving_files.read_warmup_file(
      os.path.join(exported.path, "assets.extra", "tf_serving_warmup_requests"))
  called = []
  for log in logs:
    request = log.predict_log.request
    name = request.model_spec.signature_name
    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    outputs = loaded.signatures[name](**inputs)
    called.append((name, int(next(iter(outputs.values())).shape[0])))
  assert called == [("serving_default", 1), ("serving_default", 8), ("privacy_metadata", 2)]


def _warmup_batches(path, input_name="inputs"):
  """The serving_default inputs of an export's warmup file, parsed."""
  logs = serving_files.read_warmup_file(
      os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))
  requests = [log.predict_log.request for log in logs]
  return [tf.make_ndarray(r.inputs[input_name]) for r in requests
          if r.model_spec.signature_name == "serving_default"]


def _model_card(path):
  with open(os.path.join(path, "model_card.md"), encoding="utf-8") as f:
    return f.read()


def test_the_default_warmup_is_synthetic_and_the_model_card_says_so(exported):
  batches = _warmup_batches(exported.path, E.INPUT_NAME)
  synthetic = serving_files.synthetic_warmup_batches((E.INPUTS,))
  assert len(batches) == len(synthetic) == 2
  for batch, expected in zip(batches, synthetic):
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch, expected)  # zeros: no row of any data
  card = _model_card(exported.path)
  assert "Warmup inputs: **synthetic**." in card and "derived from no dataset" in card


def test_the_warmup_carries_the_inputs_given_as_public(tmp_path):
  x = E.examples(n=3)
  path = export_saved_model(E.tiny_model(), str(tmp_path / "m"), public_warmup_inputs=x)
  batches = _warmup_batches(path)
  np.testing.assert_array_equal(batches[0], x[:1])
  np.testing.assert_array_equal(batches[1], x)
  card = _model_card(path)
  assert "Warmup inputs: **public**." in card and "passed explicitly as PUBLIC" in card
  assert "synthetic" not in card
  path = export_saved_model(E.tiny_model(), str(tmp_path / "m"), public_warmup_inputs=x,
                            model_card=False)
  assert not os.path.exists(os.path.join(path, "model_card.md"))


@pytest.mark.parametrize("rows", [E.examples(n=8), E.examples(n=8).tolist()])
def test_the_old_warmup_inputs_argument_is_refused_before_anything_is_written(tmp_path, rows):
  with pytest.raises(TypeError, match=r"no longer takes warmup_inputs.*public_warmup_inputs="):
    export_saved_model(E.tiny_model(), str(tmp_path / "m"), warmup_inputs=rows)
  assert not os.path.exists(tmp_path / "m")


def test_the_metadata_reads_back_exactly(exported, loaded):
  assert read_metadata(exported.path) == exported.metadata
  document = loaded.privacy_metadata_json().numpy().decode("utf-8")
  assert document == exported.metadata.to_json()
  names = sorted(exported.metadata.to_dict())
  values = loaded.signatures["privacy_metadata"](field=tf.constant(names))["value"].numpy()
  from_signature = {n: json.loads(v.decode("utf-8")) for n, v in zip(names, values)}
  assert from_signature == exported.metadata.to_dict()
  assert type(exported.metadata).from_dict(from_signature) == exported.metadata


def test_a_model_without_metadata_is_labelled_non_private(tmp_path):
  path = export_saved_model(E.tiny_model(), str(tmp_path / "m"))
  metadata = read_metadata(path)
  assert metadata.private is False and metadata.epsilon == float("inf")
  with open(os.path.join(path, "assets.extra", "privacy_metadata.json"), encoding="utf-8") as f:
    document = json.load(f)
  assert document["epsilon"] == "inf" and document["private"] is False
  with open(os.path.join(path, "model_card.md"), encoding="utf-8") as f:
    card = f.read()
  assert "NON-PRIVATE: trained without differential privacy (epsilon = infinity)" in card
  assert "Differentially private:" not in card
  loaded = tf.saved_model.load(path)
  value = loaded.signatures["privacy_metadata"](field=tf.constant(["epsilon", "private"]))
  assert value["value"].numpy().tolist() == [b'"inf"', b"false"]


def test_a_dp_model_labelled_non_private_is_warned_about_and_a_non_budget_refused(tmp_path,
                                                                                 monkeypatch):
  """The export stage recognises a DP optimizer and a budget without importing the library."""
  model = T.dp_model(T.dense_model())
  with pytest.raises(TypeError, match="Expected budget to be a tfdp_prune.PrivacyBudget"):
    export_saved_model(model, str(tmp_path / "refused"), budget=object())
  labels_with_a_dict = types.SimpleNamespace(privacy_metadata=lambda model: {"epsilon": 1.0})
  with pytest.raises(TypeError, match="Expected metadata to be a tfdp_prune.metadata"):
    export_saved_model(model, str(tmp_path / "refused"), budget=labels_with_a_dict)
  assert not os.path.exists(tmp_path / "refused")
  warnings = []
  monkeypatch.setattr(saved_model.logging, "warning",
                      lambda message, *args: warnings.append(message % args))
  export_saved_model(model, str(tmp_path / "dp"))
  export_saved_model(E.tiny_model(), str(tmp_path / "plain"))
  assert len(warnings) == 1 and "labelled NON-PRIVATE without budget=" in warnings[0]


def test_output_probabilities_serves_the_model_output_itself(tmp_path):
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((E.INPUTS,)),
                            keras.layers.Dense(E.CLASSES, activation="softmax")])
  path = export_saved_model(model, str(tmp_path / "m"), output="probabilities")
  x = E.examples(n=4)
  served = tf.saved_model.load(path).signatures["serving_default"](inputs=tf.constant(x))
  np.testing.assert_allclose(served["probabilities"].numpy(), model(x).numpy(), rtol=0, atol=1e-7)


# ---- exactly the model's weights ------------------------------------------------------------

def _saved_variables(path):
  """(sorted names from the SavedModel's object graph, every tensor in its checkpoint)."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  names = sorted(node.variable.name for node in proto.meta_graphs[0].object_graph_def.nodes
                 if node.WhichOneof("kind") == "variable")
  reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
  values = [reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH"]
  return names, values


def _assert_exactly(path, variables):
  names, values = _saved_variables(path)
  assert names == sorted(v.name.split(":")[0] for v in variables)
  assert not [n for n in names if any(word in n for word in _FORBIDDEN)]
  assert len(values) == len(variables)
  key = lambda a: (a.shape, a.tobytes())
  for saved, expected in zip(sorted(values, key=key),
                             sorted((v.numpy() for v in variables), key=key)):
    np.testing.assert_array_equal(saved, expected)


def test_a_dp_trained_model_exports_its_weights_without_the_optimizer_state(tmp_path):
  model = T.dp_model(E.tiny_model(), noise_multiplier=1.0, momentum=0.9)
  model.optimizer.build(model.trainable_variables)
  model.optimizer.set_update_masks(model.trainable_variables,
                                   T.random_masks(model.trainable_variables, keep=0.5))
  x, y = T.dense_data(n=8, classes=E.CLASSES)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  optimizer_names = [v.name for v in model.optimizer.variables]
  assert any("update_mask" in n for n in optimizer_names)  # the state that must stay behind
  path = export_saved_model(model, str(tmp_path / "m"), E.private_metadata())
  _assert_exactly(path, model.variables)


def test_a_tfmot_pruned_model_is_exported_stripped(tmp_path):
  environment = dict(os.environ)
  try:
    tfmot_sparsity = pytest.importorskip("tensorflow_model_optimization").sparsity.keras
    keras.utils.set_random_seed(2)
    model = tfmot_sparsity.prune_low_magnitude(
        keras.Sequential([keras.Input((E.INPUTS,)), keras.layers.Dense(16, activation="tanh"),
                          keras.layers.Dense(E.CLASSES)]),
        pruning_schedule=tfmot_sparsity.ConstantSparsity(0.5, begin_step=0, frequency=1))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=T.per_example_loss())
    x, y = T.dense_data(n=8, classes=E.CLASSES)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[tfmot_sparsity.UpdatePruningStep()])
    assert any("pruning_step" in v.name for v in model.variables)
    path = export_saved_model(model, str(tmp_path / "m"))
    stripped = tfmot_sparsity.strip_pruning(model)
    _assert_exactly(path, stripped.variables)
    kernels = [v.numpy() for v in stripped.variables if "kernel" in v.name]
    assert all(np.mean(k == 0) == pytest.approx(0.5, abs=0.05) for k in kernels)
    x = E.examples(n=4)
    served = tf.saved_model.load(path).signatures["serving_default"](inputs=tf.constant(x))
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               E.softmax(stripped(x).numpy()), rtol=0, atol=1e-6)
  finally:
    os.environ.clear()
    os.environ.update(environment)


# ---- atomic writes --------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["write_warmup_file", "render_model_card"])
def test_an_exception_mid_export_leaves_no_version_and_no_temporary_directory(
    tmp_path, monkeypatch, step):
  export_dir = tmp_path / "m"

  def fail(*args, **kwargs):
    del args, kwargs
    assert [p for p in os.listdir(export_dir) if p.startswith(".tmp-")]  # mid-write indeed
    raise OSError("disk full (injected)")

  monkeypatch.setattr(serving_files, step, fail)
  with pytest.raises(ExportError, match="Cannot write the export .*injected"):
    export_saved_model(E.tiny_model(), str(export_dir))
  assert os.listdir(export_dir) == []
  monkeypatch.undo()
  assert export_saved_model(E.tiny_model(), str(export_dir)) == str(export_dir / "1")


def test_a_killed_export_leaves_no_version_and_the_next_export_cleans_up(tmp_path):
  export_dir, signal_file = tmp_path / "m", tmp_path / "reached"
  process = subprocess.Popen(
      [sys.executable, os.path.join(_HERE, "_export_worker.py"), str(export_dir),
       str(signal_file)], env=_env(PYTHONPATH=_REPO), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while not signal_file.exists():
      if process.poll() is not None:
        pytest.fail(f"The worker ended before the kill point: {process.stderr.read()[-3000:]}")
      if time.monotonic() > deadline:
        pytest.fail("The worker did not reach the kill point in time.")
      time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
    process.communicate()
  leftovers = os.listdir(export_dir)
  assert [n for n in leftovers if n.isdigit()] == []
  (tmp,) = leftovers  # killed in the middle: a written SavedModel, under a name TF Serving skips
  assert tmp.startswith(".tmp-") and os.path.isfile(export_dir / tmp / "saved_model.pb")
  assert export_saved_model(E.tiny_model(), str(export_dir)) == str(export_dir / "1")
  assert os.listdir(export_dir) == ["1"]


def test_an_existing_version_is_refused_before_any_work_and_left_intact(tmp_path, monkeypatch):
  export_dir = str(tmp_path / "m")
  path = export_saved_model(E.tiny_model(seed=0), export_dir, version=3)
  before = E.tree_digest(path)

  def no_work(*args):
    raise AssertionError(f"the model was prepared although the version exists: {args}")

  monkeypatch.setattr(saved_model, "_plain_model", no_work)
  with pytest.raises(ExportError, match=r"Version 3 exists.*overwrite=True \(--overwrite\)"):
    export_saved_model(E.tiny_model(seed=1), export_dir, E.private_metadata(), version=3)
  assert E.tree_digest(path) == before
  assert sorted(os.listdir(export_dir)) == ["3"]


def test_overwrite_replaces_the_version(tmp_path):
  export_dir = str(tmp_path / "m")
  export_saved_model(E.tiny_model(seed=0), export_dir, version=3)
  model = E.tiny_model(seed=1)
  path = export_saved_model(model, export_dir, E.private_metadata(), version=3, overwrite=True)
  assert sorted(os.listdir(export_dir)) == ["3"]
  assert read_metadata(path) == E.private_metadata()
  x = E.examples(n=2)
  served = tf.saved_model.load(path).signatures["serving_default"](inputs=tf.constant(x))
  np.testing.assert_allclose(served["probabilities"].numpy(), E.softmax(model(x).numpy()),
                             rtol=0, atol=1e-6)


def test_an_interrupted_replacement_gives_the_old_version_back(tmp_path):
  """A writer killed between its two renames left the old version aside and the new one in a
  temporary directory: the next export restores the old one and deletes the new one."""
  export_dir = tmp_path / "m"
  export_saved_model(E.tiny_model(), str(export_dir), E.private_metadata(), version=2)
  before = E.tree_digest(export_dir / "2")
  os.rename(export_dir / "2", export_dir / ".tmp-replaced-2-0123abcd")
  shutil.copytree(export_dir / ".tmp-replaced-2-0123abcd", export_dir / ".tmp-2-deadbeef")
  path = export_saved_model(E.tiny_model(), str(export_dir))
  assert path == str(export_dir / "3")
  assert sorted(os.listdir(export_dir)) == ["2", "3"]
  assert E.tree_digest(export_dir / "2") == before


def test_versions_count_up_from_the_largest(tmp_path):
  export_dir = str(tmp_path / "m")
  model = E.tiny_model()
  assert export_saved_model(model, export_dir, model_card=False) == os.path.join(export_dir, "1")
  assert export_saved_model(model, export_dir, model_card=False) == os.path.join(export_dir, "2")
  assert export_saved_model(model, export_dir, version=7,
                            model_card=False) == os.path.join(export_dir, "7")
  with open(os.path.join(export_dir, "9"), "w", encoding="utf-8"):
    pass  # a file is no version
  assert export_saved_model(model, export_dir, model_card=False) == os.path.join(export_dir, "8")


# ---- bad input ------------------------------------------------------------------------------

def _two_inputs():
  a, b = keras.Input((2,)), keras.Input((3,))
  return keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))


def _rank3_output():
  return keras.Sequential([keras.Input((5, 3)), keras.layers.Dense(2)])


@pytest.mark.parametrize("case, error, match", [
    (dict(metadata={"private": False}), TypeError, "PrivacyMetadata.from_dict"),
    (dict(metadata="non-private"), TypeError, "Expected metadata to be"),
    (dict(output="softmax"), ValueError, r"output in \['logits', 'probabilities'\]"),
    (dict(input_name="1st input"), ValueError, "input_name"),
    (dict(version=0), ValueError, "version"),
    (dict(overwrite="yes"), ValueError, "overwrite"),
    (dict(model=_two_inputs), ExportError, "one input.*Received: 2 inputs"),
    (dict(model=_rank3_output), ExportError, r"one output \[batch, classes\]"),
    (dict(model=lambda: "a model"), TypeError, "Expected a tf_keras.Model"),
    (dict(public_warmup_inputs=np.zeros((2, 3))), ValueError,
     r"public_warmup_inputs shaped \[n >= 1, \*\[8\]"),
    (dict(warmup_inputs=np.zeros((2, 8))), TypeError, "no longer takes warmup_inputs"),
    (dict(export_dir="missing/m"), ExportError, "parent of export_dir"),
    (dict(export_dir="file"), ExportError, "which is a file"),
])
def test_bad_arguments_are_actionable_errors_and_write_nothing(tmp_path, case, error, match):
  (tmp_path / "file").write_text("not a directory")
  case = dict(case)
  model = case.pop("model", E.tiny_model)()
  export_dir = str(tmp_path / case.pop("export_dir", "m"))
  with pytest.raises(error, match=match):
    export_saved_model(model, export_dir, **case)
  assert sorted(os.listdir(tmp_path)) == ["file"]


def _imported_modules(tree):
  """The tfdp_prune modules a module's source imports ("from tfdp_prune import x" -> x)."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "tfdp_prune":
      yield from (f"tfdp_prune.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
    elif isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)


def test_the_export_modules_import_only_the_schema_compat_and_leaf_utilities():
  """The leaf utilities are `_validate` and `atomic_files` (which import nothing of ours, checked
  below). `export_saved_model(budget=...)` asks the budget for its label
  (`PrivacyBudget.privacy_metadata`), so the export stage imports no labeller."""
  allowed = {"tfdp_prune.metadata", "tfdp_prune.compat", "tfdp_prune._validate",
             "tfdp_prune.atomic_files"}
  package = os.path.join(_REPO, "export")
  for filename in ("__init__.py", "saved_model.py", "serving_files.py", "inspection.py"):
    with open(os.path.join(package, filename), encoding="utf-8") as f:
      modules = set(_imported_modules(ast.parse(f.read())))
    ours = {m for m in modules if m.split(".")[0] == "tfdp_prune"}
    assert ours, filename
    assert {m for m in ours if not m.startswith("tfdp_prune.export")} <= allowed, filename
  with open(os.path.join(_REPO, "tfdp_prune", "privacy_label.py"), encoding="utf-8") as f:
    labeller = set(_imported_modules(ast.parse(f.read())))
  assert not {m for m in labeller
              if m.startswith(("tfdp_prune.training", "tfdp_prune.trainers", "tfdp_prune.export"))}
  for leaf in ("_validate.py", "atomic_files.py"):
    with open(os.path.join(_REPO, "tfdp_prune", leaf), encoding="utf-8") as f:
      assert not {m for m in _imported_modules(ast.parse(f.read()))
                  if m.split(".")[0] == "tfdp_prune"}, leaf


def test_a_string_where_a_float_is_expected_is_refused_readably(exported, loaded):
  """TF itself refuses it, before the graph runs: each path's message names the types."""
  text = np.array([["0.5"] * E.INPUTS], dtype=object)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="expected to be a float tensor but is a string tensor"):
    loaded.signatures["serving_default"](pixels=tf.constant(text))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="Type mismatch: actual string vs. expect float"):
    _session_run(exported.path, "serving_default", {E.INPUT_NAME: text})  # gRPC's path
  body = json.dumps({"instances": [["0.5"] * E.INPUTS]})  # REST: an HTTP 400 before the graph
  with pytest.raises(E.RestError,
                     match='JSON Value: "0.5" Type: String is not of expected type: float'):
    E.rest_predict(loaded, body)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("where", ["saved_model", "warmup"])
def test_an_export_that_cannot_be_written_leaves_nothing_under_its_name(tmp_path, monkeypatch,
                                                                       code, where):
  """A full disk or a read-only file system (simulated: tests run as root) mid-export: a clear
  error; no partial version under its final name; the earlier version untouched."""
  export_dir = str(tmp_path / "models")
  first = export_saved_model(E.tiny_model(), export_dir, E.private_metadata())
  before = {os.path.relpath(os.path.join(r, n), first): open(os.path.join(r, n), "rb").read()
            for r, _, names in os.walk(first) for n in names}
  def fail(*args, **kwargs):
    raise OSError(code, os.strerror(code))
  if where == "saved_model":
    monkeypatch.setattr(saved_model.tf.saved_model, "save", fail)
  else:
    monkeypatch.setattr(serving_files, "write_warmup_file", fail)
  with pytest.raises(ExportError, match=f"(?s)Cannot write the export {export_dir}/2 "
                     f"\\({os.strerror(code)}\\).*Nothing was left under that name"):
    export_saved_model(E.tiny_model(), export_dir, E.private_metadata())
  monkeypatch.undo()
  assert os.listdir(export_dir) == ["1"]  # no "2", no temporary directory
  after = {os.path.relpath(os.path.join(r, n), first): open(os.path.join(r, n), "rb").read()
           for r, _, names in os.walk(first) for n in names}
  assert after == before
