"""The files TF Serving reads beside a SavedModel, and the serving contract they describe.

The file and signature names, the warmup requests (`write_warmup_file`, `read_warmup_file`;
synthetic inputs unless examples are passed as public) and the model card
(`render_model_card`).

Design: docs/export.md
"""

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfdp_prune import metadata as metadata_lib
from tfdp_prune.compat import tf

# ---- the layout and the serving contract --------------------------------------------------------

ASSETS_EXTRA = "assets.extra"
METADATA_FILENAME = metadata_lib.FILENAME
WARMUP_FILENAME = "tf_serving_warmup_requests"
MODEL_CARD_FILENAME = "model_card.md"
# TF Serving's saved_model_warmup_util refuses a warmup file with more records than this.
MAX_WARMUP_RECORDS = 1000

SERVING_SIGNATURE = "serving_default"
PROBABILITIES = "probabilities"
CLASS_ID = "class_id"
METADATA_SIGNATURE = "privacy_metadata"
METADATA_INPUT = "field"
METADATA_OUTPUT = "value"
# The `privacy_metadata` signature's field name for the whole JSON document.
ALL_FIELDS = "all"
# Synthetic warmup (the default): zeros, one request per batch size.
WARMUP_BATCH_SIZES = (1, 8)
# What the serving_default warmup requests hold (the model card says which).
WARMUP_SYNTHETIC = "synthetic"
WARMUP_PUBLIC = "public"
WARMUP_KINDS = (WARMUP_SYNTHETIC, WARMUP_PUBLIC)
_RANDOMNESS_TEXT = {
    metadata_lib.OS_ENTROPY: "os_entropy: drawn from the operating system (os.urandom), "
                             "recorded in no published file",
    metadata_lib.INSECURE_SEED: "insecure_seed: derived from a seed, REPRODUCIBLE (insecure)",
    None: "n/a (not trained with DP)",
}
WARMUP_METADATA_FIELDS = (ALL_FIELDS, "epsilon")


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
  """One named input or output of a signature: dtype name ("float32") and shape (None for a
  dimension of unknown size, e.g. the batch)."""
  name: str
  dtype: str
  shape: Optional[Tuple[Optional[int], ...]]

  def describe(self) -> str:
    return f"{self.name}: {self.dtype} {_dims(self.shape)}"


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
  """One signature of the SavedModel (sorted inputs and outputs)."""
  name: str
  inputs: Tuple[TensorSpecInfo, ...]
  outputs: Tuple[TensorSpecInfo, ...]

  def describe(self) -> str:
    return (f"{self.name}({', '.join(i.describe() for i in self.inputs)}) -> "
            f"{', '.join(o.describe() for o in self.outputs)}")


def metadata_fields(metadata: metadata_lib.PrivacyMetadata) -> Dict[str, str]:
  """What the `privacy_metadata` signature answers: field name -> JSON text of the field, and
  "all" -> the whole document (`metadata.to_json()`)."""
  fields = {name: json.dumps(value, sort_keys=True, allow_nan=False)
            for name, value in metadata.to_dict().items()}
  fields[ALL_FIELDS] = metadata.to_json()
  return fields


# ---- warmup requests ----------------------------------------------------------------------------

def warmup_batches(input_shape: Sequence[Optional[int]],
                   public_inputs=None) -> List[np.ndarray]:
  """The float32 batches the `serving_default` warmup requests carry.

  The warmup file is stored in clear beside the model: whatever it holds is published without
  noise. So by default it holds synthetic inputs that depend on no dataset.

  Args:
    input_shape: the model's input shape without the batch dimension.
    public_inputs: None, or examples shaped [n, *input_shape] (n >= 1) that are PUBLIC (e.g. a
      few rows of the public data): never private training data, nor test data that is not
      itself public.

  Returns:
    None -> synthetic: zeros, one batch per size in WARMUP_BATCH_SIZES (the input shape must be
    fully known); else the first example alone and, when n > 1, all n examples.
  """
  input_shape = tuple(input_shape)
  if public_inputs is None:
    return synthetic_warmup_batches(input_shape)
  try:
    inputs = np.asarray(public_inputs, dtype=np.float32)
  except (TypeError, ValueError) as error:
    raise ValueError(f"Expected public_warmup_inputs to be a float array "
                     f"[n, *{list(input_shape)}]. Received: a value that is not convertible to "
                     f"float32 ({error}).") from None
  compatible = (inputs.ndim == len(input_shape) + 1 and inputs.shape[0] >= 1 and all(
      d is None or d == s for d, s in zip(input_shape, inputs.shape[1:])))
  if not compatible:
    raise ValueError(f"Expected public_warmup_inputs shaped [n >= 1, *{list(input_shape)}] (the "
                     f"model's input with a batch dimension). Received: shape "
                     f"{list(inputs.shape)}.")
  if not np.all(np.isfinite(inputs)):
    raise ValueError("Expected finite public_warmup_inputs. Received: NaN or infinite values.")
  return [inputs[:1]] if len(inputs) == 1 else [inputs[:1], inputs]


def synthetic_warmup_batches(input_shape: Sequence[Optional[int]]) -> List[np.ndarray]:
  """The default warmup batches: zeros of the input shape, one per size in WARMUP_BATCH_SIZES.

  They depend on the shape alone, never on a dataset."""
  input_shape = tuple(input_shape)
  if any(d is None for d in input_shape):
    raise ValueError(
        f"Expected a fully known input shape for the synthetic warmup requests (zeros cannot be "
        f"made for dimensions of unknown size). Received: input shape {list(input_shape)}. "
        "Pass public_warmup_inputs=[a few PUBLIC examples shaped [n, ...]].")
  return [np.zeros((n,) + input_shape, np.float32) for n in WARMUP_BATCH_SIZES]


def warmup_kind(public_inputs) -> str:
  """WARMUP_PUBLIC when public inputs are given, else WARMUP_SYNTHETIC."""
  return WARMUP_SYNTHETIC if public_inputs is None else WARMUP_PUBLIC


def predict_log(signature_name: str, inputs: Dict[str, Any]):
  """A `PredictionLog` whose `predict_log.request` calls `signature_name` with `inputs`."""
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  log = prediction_log_pb2.PredictionLog()
  request = log.predict_log.request
  request.model_spec.signature_name = signature_name
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
  return log


def warmup_logs(input_name: str, batches: Sequence[np.ndarray],
                metadata_fields: Sequence[str] = WARMUP_METADATA_FIELDS) -> list:
  """The warmup records: one `serving_default` request per batch, then one `privacy_metadata`
  request (that signature is a separate function in the graph; it warms up on its own)."""
  logs = [predict_log(SERVING_SIGNATURE, {input_name: batch}) for batch in batches]
  logs.append(predict_log(METADATA_SIGNATURE,
                          {METADATA_INPUT: np.array(list(metadata_fields), dtype=object)}))
  if len(logs) > MAX_WARMUP_RECORDS:
    raise ValueError(f"Expected at most {MAX_WARMUP_RECORDS} warmup records (TF Serving refuses "
                     f"more). Received: {len(logs)}.")
  return logs


def write_warmup_file(path: str, logs: Sequence) -> None:
  """Writes `logs` as a TFRecord file at `path` (the caller fsyncs it)."""
  with tf.io.TFRecordWriter(path) as writer:
    for log in logs:
      writer.write(log.SerializeToString())


def read_warmup_file(path: str) -> list:
  """The `PredictionLog` records of a warmup file; a ValueError naming the file and the record
  when it is not a TFRecord file of PredictionLogs, or holds more than TF Serving accepts."""
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  logs = []
  try:
    for record in tf.data.TFRecordDataset(path):
      try:
        logs.append(prediction_log_pb2.PredictionLog.FromString(record.numpy()))
      except message.DecodeError as error:
        raise ValueError(f"Record {len(logs)} of the warmup file {path} is not a serialized "
                         f"tensorflow_serving PredictionLog ({error}).") from None
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
    raise ValueError(f"The warmup file {path} is not a valid TFRecord file "
                     f"({error.message.splitlines()[0]}).") from None
  if len(logs) > MAX_WARMUP_RECORDS:
    raise ValueError(f"The warmup file {path} holds {len(logs)} records; TF Serving refuses "
                     f"more than {MAX_WARMUP_RECORDS}.")
  return logs


# ---- the model card -----------------------------------------------------------------------------

def render_model_card(metadata: metadata_lib.PrivacyMetadata,
                      signature_info: Sequence[SignatureInfo], *,
                      warmup: Optional[str] = None) -> str:
  """The model card (markdown) of an export: the guarantee first, in a banner that cannot be
  missed, with what it does not cover, then how the model was trained, on what, with which
  masks, how to call it, what the warmup requests hold, and with what software. Measured
  (empirical) results, when there are any, get their own section, apart from the proven
  guarantee.

  Args:
    metadata: the export's privacy metadata.
    signature_info: the export's signatures.
    warmup: what the `serving_default` warmup requests hold: WARMUP_SYNTHETIC or WARMUP_PUBLIC;
      None (a card rendered without an export) leaves the section out.
  """
  if warmup is not None and warmup not in WARMUP_KINDS:
    raise ValueError(f"Expected warmup in {list(WARMUP_KINDS)} or None. Received: "
                     f"warmup={warmup!r}.")
  sections = [
      _title(metadata), _banner(metadata), _guarantee(metadata), _training(metadata),
      _data(metadata), _masks(metadata)]
  if metadata.public_guard:
    sections.append(_public_guard(metadata.public_guard))
  sections.append(_signatures(signature_info))
  if warmup is not None:
    sections.append(_warmup(warmup))
  sections.append(_provenance(metadata))
  if metadata.empirical:
    sections.append(_empirical(metadata.empirical))
  return "\n\n".join(sections) + "\n"


def _title(metadata) -> str:
  subject = f" trained on {metadata.dataset}" if metadata.dataset else ""
  return f"# Model card: classifier{_escape(subject)}"


def _banner(metadata) -> str:
  if not metadata.private:
    return ("> **NON-PRIVATE: trained without differential privacy (epsilon = infinity).**\n"
            "> This model carries no privacy guarantee for its training data.")
  banner = (f"> **Differentially private: ({_number(metadata.epsilon)}, "
            f"{_number(metadata.delta)})-DP** ({metadata.accountant} accountant).")
  if metadata.insecure:
    banner = ("> **INSECURE: reproducible noise and sampling.** This model was trained with "
              "DP noise and batch sampling derived from a seed (an `insecure_*` switch, for "
              "tests and debugging). Whoever knows or guesses the seed can reproduce the noise "
              "and remove it, so the guarantee below holds only against an adversary who "
              "cannot. Do not release this model.\n>\n" + banner)
  return banner


def _guarantee(metadata) -> str:
  lines = ["## Privacy guarantee", "", _escape(metadata.statement)]
  if metadata.private:
    lines += ["", _table([("epsilon", _number(metadata.epsilon)),
                          ("delta", _number(metadata.delta)),
                          ("accountant", metadata.accountant)])]
    event = (metadata.privacy_spec or {}).get("dp_event")
    if event is not None:
      title = "The dp_accounting event of the whole run:"
      if metadata_lib.is_private_search(metadata.tuning):  # the search's total (RepeatAndSelect)
        title = (f"One trial's dp_accounting event; epsilon above is the whole private search's "
                 f"({_escape(metadata.tuning['method'])}, a secret random number of trials; "
                 f"one trial: {_number(metadata.tuning['trial_epsilon'])}):")
      lines += ["", title, "",
                "```json", json.dumps(event, indent=1, sort_keys=True), "```"]
    lines += ["", _not_covered()]
  return "\n".join(lines)


def _not_covered() -> str:
  return ("### Not covered by this guarantee\n\n"
          "- The training loss and metrics in the training logs (progress bar, History, "
          "TensorBoard) are computed on private batches WITHOUT noise: they are not covered by "
          "the guarantee, and publishing them spends privacy that epsilon does not count.\n"
          "- An evaluation on the test split (e.g. the test accuracy `tfdp-train` prints) is not "
          "covered either, unless the test split is itself public.")


def _training(metadata) -> str:
  rows = [("noise multiplier", _number(metadata.noise_multiplier)),
          ("L2 clip norm", _number(metadata.l2_norm_clip)),
          ("sampling", metadata.sampling),
          ("sampling rate", _number(metadata.sampling_probability)),
          ("(expected) logical batch size", _number(metadata.batch_size)),
          ("logical steps", metadata.steps),
          ("epochs", _number(metadata.epochs))]
  return "## Training setup\n\n" + _table(rows)


def _data(metadata) -> str:
  fingerprint = metadata.public_fingerprint
  if fingerprint:
    fingerprint_text = (f"sha256 {fingerprint.get('sha256')} over "
                        f"{fingerprint.get('num_examples')} examples "
                        f"(version {fingerprint.get('version')})")
  else:
    fingerprint_text = None
  rows = [("dataset", metadata.dataset), ("private split", metadata.private_split),
          ("private examples", metadata.num_private_examples),
          ("public dataset", metadata.public_dataset), ("public split", metadata.public_split),
          ("public examples", metadata.num_public_examples),
          ("public data fingerprint", fingerprint_text),
          ("test examples", metadata.num_test_examples)]
  return "## Data\n\n" + _table(rows)


def _masks(metadata) -> str:
  rule = json.dumps(metadata.mask_rule, sort_keys=True) if metadata.mask_rule else None
  lines = ["## Masks", "",
           _table([("mode", metadata.mask_mode), ("rule", rule),
                   ("overall sparsity (frozen fraction)", _percent(metadata.mask_sparsity))])]
  if metadata.mask_sparsity_per_variable:
    per_variable = sorted(metadata.mask_sparsity_per_variable.items())
    lines += ["", "| variable | sparsity |", "| --- | --- |"]
    lines += [f"| {_escape(name)} | {_percent(value)} |" for name, value in per_variable]
  lines += ["", "The masks are not part of the export: it holds the plain model's weights "
            "(frozen coordinates at their final values)."]
  return "\n".join(lines)


def _public_guard(guard) -> str:
  lines = ["## Exported model", "", _escape(metadata_lib.describe_public_guard(guard))]
  if guard.get("exported") == "public_only":
    lines += ["", "This export holds the public-only model: the weights right after the "
              "non-private pre-training on public data, before any DP step. The choice read only "
              "public data and the DP model (post-processing of the DP run), so the guarantee "
              "above is the run's; the masks above describe the DP training, not these weights."]
  return "\n".join(lines)


def _signatures(signature_info) -> str:
  lines = ["## Signatures", ""]
  for signature in signature_info:
    lines += [f"### `{signature.name}`", "", "| | name | dtype | shape |", "| --- | --- | --- | --- |"]
    for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
      for spec in specs:
        lines.append(f"| {kind} | `{spec.name}` | {spec.dtype} | {_dims(spec.shape)} |")
    lines.append("")
  lines += [
      f"`{METADATA_SIGNATURE}` maps each requested field name of the privacy metadata to the "
      f"JSON text of that field (`\"{ALL_FIELDS}\"`: the whole document; an unknown name: the "
      "empty string). The REST body "
      f"`{{\"signature_name\": \"{METADATA_SIGNATURE}\", \"instances\": [\"epsilon\"]}}` asks "
      "for epsilon. Without TF Serving: "
      "`tf.saved_model.load(path).privacy_metadata_json()`."]
  return "\n".join(lines)


def _warmup(warmup: str) -> str:
  path = f"`{ASSETS_EXTRA}/{WARMUP_FILENAME}`"
  if warmup == WARMUP_SYNTHETIC:
    held = ("synthetic inputs: zeros of the `serving_default` input's shape, at batch sizes "
            f"{', '.join(str(n) for n in WARMUP_BATCH_SIZES)}. They are derived from no dataset.")
  else:
    held = ("examples that the exporter passed explicitly as PUBLIC "
            "(`public_warmup_inputs`), in clear. The guarantee above assumes them public; it "
            "does not cover them.")
  return (f"## Warmup requests\n\nWarmup inputs: **{warmup}**. {path} (read by TF Serving at "
          f"load, stored in clear) holds {held} It also holds one `{METADATA_SIGNATURE}` "
          "request.")


def _provenance(metadata) -> str:
  rows = sorted(metadata.library_versions.items())
  rows += [("mechanism randomness (DP noise, sampling)",
            _RANDOMNESS_TEXT.get(metadata.mechanism_randomness, metadata.mechanism_randomness)),
           ("seed (initialization, data split, masks; not the DP noise)", metadata.seed),
           ("created (UTC)", metadata.created)]
  return "## Provenance\n\n" + _table(rows, header=("library / setting", "value"))


def _empirical(empirical: Dict[str, Any]) -> str:
  rows = [(name, json.dumps(value, sort_keys=True)) for name, value in sorted(empirical.items())]
  return ("## Empirical (not proven)\n\nMeasured results, e.g. an audit's lower bound on "
          "epsilon. They are NOT a privacy guarantee; the guarantee is the one above.\n\n"
          + _table(rows, header=("measurement", "value")))


def _table(rows, header=("setting", "value")) -> str:
  lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
  lines += [f"| {_escape(str(k))} | {_escape(_text(v))} |" for k, v in rows]
  return "\n".join(lines)


def _dims(shape) -> str:
  """"[None, 8]"; a shape of unknown rank (None: the privacy_metadata field, a scalar or a
  vector) is "[] or [None]"."""
  if shape is None:
    return "[] or [None]"
  return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def _text(value) -> str:
  return "n/a" if value is None else str(value)


def _number(value) -> Optional[str]:
  if value is None:
    return None
  if isinstance(value, float) and math.isinf(value):
    return "infinity"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _percent(value) -> str:
  return f"{100 * value:.2f}%"


def _escape(text: str) -> str:
  """Markdown table cells and headings: a `|` or a newline would break the table."""
  return text.replace("|", "\\|").replace("\n", " ")

