"""Running a binary's console entry point in the test process, as its installed script does."""

import sys

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
