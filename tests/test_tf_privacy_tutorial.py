"""examples/tf_privacy_tutorial.py (TF Privacy's Keras tutorial, ported) runs offline."""

import os
import re
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 15 s: the tutorial end to end in a subprocess
def test_the_tutorial_port_runs_offline_and_reports_the_shuffle_guarantee():
  result = subprocess.run(
      [sys.executable, "examples/tf_privacy_tutorial.py", "--epochs=1", "--steps_per_epoch=2"],
      cwd=_REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=_REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  accuracy = float(re.search(r"test accuracy: ([0-9.]+)", result.stdout).group(1))
  assert 0.0 <= accuracy <= 1.0
  # 2 steps of shuffled fixed batches, accounted as such (no Poisson amplification).
  statement = re.search(r"epsilon: ([0-9.]+) at delta 1e-05 \((.*)\)", result.stdout)
  assert float(statement.group(1)) > 0
  assert statement.group(2).startswith("NOT a Poisson guarantee")
  assert "2 steps" in statement.group(2)
