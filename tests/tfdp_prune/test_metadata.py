"""The privacy metadata schema: a round trip that loses nothing, strict JSON, and no record that
could label a non-private model private (or the reverse)."""

import dataclasses
import hashlib
import json
import math

import pytest

from tfdp_prune import metadata as metadata_lib
from tfdp_prune.metadata import PrivacyMetadata
from tests.export import _export_testing as E


def _strict_loads(text):
  """json.loads that refuses Infinity, -Infinity and NaN (RFC 8259 has none of them)."""
  def refuse(token):
    raise ValueError(f"non-standard JSON constant {token}")
  return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("record", [
    E.private_metadata(),
    E.private_metadata().with_empirical({"audit_epsilon_lower_bound": 0.8}),
    metadata_lib.non_private(dataset="digits", num_private_examples=1597, steps=10, epochs=2.5,
                             seed=3),
    E.private_metadata(mechanism_randomness="insecure_seed",
                       statement="INSECURE: seeded. " + E.private_metadata().statement),
    E.private_metadata(tuning={"mode": "public", "chosen": {"learning_rate": 0.3}}),
], ids=["private", "empirical", "non-private", "insecure", "tuned"])
def test_to_json_from_json_round_trips_exactly(record):
  assert PrivacyMetadata.from_json(record.to_json()) == record
  assert PrivacyMetadata.from_dict(record.to_dict()) == record
  assert PrivacyMetadata.from_json(record.to_json()).to_json() == record.to_json()


def test_the_json_is_strict_and_writes_infinity_as_a_string():
  text = metadata_lib.non_private().to_json()
  document = _strict_loads(text)
  assert document["epsilon"] == "inf" and document["private"] is False
  assert document["schema"] == metadata_lib.SCHEMA
  assert document["schema_version"] == metadata_lib.SCHEMA_VERSION
  assert _strict_loads(E.private_metadata().to_json())["epsilon"] == 7.42
  with pytest.raises(ValueError, match="non-standard"):
    _strict_loads('{"epsilon": Infinity}')  # the check itself can fail


def test_a_private_record_with_infinite_epsilon_is_refused():
  with pytest.raises(ValueError, match="private model needs a finite epsilon"):
    E.private_metadata(epsilon=math.inf)


def test_a_non_private_record_with_finite_epsilon_is_refused():
  with pytest.raises(ValueError, match="non-private model has epsilon=inf"):
    dataclasses.replace(metadata_lib.non_private(), epsilon=3.0)


def test_a_private_record_without_noise_is_refused():
  with pytest.raises(ValueError, match="noise_multiplier > 0"):
    E.private_metadata(noise_multiplier=0.0)


@pytest.mark.parametrize("change, match", [
    ({"surprise": 1}, r"Unknown privacy metadata fields: \['surprise'\]"),
    ({"schema": "someone.else"}, "Expected a dict with schema"),
    ({"schema_version": 4}, "Expected schema_version=3"),
    ({"schema_version": 1}, "seeded the DP noise and sampling"),
    ({"schema_version": 2}, "carry no digest.*re-export the model from its checkpoint"),
])
def test_unknown_fields_and_other_schemas_are_refused(change, match):
  document = E.private_metadata().to_dict()
  document.update(change)
  with pytest.raises(ValueError, match=match):
    PrivacyMetadata.from_dict(document)


def test_an_untuned_record_has_no_tuning_key_so_older_documents_read_back_the_same():
  document = E.private_metadata().to_dict()
  assert "tuning" not in document  # the documents (and digests) of earlier releases
  assert PrivacyMetadata.from_dict(document).to_dict() == document
  tuned = E.private_metadata(tuning={"mode": "public"}).to_dict()
  assert tuned["tuning"] == {"mode": "public"} and tuned["digest"] != document["digest"]
  with pytest.raises(ValueError, match="Expected tuning to be a record"):
    E.private_metadata(tuning="public")


def test_a_missing_field_is_refused():
  document = E.private_metadata().to_dict()
  del document["delta"]
  with pytest.raises(ValueError, match="Incomplete privacy metadata"):
    PrivacyMetadata.from_dict(document)


def test_the_guarantee_line():
  assert E.private_metadata().guarantee.startswith("(7.42, 1e-05)-DP. ")
  assert metadata_lib.non_private().guarantee.startswith("NON-PRIVATE")
  insecure = E.private_metadata(mechanism_randomness="insecure_seed",
                                statement="INSECURE: seeded. " + E.private_metadata().statement)
  assert insecure.insecure and not E.private_metadata().insecure
  assert insecure.guarantee.startswith("INSECURE: (7.42, 1e-05)-DP only against an adversary "
                                       "who cannot reproduce the seeded noise and sampling.")


def test_where_the_randomness_came_from_is_required_and_an_insecure_run_is_labelled():
  with pytest.raises(ValueError, match="a private model needs one"):
    E.private_metadata(mechanism_randomness=None)
  with pytest.raises(ValueError, match="mechanism_randomness in"):
    E.private_metadata(mechanism_randomness="seed")
  with pytest.raises(ValueError, match="must say so.*INSECURE"):
    E.private_metadata(mechanism_randomness="insecure_seed")  # the statement does not say it
  assert metadata_lib.non_private().mechanism_randomness is None
  document = E.private_metadata().to_dict()
  assert document["mechanism_randomness"] == "os_entropy"
  del document["mechanism_randomness"]
  with pytest.raises(ValueError, match="Incomplete privacy metadata"):
    PrivacyMetadata.from_dict(document)


def test_the_json_carries_the_digest_of_the_rest_of_the_document():
  document = _strict_loads(E.private_metadata().to_json())
  rest = {k: v for k, v in document.items() if k != "digest"}
  canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
  assert document["digest"] == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
  assert E.private_metadata().digest == document["digest"]
  assert E.private_metadata(epsilon=1.0).digest != document["digest"]


@pytest.mark.parametrize("change", [{"epsilon": 0.5}, {"private": False, "epsilon": "inf"},
                                    {"delta": 1e-9}, {"digest": None}])
def test_an_edited_field_that_does_not_recompute_the_digest_is_refused(change):
  document = E.private_metadata().to_dict()
  document.update(change)
  with pytest.raises(ValueError, match="does not match its digest.*edited"):
    PrivacyMetadata.from_dict(document)


def test_a_removed_digest_is_refused():
  document = E.private_metadata().to_dict()
  del document["digest"]
  with pytest.raises(ValueError, match="does not match its digest"):
    PrivacyMetadata.from_dict(document)


def test_the_digest_proves_consistency_only_whoever_recomputes_it_passes():
  """The limit, stated as a test: the digest takes no key, so an editor who recomputes it is
  accepted by from_dict. The protection against editing one copy is inspect's cross-check."""
  document = E.private_metadata().to_dict()
  document["epsilon"] = 0.5
  document["digest"] = metadata_lib.document_digest(document)
  assert PrivacyMetadata.from_dict(document).epsilon == 0.5
