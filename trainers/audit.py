"""`tfdp-audit`: train one run with canaries, audit it, export it with the audit attached.

  tfdp-audit                                  # digits, the default config, 200 canaries
  tfdp-audit --noise_multiplier=0 --mode=none --epochs=100 --learning_rate=1   # non-private
  tfdp-audit --epsilon=1 --canaries=400 --k_plus=40 --k_minus=40 --export_dir=/tmp/audit

Takes every `tfdp-train` flag (the same table, `tfdp_prune.trainers.train`) and the audit's
own; prints the epsilon lower bound and the membership-inference AUC next to the proven epsilon,
and exports the audited model with both in its metadata (`empirical.audit`). Without
--export_dir the export goes to the config's export directory + "_audit" (the audited model was
trained with mislabelled canaries; it should not become the served model by accident). `main`
only maps the given flags onto `tfdp_prune.audit.run`; see `tfdp_prune.audit` for the method.
"""

import sys

from absl import app
from absl import flags

from tfdp_prune import audit
from tfdp_prune.trainers import _console
from tfdp_prune.trainers import _flags
from tfdp_prune.trainers import train  # defines --config and the training flags

_DEFAULTS = audit.AuditConfig()


def _help(name: str) -> str:
  """The help text beside AuditConfig's field `name`, its {default} filled in."""
  return _flags.help_text(audit.AuditConfig, name).format(default=getattr(_DEFAULTS, name))


# Every audit flag defaults to None: "not given, keep AuditConfig's default". One per field of
# AuditConfig, of the field's kind (tests/trainers/test_flags.py checks both).
_AUDIT_FLAGS = {
    "canaries": flags.DEFINE_integer("canaries", None, _help("canaries")),
    "canary_seed": flags.DEFINE_integer("canary_seed", None, _help("canary_seed")),
    "confidence": flags.DEFINE_float("confidence", None, _help("confidence")),
    "k_plus": flags.DEFINE_integer("k_plus", None, _help("k_plus")),
    "k_minus": flags.DEFINE_integer("k_minus", None, _help("k_minus")),
}


def given_audit_settings() -> dict:
  """The audit settings of the flags given on the command line."""
  return {name: holder.value for name, holder in _AUDIT_FLAGS.items() if holder.present}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]} (settings are --flags).")
  audit.run(flags.FLAGS.config, given_audit_settings(), **train.given_overrides())


def run_main():
  """The console-script entry point."""
  _console.run_console(main, "tfdp-audit", sys.modules[__name__], train)


if __name__ == "__main__":
  run_main()
