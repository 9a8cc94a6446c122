"""Checks an export directory the way TF Serving reads it, and summarizes what it serves.

`inspect_export(path)` reads only files, never loads the model (cheap enough for a CI step or a
deployment gate): `saved_model.pb` is parsed as a protobuf for its signatures, the privacy
metadata with `PrivacyMetadata.from_json` (strict: another schema, version or field is refused),
and the warmup file as `PredictionLog` records. The metadata file is cross-checked against the
copies baked into the graph (`check_metadata_copies`): the `privacy_metadata` signature's
constants and `privacy_metadata_json()`. That cross-check, not the record's digest, is what
catches an edit of one copy: the digest proves consistency, not authorship (README: "What
`--inspect` checks"). A problem raises `ExportError` naming the file and what is wrong with it.
`format_report` prints the result, each version's guarantee first.
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, Optional, Tuple

from tfdp_prune import metadata as metadata_lib
from tfdp_prune.compat import tf
from tfdp_prune.export import serving_files as files

SAVED_MODEL_FILENAME = "saved_model.pb"
VARIABLES_INDEX = os.path.join("variables", "variables.index")
# The meta graph TF Serving loads (tf.saved_model.SERVING).
SERVING_TAG = "serve"
# TF Serving loads only version directories whose names are integers.
_VERSION_RE = re.compile(r"^[0-9]+$")
# The exported function without inputs that returns the whole metadata document.
_JSON_FUNCTION = "privacy_metadata_json"
_MISSING = object()
# What the digest check does NOT prove (printed by format_report, stated in the README).
DIGEST_CAVEAT = (
    "This proves consistency, not authenticity: anyone who can write these files can edit "
    "every copy and recompute the digest; verify a signature or checksum kept outside the "
    "export to know who wrote it.")


class ExportError(ValueError):
  """An export directory, or a request to write one, that does not fit the TF Serving layout: a
  missing or unreadable file, a missing signature, a version that exists already."""


@dataclasses.dataclass(frozen=True)
class VersionReport:
  """One version directory: its signatures, privacy metadata and serving files.

  `warmup_records` is None when there is no warmup file (TF Serving then loads the version
  without warm-up); `model_card` says whether model_card.md is present."""
  path: str
  version: int
  signatures: Tuple[files.SignatureInfo, ...]
  metadata: metadata_lib.PrivacyMetadata
  warmup_records: Optional[int]
  model_card: bool

  def signature(self, name: str) -> files.SignatureInfo:
    for signature in self.signatures:
      if signature.name == name:
        return signature
    raise KeyError(f"No signature {name!r} in {self.path}; it has "
                   f"{[s.name for s in self.signatures]}.")


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """The inspected path and its versions, ascending (TF Serving serves the latest by default).

  `newer_versions`: when `path` is one version directory, the versions of its parent directory
  newer than it (TF Serving serves the newest of those by default, not this one)."""
  path: str
  versions: Tuple[VersionReport, ...]
  newer_versions: Tuple[int, ...] = ()

  @property
  def latest(self) -> VersionReport:
    """The newest version inspected (not necessarily the newest of the base directory: see
    `newer_versions`)."""
    return self.versions[-1]


def version_dirs(export_dir: str) -> Dict[int, Tuple[str, ...]]:
  """The version directories of `export_dir`: version -> directory names ("7"; "07" would be
  version 7 too, for TF Serving). Files, and `.tmp-*` directories, are no versions."""
  result = {}
  for name in sorted(os.listdir(export_dir)):
    if _VERSION_RE.match(name) and os.path.isdir(os.path.join(export_dir, name)):
      result.setdefault(int(name), []).append(name)
  return {version: tuple(names) for version, names in result.items()}


def read_metadata(path: str) -> metadata_lib.PrivacyMetadata:
  """The `PrivacyMetadata` of the version directory `path` (from
  assets.extra/privacy_metadata.json; its digest is checked, see `check_metadata_copies` for the
  check against the copies in the graph)."""
  filename = os.path.join(path, files.ASSETS_EXTRA, files.METADATA_FILENAME)
  if not os.path.isfile(filename):
    hint = ""
    if os.path.isdir(path) and version_dirs(path):
      latest = max(version_dirs(path))
      hint = (f" {path} looks like an export base directory with versions "
              f"{sorted(version_dirs(path))}: pass a version directory, e.g. "
              f"{os.path.join(path, str(latest))}.")
    raise ExportError(f"Expected the privacy metadata file {filename}. Received: no such file."
                      + hint)
  try:
    with open(filename, encoding="utf-8") as f:
      return metadata_lib.PrivacyMetadata.from_json(f.read())
  except (ValueError, UnicodeDecodeError) as error:
    raise ExportError(f"{filename} is not valid privacy metadata: {error}") from None


def read_signatures(path: str) -> Tuple[files.SignatureInfo, ...]:
  """The signatures of the serving meta graph of the SavedModel in `path`, from saved_model.pb
  alone (no loading): serving_default first, then by name. Internal signatures
  (`__saved_model_init_op`) are left out."""
  graph = _serving_meta_graph(path)
  return tuple(
      files.SignatureInfo(name=name, inputs=_tensor_infos(definition.inputs),
                          outputs=_tensor_infos(definition.outputs))
      for name, definition in sorted(graph.signature_def.items(), key=_serving_first)
      if not name.startswith("__"))


def read_served_metadata(path: str) -> Dict[str, Dict[str, Any]]:
  """The copies of the privacy metadata baked into the graph of `path`/saved_model.pb, read from
  the protobuf (no loading): copy name -> the JSON document it serves.

  The copies: the `privacy_metadata` signature field by field (what TF Serving answers for
  "epsilon", "delta", ...), the same signature's "all" field (the whole document), and the
  `privacy_metadata_json()` function (the whole document, for Python users)."""
  graph = _serving_meta_graph(path)
  filename = os.path.join(path, SAVED_MODEL_FILENAME)
  signature = graph.signature_def.get(files.METADATA_SIGNATURE)
  if signature is None or files.METADATA_OUTPUT not in signature.outputs:
    raise ExportError(f"Expected the signature {files.METADATA_SIGNATURE!r} with output "
                      f"{files.METADATA_OUTPUT!r} in {filename}. Re-export with "
                      "tfdp_prune.export.export_saved_model.")
  node_name = signature.outputs[files.METADATA_OUTPUT].name.split(":")[0]
  calls = [attr.func.name for node in graph.graph_def.node if node.name == node_name
           for attr in node.attr.values() if attr.HasField("func")]
  constants = _string_constants(graph, calls)
  vectors = [c for c in constants if c.ndim == 1 and len(c) > 1]
  names = [c for c in vectors if {files.ALL_FIELDS.encode(), b"schema_version"} <= set(c)]
  texts = [c for c in vectors if names and c is not names[0] and len(c) == len(names[0])]
  # Exactly what the exporter writes: the names, the texts, and "" (the answer to an unknown
  # name). Another string constant could be an answer that the cross-check would not see.
  others = [c for c in constants if not any(c is v for v in names + texts)]
  if (len(names) != 1 or len(texts) != 1 or len(others) != 1 or others[0].ndim != 0
      or others[0].item() != b""):
    raise ExportError(f"Expected the {files.METADATA_SIGNATURE!r} signature in {filename} to be "
                      "a lookup in two constants (the field names and their JSON texts) with "
                      "\"\" for an unknown name, as tfdp_prune exports it. Received: "
                      f"{len(constants)} string constants that do not fit; the graph was "
                      "changed after the export. Re-export with "
                      "tfdp_prune.export.export_saved_model.")
  fields = {n.decode("utf-8"): t.decode("utf-8") for n, t in zip(names[0], texts[0])}
  copies = {}
  where = f"{SAVED_MODEL_FILENAME} (the graph)"
  copies[f"the {files.METADATA_SIGNATURE!r} signature's fields, in {where}"] = {
      name: _json(text, filename) for name, text in fields.items() if name != files.ALL_FIELDS}
  copies[f"the {files.METADATA_SIGNATURE!r} signature's {files.ALL_FIELDS!r} field, in "
         f"{where}"] = _json(fields.get(files.ALL_FIELDS, "null"), filename)
  root = graph.object_graph_def.nodes[0] if graph.object_graph_def.nodes else None
  function_ids = [c.node_id for c in (root.children if root else ())
                  if c.local_name == _JSON_FUNCTION]
  documents = []
  for node_id in function_ids:
    node = graph.object_graph_def.nodes[node_id]
    documents += [c for c in _string_constants(graph, node.function.concrete_functions)
                  if c.ndim == 0]
  if len(documents) != 1:
    raise ExportError(f"Expected the function {_JSON_FUNCTION}() in {filename} to return one "
                      f"constant (the metadata document). Received: {len(documents)} string "
                      "constants. Re-export with tfdp_prune.export.export_saved_model.")
  copies[f"{_JSON_FUNCTION}(), in {where}"] = _json(documents[0].item(), filename)
  return copies


def inspect_export(path: str) -> ExportReport:
  """Checks the export at `path`: a base directory (every integer-named version in it) or one
  version directory. Raises ExportError at the first problem; returns the report otherwise."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ExportError(f"Expected an export directory (a base directory or a version directory). "
                      f"Received: {path}, which is {_what(path)}.")
  if os.path.exists(os.path.join(path, SAVED_MODEL_FILENAME)):
    name = os.path.basename(os.path.normpath(path))
    if not _VERSION_RE.match(name):
      raise ExportError(f"TF Serving loads only version directories whose names are integers. "
                        f"Received: {path}. Rename it (e.g. to .../1) or pass its parent.")
    parent = os.path.dirname(os.path.abspath(path))
    newer = tuple(v for v in sorted(version_dirs(parent)) if v > int(name))
    return ExportReport(path=path, versions=(inspect_version(path, int(name)),),
                        newer_versions=newer)
  versions = version_dirs(path)
  if not versions:
    raise ExportError(f"Expected {path} to hold integer-named version directories (the TF "
                      f"Serving layout <base>/<version>/saved_model.pb). Received: "
                      f"{sorted(os.listdir(path))[:20]}.")
  reports = []
  for version, names in sorted(versions.items()):
    if len(names) > 1:
      raise ExportError(f"{path} holds several directories for version {version}: "
                        f"{list(names)}. TF Serving would read both as version {version}; "
                        "keep one.")
    reports.append(inspect_version(os.path.join(path, names[0]), version))
  return ExportReport(path=path, versions=tuple(reports))


def inspect_version(path: str, version: int) -> VersionReport:
  """Checks one version directory (whatever its name: the writer checks its temporary
  directory with this before renaming it into place)."""
  for required, kind in ((SAVED_MODEL_FILENAME, "file"), (VARIABLES_INDEX, "file")):
    if not os.path.isfile(os.path.join(path, required)):
      raise ExportError(f"Expected the {kind} {os.path.join(path, required)} of a SavedModel. "
                        "Received: it is missing; the export is incomplete. Re-export it.")
  signatures = read_signatures(path)
  _check_signatures(path, signatures)
  metadata = read_metadata(path)
  check_metadata_copies(path, metadata)
  check_tuning(path, metadata)
  warmup_path = os.path.join(path, files.ASSETS_EXTRA, files.WARMUP_FILENAME)
  warmup_records = None
  if os.path.exists(warmup_path):
    try:
      logs = files.read_warmup_file(warmup_path)
    except ValueError as error:
      raise ExportError(str(error)) from None
    _check_warmup(warmup_path, logs, signatures)
    warmup_records = len(logs)
  return VersionReport(
      path=path, version=version, signatures=signatures, metadata=metadata,
      warmup_records=warmup_records,
      model_card=os.path.isfile(os.path.join(path, files.MODEL_CARD_FILENAME)))


def check_metadata_copies(path: str, metadata: metadata_lib.PrivacyMetadata) -> None:
  """Raises ExportError unless every copy of the privacy metadata in the graph of `path`
  (`read_served_metadata`) is the document of assets.extra/privacy_metadata.json (`metadata`).

  This is the check that catches an edit of one copy: the file is what `--inspect`, the model
  card and JSON clients read; the graph's constants are what TF Serving answers."""
  expected = metadata.to_dict()
  filename = os.path.join(files.ASSETS_EXTRA, files.METADATA_FILENAME)
  for copy, document in read_served_metadata(path).items():
    if document == expected:
      continue
    if not isinstance(document, dict):
      document = {}
    differences = [f"{key}: {filename} says {_short(expected.get(key, '(missing)'))}, {copy} "
                   f"says {_short(document.get(key, '(missing)'))}"
                   for key in sorted(set(expected) | set(document))
                   if expected.get(key, _MISSING) != document.get(key, _MISSING)]
    raise ExportError(
        f"The privacy metadata of {path} differs between its copies; one was edited after the "
        f"export. {'; '.join(differences)}. TF Serving answers with the graph's copy. Do not "
        "serve this version: re-export it from its checkpoint (tfdp-export).")


def check_tuning(path: str, metadata: metadata_lib.PrivacyMetadata) -> None:
  """A privately tuned model: raises ExportError unless its epsilon and delta are what its
  `tuning` record's fields give (the whole search's; `metadata.check_tuning`)."""
  try:
    metadata_lib.check_tuning(metadata)
  except ValueError as error:
    raise ExportError(f"The private search's record in {path} does not verify: {error} Do not "
                      "serve this version.") from None


def format_report(report: ExportReport) -> str:
  """A readable summary, newest version first, each starting with its guarantee line."""
  blocks = []
  for version in reversed(report.versions):
    metadata = version.metadata
    latest = ""
    if version is report.latest and report.newer_versions:
      latest = (f" (NOT the latest: its base directory also holds version"
                f"{'s' if len(report.newer_versions) > 1 else ''} "
                f"{', '.join(map(str, report.newer_versions))}; TF Serving serves version "
                f"{report.newer_versions[-1]} by default)")
    elif version is report.latest:
      latest = " (latest: what TF Serving serves by default)"
    lines = [metadata.guarantee, f"  version {version.version}{latest}: {version.path}"]
    lines += [f"  signature {signature.describe()}" for signature in version.signatures]
    if metadata.private:
      lines.append(
          f"  training: noise multiplier {metadata.noise_multiplier:g}, clip "
          f"{_fmt(metadata.l2_norm_clip)}, sampling {metadata.sampling} (rate "
          f"{_fmt(metadata.sampling_probability)}, batch {_fmt(metadata.batch_size)}), "
          f"{metadata.steps} steps, {metadata.epochs:.3g} epochs")
    lines.append(f"  data: {metadata.dataset or 'n/a'}: {metadata.num_private_examples} private, "
                 f"{metadata.num_public_examples} public, {metadata.num_test_examples} test "
                 "examples")
    lines.append(f"  masks: {metadata.mask_mode}, overall sparsity "
                 f"{100 * metadata.mask_sparsity:.2f}%")
    if metadata.tuning:
      if metadata_lib.is_private_search(metadata.tuning):
        lines.append(f"  tuning: {metadata.tuning['method']}, a secret random number of "
                     f"trials; the epsilon above is the whole search's (recomputed and "
                     f"verified; one trial's: {metadata.tuning['trial_epsilon']:.4g})")
      else:
        lines.append(f"  tuning: {metadata.tuning.get('mode')} (private data read: "
                     f"{metadata.tuning.get('private_data_read')}), chose "
                     f"{metadata.tuning.get('chosen')}")
    if metadata.public_guard:
      lines.append(f"  exported model: {metadata_lib.describe_public_guard(metadata.public_guard)}")
    if metadata.empirical:
      lines.append(f"  empirical (not proven): {sorted(metadata.empirical)}")
    warmup = ("none (no warmup file)" if version.warmup_records is None
              else str(version.warmup_records))
    lines.append(f"  warmup records: {warmup}; model card: "
                 f"{files.MODEL_CARD_FILENAME if version.model_card else 'none'}")
    lines.append(f"  created {metadata.created} with tfdp_prune "
                 f"{metadata.library_versions.get('tfdp_prune', 'unknown')}")
    lines.append(f"  metadata {metadata.digest}: the file's digest matches, and the copies "
                 f"in {SAVED_MODEL_FILENAME} (the {files.METADATA_SIGNATURE} signature, "
                 f"{_JSON_FUNCTION}()) equal the file. {DIGEST_CAVEAT}")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


# ---- internals ----------------------------------------------------------------------------------

def _tensor_infos(tensor_info_map) -> Tuple[files.TensorSpecInfo, ...]:
  return tuple(files.TensorSpecInfo(name=name, dtype=tf.dtypes.as_dtype(info.dtype).name,
                                    shape=_shape(info.tensor_shape))
               for name, info in sorted(tensor_info_map.items()))


def _serving_first(item):
  return item[0] != files.SERVING_SIGNATURE, item[0]


def _shape(shape_proto):
  if shape_proto.unknown_rank:
    return None
  return tuple(None if d.size < 0 else int(d.size) for d in shape_proto.dim)


def _check_signatures(path, signatures):
  """The serving contract: `serving_default` takes one input and returns probabilities and
  class ids; `privacy_metadata` maps string field names to string values."""
  by_name = {s.name: s for s in signatures}
  filename = os.path.join(path, SAVED_MODEL_FILENAME)
  for name in (files.SERVING_SIGNATURE, files.METADATA_SIGNATURE):
    if name not in by_name:
      raise ExportError(f"Expected the signature {name!r} in {filename}. Received: signatures "
                        f"{sorted(by_name)}. Re-export with tfdp_prune.export.export_saved_model.")
  serving = by_name[files.SERVING_SIGNATURE]
  outputs = {o.name: o.dtype for o in serving.outputs}
  if (len(serving.inputs) != 1
      or outputs != {files.PROBABILITIES: "float32", files.CLASS_ID: "int64"}):
    raise ExportError(f"Expected {files.SERVING_SIGNATURE!r} in {filename} to take one input and "
                      f"return {files.PROBABILITIES} (float32) and {files.CLASS_ID} (int64). "
                      f"Received: {serving.describe()}.")
  lookup = by_name[files.METADATA_SIGNATURE]
  expected = ((files.METADATA_INPUT, "string"),), ((files.METADATA_OUTPUT, "string"),)
  if ((tuple((i.name, i.dtype) for i in lookup.inputs),
       tuple((o.name, o.dtype) for o in lookup.outputs)) != expected):
    raise ExportError(f"Expected {files.METADATA_SIGNATURE!r} in {filename} to map "
                      f"{files.METADATA_INPUT} (string) to {files.METADATA_OUTPUT} (string). "
                      f"Received: {lookup.describe()}.")


def _check_warmup(filename, logs, signatures):
  """Every record must be a Predict request for an existing signature with its inputs."""
  inputs = {s.name: sorted(i.name for i in s.inputs) for s in signatures}
  for index, log in enumerate(logs):
    if log.WhichOneof("log_type") != "predict_log":
      raise ExportError(f"Record {index} of {filename} is a {log.WhichOneof('log_type')}; "
                        "tfdp_prune exports write predict_log records only.")
    request = log.predict_log.request
    name = request.model_spec.signature_name or files.SERVING_SIGNATURE
    if name not in inputs or sorted(request.inputs) != inputs[name]:
      raise ExportError(f"Record {index} of {filename} calls signature {name!r} with inputs "
                        f"{sorted(request.inputs)}, which the SavedModel does not have "
                        f"(signatures and inputs: {inputs}). TF Serving would fail to load "
                        "this version.")


def _serving_meta_graph(path):
  """The meta graph of `path`/saved_model.pb that TF Serving loads (tag "serve")."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  filename = os.path.join(path, SAVED_MODEL_FILENAME)
  saved_model = saved_model_pb2.SavedModel()
  try:
    with open(filename, "rb") as f:
      saved_model.ParseFromString(f.read())
  except (OSError, message.DecodeError) as error:
    raise ExportError(f"{filename} is not a readable SavedModel protobuf ({error}).") from None
  graphs = [g for g in saved_model.meta_graphs if SERVING_TAG in g.meta_info_def.tags]
  if not graphs:
    raise ExportError(f"{filename} has no meta graph tagged {SERVING_TAG!r}, the one TF Serving "
                      "loads. Re-export with tfdp_prune.export.export_saved_model.")
  return graphs[0]


def _string_constants(graph, function_names) -> list:
  """The string constants (numpy arrays of bytes) of the named functions of `graph` and of every
  function they call, but those read by no op or by Assert ops alone (error messages)."""
  library = {f.signature.name: f for f in graph.graph_def.library.function}
  stack, seen, constants = list(function_names), set(), []
  while stack:
    name = stack.pop()
    if name in seen or name not in library:
      continue
    seen.add(name)
    nodes = library[name].node_def
    consumers = {}
    for node in nodes:
      for source in node.input:
        consumers.setdefault(source.lstrip("^").split(":")[0], set()).add(node.op)
    for node in nodes:
      # Read by no op, or by Assert ops alone (an error message): no answer.
      answers = consumers.get(node.name, set()) - {"Assert"}
      if (node.op == "Const" and node.attr["dtype"].type == tf.string.as_datatype_enum
          and answers):
        constants.append(tf.make_ndarray(node.attr["value"].tensor))
      stack += [attr.func.name for attr in node.attr.values() if attr.HasField("func")]
  return constants


def _json(text, filename):
  try:
    return json.loads(text)
  except (ValueError, UnicodeDecodeError) as error:
    raise ExportError(f"{filename} serves privacy metadata that is not JSON ({error}).") from None


def _short(value) -> str:
  text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
  return text if len(text) <= 80 else text[:77] + "..."


def _fmt(value) -> str:
  return "n/a" if value is None else f"{value:g}"


def _what(path) -> str:
  if not os.path.exists(path):
    return "missing"
  return "a file, not a directory"
