"""Writes a trained classifier as a TF Serving SavedModel with its privacy guarantee attached.

  path = export_saved_model(model, "/models/digits", budget=budget)   # -> "/models/digits/3"

Each version is written atomically (a temporary directory, then one rename), with the
signatures `serving_default` and `privacy_metadata`.

Design: docs/export.md
"""

import os
import re
import shutil
import sys
from typing import Optional, Tuple

from absl import logging

from tfdp_prune import _validate
from tfdp_prune import atomic_files
from tfdp_prune import compat
from tfdp_prune import metadata as metadata_lib
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.export import inspection
from tfdp_prune.export import serving_files as files
from tfdp_prune.export.inspection import ExportError

OUTPUTS = ("logits", "probabilities")
_TMP_PREFIX = atomic_files.TMP_PREFIX
_REPLACED_RE = re.compile(r"^\.tmp-replaced-([0-9]+)-[0-9a-f]+$")
_INPUT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_MAX_VERSION = 2**63 - 1  # TF Serving's versions are int64
_TFMOT_PACKAGE = "tensorflow_model_optimization"


def export_saved_model(model, export_dir: str,
                       metadata: Optional[metadata_lib.PrivacyMetadata] = None, *,
                       budget=None, version: Optional[int] = None, overwrite: bool = False,
                       output: str = "logits", input_name: str = "inputs",
                       public_warmup_inputs=None, model_card: bool = True,
                       warmup_inputs=None) -> str:
  """Exports `model` with its privacy metadata as `<export_dir>/<version>` (see the module
  docstring for the layout, the signatures and the atomicity).

  Args:
    model: a built tf_keras model (Sequential or functional) with one input [batch, ...] and one
      output [batch, classes]. tfmot pruning wrappers are stripped.
    export_dir: the TF Serving base directory; created if missing (its parent must exist).
    metadata: the run's `PrivacyMetadata` (what `tfdp-train` records); None, without budget,
      labels the model non-private (`metadata.non_private()`: epsilon = inf), as is every model
      that did not come out of DP training.
    budget: the `PrivacyBudget` (built with `sampler=`) that was in the fit callbacks of a
      hand-written DP training: the label is built from it, the model's DP optimizer and the
      record its mask callbacks left (`budget.privacy_metadata(model)`), and refused when they are
      inconsistent. Not together with metadata.
    version: the version number (>= 1); None: 1 + the largest existing version (1 if none).
    overwrite: replace an existing `<version>`; without it an existing version is an error
      raised before anything is written.
    output: what the model outputs: "logits" (probabilities = softmax) or "probabilities".
    input_name: the name of the serving_default input (a letter, then letters, digits, _).
    public_warmup_inputs: None: the warmup requests hold synthetic inputs (zeros of the input
      shape, derived from no dataset); or a few PUBLIC examples [n, *input_shape]. The warmup
      file is stored in clear beside the model, outside the privacy guarantee: never pass
      private training data, nor test data that is not itself public. The model card says
      which kind the export holds.
    model_card: write model_card.md into the version directory.
    warmup_inputs: removed; passing it raises TypeError (it took any rows, and callers passed
      rows of the test or private data). Use public_warmup_inputs, or nothing.

  Returns:
    The version directory's path.

  Raises:
    TypeError: warmup_inputs is given, metadata is not a PrivacyMetadata, or budget is not a
      PrivacyBudget.
    ExportError: both metadata and budget are given; the budget, the model's DP optimizer, its
      masks and the sampler cannot be labelled truthfully (see `PrivacyBudget.privacy_metadata`).
    ValueError, ExportError: another argument is invalid (nothing is written).
  """
  _refuse_old_warmup_argument(warmup_inputs)
  metadata = _label(model, metadata, budget)
  _validate.one_of("output", output, OUTPUTS)
  if not isinstance(input_name, str) or not _INPUT_NAME_RE.match(input_name):
    raise ValueError(f"Expected input_name to be a letter followed by letters, digits or _ (a "
                     f"name REST clients can use as a JSON key). Received: "
                     f"input_name={input_name!r}.")
  for name, value in (("overwrite", overwrite), ("model_card", model_card)):
    _validate.boolean(name, value)
  if version is not None:
    _validate.positive_int("version", version)
    if version > _MAX_VERSION:
      raise ValueError(f"Expected version <= {_MAX_VERSION} (TF Serving versions are int64). "
                       f"Received: version={version}.")
  export_dir = _check_export_dir(export_dir)
  if version is not None and not overwrite:  # before any work, the existing version untouched
    _refuse_existing(export_dir, version)

  model = _plain_model(model)
  input_shape = _input_shape(model)
  batches = files.warmup_batches(input_shape, public_warmup_inputs)
  warmup = files.warmup_kind(public_warmup_inputs)

  if not os.path.isdir(export_dir):
    os.mkdir(export_dir)
    atomic_files.fsync(os.path.dirname(os.path.abspath(export_dir)))
  clean_leftovers(export_dir)
  if version is None:
    version = next_version(export_dir)
  elif not overwrite:
    _refuse_existing(export_dir, version)  # a leftover may have been restored
  final = os.path.join(export_dir, str(version))
  try:
    _write_and_commit(export_dir, final, version, model, metadata, input_shape=input_shape,
                      output=output, input_name=input_name, batches=batches, warmup=warmup,
                      model_card=model_card)
  except (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as error:
    reason = getattr(error, "strerror", None) or getattr(error, "message", None) or error
    left = ("It was committed before the fault (its last fsync failed)." if os.path.exists(final)
            else "Nothing was left under that name.")
    raise ExportError(
        f"Cannot write the export {final} ({reason}). {left} The other versions in {export_dir} "
        "are untouched. Free space on that file system (or make "
        "it writable), then export again (tfdp-export --checkpoint_dir=... exports a "
        "checkpointed run without training).") from error
  logging.info("export_saved_model: wrote %s (%s).", final, metadata.guarantee)
  return final


def _write_and_commit(export_dir, final, version, model, metadata, **write_args) -> None:
  """Writes the version into a temporary directory, then renames it to `final` (atomic)."""
  tmp = atomic_files.temporary_path(export_dir, str(version), suffix_length=32)
  os.mkdir(tmp)
  try:
    _write_version(tmp, model, metadata, version=version, **write_args)
    moved = _move_aside(export_dir, version)
    try:
      os.rename(tmp, final)
    except BaseException:
      _move_back(moved)
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  # Outside the try: a failed fsync must not move the old version back over the new one.
  atomic_files.fsync(export_dir)
  for _, aside in moved:
    shutil.rmtree(aside, ignore_errors=True)


def next_version(export_dir: str) -> int:
  """1 + the largest version in `export_dir`, or 1 when it has none."""
  versions = inspection.version_dirs(export_dir) if os.path.isdir(export_dir) else {}
  return max(versions, default=0) + 1


def clean_leftovers(export_dir: str) -> None:
  """Deletes the `.tmp-*` directories a killed writer left in `export_dir`, except that an old
  version moved aside for a replacement that never landed is renamed back. Only the directory's
  one writer may call this: it would delete a write in progress."""
  if not os.path.isdir(export_dir):
    return
  changed = False
  for name in sorted(os.listdir(export_dir)):
    if not name.startswith(_TMP_PREFIX):
      continue
    path = os.path.join(export_dir, name)
    replaced = _REPLACED_RE.match(name)
    if replaced and int(replaced.group(1)) not in inspection.version_dirs(export_dir):
      logging.warning("export_saved_model: restoring version %s from %s (its replacement was "
                      "interrupted).", replaced.group(1), path)
      os.rename(path, os.path.join(export_dir, replaced.group(1)))
    else:
      logging.info("export_saved_model: deleting the leftover %s.", path)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
    changed = True
  if changed:
    atomic_files.fsync(export_dir)


# ---- checks ---------------------------------------------------------------------------------

def _refuse_old_warmup_argument(warmup_inputs) -> None:
  """`warmup_inputs=` took any rows; callers passed test or private rows, which the warmup file
  then published in clear. It is refused, so that no caller keeps doing so unnoticed."""
  if warmup_inputs is None:
    return
  shape = getattr(warmup_inputs, "shape", None)
  received = (f"an array of shape {list(shape)}" if shape is not None
              else f"a {type(warmup_inputs).__name__}")
  raise TypeError(
      "export_saved_model no longer takes warmup_inputs: the warmup requests are stored in "
      "clear beside the model, so rows of the training or test data there are published "
      "without noise, outside the privacy guarantee. Expected public_warmup_inputs=<examples "
      "that are PUBLIC> or no warmup argument (synthetic inputs: zeros of the input shape). "
      f"Received: warmup_inputs={received}.")


def _label(model, metadata, budget) -> metadata_lib.PrivacyMetadata:
  """The record to export: from the budget, the metadata given, or NON-PRIVATE."""
  if budget is None:
    # A tfdp_prune DP optimizer holds its DPSettings (read here without importing the library).
    if metadata is None and getattr(getattr(model, "optimizer", None), "dp_settings", None):
      logging.warning("export_saved_model: a model compiled with a DP optimizer is labelled "
                      "NON-PRIVATE without budget= or metadata=; pass budget=<the PrivacyBudget "
                      "of its fit> to label it with its guarantee.")
    return _check_metadata(metadata)
  if metadata is not None:
    raise ExportError("Expected budget= (a label built from the training's objects) or "
                      "metadata= (a record built before), not both. Received both: drop "
                      "metadata= to label the model from its budget.")
  label = getattr(budget, "privacy_metadata", None)
  if not callable(label):
    raise TypeError(f"Expected budget to be a tfdp_prune.PrivacyBudget (the callback that "
                    f"counted the run's steps). Received: {type(budget).__name__}.")
  try:
    return _check_metadata(label(model))
  except metadata_lib.LabelError as error:
    raise ExportError(str(error)) from None


def _check_metadata(metadata) -> metadata_lib.PrivacyMetadata:
  if metadata is None:
    return metadata_lib.non_private()
  if not isinstance(metadata, metadata_lib.PrivacyMetadata):
    hint = (" It is a dict: pass PrivacyMetadata.from_dict(it)." if isinstance(metadata, dict)
            else "")
    raise TypeError(f"Expected metadata to be a tfdp_prune.metadata.PrivacyMetadata or None (a "
                    f"non-private model). Received: {type(metadata).__name__}.{hint}")
  return metadata


def _check_export_dir(export_dir) -> str:
  export_dir = os.fspath(export_dir)
  if os.path.exists(export_dir):
    if not os.path.isdir(export_dir):
      raise ExportError(f"Expected export_dir to be a directory (the TF Serving base directory). "
                        f"Received: {export_dir}, which is a file.")
    return export_dir
  parent = os.path.dirname(os.path.abspath(export_dir))
  if not os.path.isdir(parent):
    raise ExportError(f"Expected the parent of export_dir to be an existing directory (only "
                      f"export_dir itself is created). Received: {export_dir}, whose parent "
                      f"{parent} is {'a file' if os.path.exists(parent) else 'missing'}. "
                      "Create it first, or fix the path.")
  return export_dir


def _refuse_existing(export_dir, version):
  names = inspection.version_dirs(export_dir).get(version) if os.path.isdir(export_dir) else None
  if names:
    raise ExportError(f"Version {version} exists already: {os.path.join(export_dir, names[0])}. "
                      "Pass overwrite=True (--overwrite) to replace it, or version=None for the "
                      "next version number.")


def _plain_model(model) -> keras.Model:
  """The model to export: `model`, or `strip_pruning(model)` when it holds tfmot wrappers."""
  compat.ensure_tf_keras_model(model)
  if not model.built:
    raise ExportError("Expected a built model (its weights must exist). Received: an unbuilt "
                      f"{type(model).__name__}. Build it with keras.Input(shape) first.")
  model = _undistributed(model)
  if _TFMOT_PACKAGE not in sys.modules:  # no wrappers without tfmot; never import it here
    return model
  tfmot = compat.tfmot()
  wrapper = tfmot.pruning_wrapper.PruneLowMagnitude
  if not any(isinstance(layer, wrapper) for layer in model.submodules):
    return model
  stripped = tfmot.sparsity.strip_pruning(model)
  left = [layer.name for layer in stripped.submodules if isinstance(layer, wrapper)]
  if left:
    raise ExportError(f"strip_pruning left pruning wrappers in the model: {left} (nested "
                      "models?). Strip them, e.g. strip_pruning on each nested model, then "
                      "export.")
  return stripped


def _undistributed(model) -> keras.Model:
  """A model trained under a tf.distribute strategy holds per-replica (mirrored) variables;
  the export is a copy with plain variables and the same weights (a SavedModel is served
  without the training strategy)."""
  if not _is_distributed(model):
    return model
  copy = keras.models.clone_model(model)
  if _is_distributed(copy):
    raise ExportError("Expected export_saved_model to be called outside strategy.scope() (the "
                      "export is served without a tf.distribute strategy). Received a call "
                      "inside one; call it after the `with strategy.scope():` block.")
  copy.set_weights(model.get_weights())
  return copy


def _is_distributed(model) -> bool:
  return any(isinstance(v, tf.distribute.DistributedValues) for v in model.variables)


def _input_shape(model) -> Tuple[Optional[int], ...]:
  """The input shape (without the batch) of a one-input classifier [batch, classes]."""
  inputs, outputs = model.inputs, model.outputs
  if not inputs or not outputs:
    raise ExportError(f"Expected a model with known inputs and outputs (Sequential or "
                      f"functional, built with keras.Input). Received: a "
                      f"{type(model).__name__} without them. Wrap it: "
                      "keras.Sequential([keras.Input(shape), model]).")
  if len(inputs) != 1:
    raise ExportError(f"Expected a model with one input [batch, ...]. Received: {len(inputs)} "
                      f"inputs {[tuple(i.shape) for i in inputs]}. Export a model with one "
                      "input tensor.")
  if len(outputs) != 1 or outputs[0].shape.rank != 2 or outputs[0].shape[-1] is None:
    raise ExportError(f"Expected a classifier with one output [batch, classes]. Received: "
                      f"outputs {[tuple(o.shape) for o in outputs]}.")
  return tuple(inputs[0].shape[1:])


# ---- writing --------------------------------------------------------------------------------

def _write_version(path, model, metadata, *, input_shape, output, input_name, batches, warmup,
                   model_card, version):
  module, signatures = _export_module(model, metadata, input_shape=input_shape, output=output,
                                      input_name=input_name)
  tf.saved_model.save(module, path, signatures=signatures)
  extra = os.path.join(path, files.ASSETS_EXTRA)
  os.makedirs(extra, exist_ok=True)
  with open(os.path.join(extra, files.METADATA_FILENAME), "w", encoding="utf-8") as f:
    f.write(metadata.to_json())
  files.write_warmup_file(os.path.join(extra, files.WARMUP_FILENAME),
                          files.warmup_logs(input_name, batches))
  report = inspection.inspect_version(path, version)  # what TF Serving will read, before commit
  if model_card:
    with open(os.path.join(path, files.MODEL_CARD_FILENAME), "w", encoding="utf-8") as f:
      f.write(files.render_model_card(metadata, report.signatures, warmup=warmup))
  atomic_files.fsync_tree(path)


def _export_module(model, metadata, *, input_shape, output, input_name):
  """The tf.Module to save, and its signatures. The module tracks the model's variables (so
  exactly they are saved), never the model object (which would bring its optimizer along)."""
  module = tf.Module(name="tfdp_prune_export")
  module.model_variables = list(model.variables)
  spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=input_name)

  @tf.function(input_signature=[spec])
  def serve(inputs):
    inputs = _checked_shape(inputs, input_name, input_shape)
    result = tf.cast(model(inputs, training=False), tf.float32)
    probabilities = tf.nn.softmax(result, axis=-1) if output == "logits" else result
    return {files.PROBABILITIES: probabilities,
            files.CLASS_ID: tf.argmax(result, axis=-1, output_type=tf.int64)}

  fields = files.metadata_fields(metadata)
  names, texts = sorted(fields), [fields[name] for name in sorted(fields)]

  # The field is a scalar (one name: TF Serving's columnar {"inputs": {"field": "epsilon"}}) or a
  # vector of names (row format, or a list); the value has the field's shape. Declared with an
  # unknown rank because a TensorSpec cannot say "rank 0 or 1"; any other rank is refused.
  @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name=files.METADATA_INPUT)])
  def privacy_metadata(field):
    check = tf.debugging.Assert(
        tf.less_equal(tf.raw_ops.Rank(input=field), 1),
        [f"{files.METADATA_SIGNATURE}: expected `{files.METADATA_INPUT}` to be one field name "
         "(a string, e.g. epsilon) or a list of names (e.g. [epsilon, delta]). Received a "
         "string tensor of shape", tf.raw_ops.Shape(input=field)])
    with tf.control_dependencies([check]):
      flat = tf.reshape(field, [-1])
    # A constant lookup: flat [n] against the names [k]; no table resource to initialize.
    matches = tf.equal(tf.expand_dims(flat, 1), tf.expand_dims(tf.constant(names), 0))
    found = tf.reduce_any(matches, axis=1)
    index = tf.argmax(tf.cast(matches, tf.int32), axis=1)
    value = tf.where(found, tf.gather(tf.constant(texts), index), tf.constant(""))
    return {files.METADATA_OUTPUT: tf.reshape(value, tf.raw_ops.Shape(input=field))}

  document = metadata.to_json()

  @tf.function(input_signature=[])
  def privacy_metadata_json():
    return tf.constant(document)

  module.privacy_metadata_json = privacy_metadata_json
  serving = serve.get_concrete_function()
  _check_captures(serving, model)
  return module, {files.SERVING_SIGNATURE: serving,
                  files.METADATA_SIGNATURE: privacy_metadata.get_concrete_function()}


def _checked_shape(inputs, input_name, input_shape):
  """`inputs` after a check that its shape is [batch, *input_shape], with a readable error
  otherwise (TF Serving feeds a request's tensor without checking it against the signature; the
  model's first layer would fail with a graph error such as "Matrix size-incompatible").

  The check compares the text of the whole runtime shape with a pattern: the declared shape
  [None, ...] is not fully known, so no graph optimization can fold the check away, as it could
  a check on the known dimensions alone."""
  expected = ",".join("[0-9]+" if d is None else str(d) for d in (None,) + tuple(input_shape))
  wanted = ", ".join("n" if d is None else str(d) for d in input_shape)
  shape = tf.raw_ops.Shape(input=inputs)
  text = tf.strings.reduce_join(tf.strings.as_string(shape), separator=",")
  check = tf.debugging.Assert(
      tf.strings.regex_full_match(text, expected),
      [f"{files.SERVING_SIGNATURE}: expected `{input_name}` shaped [batch, {wanted}] (float32, "
       f"one row per example: a single example is a batch of 1, [[...]]). Received shape", shape])
  with tf.control_dependencies([check]):
    return tf.identity(inputs)


def _check_captures(concrete_function, model):
  """Every variable the serving function reads is one of the model's: nothing else (an
  optimizer's or a wrapper's variable) can reach the SavedModel through the graph."""
  own = {v.ref() for v in model.variables}
  foreign = [v.name for v in concrete_function.variables if v.ref() not in own]
  if foreign:
    raise ExportError(f"The model's forward pass reads variables that are not the model's own: "
                      f"{foreign}. Export a model whose call uses only its weights.")


def _move_aside(export_dir, version) -> list:
  """Renames the existing directories of `version` to `.tmp-replaced-*` names; returns the
  (original, aside) paths."""
  moved = []
  for name in inspection.version_dirs(export_dir).get(version, ()):
    aside = atomic_files.temporary_path(export_dir, f"replaced-{version}", suffix_length=12)
    os.rename(os.path.join(export_dir, name), aside)
    moved.append((os.path.join(export_dir, name), aside))
  return moved


def _move_back(moved):
  for original, aside in moved:
    os.rename(aside, original)
