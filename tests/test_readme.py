"""The README's quickstart is examples/quickstart.py, and it runs."""

import os
import re
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
  with open(os.path.join(_REPO, path), encoding="utf-8") as f:
    return f.read()


def test_readme_quickstart_is_the_example_file():
  block = re.search(r"run as written \(a test runs it too\):\n\n```python\n(.*?)```",
                    _read("README.md"), re.S).group(1)
  assert block in _read("examples/quickstart.py")


def test_quickstart_runs_learns_and_exports_with_its_label(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(_REPO, "examples", "quickstart.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  accuracy = float(re.search(r"test accuracy: ([0-9.]+)", result.stdout).group(1))
  assert accuracy > 0.5, result.stdout[-2000:]  # 10 classes: chance is 0.1
  epsilon = float(re.search(r"epsilon: ([0-9.]+) at delta 1e-05 \(.*Poisson sampling",
                            result.stdout).group(1))
  assert 0 < epsilon <= 8.0  # the budget's target
  # The export is labelled with the run's guarantee, as the budget and the callback saw it.
  from tfdp_prune import accounting  # pylint: disable=g-import-not-at-top
  from tfdp_prune.export import read_metadata  # pylint: disable=g-import-not-at-top
  label = read_metadata(str(tmp_path / "tfdp_export" / "1"))
  assert label.private and label.guarantee.startswith(f"({label.epsilon:.4g}, ")
  assert round(label.epsilon, 2) == epsilon
  assert label.steps == 195 and label.num_private_examples == 1300  # 15 epochs of 13 steps
  assert label.epsilon == accounting.PrivacySpec.from_dict(label.privacy_spec).epsilon()
  assert (label.noise_multiplier, label.l2_norm_clip, label.delta) == (
      1.0, 1.0, accounting.PrivacySpec.from_dict(label.privacy_spec).total_delta())
  assert label.sampling == "poisson" and label.sampling_probability == 100 / 1300
  assert label.mechanism_randomness == "os_entropy"
  assert label.mask_mode == "freeze" and label.mask_rule["name"] == "magnitude"
  assert label.mask_rule["sparsity"] == 0.8 and label.mask_sparsity > 0.7
  assert label.public_fingerprint["num_examples"] == label.num_public_examples == 200
  # The expected output the quickstart states is what it prints.
  code = _read("examples/quickstart.py")
  for line in ("epsilon: 7.42 at delta 1e-05 (",
               "exported: tfdp_export/1, labelled (7.422, 1e-05)-DP after 195 steps, masks: "
               "freeze magnitude"):
    assert line in code and line in result.stdout, line
  lowest = float(re.search(r"#   test accuracy: ([0-9.]+) to ", code).group(1))
  assert accuracy > lowest - 0.1, result.stdout[-2000:]


def _defined_flags(path):
  """The flag names a binary's module defines (absl DEFINE_* calls with a literal name)."""
  import ast  # pylint: disable=g-import-not-at-top
  names = set()
  for node in ast.walk(ast.parse(_read(path))):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("DEFINE_") and node.args
        and isinstance(node.args[0], ast.Constant)):
      names.add(node.args[0].value)
  return names


def test_readme_documents_every_flag_of_every_binary():
  from tfdp_prune.trainers import train  # pylint: disable=g-import-not-at-top
  readme = _read("README.md")
  binaries = {
      "tfdp-train": _defined_flags("trainers/train.py")
                    | {name for name, _, _ in train._FLAG_SPECS},
      "tfdp-audit": _defined_flags("trainers/audit.py"),
      "tfdp-export": _defined_flags("trainers/export.py"),
  }
  for binary, names in binaries.items():
    assert len(names) > 3, (binary, names)  # the scan found the flags
    missing = sorted(n for n in names if not re.search(rf"`--(\[no\])?{n}[`=,]", readme))
    assert not missing, f"{binary}: flags missing from the README: {missing}"
