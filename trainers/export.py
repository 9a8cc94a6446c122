"""`tfdp-export`: export a `tfdp-train` checkpoint for TF Serving, or inspect an export.

  tfdp-export --checkpoint_dir=/runs/digits --export_dir=/models/digits     # -> /models/digits/<v>/
  tfdp-export --checkpoint_dir=/runs/digits --export_dir=/models/digits --export_version=3 \
      --overwrite
  tfdp-export --inspect=/models/digits          # validate the layout, print the privacy metadata

`main` maps the flags onto `tfdp_prune.training.export_checkpoint` (which rebuilds the model from
the run's record and restores the newest checkpoint) or onto `inspect_export`.
"""

import sys

from absl import app
from absl import flags

from tfdp_prune import training
from tfdp_prune.export import inspection
from tfdp_prune.trainers import _console

_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "A `tfdp-train --checkpoint_dir` directory: its newest complete "
    "checkpoint is exported.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "TF Serving base path; the model goes to <export_dir>/<version>/.")
_EXPORT_VERSION = flags.DEFINE_integer(
    "export_version", None, "Version directory; default: one more than the newest.",
    lower_bound=1)
_RENAMED_VERSION = flags.DEFINE_integer(
    "version", None, "Renamed --export_version (tfdp-train's spelling); given, it is an error "
    "that names the new flag.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
_EMA = flags.DEFINE_bool("ema", True, "Export the EMA weights when the run kept them.")
_INSPECT = flags.DEFINE_string(
    "inspect", None, "Validate an export (base path or version directory) and print its "
    "privacy metadata; nothing is written.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]} (settings are --flags).")
  if _RENAMED_VERSION.present:
    raise app.UsageError(f"--version was renamed --export_version (the spelling tfdp-train "
                         f"uses). Received: --version={_RENAMED_VERSION.value}; pass "
                         f"--export_version={_RENAMED_VERSION.value}.")
  if _INSPECT.value:
    if _CHECKPOINT_DIR.value or _EXPORT_DIR.value:
      raise app.UsageError("--inspect reads an export; it takes no --checkpoint_dir or "
                           "--export_dir.")
    print(inspection.format_report(inspection.inspect_export(_INSPECT.value)))
    return
  if not (_CHECKPOINT_DIR.value and _EXPORT_DIR.value):
    raise app.UsageError("Expected --checkpoint_dir and --export_dir (to export), or --inspect "
                         "(to check an export).")
  path = training.export_checkpoint(_CHECKPOINT_DIR.value, _EXPORT_DIR.value,
                                    version=_EXPORT_VERSION.value, overwrite=_OVERWRITE.value,
                                    use_ema=_EMA.value)
  print(inspection.format_report(inspection.inspect_export(path)))


def run_main():
  """The console-script entry point: a user error (a bad setting, a damaged checkpoint, an
  export that does not fit the layout) ends with its message; a bug keeps its traceback."""
  _console.run_console(main, "tfdp-export", sys.modules[__name__],
                       more_user_errors=(inspection.ExportError,))


if __name__ == "__main__":
  run_main()
