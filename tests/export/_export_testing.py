"""Helpers shared by the export tests (not a test module): a tiny classifier, a realistic private
`PrivacyMetadata` built by hand, and a TF Serving REST emulator for loaded signatures."""

import hashlib
import json
import os

import numpy as np

import tfdp_prune
from tfdp_prune import metadata as metadata_lib
from tfdp_prune.compat import keras

INPUTS = 8
CLASSES = 4
INPUT_NAME = "pixels"


def tiny_model(seed=0):
  """Input((8,)) -> Dense(4): logits of 4 classes."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(CLASSES)])


def examples(n=5, seed=1):
  return np.random.default_rng(seed).normal(size=(n, INPUTS)).astype(np.float32)


def softmax(logits):
  """Reference softmax in float64 (independent of TF)."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def private_metadata(**overrides) -> metadata_lib.PrivacyMetadata:
  """The record of a realistic DP run (digits, Poisson sampling, RDP, frozen masks), by hand."""
  spec = tfdp_prune.PrivacySpec(noise_multiplier=1.1, steps=300, delta=1e-5, sampling="poisson",
                                sampling_probability=0.05, accountant="rdp")
  fingerprint = tfdp_prune.PublicDataFingerprint(
      num_examples=200, sha256=hashlib.sha256(b"public digits").hexdigest())
  values = dict(
      private=True, epsilon=7.42, delta=1e-5, accountant="rdp", statement=spec.statement(),
      privacy_spec=spec.to_dict(), noise_multiplier=1.1, l2_norm_clip=1.0, sampling="poisson",
      sampling_probability=0.05, batch_size=79.85, steps=300, epochs=15.0, dataset="digits",
      public_dataset="digits", public_split="train[:200]", private_split="train[200:]",
      num_private_examples=1597, num_public_examples=200, num_test_examples=360,
      public_fingerprint=fingerprint.to_dict(), mask_mode="freeze",
      mask_rule={"class_name": "MagnitudeRule", "config": {"sparsity": 0.9, "scope": "layer"}},
      mask_sparsity=0.9, mask_sparsity_per_variable={"dense/kernel:0": 0.9, "dense/bias:0": 0.0},
      mechanism_randomness="os_entropy", seed=1234,
      library_versions=metadata_lib.library_versions(),
      created="2026-01-02T03:04:05+00:00")
  values.update(overrides)
  return metadata_lib.PrivacyMetadata(**values)


def tree_digest(path):
  """{relative file name: sha256 of its bytes} of every file under `path`."""
  result = {}
  for directory, _, names in os.walk(path):
    for name in names:
      full = os.path.join(directory, name)
      with open(full, "rb") as f:
        result[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return result


# ---- TF Serving's REST predict API, emulated ----------------------------------------------------
# As documented in https://www.tensorflow.org/tfx/serving/api_rest ("Predict API") and
# implemented in tensorflow_serving/util/json_tensor.cc (FillPredictRequestFromJson,
# MakeJsonFromTensors): the request body picks a signature ("signature_name", default
# serving_default) and gives its inputs either in row format ("instances": one entry per
# example: the input's value when the signature has one input, or an object {input name: value}
# holding every input) or in columnar format ("inputs": the whole tensor for a single input, or
# an object {input name: tensor}). The response is {"predictions": [...]} for the row format
# (a list of values for one output, a list of {output name: value} objects for several) and
# {"outputs": ...} for the columnar format (the tensor for one output, {name: tensor} for
# several). float32 values are written in their shortest round-tripping decimal form.

class RestError(ValueError):
  """The request would be answered with HTTP 400 by TF Serving."""


def rest_predict(loaded, body: str) -> dict:
  """The parsed JSON response TF Serving's `:predict` gives for `body` on `loaded` (a
  `tf.saved_model.load` result)."""
  request = json.loads(body)
  name = request.get("signature_name", "serving_default")
  if name not in loaded.signatures:
    raise RestError(f"Serving signature name: {name!r} not found in signature def")
  signature = loaded.signatures[name]
  specs = signature.structured_input_signature[1]
  if ("instances" in request) == ("inputs" in request):
    raise RestError("expecting exactly one of 'instances' or 'inputs'")
  if "instances" in request:
    tensors = _from_instances(request["instances"], specs)
  else:
    tensors = _from_inputs(request["inputs"], specs)
  outputs = {k: np.array(v.numpy(), dtype=object if v.dtype.name == "string" else None)
             for k, v in signature(**tensors).items()}
  if "instances" in request:
    return json.loads(json.dumps({"predictions": _rows(outputs)}))
  return json.loads(json.dumps({"outputs": _columns(outputs)}))


def _is_object(value):
  return isinstance(value, dict) and not (set(value) == {"b64"})


def _from_instances(instances, specs):
  if not isinstance(instances, list) or not instances:
    raise RestError("'instances' must be a non-empty list")
  if not _is_object(instances[0]):
    if len(specs) > 1:
      raise RestError("instances is a plain list, but expecting list of objects as multiple "
                      "input tensors required as per tensorinfo_map")
    if any(_is_object(item) for item in instances):
      raise RestError("Expecting value/list but got object")
    (input_name,) = specs
    return {input_name: _tensor(instances, specs[input_name])}
  columns = {n: [] for n in specs}
  for index, item in enumerate(instances):
    if not _is_object(item) or set(item) != set(specs):
      raise RestError(f"Failed to process element: {index} of 'instances' list: it must only "
                      f"have keys: {sorted(specs)}")
    for input_name, value in item.items():
      columns[input_name].append(value)
  return {n: _tensor(v, specs[n]) for n, v in columns.items()}


def _from_inputs(inputs, specs):
  if not _is_object(inputs):
    if len(specs) > 1:
      raise RestError("inputs is a plain value/list, but expecting an object as multiple input "
                      "tensors required as per tensorinfo_map")
    (input_name,) = specs
    return {input_name: _tensor(inputs, specs[input_name])}
  missing = sorted(set(specs) - set(inputs))
  if missing:
    raise RestError(f"Missing named input: {missing[0]} in 'inputs' object.")
  return {n: _tensor(inputs[n], spec) for n, spec in specs.items()}


def _tensor(value, spec):
  if spec.dtype.name == "string":
    array = np.array(value, dtype=object)
    if any(not isinstance(v, str) for v in array.reshape(-1)):
      raise RestError("a string tensor needs JSON strings")
    return array
  for leaf in _leaves(value):  # TF Serving's json_tensor.cc: a number, or an HTTP 400
    if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
      raise RestError(f"JSON Value: {json.dumps(leaf)} Type: {_json_type(leaf)} is not of "
                      f"expected type: {spec.dtype.name}")
  array = np.array(value, dtype=spec.dtype.as_numpy_dtype)  # raises on ragged lists
  if not spec.shape.is_compatible_with(array.shape):
    raise RestError(f"shape {list(array.shape)} does not fit the signature's {spec.shape}")
  return array


def _leaves(value):
  if isinstance(value, list):
    for item in value:
      yield from _leaves(item)
  else:
    yield value


def _json_type(value) -> str:
  """rapidjson's name of a JSON value's type, as TF Serving's errors print it."""
  if value is None:
    return "Null"
  if isinstance(value, bool):
    return "True" if value else "False"
  return {str: "String", dict: "Object"}.get(type(value), "Number")


def _json_value(array):
  if array.dtype == np.float32:
    return json.loads(json.dumps(
        np.vectorize(lambda v: float(str(v)), otypes=[object])(array).tolist()))
  if array.dtype == object:
    return np.vectorize(lambda v: v.decode("utf-8"), otypes=[object])(array).tolist()
  return array.tolist()


def _rows(outputs):
  sizes = {v.shape[0] for v in outputs.values()}
  if len(sizes) != 1:
    raise RestError(f"outputs have inconsistent batch sizes {sorted(sizes)}")
  values = {name: _json_value(array) for name, array in outputs.items()}
  if len(values) == 1:
    return next(iter(values.values()))
  return [{name: values[name][i] for name in sorted(values)} for i in range(sizes.pop())]


def _columns(outputs):
  values = {name: _json_value(array) for name, array in outputs.items()}
  return next(iter(values.values())) if len(values) == 1 else values
