"""`tfdp-audit`: the training flags are tfdp-train's, bad flags fail before training, a short
audit runs end to end and exports the audit next to the proven epsilon."""

import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from tfdp_prune.trainers import audit as audit_binary
from tfdp_prune.trainers import train as train_binary
from tests.trainers._console_testing import run_in_process

# The child imports exactly what this process imports (also under Bazel, whose runfiles are on
# sys.path, not on PYTHONPATH).
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(sys.path))


def _run(argv, cwd, timeout=600):
  """`python -m tfdp_prune.trainers.audit`: the module behind the `tfdp-audit` console script."""
  return subprocess.run([sys.executable, "-m", "tfdp_prune.trainers.audit", *argv],
                        capture_output=True, text=True, timeout=timeout, env=_ENV, cwd=cwd)


@pytest.fixture
def parsed_flags():
  def parse(*argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tfdp-audit", *argv])
    return audit_binary.given_audit_settings(), train_binary.given_overrides()
  yield parse
  flags.FLAGS.unparse_flags()


def test_audit_and_training_flags_map_onto_their_settings(parsed_flags):
  assert parsed_flags() == ({}, {})
  assert parsed_flags("--canaries=50", "--k_plus=5", "--k_minus=3", "--epsilon=1",
                      "--export_dir=") == (
      {"canaries": 50, "k_plus": 5, "k_minus": 3}, {"epsilon": 1.0, "export_dir": None})


@pytest.mark.parametrize("argv, flag", [
    (["--k_plus=5"], "--k_minus"),  # an audit flag (all of them: test_audit.py, in process)
    (["--canaries=5000"], "--canaries"),  # more than the private part: after loading the data
    (["--ema_decay=0.9"], "--ema_decay"),
    (["--mode=none", "--sparsity=0.5"], "--sparsity"),  # a training flag, checked as by tfdp-train
])
def test_invalid_flags_fail_before_training_and_name_the_flag(argv, flag, tmp_path, monkeypatch,
                                                             capsys):
  monkeypatch.chdir(tmp_path)
  # In this process, as the console script runs it: an exception other than the exit (a crash,
  # not a message) fails the test.
  code, message, out = run_in_process(audit_binary.run_main, argv, monkeypatch, capsys)
  assert code != 0
  assert flag in message, message[-2000:]
  assert "Traceback" not in message, message[-2000:]
  assert "Epoch" not in out and not os.listdir(tmp_path)


# 30-45 s (a subprocess imports TensorFlow and trains); fast: test_audit.py runs the same
# workflow in process, and the flags are checked above.
@pytest.mark.slow
def test_tfdp_audit_short_run_exports_the_audit(tmp_path):
  export_dir = tmp_path / "audited"
  # The default config (freeze 80%, epsilon 8), shortened; RDP calibrates in a second where PLD
  # takes over a minute for so few steps.
  result = _run(["--steps=20", "--public_epochs=2", "--accountant=rdp", "--canaries=60",
                 f"--export_dir={export_dir}"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  proven = float(re.search(r"proven: epsilon = ([0-9.]+), delta = 1e-05", result.stdout).group(1))
  assert re.search(r"privacy: epsilon = .* after 20 logical steps \(rdp", result.stdout)
  bound = float(re.search(r"audit \(measured, not proven\): epsilon >= ([0-9.]+) at 0.95 "
                          r"confidence", result.stdout).group(1))
  auc = float(re.search(r"membership inference \(loss threshold\): AUC = ([0-9.]+)",
                        result.stdout).group(1))
  assert re.search(r"exported: .*audited/1$", result.stdout, re.M)
  with open(export_dir / "1" / "assets.extra" / "privacy_metadata.json") as f:
    metadata = json.load(f)
  assert metadata["private"] is True and metadata["epsilon"] == pytest.approx(proven, abs=1e-3)
  assert metadata["epsilon"] <= 8.0  # the default config's target, untouched by the audit
  record = metadata["empirical"]["audit"]
  assert record["m"] == 60 and record["epsilon_lower_bound"] == pytest.approx(bound, abs=1e-4)
  assert record["mia_auc"] == pytest.approx(auc, abs=1e-4)
  assert record["epsilon_lower_bound"] <= metadata["epsilon"]
