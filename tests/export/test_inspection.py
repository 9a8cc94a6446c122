"""inspect_export / format_report / read_metadata: an export checked the way TF Serving reads it.

The claims: a good export (base directory or one version) reports its signatures with their
inputs and outputs, its metadata, its warmup records; the summary starts with the guarantee
(NON-PRIVATE for a non-private model); every broken piece (missing or corrupted metadata, a
missing signature or file, a bad warmup file, a non-integer version name) is an ExportError that
names the file and the problem.
"""

import json
import os
import shutil

import pytest

from tfdp_prune.export import ExportError
from tfdp_prune.export import export_saved_model
from tfdp_prune.export import format_report
from tfdp_prune.export import inspect_export
from tfdp_prune.export import read_metadata
from tests.export import _export_testing as E

_METADATA = os.path.join("assets.extra", "privacy_metadata.json")
_WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  """Version 1 non-private, version 2 private (the latest)."""
  path = str(tmp_path_factory.mktemp("inspect") / "models")
  export_saved_model(E.tiny_model(seed=0), path)
  export_saved_model(E.tiny_model(seed=1), path, E.private_metadata(), input_name=E.INPUT_NAME)
  return path


@pytest.fixture
def broken(export_dir, tmp_path):
  """A copy of version 2 to break: (base directory, version directory)."""
  base = tmp_path / "models"
  shutil.copytree(os.path.join(export_dir, "2"), base / "2")
  return str(base), str(base / "2")


def test_a_base_directory_reports_every_version(export_dir):
  report = inspect_export(export_dir)
  assert [v.version for v in report.versions] == [1, 2]
  assert report.latest.path == os.path.join(export_dir, "2")
  assert report.latest.metadata == E.private_metadata()
  assert report.versions[0].metadata.private is False
  assert report.latest.warmup_records == 3 and report.latest.model_card
  serving = report.latest.signature("serving_default")
  assert [(i.name, i.dtype, i.shape) for i in serving.inputs] == [(E.INPUT_NAME, "float32",
                                                                   (None, E.INPUTS))]
  assert [(o.name, o.dtype, o.shape) for o in serving.outputs] == [
      ("class_id", "int64", (None,)), ("probabilities", "float32", (None, E.CLASSES))]
  lookup = report.latest.signature("privacy_metadata")
  assert [(i.name, i.dtype) for i in lookup.inputs] == [("field", "string")]
  assert [(o.name, o.dtype) for o in lookup.outputs] == [("value", "string")]
  assert [s.name for s in report.latest.signatures] == ["serving_default", "privacy_metadata"]


def test_a_version_directory_reports_itself(export_dir):
  report = inspect_export(os.path.join(export_dir, "1"))
  assert [v.version for v in report.versions] == [1]
  assert report.latest.signature("serving_default").inputs[0].name == "inputs"


def test_the_report_starts_with_the_guarantee(export_dir):
  text = format_report(inspect_export(export_dir))
  lines = text.splitlines()
  assert lines[0] == E.private_metadata().guarantee
  assert lines[0].startswith("(7.42, 1e-05)-DP.")
  assert "version 2 (latest" in lines[1]
  assert any("signature serving_default(pixels: float32 [None, 8])" in line for line in lines)
  assert "  signature privacy_metadata(field: string [] or [None]) -> value: string" in text
  assert "noise multiplier 1.1" in text and "300 steps" in text
  older = text.split("\n\n")[1].splitlines()
  assert older[0].startswith("NON-PRIVATE")


def test_a_non_private_export_is_reported_non_private(export_dir):
  text = format_report(inspect_export(os.path.join(export_dir, "1")))
  assert text.splitlines()[0] == "NON-PRIVATE (epsilon = inf): trained without differential privacy."


def test_read_metadata_of_a_base_directory_names_the_version_to_pass(export_dir):
  with pytest.raises(ExportError, match=r"pass a version directory, e.g. .*models/2"):
    read_metadata(export_dir)


def test_a_deleted_metadata_file_is_named(broken):
  base, version = broken
  os.remove(os.path.join(version, _METADATA))
  with pytest.raises(ExportError, match=r"privacy metadata file .*privacy_metadata.json"):
    inspect_export(base)


@pytest.mark.parametrize("text, match", [
    ("{not json", "Expecting property name"),
    ('{"schema": "other"}', "Expected a dict with schema"),
    ('{"schema": "tfdp_prune.PrivacyMetadata", "schema_version": 4}', "schema_version=3"),
    ('{"schema": "tfdp_prune.PrivacyMetadata", "schema_version": 1}', "seeded the DP noise"),
    ('{"schema": "tfdp_prune.PrivacyMetadata", "schema_version": 2}', "carry no digest"),
    ('{"schema": "tfdp_prune.PrivacyMetadata", "schema_version": 3}', "Incomplete"),
])
def test_corrupted_metadata_is_named(broken, text, match):
  base, version = broken
  with open(os.path.join(version, _METADATA), "w", encoding="utf-8") as f:
    f.write(text)
  with pytest.raises(ExportError, match=f"privacy_metadata.json is not valid privacy metadata: "
                                        f".*{match}"):
    inspect_export(base)


def test_a_missing_signature_is_named(broken):
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  base, version = broken
  filename = os.path.join(version, "saved_model.pb")
  proto = saved_model_pb2.SavedModel()
  with open(filename, "rb") as f:
    proto.ParseFromString(f.read())
  del proto.meta_graphs[0].signature_def["privacy_metadata"]
  with open(filename, "wb") as f:
    f.write(proto.SerializeToString())
  with pytest.raises(ExportError, match=r"Expected the signature 'privacy_metadata' in "
                                        r".*saved_model.pb"):
    inspect_export(base)


@pytest.mark.parametrize("missing, match", [
    ("saved_model.pb", "saved_model.pb of a SavedModel"),
    (os.path.join("variables", "variables.index"), "variables.index of a SavedModel"),
])
def test_a_missing_savedmodel_file_is_named(broken, missing, match):
  base, version = broken
  os.remove(os.path.join(version, missing))
  with pytest.raises(ExportError, match=match):
    inspect_export(base)


def test_a_corrupted_savedmodel_is_named(broken):
  base, version = broken
  with open(os.path.join(version, "saved_model.pb"), "wb") as f:
    f.write(b"\xff\xff\xff not a protobuf")
  with pytest.raises(ExportError, match="saved_model.pb is not a readable SavedModel"):
    inspect_export(base)


def test_a_corrupted_warmup_file_is_named(broken):
  base, version = broken
  with open(os.path.join(version, _WARMUP), "wb") as f:
    f.write(b"\x01" * 30)
  with pytest.raises(ExportError, match="tf_serving_warmup_requests is not a valid TFRecord"):
    inspect_export(base)


def test_a_warmup_request_for_a_missing_input_is_named(broken):
  from tfdp_prune.export import serving_files  # pylint: disable=g-import-not-at-top
  base, version = broken
  logs = serving_files.warmup_logs("inputs", serving_files.warmup_batches((E.INPUTS,)))
  serving_files.write_warmup_file(os.path.join(version, _WARMUP), logs)
  with pytest.raises(ExportError, match=r"Record 0 .* calls signature 'serving_default' with "
                                        r"inputs \['inputs'\]"):
    inspect_export(base)


def test_a_version_without_warmup_file_is_valid(broken):
  base, version = broken
  os.remove(os.path.join(version, _WARMUP))
  report = inspect_export(base)
  assert report.latest.warmup_records is None
  assert "warmup records: none" in format_report(report)


@pytest.mark.parametrize("layout, match", [
    ("missing", "which is missing"),
    ("empty", "to hold integer-named version directories"),
    ("named", "only version directories whose names are integers"),
])
def test_not_an_export_is_named(broken, layout, match):
  base, version = broken
  path = {"missing": os.path.join(base, "nothing"), "empty": os.path.join(base, "empty"),
          "named": os.path.join(base, "latest")}[layout]
  if layout == "empty":
    os.mkdir(path)
  if layout == "named":
    os.rename(version, path)
  with pytest.raises(ExportError, match=match):
    inspect_export(path)


# ---- forged metadata: every copy is cross-checked -------------------------------------------

def _edit_file(version, **changes):
  """Edits fields of assets.extra/privacy_metadata.json; `recompute_digest=True` recomputes the digest
  (what a careful forger does: the digest takes no key)."""
  from tfdp_prune import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  recompute = changes.pop("recompute_digest", False)
  filename = os.path.join(version, _METADATA)
  with open(filename, encoding="utf-8") as f:
    document = json.load(f)
  document.update(changes)
  if recompute:
    document["digest"] = metadata_lib.document_digest(document)
  with open(filename, "w", encoding="utf-8") as f:
    json.dump(document, f, indent=1, sort_keys=True)


def _edit_graph_constant(version, old: bytes, new: bytes, *, function_prefix: str,
                         whole=False):
  """Replaces `old` by `new` (`whole`: only constants equal to `old`) in the string constants of the functions of saved_model.pb whose
  names start with `function_prefix` (a forger editing the served copy)."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  filename = os.path.join(version, "saved_model.pb")
  proto = saved_model_pb2.SavedModel()
  with open(filename, "rb") as f:
    proto.ParseFromString(f.read())
  edited = 0
  for function in proto.meta_graphs[0].graph_def.library.function:
    if not function.signature.name.startswith(function_prefix):
      continue
    for node in function.node_def:
      if node.op != "Const":
        continue
      values = node.attr["value"].tensor.string_val
      for i, value in enumerate(values):
        if (value == old) if whole else (old in value):
          values[i] = value.replace(old, new)
          edited += 1
  assert edited, f"{old!r} is in no constant of {function_prefix}*"
  with open(filename, "wb") as f:
    f.write(proto.SerializeToString())


def test_an_edited_epsilon_in_the_file_fails_the_digest(broken):
  base, version = broken
  _edit_file(version, epsilon=0.5)
  with pytest.raises(ExportError, match=r"privacy_metadata.json is not valid privacy metadata: "
                                        r"The privacy metadata does not match its digest"):
    inspect_export(base)


def test_an_edited_epsilon_with_a_recomputed_digest_fails_the_cross_check(broken):
  base, version = broken
  _edit_file(version, epsilon=0.5, recompute_digest=True)
  with pytest.raises(ExportError) as raised:
    inspect_export(base)
  message = str(raised.value)
  assert "differs between its copies" in message
  assert ("epsilon: assets.extra/privacy_metadata.json says 0.5, the 'privacy_metadata' "
          "signature's fields, in saved_model.pb (the graph) says 7.42") in message
  assert "Do not serve this version" in message


def test_an_edited_served_field_fails_the_cross_check(broken):
  base, version = broken
  # Only the signature's per-field constant "7.42" (the "all" text holds '"epsilon": 7.42').
  _edit_graph_constant(version, b"7.42", b"0.5", function_prefix="__inference_privacy_metadata_",
                       whole=True)
  with pytest.raises(ExportError, match=r"differs between its copies.*epsilon: "
                                        r"assets.extra/privacy_metadata.json says 7.42, the "
                                        r"'privacy_metadata' signature"):
    inspect_export(base)


def test_an_edited_privacy_metadata_json_function_fails_the_cross_check(broken):
  base, version = broken
  _edit_graph_constant(version, b'"epsilon": 7.42', b'"epsilon": 0.5',
                       function_prefix="__inference_privacy_metadata_json")
  with pytest.raises(ExportError, match=r"epsilon: assets.extra/privacy_metadata.json says "
                                        r"7.42, privacy_metadata_json\(\), in saved_model.pb"):
    inspect_export(base)


def test_the_graph_holds_three_copies_equal_to_the_file(export_dir):
  from tfdp_prune.export import inspection  # pylint: disable=g-import-not-at-top
  copies = inspection.read_served_metadata(os.path.join(export_dir, "2"))
  assert len(copies) == 3
  assert all(document == E.private_metadata().to_dict() for document in copies.values())


def test_the_report_states_what_the_digest_proves(export_dir):
  text = format_report(inspect_export(export_dir))
  assert f"metadata {E.private_metadata().digest}: the file's digest matches" in text
  assert "consistency, not authenticity" in text and "recompute the digest" in text


def test_an_older_version_directory_is_not_called_latest(export_dir):
  older = format_report(inspect_export(os.path.join(export_dir, "1")))
  assert "(latest:" not in older
  assert ("version 1 (NOT the latest: its base directory also holds version 2; TF Serving "
          "serves version 2 by default)") in older
  newest = format_report(inspect_export(os.path.join(export_dir, "2")))
  assert "version 2 (latest: what TF Serving serves by default)" in newest


def test_an_extra_string_constant_in_the_served_lookup_fails_the_check(broken):
  """A forger who keeps the constants the cross-check compares but wires in another answer."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  base, version = broken
  filename = os.path.join(version, "saved_model.pb")
  proto = saved_model_pb2.SavedModel()
  with open(filename, "rb") as f:
    proto.ParseFromString(f.read())
  (function,) = [f for f in proto.meta_graphs[0].graph_def.library.function
                 if f.signature.name.startswith("__inference_privacy_metadata_")
                 and not f.signature.name.startswith("__inference_privacy_metadata_json")]
  (empty,) = [n for n in function.node_def if n.op == "Const"
              and n.attr["value"].tensor.string_val == [b""]]
  forged = function.node_def.add()
  forged.CopyFrom(empty)
  forged.name = "forged_answer"
  forged.attr["value"].tensor.string_val[0] = b"0.5"
  (select,) = [n for n in function.node_def if n.op == "SelectV2"]
  select.input[2] = "forged_answer:output:0"  # what an unknown name is now answered
  with open(filename, "wb") as f:
    f.write(proto.SerializeToString())
  with pytest.raises(ExportError, match=r"3 string constants that do not fit; the graph was "
                                        r"changed after the export"):
    inspect_export(base)


def test_a_tuning_record_is_reported_and_cross_checked(tmp_path):
  tuning = {"mode": "public", "private_data_read": False, "chosen": {"learning_rate": 0.3}}
  path = export_saved_model(E.tiny_model(seed=1), str(tmp_path / "models"),
                            E.private_metadata(tuning=tuning), input_name=E.INPUT_NAME)
  report = inspect_export(path)
  assert report.latest.metadata.tuning == tuning
  assert ("tuning: public (private data read: False), chose {'learning_rate': 0.3}"
          in format_report(report))
  _edit_file(path, tuning=dict(tuning, chosen={"learning_rate": 0.03}), recompute_digest=True)
  with pytest.raises(ExportError, match="tuning: assets.extra/privacy_metadata.json says"):
    inspect_export(path)
