"""Runs `tfdp-export`'s console entry point once per argument list, in one process (TensorFlow
is imported once, not once per run), and prints [exit code, stdout, stderr] per run as JSON.

  python -m tests.trainers._export_driver '[["--inspect=/m"], ["--checkpoint_dir=/c", ...]]'

Each run sees what the console script's user would: its exit code (a `sys.exit(message)`
counts as 1 with the message on stderr) and, for an exception other than the exit, the
traceback on stderr. Its flags clash with tfdp-train's, so it never runs in the test process:
tests call `_console_testing.run_tfdp_export`.
"""

import contextlib
import io
import json
import sys
import traceback

from absl import flags

from tfdp_prune.trainers import export


def run(argv):
  out, err = io.StringIO(), io.StringIO()
  sys.argv = ["tfdp-export", *argv]
  flags.FLAGS.unparse_flags()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      export.run_main()
    except SystemExit as exit_info:
      code = exit_info.code
    except Exception:  # pylint: disable=broad-except  # what the interpreter would print
      traceback.print_exc()
      code = 1
  if isinstance(code, str):  # sys.exit(message): Python prints it and exits 1
    err.write(code + "\n")
    code = 1
  return [code or 0, out.getvalue(), err.getvalue()]


if __name__ == "__main__":
  runs = [run(argv) for argv in json.loads(sys.argv[1])]
  print("\n" + json.dumps(runs))
