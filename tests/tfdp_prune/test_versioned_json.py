"""Versioned JSON envelopes: each record kind keeps its field names; reads name file and version."""

import json

import pytest

from tfdp_prune import versioned_json
from tfdp_prune.versioned_json import Envelope
from tfdp_prune.versioned_json import VersionError

NAMED = Envelope(version=3, version_key="schema_version", name="x.Record", name_key="schema")
UNNAMED = Envelope(version=1)


def test_the_header_keeps_the_field_names_on_disk():
  assert NAMED.header() == {"schema": "x.Record", "schema_version": 3}
  assert UNNAMED.header() == {"format_version": 1}
  assert NAMED.keys == ("schema", "schema_version") and UNNAMED.keys == ("format_version",)


def test_a_record_written_with_the_header_reads_back():
  record = json.loads(json.dumps({**NAMED.header(), "a": 1}))
  assert NAMED.check(record, "r.json") is record and NAMED.problem(record) is None
  assert UNNAMED.check({"format_version": 1, "step": 2}) == {"format_version": 1, "step": 2}


@pytest.mark.parametrize("envelope, data, message", [
    (UNNAMED, {"format_version": 2}, r"^Expected format_version=1 in run\.json\. Received: "
                                     r"format_version=2\.$"),
    (UNNAMED, {}, "Received: format_version=None"),
    (UNNAMED, [1], "Expected a JSON object in run.json .* Received: a list"),
    (NAMED, {"schema": "other", "schema_version": 3}, r"Expected a dict with "
                                                       r"schema='x\.Record' in run\.json"),
    (NAMED, {"schema": "x.Record", "schema_version": 2}, "Expected schema_version=3 in run.json"),
])
def test_another_kind_or_version_is_refused_naming_the_file_and_the_version(envelope, data,
                                                                             message):
  with pytest.raises(VersionError, match=message):
    envelope.check(data, "run.json")
  assert issubclass(VersionError, ValueError)


def test_a_name_without_its_key_is_refused():
  with pytest.raises(ValueError, match="name_key"):
    versioned_json.Envelope(version=1, name="x.Record")


def test_every_record_keeps_the_header_fields_it_had_on_disk():
  from tfdp_prune import accounting  # pylint: disable=g-import-not-at-top
  from tfdp_prune import checkpoint_format  # pylint: disable=g-import-not-at-top
  from tfdp_prune import metadata  # pylint: disable=g-import-not-at-top
  from tfdp_prune import run_record  # pylint: disable=g-import-not-at-top
  assert metadata._ENVELOPE.header() == {"schema": "tfdp_prune.PrivacyMetadata",
                                         "schema_version": 3}
  assert accounting._ENVELOPE.header() == {"format": "tfdp_prune.PrivacySpec", "version": 1}
  assert checkpoint_format.SIDECAR_ENVELOPE.header() == {"format_version": 1}
  assert run_record._RUN_RECORD_ENVELOPE.header() == {"format_version": 1}


def test_a_run_record_of_another_version_is_refused_naming_the_file(tmp_path):
  from tfdp_prune import run_record  # pylint: disable=g-import-not-at-top
  from tfdp_prune.train_config import ConfigError  # pylint: disable=g-import-not-at-top
  path = tmp_path / run_record.RUN_RECORD
  path.write_text(json.dumps({"format_version": 1, "config": {}}))
  assert run_record.read_run_record(str(tmp_path)) == {"format_version": 1, "config": {}}
  path.write_text(json.dumps({"format_version": 2, "config": {}}))
  with pytest.raises(ConfigError, match=rf"Expected format_version=1 in {path}\. Received: "
                                        r"format_version=2\."):
    run_record.read_run_record(str(tmp_path))
