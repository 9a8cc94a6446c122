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

from tfdp_prune import train_config
from tfdp_prune import training
from tfdp_prune.trainers import _console

_DEFAULTS = train_config.TrainConfig()
# (flag, kind, help). Every flag defaults to None: "not given, keep the config's value".
_FLAG_SPECS = (
    ("dataset", "string", "digits (embedded), a TFDS name (e.g. mnist, cifar10), or a path: "
     "a folder with one sub-folder of images per class, a .csv file (--label_column, "
     "--num_classes) or a .npz file with arrays x and y (--num_classes). A relative folder "
     "starts with ./"),
    ("public_dataset", "string", "Dataset of the public part, in the same forms; empty: "
     "--dataset itself."),
    ("public_split", "string", "TFDS split string of the public part, e.g. 'train[:10%]'."),
    ("private_split", "string", "TFDS split string of the private part."),
    ("test_split", "string", "TFDS split string of the test part; empty: no test part."),
    ("data_dir", "string", "TFDS data directory."),
    ("label_column", "string", "The label column of .csv datasets; every other column is a "
     "numeric feature."),
    ("num_classes", "integer", "Classes of .csv and .npz datasets (labels 0..num_classes-1); "
     "declared, because the model publishes it."),
    ("image_size", "string", "HEIGHTxWIDTH (e.g. 32x32): resize the images of folder datasets "
     "to it; unset: every image must have one size."),
    ("model", "string", "mlp, mnist_cnn or wrn<depth>_<width> (e.g. wrn16_4)."),
    ("mode", train_config.MODES, "Masks: none (dense DP-SGD), freeze (one mask from public "
     "data before DP training) or select (a new mask every --select_every steps)."),
    ("rule", train_config.RULES, "How coordinates are chosen."),
    ("sparsity", "float", "Fraction of each maskable variable that is frozen, in [0, 1)."),
    ("select_every", "integer", "Logical steps between re-selections (--mode=select)."),
    ("public_epochs", "integer", "Epochs of non-private training on the public part first."),
    ("public_learning_rate", "float", "Learning rate of the public pre-training."),
    ("epsilon", "float", "Target epsilon: the noise multiplier is calibrated to it and "
     "training stops before it is exceeded."),
    ("delta", "float", "Target delta."),
    ("noise_multiplier", "float", "Noise multiplier sigma instead of --epsilon; 0 trains "
     "without privacy (exported as NON-PRIVATE)."),
    ("accountant", train_config.ACCOUNTANTS, "Privacy accountant (dp_accounting)."),
    ("l2_norm_clip", "float", "Per-example clip norm C."),
    ("sampling", train_config.SAMPLINGS, "poisson (amplified epsilon) or shuffle (fixed "
     "batches, reported without amplification)."),
    ("batch_size", "integer", "Logical (expected) batch size: one noisy update each."),
    ("physical_batch_size", "integer", "Examples per accumulated micro-batch; divides "
     "--batch_size."),
    ("augmult", "integer", "Augmented views per example (images; 0: none)."),
    ("epochs", "float", "Epochs over the private part (instead of --steps)."),
    ("steps", "integer", "Logical steps (instead of --epochs)."),
    ("optimizer", train_config.OPTIMIZERS, "Base optimizer."),
    ("learning_rate", "float", "Learning rate."),
    ("momentum", "float", "SGD momentum."),
    ("ema_decay", "float", "EMA decay of the weights (evaluated and exported); 0: no EMA."),
    ("strategy", train_config.STRATEGIES, "tf.distribute strategy."),
    ("checkpoint_dir", "string", "Checkpoints every epoch; a run resumes from the newest."),
    ("carry_spend_from", "string", "The checkpoint directory of an earlier run on the same "
     "private data with the same mechanism (e.g. one whose checkpoints are damaged): its privacy "
     "ledger's steps are counted in this run's epsilon, step limit and export. Needs a new "
     "--checkpoint_dir."),
    ("export_dir", "string", "TF Serving base path: the model goes to <export_dir>/<version>/; "
     "empty: no export."),
    ("export_version", "integer", "Version directory; default: one more than the newest."),
    ("overwrite", "bool", "Replace an existing export version."),
    ("seed", "integer", "Seed of the initialization, the data split, random masks and "
     "augmentation. NOT of the DP noise nor the sampling, which draw from OS entropy (see "
     "--insecure_mechanism_seed)."),
    ("insecure_mechanism_seed", "integer", "INSECURE: seeds the DP noise and the sampling, so "
     "that a run can be reproduced; whoever knows the seed can remove the noise. For tests and "
     "debugging only: the run logs a warning and its export is labelled INSECURE. Unset (the "
     "default): OS entropy."),
    ("verbose", "integer", "Keras fit verbosity (1: progress bar)."),
)

_CONFIG = flags.DEFINE_enum("config", "default", sorted(train_config.CONFIGS),
                            "Named config the other flags override.")


def _define(name, kind, help_text):
  default_text = f" (default config: {getattr(_DEFAULTS, name)!r})"
  if isinstance(kind, tuple):
    return flags.DEFINE_enum(name, None, list(kind), help_text + default_text)
  define = {"string": flags.DEFINE_string, "float": flags.DEFINE_float,
            "integer": flags.DEFINE_integer, "bool": flags.DEFINE_bool}[kind]
  return define(name, None, help_text + default_text)


_FLAGS = {name: _define(name, kind, help_text) for name, kind, help_text in _FLAG_SPECS}


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
  _console.run_console(main, "tfdp-train", sys.modules[__name__])


if __name__ == "__main__":
  run_main()
