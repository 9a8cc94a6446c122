"""What the traced DP step keeps allocated between steps."""

import json
import os
import subprocess
import sys

import pytest


# ~15 s in its own process (the allocator is chosen when TensorFlow starts).
@pytest.mark.slow
def test_the_dp_step_holds_no_activation_sized_tensor_and_one_zeros_per_shape_between_steps():
  """Grappler folds zeros of a known shape into constants, and one inside a `tf.cond` branch
  stays allocated for the traced step's lifetime: the WRN-16-4's step held 145 MB of them
  (docs/per-layer-engine.md). Made outside the branches, zeros of one shape are one constant.
  Here every windowed path and a 1.2 MB kernel are in the model: the step may keep one zeros
  tensor per variable shape, and nothing near a 2 MB activation."""
  worker = os.path.join(os.path.dirname(__file__), "_held_memory_worker.py")
  run = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  measured = json.loads(run.stdout.strip().splitlines()[-1])
  assert measured["held"] < measured["one_per_shape"] + measured["activation"] / 8, measured
