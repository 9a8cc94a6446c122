"""`tfdp-train`: DP training with public-data pruning, then a TF Serving export.

  tfdp-train                                   # digits, freeze 80% by magnitude, epsilon 8
  tfdp-train --mode=select --rule=random --sparsity=0.9 --select_every=5
  tfdp-train --noise_multiplier=1.1 --steps=300 --export_dir=/models/digits
  tfdp-train --dataset=/data/xrays --model=mnist_cnn --image_size=64x64  # class folders
  tfdp-train --dataset=/data/visits.csv --label_column=outcome --num_classes=2
  tfdp-train --config=mnist_tfp_tutorial       # needs MNIST prepared for TFDS
  tfdp-train --config=cifar10_wrn16_4_eps8 --strategy=tpu

Flags override the named --config; a flag that is not given keeps the config's value (see
`tfdp_prune.train_config` for the configs and the settings that exclude one another). An empty
string sets an optional setting to None (e.g. --export_dir= to skip the export). `main` only maps
the flags that were given onto `tfdp_prune.training.run`; all checks and the work are there.
"""

import sys

from absl import app
from absl import flags

from tfdp_prune import private_tuning
from tfdp_prune import train_config
from tfdp_prune import training
from tfdp_prune.trainers import _console
from tfdp_prune.trainers import _flags

_DEFAULTS = train_config.resolve()  # the default config (with its model's MODEL_DEFAULTS)
# (flag, kind, help), one per TrainConfig field: the help text sits beside the field.
_FLAG_SPECS = _flags.flag_specs(train_config.TrainConfig)

_CONFIG = flags.DEFINE_enum("config", "default", sorted(train_config.CONFIGS),
                            "Named config the other flags override.")


def _help_with_default(name: str, help_text: str) -> str:
  return f"{help_text} (default config: {getattr(_DEFAULTS, name)!r})"


# Every flag defaults to None: "not given, keep the config's value".
_FLAGS = {name: _flags.define(name, kind, _help_with_default(name, help_text))
          for name, kind, help_text in _FLAG_SPECS}


def given_overrides() -> dict:
  """The settings of the flags given on the command line ("" -> None)."""
  return {name: (None if holder.value == "" else holder.value)
          for name, holder in _FLAGS.items() if holder.present}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]} (settings are --flags).")
  training.run(_CONFIG.value, **given_overrides())


def run_main():
  """The console-script entry point."""
  _console.run_console(main, "tfdp-train", sys.modules[__name__],
                       more_user_errors=(private_tuning.EmptySearchError,))


if __name__ == "__main__":
  run_main()
