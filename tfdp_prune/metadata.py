"""The privacy metadata schema: one record of a run's guarantee, written by training and export.

`PrivacyMetadata` (`to_json`, `from_dict`, checked by `document_digest`) never holds a seed or
secret of the mechanism, and refuses to label a non-private run private. It imports only the
version and `randomness`, so the export stage can depend on it alone.

Design: docs/privacy-metadata.md
"""

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import numbers
from typing import Any, Dict, Optional

from tfdp_prune import _validate
from tfdp_prune import mask_modes
from tfdp_prune import randomness
from tfdp_prune import tuning_accounting
from tfdp_prune import version
from tfdp_prune import versioned_json

SCHEMA = "tfdp_prune.PrivacyMetadata"
# 2: `mechanism_randomness` added; `seed` no longer seeds the noise or the sampling.
# 3: `digest` added (sha256 of the rest of the document), checked on every read.
#    Later, still 3: `public_guard`, optional and left out of the document when None, so every
#    earlier version-3 record reads back to the same document and digest.
SCHEMA_VERSION = 3
DIGEST_KEY = "digest"
_DIGEST_PREFIX = "sha256:"
INSECURE_PREFIX = "INSECURE"
# Where the mechanism's randomness came from (the values of `mechanism_randomness`).
OS_ENTROPY = randomness.OS_ENTROPY
INSECURE_SEED = randomness.INSECURE_SEED
FILENAME = "privacy_metadata.json"
_ENVELOPE = versioned_json.Envelope(version=SCHEMA_VERSION, version_key="schema_version",
                                     name=SCHEMA, name_key="schema")
# The distributions whose versions decide what the guarantee and the model mean.
_VERSIONED_PACKAGES = ("tensorflow", "tf-keras", "dp-accounting", "tensorflow-privacy",
                       "tensorflow-model-optimization")
_INFINITY = "inf"


class LabelError(ValueError):
  """The objects given cannot be labelled truthfully (what was expected, what was received, the
  fix); raised before anything is written."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyMetadata:
  """The privacy record of one trained model (see the module docstring).

  Attributes:
    private: True when the model was trained with DP noise (finite epsilon); False otherwise.
    epsilon, delta: the proven (epsilon, delta)-DP guarantee; epsilon is inf when not private.
    accountant: "pld" or "rdp" (dp_accounting), None when not private.
    statement: one sentence saying what the guarantee covers (sampling, adjacency, accountant).
    privacy_spec: `PrivacySpec.to_dict()` of the run (incl. the serialized dp_accounting event).
    noise_multiplier, l2_norm_clip: sigma and the clip norm C.
    sampling: the sampling scheme's name ("poisson", "shuffle" or a registered one, see
      `sampling_schemes`) or None; sampling_probability: q (Poisson only).
    batch_size: the (expected) logical batch size; steps: logical steps; epochs: steps * batch /
      number of private examples.
    dataset, public_dataset, public_split, private_split: where the data came from.
    num_private_examples, num_public_examples, num_test_examples: the sizes of the parts.
    public_fingerprint: `PublicDataFingerprint.to_dict()` of the public part, or None.
    mask_mode: "none", "freeze" or "select"; mask_rule: the rule's config, or None;
    mask_sparsity: the fraction of maskable coordinates frozen (0 without masks);
    mask_sparsity_per_variable: the same, per variable name.
    mechanism_randomness: where the DP noise and sampling drew their randomness: "os_entropy"
      (the default: os.urandom, recorded in no published file) or "insecure_seed" (derived from
      a seed: reproducible by whoever knows it; the statement then starts with "INSECURE");
      None for a model that did not come out of DP training.
    seed: the run's seed of what is NOT the mechanism: initialization, the data split, random
      masks, augmentation. Publishing it costs no privacy: the guarantee holds for every fixed
      value of these (they do not depend on the private data), and the noise and the sampling
      do not depend on it.
    library_versions: distribution -> version; created: ISO 8601 UTC time.
    empirical: measured (not proven) results such as an audit, or None.
    tuning: how the hyperparameters were chosen, or None (left out of the JSON). Its "mode" says
      which tuner: "public" (`tuning.TuningResult.record()`: the grid, each candidate's
      public-validation accuracy, what was chosen; no private data read, no privacy spent) or
      "private" (a private search: `tuning_accounting.record` and what the search drew, the
      candidates and the selected one; never the number of trials run, which the guarantee keeps
      secret; epsilon and delta are the WHOLE search's, and `tfdp-export --inspect` recomputes
      them from it).
    public_guard: `public_guard.record(...)` of a `tfdp-train` run that compared the DP model
      with the public-only model on held-out public data: which one is exported ("dp" or
      "public_only") and on what evidence (both validation accuracies, the number of public
      validation examples). The choice is post-processing of the DP run, so either export
      carries the run's epsilon and delta. None: no comparison (left out of the JSON).
  """

  private: bool
  epsilon: float
  delta: Optional[float]
  accountant: Optional[str]
  statement: str
  privacy_spec: Optional[Dict[str, Any]]
  noise_multiplier: float
  l2_norm_clip: Optional[float]
  sampling: Optional[str]
  sampling_probability: Optional[float]
  batch_size: Optional[float]
  steps: int
  epochs: float
  dataset: Optional[str]
  public_dataset: Optional[str]
  public_split: Optional[str]
  private_split: Optional[str]
  num_private_examples: int
  num_public_examples: int
  num_test_examples: int
  public_fingerprint: Optional[Dict[str, Any]]
  mask_mode: str
  mask_rule: Optional[Dict[str, Any]]
  mask_sparsity: float
  mask_sparsity_per_variable: Dict[str, float]
  mechanism_randomness: Optional[str]
  seed: Optional[int]
  library_versions: Dict[str, str]
  created: str
  empirical: Optional[Dict[str, Any]] = None
  tuning: Optional[Dict[str, Any]] = None
  public_guard: Optional[Dict[str, Any]] = None

  def __post_init__(self):
    _validate.boolean("private", self.private)
    if not isinstance(self.epsilon, numbers.Real) or math.isnan(self.epsilon) or self.epsilon < 0:
      raise ValueError(f"Expected epsilon >= 0 or inf. Received: epsilon={self.epsilon!r}.")
    if self.private:
      if not math.isfinite(self.epsilon):
        raise ValueError("A private model needs a finite epsilon. Received: epsilon=inf with "
                         "private=True; a model without a finite guarantee has private=False.")
      if not (isinstance(self.noise_multiplier, numbers.Real) and self.noise_multiplier > 0):
        raise ValueError(f"A private model needs noise_multiplier > 0. Received: "
                         f"noise_multiplier={self.noise_multiplier!r}.")
      if self.privacy_spec is None or self.delta is None or self.accountant is None:
        raise ValueError("A private model needs privacy_spec, delta and accountant (the "
                         "guarantee is stated by them). Received None.")
    elif math.isfinite(self.epsilon):
      raise ValueError(f"A non-private model has epsilon=inf. Received: "
                       f"epsilon={self.epsilon!r} with private=False.")
    if self.mechanism_randomness is not None or self.private:
      if self.mechanism_randomness not in randomness.SOURCES:
        raise ValueError(f"Expected mechanism_randomness in {list(randomness.SOURCES)}"
                         f"{' (a private model needs one)' if self.private else ' or None'}. "
                         f"Received: mechanism_randomness={self.mechanism_randomness!r}.")
    if (self.private and self.mechanism_randomness == randomness.INSECURE_SEED
        and not self.statement.startswith(INSECURE_PREFIX)):
      raise ValueError(
          f"A private model trained with seeded noise and sampling (mechanism_randomness="
          f"{randomness.INSECURE_SEED!r}) must say so: expected a statement starting with "
          f"{INSECURE_PREFIX!r}. Received: statement={self.statement!r}.")
    if self.tuning is not None and not isinstance(self.tuning, dict):
      raise ValueError(f"Expected tuning to be a record (a dict) or None. Received: "
                       f"{type(self.tuning).__name__}.")
    if is_private_search(self.tuning) and not (
        self.private
        and self.tuning.get("epsilon") == self.epsilon and self.tuning.get("delta") == self.delta):
      raise ValueError(f"A tuned model's epsilon and delta are its search's total: expected "
                       f"private=True and epsilon, delta equal to tuning's. Received: "
                       f"epsilon={self.epsilon!r}, delta={self.delta!r}, tuning epsilon, delta="
                       f"{(self.tuning or {}).get('epsilon')!r}, "
                       f"{(self.tuning or {}).get('delta')!r}.")
    _validate.one_of("mask_mode", self.mask_mode, mask_modes.ALL)
    if self.public_guard is not None and not isinstance(self.public_guard, dict):
      raise ValueError(f"Expected public_guard to be a dict or None. Received: "
                       f"public_guard={self.public_guard!r}.")
    for name in ("steps", "num_private_examples", "num_public_examples", "num_test_examples"):
      _validate.non_negative_int(name, getattr(self, name))
    object.__setattr__(self, "epsilon", float(self.epsilon))

  @property
  def insecure(self) -> bool:
    """True when the noise and sampling were seeded (reproducible): see `guarantee`."""
    return self.mechanism_randomness == INSECURE_SEED

  @property
  def guarantee(self) -> str:
    """A one-line label: "(epsilon, delta)-DP" or "NON-PRIVATE"."""
    if not self.private:
      return "NON-PRIVATE (epsilon = inf): trained without differential privacy."
    if self.insecure:
      return (f"{INSECURE_PREFIX}: ({self.epsilon:.4g}, {self.delta:.3g})-DP only against an "
              f"adversary who cannot reproduce the seeded noise and sampling. {self.statement}")
    return f"({self.epsilon:.4g}, {self.delta:.3g})-DP. {self.statement}"

  def with_empirical(self, results: Dict[str, Any]) -> "PrivacyMetadata":
    """A copy with measured results (e.g. an audit) under `empirical`, apart from the proof."""
    return dataclasses.replace(self, empirical=dict(results))

  def to_dict(self) -> Dict[str, Any]:
    """A strict-JSON-compatible dict (epsilon inf -> "inf"), with the schema name and version,
    and `digest`: `document_digest` of the rest (consistency, not authenticity: see there)."""
    result = _ENVELOPE.header()
    result.update(dataclasses.asdict(self))
    if result["public_guard"] is None:  # optional: absent from records written before it
      del result["public_guard"]
    result["epsilon"] = _INFINITY if math.isinf(self.epsilon) else self.epsilon
    if result["tuning"] is None:  # absent, not null: untuned records keep their digest
      del result["tuning"]
    result[DIGEST_KEY] = document_digest(result)
    return result

  @property
  def digest(self) -> str:
    """The "sha256:<hex>" this record carries in its JSON form (see `document_digest`)."""
    return self.to_dict()[DIGEST_KEY]

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False)

  @classmethod
  def from_dict(cls, data: Dict[str, Any]) -> "PrivacyMetadata":
    """Inverse of `to_dict`; refuses another schema, version, unknown or missing fields, and a
    `digest` that does not match the rest (consistency only: see `document_digest`)."""
    problem = _ENVELOPE.problem(data)
    if problem is not None:
      hint = ""
      old_version = data.get("schema_version") if isinstance(data, dict) else None
      if old_version == 1:
        hint = (" Version 1 records come from tfdp_prune releases whose published `seed` also "
                "seeded the DP noise and sampling, which makes their guarantee void: re-train.")
      if old_version == 2:
        hint = (" Version 2 records carry no digest, so an edit of one field cannot be told "
                "apart from the record training wrote: re-export the model from its checkpoint "
                "(tfdp-export --checkpoint_dir=... --export_dir=...) with this release.")
      raise versioned_json.VersionError(problem + hint)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields - {*_ENVELOPE.keys, DIGEST_KEY}
    if unknown:
      raise ValueError(f"Unknown privacy metadata fields: {sorted(unknown)}.")
    values = {name: data[name] for name in fields if name in data}
    if values.get("epsilon") == _INFINITY:
      values["epsilon"] = math.inf
    try:
      record = cls(**values)
    except TypeError as error:  # a required field is missing
      raise ValueError(f"Incomplete privacy metadata: {error}.") from None
    received = data.get(DIGEST_KEY)
    expected = document_digest(data)
    if received != expected:
      raise ValueError(
          f"The privacy metadata does not match its digest: expected {DIGEST_KEY}={expected!r} "
          f"(sha256 of the other fields), received {DIGEST_KEY}={received!r}. A field was "
          "edited (or the digest removed) after the record was written; do not trust this "
          "record.")
    return record

  @classmethod
  def from_json(cls, text: str) -> "PrivacyMetadata":
    return cls.from_dict(json.loads(text))


def document_digest(document: Dict[str, Any]) -> str:
  """"sha256:<hex>" of `document` without its `digest` key, as canonical JSON (sorted keys, no
  spaces).

  What it proves: CONSISTENCY only. A record whose digest matches was not edited by someone who
  did not also recompute the digest (a hand edit, a partial copy, a bit flip). It proves nothing
  about who wrote the record: anyone who can edit the file can recompute the digest (the
  function is public and takes no key). Authenticity needs a signature over the export, kept
  or verified outside the files an attacker can edit.
  """
  rest = {key: value for key, value in document.items() if key != DIGEST_KEY}
  try:
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=False)
  except (TypeError, ValueError) as error:
    raise ValueError(f"Expected privacy metadata made of strict JSON values. Received: a value "
                     f"JSON cannot hold ({error}).") from None
  return _DIGEST_PREFIX + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def describe_public_guard(guard: Dict[str, Any]) -> str:
  """What the summary and the model card say about `public_guard`: the comparison and which
  model was exported."""
  if not guard["compared"]:
    return f"No public-only comparison: {guard['note']} Exported the DP model."
  dp, public = guard["dp_validation_accuracy"], guard["public_only_validation_accuracy"]
  verdict = "is worse than" if dp < public else "is at least as good as"
  exported = ("the public-only model" if guard["exported"] == "public_only" else
              "the DP model" + (" (--export_choice=dp)" if dp < public else ""))
  return (f"The DP model ({dp:.3f}) {verdict} the public-only model ({public:.3f}) on "
          f"{guard['num_public_validation_examples']} public validation examples; exported "
          f"{exported}.")


def library_versions() -> Dict[str, str]:
  """The installed versions of tfdp_prune and the packages the guarantee depends on."""
  result = {"tfdp_prune": version.__version__}
  for name in _VERSIONED_PACKAGES:
    try:
      result[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      result[name] = "not installed"
  return result


def utc_now() -> str:
  """The current time as ISO 8601 UTC, to the second (the `created` field)."""
  return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def non_private(*, dataset: Optional[str] = None, num_private_examples: int = 0,
                num_test_examples: int = 0, steps: int = 0, epochs: float = 0.0,
                seed: Optional[int] = None) -> PrivacyMetadata:
  """The record of a model trained without DP (e.g. a plain Keras model being exported)."""
  return PrivacyMetadata(
      private=False, epsilon=math.inf, delta=None, accountant=None,
      statement="Trained without differential privacy: no privacy guarantee.",
      privacy_spec=None, noise_multiplier=0.0, l2_norm_clip=None, sampling=None,
      sampling_probability=None, batch_size=None, steps=steps, epochs=epochs, dataset=dataset,
      public_dataset=None, public_split=None, private_split=None,
      num_private_examples=num_private_examples, num_public_examples=0,
      num_test_examples=num_test_examples, public_fingerprint=None, mask_mode=mask_modes.NONE,
      mask_rule=None, mask_sparsity=0.0, mask_sparsity_per_variable={},
      mechanism_randomness=None, seed=seed,
      library_versions=library_versions(), created=utc_now())


def is_private_search(tuning: Optional[Dict[str, Any]]) -> bool:
  """Whether a `tuning` record is a private search's (its epsilon is the search's total). Any
  record but public tuning's counts as one, so that a record without its "mode" is checked."""
  return tuning is not None and tuning.get("mode") != "public"


def check_tuning(metadata: PrivacyMetadata) -> None:
  """A privately tuned model's record: raises ValueError unless its epsilon and delta are what
  its `tuning` record's fields give (the whole search's, recomputed with dp_accounting). The
  schema checks it because those fields are what the stated guarantee rests on."""
  if not is_private_search(metadata.tuning):
    return
  total = tuning_accounting.verify(metadata.tuning)
  if not all(math.isclose(total[name], getattr(metadata, name), rel_tol=1e-9)
             for name in ("epsilon", "delta")):
    raise ValueError(f"It states epsilon={metadata.epsilon!r}, delta={metadata.delta!r}, but its "
                     f"private search's record gives {total['epsilon']!r}, {total['delta']!r}.")
