"""Running a binary's console entry point as its installed script does: in the test process
(`run_in_process`), or for tfdp-export, whose flags clash with tfdp-train's, several runs in one
process of their own (`run_tfdp_export`)."""

import json
import os
import subprocess
import sys
import types

import pytest
from absl import flags


def run_in_process(run_main, argv, monkeypatch, capsys):
  """(exit code, what the user sees on stderr, stdout) of `run_main()` run as `tfdp-train argv`.
  The flags are reset before and after, so one process can run it many times."""
  monkeypatch.setattr(sys, "argv", ["tfdp-train", *argv])
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(SystemExit) as exit_info:
      run_main()
  finally:
    flags.FLAGS.unparse_flags()
  code = exit_info.value.code
  out, message = capsys.readouterr()
  if isinstance(code, str):  # sys.exit(message): Python prints it and exits 1
    return 1, message + code, out
  return code, message, out


def unindented_lines(message: str) -> str:
  """The message without the help text's indented lines (a usage error prints the help first,
  whose indented lines name every flag)."""
  return "\n".join(line for line in message.splitlines() if not line[:1].isspace())


def run_tfdp_export(*runs, cwd=None):
  """The `tfdp-export` runs (argument lists), one after the other in one process of their own
  (tests/trainers/_export_driver.py): a `subprocess.CompletedProcess`-like result
  (returncode, stdout, stderr) per run."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  driver = subprocess.run([sys.executable, "-m", "tests.trainers._export_driver", json.dumps(runs)],
                          capture_output=True, text=True, timeout=600, cwd=cwd or repo,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                                   PYTHONPATH=os.pathsep.join([repo] + sys.path)))
  assert driver.returncode == 0, driver.stderr[-3000:]
  return [types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
          for code, out, err in json.loads(driver.stdout.strip().splitlines()[-1])]
