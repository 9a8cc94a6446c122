"""serving_files: the warmup requests and the model card (pure functions, no export needed).

The claims: the default warmup is synthetic, zeros of the input shape at batch sizes 1 and 8
(no dataset involved), inputs given as public are carried as they are, bad ones are refused; the
warmup file holds PredictionLog records that read back equal, a corrupted file is refused naming
it; the model card states the guarantee first (private or, loudly, NON-PRIVATE) with what it does
not cover (training metrics, the test split), then the setup, data, masks, signatures, which
kind of warmup inputs the export holds, and provenance, and shows empirical results only when
there are any, apart from the guarantee.
"""

import numpy as np
import pytest

from tfdp_prune import metadata as metadata_lib
from tfdp_prune.compat import tf
from tfdp_prune.export import SignatureInfo
from tfdp_prune.export import TensorSpecInfo
from tfdp_prune.export import render_model_card
from tfdp_prune.export import serving_files
from tests.export import _export_testing as E

SIGNATURES = (
    SignatureInfo("serving_default",
                  inputs=(TensorSpecInfo("pixels", "float32", (None, 8)),),
                  outputs=(TensorSpecInfo("class_id", "int64", (None,)),
                           TensorSpecInfo("probabilities", "float32", (None, 4)))),
    SignatureInfo("privacy_metadata", inputs=(TensorSpecInfo("field", "string", (None,)),),
                  outputs=(TensorSpecInfo("value", "string", (None,)),)),
)


# ---- warmup ---------------------------------------------------------------------------------

def test_the_default_warmup_is_synthetic_zeros_at_batch_sizes_1_and_8():
  batches = serving_files.warmup_batches((8,))
  assert [b.shape for b in batches] == [(1, 8), (8, 8)]
  assert all(b.dtype == np.float32 and not b.any() for b in batches)
  assert serving_files.warmup_kind(None) == serving_files.WARMUP_SYNTHETIC
  for made, synthetic in zip(batches, serving_files.synthetic_warmup_batches((8,))):
    np.testing.assert_array_equal(made, synthetic)


def test_public_warmup_inputs_are_sent_first_alone_then_together():
  x = E.examples(n=3)
  first, whole = serving_files.warmup_batches((None,), x)
  np.testing.assert_array_equal(first, x[:1])
  np.testing.assert_array_equal(whole, x)
  (single,) = serving_files.warmup_batches((8,), public_inputs=x[:1])
  np.testing.assert_array_equal(single, x[:1])
  assert serving_files.warmup_kind(x) == serving_files.WARMUP_PUBLIC


@pytest.mark.parametrize("shape, inputs, match", [
    ((8,), np.zeros((2, 7)), r"public_warmup_inputs shaped \[n >= 1, \*\[8\]\]"),
    ((8,), np.zeros((0, 8)), r"Received: shape \[0, 8\]"),
    ((8,), np.full((1, 8), np.nan), "finite"),
    ((8,), [["a"] * 8], "convertible to float32"),
    ((None, 3), None, "unknown size.*public_warmup_inputs"),
])
def test_bad_warmup_inputs_are_refused(shape, inputs, match):
  with pytest.raises(ValueError, match=match):
    serving_files.warmup_batches(shape, inputs)


def test_the_warmup_file_round_trips_prediction_logs(tmp_path):
  x = E.examples(n=2)
  logs = serving_files.warmup_logs("pixels", [x[:1], x])
  path = str(tmp_path / "warmup")
  serving_files.write_warmup_file(path, logs)
  read = serving_files.read_warmup_file(path)
  assert read == logs
  requests = [log.predict_log.request for log in read]
  assert [r.model_spec.signature_name for r in requests] == [
      "serving_default", "serving_default", "privacy_metadata"]
  np.testing.assert_array_equal(tf.make_ndarray(requests[1].inputs["pixels"]), x)
  assert tf.make_ndarray(requests[2].inputs["field"]).tolist() == [b"all", b"epsilon"]


def test_a_corrupted_warmup_file_is_refused_naming_it(tmp_path):
  path = tmp_path / "warmup"
  path.write_bytes(b"\x00" * 40)
  with pytest.raises(ValueError, match=f"warmup file {path}"):
    serving_files.read_warmup_file(str(path))
  with tf.io.TFRecordWriter(str(path)) as writer:
    writer.write(b"\xff\xff not a PredictionLog")
  with pytest.raises(ValueError, match="Record 0 .* PredictionLog"):
    serving_files.read_warmup_file(str(path))


def test_more_warmup_records_than_tf_serving_reads_are_refused(tmp_path):
  batches = [np.zeros((1, 2), np.float32)] * serving_files.MAX_WARMUP_RECORDS
  with pytest.raises(ValueError, match="at most 1000"):
    serving_files.warmup_logs("x", batches)
  path = str(tmp_path / "warmup")
  serving_files.write_warmup_file(path, serving_files.warmup_logs("x", batches[:-1]) * 2)
  with pytest.raises(ValueError, match="refuses more than 1000"):
    serving_files.read_warmup_file(path)


# ---- the model card -------------------------------------------------------------------------

def test_the_model_card_of_a_private_model():
  metadata = E.private_metadata()
  card = render_model_card(metadata, SIGNATURES)
  lines = card.splitlines()
  assert lines[0] == "# Model card: classifier trained on digits"
  banner = next(line for line in lines if line.startswith(">"))
  assert banner.startswith("> **Differentially private: (7.42, 1e-05)-DP** (rdp accountant)")
  assert "NON-PRIVATE" not in card
  assert metadata.statement in card
  for row in ("| noise multiplier | 1.1 |", "| L2 clip norm | 1 |", "| sampling | poisson |",
              "| sampling rate | 0.05 |", "| (expected) logical batch size | 79.85 |",
              "| logical steps | 300 |", "| epochs | 15 |", "| dataset | digits |",
              "| public split | train[:200] |", "| private examples | 1597 |",
              "| public examples | 200 |", "| test examples | 360 |", "| mode | freeze |",
              "| overall sparsity (frozen fraction) | 90.00% |",
              "| dense/kernel:0 | 90.00% |", "| dense/bias:0 | 0.00% |",
              "| input | `pixels` | float32 | [None, 8] |",
              "| output | `probabilities` | float32 | [None, 4] |",
              "| output | `class_id` | int64 | [None] |", "| input | `field` | string | [None] |",
              "| seed (initialization, data split, masks; not the DP noise) | 1234 |",
              "| mechanism randomness (DP noise, sampling) | os_entropy: drawn from the "
              "operating system (os.urandom), recorded in no published file |",
              "| created (UTC) | 2026-01-02T03:04:05+00:00 |",
              f"| tensorflow | {metadata.library_versions['tensorflow']} |"):
    assert row in lines, row
  assert metadata.public_fingerprint["sha256"] in card
  assert '"MagnitudeRule"' in card  # the mask rule's config
  assert '"PoissonSampledDpEvent"' in card  # the dp_accounting event
  assert "Empirical" not in card
  order = [card.index(h) for h in ("## Privacy guarantee", "## Training setup", "## Data",
                                   "## Masks", "## Signatures", "## Provenance")]
  assert order == sorted(order) and card.index("Differentially private") < order[0]


def test_the_model_card_of_an_insecure_run_says_so_first():
  statement = "INSECURE: seeded noise. " + E.private_metadata().statement
  card = render_model_card(
      E.private_metadata(mechanism_randomness="insecure_seed", statement=statement), SIGNATURES)
  title, banner = card.split("\n\n")[:2]
  assert banner.startswith("> **INSECURE: reproducible noise and sampling.**")
  assert "> **Differentially private: (7.42, 1e-05)-DP**" in banner  # the numbers, after
  assert "insecure_seed: derived from a seed, REPRODUCIBLE" in card
  secure = render_model_card(E.private_metadata(), SIGNATURES)
  assert "INSECURE" not in secure and "REPRODUCIBLE" not in secure


def test_the_model_card_of_a_non_private_model_says_so_first():
  card = render_model_card(metadata_lib.non_private(dataset="digits"), SIGNATURES)
  title, banner = card.split("\n\n")[:2]
  assert title == "# Model card: classifier trained on digits"
  assert banner.startswith(
      "> **NON-PRIVATE: trained without differential privacy (epsilon = infinity).**")
  assert "Differentially private" not in card
  assert "Not covered by this guarantee" not in card  # there is no guarantee


def _section(card, heading):
  """The text of one section of the card, from its heading to the next heading."""
  start = card.index(heading + "\n")
  ends = [i for i in (card.find("\n## ", start + 1), card.find("\n### ", start + 1)) if i > 0]
  return card[start:min(ends, default=len(card))]


def test_the_model_card_says_training_metrics_and_the_test_split_are_not_covered():
  card = render_model_card(E.private_metadata(), SIGNATURES)
  section = _section(card, "### Not covered by this guarantee")
  assert card.index("## Privacy guarantee") < card.index(section) < card.index("## Training setup")
  assert "training loss and metrics" in section and "private batches WITHOUT noise" in section
  assert "test split" in section and "not covered" in section


@pytest.mark.parametrize("kind, says", [
    ("synthetic", "holds synthetic inputs: zeros of the `serving_default` input's shape, at "
                  "batch sizes 1, 8. They are derived from no dataset."),
    ("public", "holds examples that the exporter passed explicitly as PUBLIC "
               "(`public_warmup_inputs`)"),
])
def test_the_model_card_says_which_warmup_inputs_the_export_holds(kind, says):
  card = render_model_card(E.private_metadata(), SIGNATURES, warmup=kind)
  section = _section(card, "## Warmup requests")
  assert f"Warmup inputs: **{kind}**." in section and says in section
  assert card.index("## Signatures") < card.index(section) < card.index("## Provenance")
  assert "## Warmup requests" not in render_model_card(E.private_metadata(), SIGNATURES)
  with pytest.raises(ValueError, match=r"warmup in \['synthetic', 'public'\]"):
    render_model_card(E.private_metadata(), SIGNATURES, warmup="test rows")


def test_empirical_results_get_their_own_section_after_the_guarantee():
  metadata = E.private_metadata().with_empirical({"audit_epsilon_lower_bound": 0.8})
  card = render_model_card(metadata, SIGNATURES)
  assert "## Empirical (not proven)" in card
  assert "| audit_epsilon_lower_bound | 0.8 |" in card
  assert card.index("## Privacy guarantee") < card.index("## Empirical (not proven)")


def test_table_cells_cannot_break_the_markdown():
  metadata = E.private_metadata(dataset="a|b\nc")
  card = render_model_card(metadata, SIGNATURES)
  assert "| dataset | a\\|b c |" in card.splitlines()
