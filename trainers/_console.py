"""What the binaries share: their flags listed by --help, and user errors without a traceback."""

import sys

from absl import app
from absl import flags

from tfdp_prune import checkpoint_errors
from tfdp_prune import train_config


def adopt_key_flags(*modules) -> None:
  """Makes the flags of `modules` key flags of the program, so that `--help` lists them.

  absl's --help lists the key flags of the main module, which it names by `sys.argv[0]`; a
  console script (`tfdp-train`) defines none itself, so its --help listed no flag at all."""
  for module in modules:
    for flag in flags.FLAGS.get_key_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


# The user errors every binary answers with its message alone.
USER_ERRORS = (train_config.ConfigError, checkpoint_errors.CheckpointError)


def run_console(main_function, program: str, *flag_modules, more_user_errors=()) -> None:
  """Runs an absl `main` whose flags are defined in `flag_modules`: --help lists them, and a bad
  setting (ConfigError), a damaged checkpoint directory (CheckpointError: its message names the
  file and the choices) or one of `more_user_errors` (a binary's own, e.g. tfdp-export's
  ExportError) exits with status 1 and `program: message`, without a traceback. Any other
  exception (a plain ValueError included) is a bug and keeps its traceback."""
  adopt_key_flags(*flag_modules)
  try:
    app.run(main_function)
  except USER_ERRORS + tuple(more_user_errors) as error:
    sys.exit(f"{program}: {error}")
