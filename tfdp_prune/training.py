"""The training entry point: one `TrainConfig` -> data -> DP model -> fit -> checkpoint -> export.

`train(config)` composes the library; `run(config_name, **overrides)` is what `tfdp-train`
calls; `export_checkpoint(checkpoint_dir, export_dir)` exports a run's newest checkpoint later.

Design: docs/training.md
"""

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Dict, Optional, Sequence

import numpy as np

from tfdp_prune import _mask_callback
from tfdp_prune import accounting
from tfdp_prune import agreement
from tfdp_prune import atomic_files
from tfdp_prune import augmult
from tfdp_prune import budget as budget_lib
from tfdp_prune import carried_spend
from tfdp_prune import checkpointing
from tfdp_prune import data as data_lib
from tfdp_prune import ema as ema_lib
from tfdp_prune import freezing
from tfdp_prune import mask_modes
from tfdp_prune import mask_provenance
from tfdp_prune import masks as masks_lib
from tfdp_prune import metadata as metadata_lib
from tfdp_prune import models
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune import overlap
from tfdp_prune import privacy_label
from tfdp_prune import private_tuning
from tfdp_prune import public_guard
from tfdp_prune import public_data as public_data_lib
from tfdp_prune import run_record as run_record_lib
from tfdp_prune import sampling
from tfdp_prune import selection
from tfdp_prune import train_config
from tfdp_prune import train_step
from tfdp_prune import tuning_accounting
from tfdp_prune import tuning
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.export import saved_model as export_lib
from tfdp_prune.sampling_schemes import registry as schemes
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

# The tuning record of a checkpointed run: a resume reuses its choice instead of tuning again.
TUNING_RECORD = "tuning.json"
INSECURE_STATEMENT = (
    f"{metadata_lib.INSECURE_PREFIX}: the DP noise and the batch sampling were derived from "
    "--insecure_mechanism_seed, so whoever knows or guesses that seed can reproduce and remove "
    "the noise; the guarantee that follows holds only against an adversary who cannot. ")


@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
  """What `train` produced: the trained model (raw weights, not EMA), its privacy metadata (its
  `public_guard` says whether the export holds it or the public-only model), the fit history,
  its test accuracy (None without a test part), the export's version directory (None without
  export_dir), the logical step the run resumed from (None for a fresh run) and the public-only
  model's test accuracy (None without a test part or a public-only comparison)."""

  model: Any
  metadata: metadata_lib.PrivacyMetadata
  history: Dict[str, list]
  test_accuracy: Optional[float]
  export_path: Optional[str]
  resumed_from: Optional[int]
  public_only_test_accuracy: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The privacy-relevant numbers decided before training (pure function of config and n)."""

  steps: int
  noise_multiplier: float
  spec: accounting.PrivacySpec  # with steps=0, for the PrivacyBudget


def run(config_name: str = "default", **overrides) -> TrainResult:
  """`tfdp-train`'s one call: the named config with the given settings, trained and exported."""
  return train(train_config.resolve(config_name, overrides))


def train(config: TrainConfig, *, splits: Optional[data_lib.DataSplits] = None,
          callbacks: Sequence[Any] = ()) -> TrainResult:
  """Trains and (with `config.export_dir`) exports one model; see the module docstring.

  Args:
    config: the run's settings (validated when it was built).
    splits: data already loaded, e.g. `DataSplits.from_arrays(public=(x, y), private=(x, y),
      test=(x, y), num_classes=k)` or `data.load(...)`; None loads `config.dataset` (a name or
      a path). Given splits go through the checks `load_data` runs (`data.check_splits`: public and private disjoint,
      the recorded public fingerprint the public part's) before anything else.
    callbacks: more Keras callbacks for `fit`. The training loss and metrics they see are
      computed on private batches without noise: a decision made from them (early stopping,
      keeping the best checkpoint) is not covered by the guarantee.

  Raises:
    ConfigError: an invalid setting, before any training.
    ValueError: the public and private parts overlap (as `data.load` raises it).
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"Expected a tfdp_prune.TrainConfig. Received: {type(config).__name__}.")
  check_export_target(config)
  strategy = make_strategy(config.strategy)
  if splits is None:
    splits = load_data(config)  # checked there
  else:
    _check_given_splits(splits)
  _check_callback_public_data(callbacks, splits.private)
  info = splits.info
  _check_model_and_data(config, info.input_shape)
  if config.tune == train_config.TUNE_PRIVATE:
    if callbacks:  # they would see every trial, and so the number of trials (K is secret)
      raise ConfigError("--tune=private refuses callbacks: they would observe every trial's "
                        "training, which reveals the number of trials the guarantee keeps "
                        "secret. Drop the callbacks (the export and summary report the result).")
    return _train_tuned(config, splits, callbacks)
  public, validation = split_public(config, splits.public)
  # Public tuning reads only the public part the pre-training sees, never the held-out
  # validation part the public-only comparison is made on.
  config, tuning_record = _tune(config, dataclasses.replace(splits, public=public))
  sampler = make_sampler(config, splits.private, strategy)
  plan = plan_privacy(config, sampler)
  with strategy.scope():
    model = compile_model(config, info.input_shape, info.num_classes, plan.noise_multiplier,
                          sampler.expected_batch_size)
  # The sampler, the optimizer and the budget agree on the logical batch, or nothing starts
  # (the budget checks again when fit begins).
  agreement.check_agreement(model.optimizer, sampler=sampler, spec=plan.spec)
  budget = budget_lib.PrivacyBudget(plan.spec, target_epsilon=config.epsilon,
                                    num_examples=info.num_private, sampler=sampler)
  ema = ema_lib.ExponentialMovingAverage(config.ema_decay) if config.ema_decay else None
  if ema is not None:
    ema.build(model)
  trackables = {"ema": ema.state} if ema is not None else None
  carried = read_carried_spend(config, plan, info)  # before anything is written
  _check_room_left(budget, carried)
  resumed_from = None
  run_record = None
  if config.checkpoint_dir:
    run_record = run_record_lib.write_or_check_run_record(
        config, info, plan.spec, plan.steps, sampler.expected_batch_size)
    if tuning_record is not None:  # only once the run record accepted the tuned config
      atomic_files.replace_file(os.path.join(config.checkpoint_dir, TUNING_RECORD),
                                json.dumps(tuning_record, indent=1, sort_keys=True))
    if carried is not None:  # the new ledger begins at the old steps (restored from it below)
      checkpointing.start_carried_ledger(config.checkpoint_dir, carried.state, carried.source)
    resumed_from = checkpointing.restore_latest(config.checkpoint_dir, model, budget=budget,
                                                sampler=sampler, trackables=trackables)
  fit_callbacks = []
  public_only = None  # the public-only model's weights, when there is a validation part
  if resumed_from is None:
    if config.public_epochs:
      freezing.pretrain_on_public_data(model, public, config.public_epochs,
                                       config.public_learning_rate, batch_size=64)
    if validation is not None:
      public_only = snapshot_public_only(model, config.checkpoint_dir)
    mask_callback = make_mask_callback(config, public)
    if mask_callback is not None:
      fit_callbacks.append(mask_callback)
  else:
    if validation is not None:
      public_only = public_guard.load_snapshot(config.checkpoint_dir, model)
    if config.mode == mask_modes.SELECT:  # re-selection continues on the restored weights
      fit_callbacks.append(make_mask_callback(config, public))
  fit_callbacks.append(budget)
  if ema is not None:
    fit_callbacks.append(ema)
  fit_callbacks.append(StopAfterSteps(plan.steps))
  if config.checkpoint_dir:
    fit_callbacks.append(checkpointing.DPCheckpoint(
        config.checkpoint_dir, every_epoch=True, budget=budget, sampler=sampler,
        trackables=trackables, run_record=run_record))
  fit_callbacks.extend(callbacks)
  start = resumed_from or 0
  history = {}
  if start < plan.steps:
    history = _fit(model, config, sampler, plan.steps, start, fit_callbacks)
  elif config.verbose:
    print(f"tfdp-train: the checkpoint is already at step {start} of {plan.steps}; nothing to "
          "train.")
  metadata = build_metadata(config, budget.ledger.spec.with_steps(budget.steps), info,
                            model, sampler.expected_batch_size,
                            carried=None if carried is None else carried.source,
                            tuning_record=tuning_record)
  accuracies, export_path, metadata = _evaluate_and_export(
      config, model, ema, splits, metadata, validation, public_only)
  if config.verbose:
    print(summary(metadata, accuracies[0], export_path, accuracies[1]))
  return TrainResult(model=model, metadata=metadata, history=history,
                     test_accuracy=accuracies[0], export_path=export_path,
                     resumed_from=resumed_from, public_only_test_accuracy=accuracies[1])


def export_checkpoint(checkpoint_dir: str, export_dir: str, *, version: Optional[int] = None,
                      overwrite: bool = False, use_ema: bool = True) -> str:
  """Exports the newest complete checkpoint of a `tfdp-train --checkpoint_dir` run.

  The model is rebuilt from the run's record (the one the newest checkpoint carries, else
  `run.json`), its weights, masks and ledger are restored, and the metadata says what the
  spent privacy is (the checkpoint's steps, or the privacy ledger's if more steps ran). `use_ema`
  exports the EMA weights when the run kept them. Returns the export's version directory.
  `export_dir` is checked first (`check_output_dir`), before the checkpoint is read.
  """
  check_output_dir("--export_dir", export_dir)
  newest = checkpointing.latest_checkpoint(checkpoint_dir)  # CheckpointError if damaged
  record = (newest.metadata.get("run_record") if newest is not None else None) or (
      run_record_lib.read_run_record(checkpoint_dir))
  config = TrainConfig.from_dict(record["config"])
  info = data_lib.DataInfo.from_dict(record["data_info"])
  spec = accounting.PrivacySpec.from_dict(record["privacy_spec"])
  with make_strategy("default").scope():
    model = compile_model(config, info.input_shape, info.num_classes, spec.noise_multiplier,
                          record["expected_batch_size"])
  budget = budget_lib.PrivacyBudget(spec)
  ema = ema_lib.ExponentialMovingAverage(config.ema_decay) if config.ema_decay else None
  if ema is not None:
    ema.build(model)
  step = checkpointing.restore_latest(
      checkpoint_dir, model, budget=budget,
      trackables={"ema": ema.state} if ema is not None else None)
  if step is None:
    raise ConfigError(f"Expected a complete checkpoint in --checkpoint_dir={checkpoint_dir}. "
                      "Received a directory without one (the run saved none yet): train "
                      "longer, or pass the directory of a run that saved a checkpoint.")
  metadata = build_metadata(config, budget.ledger.spec.with_steps(budget.steps), info, model,
                            record["expected_batch_size"],
                            carried=checkpointing.read_carried(checkpoint_dir),
                            tuning_record=_tuning_record_of(config, checkpoint_dir))
  if ema is not None and use_ema and ema.num_updates:
    ema.assign_to_model()
  return export_lib.export_saved_model(model, export_dir, metadata, version=version,
                                       overwrite=overwrite)


# ---- the pieces (each usable and tested on its own) ---------------------------------------------

def load_data(config: TrainConfig) -> data_lib.DataSplits:
  """The config's data; an unknown or unprepared dataset is a ConfigError naming the flag."""
  try:
    return data_lib.load(config.dataset, public_split=config.public_split,
                         private_split=config.private_split, test_split=config.test_split,
                         public_dataset=config.public_dataset, seed=config.seed,
                         data_dir=config.data_dir, label_column=config.label_column,
                         num_classes=config.num_classes, image_size=config.image_size_pair)
  except data_lib.DatasetNotAvailableError as error:
    flags = f"--dataset={config.dataset!r}"
    if config.public_dataset is not None:
      flags += f" / --public_dataset={config.public_dataset!r}"
    raise ConfigError(f"{flags}: {error}") from None
  except data_lib.OverlapError as error:
    raise ConfigError(
        f"{error.found} The public and private parts must be disjoint: the masks are chosen from "
        "the public part at no privacy cost. Choose a --public_split and --private_split that do "
        f"not overlap (received --public_split={config.public_split!r}, "
        f"--private_split={config.private_split!r}; None is the dataset's default), or a "
        "--public_dataset without the private examples.") from None
  except data_lib.DataError as error:
    raise ConfigError(f"{error} (--dataset={config.dataset!r}, --public_split="
                      f"{config.public_split!r}, --private_split={config.private_split!r}; "
                      "None is the dataset's default)") from None


def make_sampler(config: TrainConfig, private, strategy=None) -> sampling._Sampler:
  """The sampler of --sampling over the private part: Poisson (q = batch_size / n), shuffled
  batches of batch_size, or a registered scheme's (`sampling_schemes`).

  The draws come from a secret of OS entropy (never from --seed), which every worker of
  `strategy` shares (see `sampling`); only --insecure_mechanism_seed makes them reproducible.
  """
  num_examples = len(private[1])
  if config.batch_size > num_examples:
    raise ConfigError(f"Expected --batch_size <= the {num_examples} private examples. Received: "
                      f"--batch_size={config.batch_size}.")
  arguments = schemes.get(config.sampling).sampler_arguments(config.batch_size, num_examples)
  return sampling.make_sampler(
      private, sampling=config.sampling, **arguments,
      gradient_accumulation_steps=config.gradient_accumulation_steps,
      insecure_sampling_seed=config.insecure_mechanism_seed, strategy=strategy)


def plan_privacy(config: TrainConfig, sampler) -> _Plan:
  """The logical steps and the noise multiplier: the given one, or the smallest whose epsilon
  after those steps is within `config.epsilon` (calibrated for the sampling actually done)."""
  steps = config.steps or accounting.steps_for_epochs(config.epochs, sampler.num_examples,
                                                      sampler.expected_batch_size)
  template = sampler.privacy_spec(noise_multiplier=1.0, steps=steps, delta=config.delta,
                                  accountant=config.accountant)
  try:
    if config.noise_multiplier is not None:
      sigma = float(config.noise_multiplier)
    else:
      sigma = accounting.calibrate_noise_multiplier(
          config.epsilon, config.delta, template.sampling_probability, steps, config.accountant,
          sampling=template.sampling, batch_size=template.batch_size,
          num_examples=template.num_examples, pld_discretization=template.pld_discretization)
    # The run's final epsilon (cached for the budget and the metadata): a PLD that cannot be
    # computed is found here, before training. Fewer steps never need a larger PLD.
    dataclasses.replace(template, noise_multiplier=sigma).epsilon()
  except accounting.UnreachableEpsilonError as error:
    raise ConfigError(
        f"Expected an --epsilon that some noise multiplier reaches. Received: "
        f"--epsilon={config.epsilon} for {steps} steps at --delta={config.delta} "
        f"({template.sampling} sampling{template.scheme.rate_text(template)}): {error} Epsilon "
        "grows with the steps and the sampling rate and falls with delta: train fewer --steps or "
        "--epochs, use a smaller batch size (a smaller sampling rate), a larger --delta, or a "
        "larger --epsilon.") from None
  except accounting.PLDError as error:
    raise ConfigError(f"--accountant={config.accountant} cannot account for {steps} steps of "
                      f"this run: {error} (tfdp-train: --accountant=rdp, or fewer --steps or "
                      "--epochs.)") from None
  spec = dataclasses.replace(template, noise_multiplier=sigma, steps=0)
  return _Plan(steps=steps, noise_multiplier=sigma, spec=spec)


def make_strategy(name: str) -> tf.distribute.Strategy:
  """The tf.distribute strategy named by --strategy."""
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable (the "
                        "cluster and this worker's task), as MultiWorkerMirroredStrategy does.")
    return tf.distribute.MultiWorkerMirroredStrategy()
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as error:
    raise ConfigError(f"--strategy=tpu: no TPU is reachable from this machine ({error}). Use "
                      "--strategy=default on CPU/GPU.") from None
  return tf.distribute.TPUStrategy(resolver)


def build_model(config: TrainConfig, input_shape, num_classes: int) -> keras.Model:
  """The model named by --model, for inputs of `input_shape` and `num_classes` logits.

  Keras' layer-name counters are reset first, so the variable names (which the metadata's
  per-variable mask record uses) are the same in every process: dense/kernel, dense_1/kernel...
  """
  keras.backend.reset_uids()
  match = train_config.MODEL_PATTERN.match(config.model)
  if config.model == "mlp":
    return models.mlp(int(np.prod(input_shape)), num_classes=num_classes)
  if config.model == "mnist_cnn":
    return models.mnist_cnn(input_shape=input_shape, num_classes=num_classes)
  return models.wide_resnet(int(match.group(2)), int(match.group(3)), num_classes=num_classes,
                            input_shape=input_shape)


def compile_model(config: TrainConfig, input_shape, num_classes: int, noise_multiplier: float,
                  expected_batch_size: float) -> keras.Model:
  """The model with its DP optimizer, compiled and made private (call under the strategy).

  `config.seed` seeds the initialization only; the optimizer's noise comes from OS entropy
  (or, INSECURE, from --insecure_mechanism_seed)."""
  keras.utils.set_random_seed(config.seed)
  model = build_model(config, input_shape, num_classes)
  common = dict(l2_norm_clip=config.l2_norm_clip, noise_multiplier=noise_multiplier,
                learning_rate=config.learning_rate,
                insecure_noise_seed=config.insecure_mechanism_seed,
                expected_batch_size=expected_batch_size,
                gradient_accumulation_steps=config.gradient_accumulation_steps)
  if config.optimizer == "sgd":
    optimizer = optimizer_lib.DPKerasSGDOptimizer(momentum=config.momentum, **common)
  else:
    optimizer = optimizer_lib.DPKerasAdamOptimizer(**common)
  model.compile(optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                reduction="none"),
                metrics=["accuracy"])
  train_step.make_private(model)
  optimizer.build(model.trainable_variables)  # masks exist before any mask callback runs
  return model


def split_public(config: TrainConfig, public):
  """(pre-training and mask part, validation part or None) of the public arrays, split by
  --public_validation_fraction with --seed; a split that leaves nothing to train on is a
  ConfigError."""
  try:
    return public_guard.split_public(public, config.public_validation_fraction, config.seed)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def snapshot_public_only(model, checkpoint_dir: Optional[str]) -> list:
  """The public-only model's weights: right after the public pre-training, before the masks and
  the first DP step (the initial model without pre-training). Written beside the checkpoints
  too, so that a resumed run compares with the same model."""
  weights = model.get_weights()
  if checkpoint_dir:
    public_guard.save_snapshot(checkpoint_dir, weights)
  return weights


def compare_with_public_only(config: TrainConfig, model, validation, public_only,
                             dp_accuracy: Optional[float]) -> Optional[Dict[str, Any]]:
  """`public_guard.record` of the DP model (`dp_accuracy`) against the public-only weights on
  the public validation part; None without one (--public_validation_fraction=0)."""
  if validation is None:
    return None
  count = len(validation[1])
  if public_only is None:
    return public_guard.record(
        config.export_choice, count, dp_accuracy, None,
        note=(f"the run resumed from a checkpoint in {config.checkpoint_dir} without the "
              f"public-only weights ({public_guard.SNAPSHOT_FILENAME}), so there is no "
              "public-only model to compare with."))
  with public_guard.weights_of(model, public_only):
    public_accuracy = public_guard.accuracy(model, validation)
  return public_guard.record(config.export_choice, count, dp_accuracy, public_accuracy)


def make_rule(config: TrainConfig) -> masks_lib.MaskRule:
  """The mask rule named by --rule, with --sparsity (and --seed for the random rule)."""
  kwargs = {"seed": config.seed} if config.effective_rule == masks_lib.RandomRule.name else {}
  return masks_lib.get(config.effective_rule, sparsity=config.effective_sparsity, **kwargs)


def make_mask_callback(config: TrainConfig, public):
  """ParameterFreezing (mode freeze) or ParameterSelection (mode select), or None."""
  if config.mode == mask_modes.NONE:
    return None
  rule = make_rule(config)
  if config.mode == mask_modes.FREEZE:
    return freezing.ParameterFreezing(rule, public_data=public,
                                      frozen_value=config.effective_frozen_value)
  return selection.ParameterSelection(rule, select_every=config.effective_select_every,
                                      public_data=public)


class StopAfterSteps(keras.callbacks.Callback):
  """Stops `fit` once the DP optimizer has taken `steps` logical steps."""

  def __init__(self, steps: int):
    super().__init__()
    self.steps = steps

  def on_train_batch_end(self, batch, logs=None):
    optimizer = self.model.optimizer
    if optimizer.at_logical_batch_start() and int(optimizer.iterations.numpy()) >= self.steps:
      self.model.stop_training = True


def build_metadata(config: TrainConfig, spec: accounting.PrivacySpec, info: data_lib.DataInfo,
                   model, expected_batch_size: float,
                   carried: Optional[Dict[str, Any]] = None,
                   tuning_record: Optional[Dict[str, Any]] = None
                   ) -> metadata_lib.PrivacyMetadata:
  """The run's `PrivacyMetadata`, by the builder the export of hand-written training uses
  (`privacy_label.build`): the masks' rule from the config (a resumed run's masks come from
  its checkpoint, without a callback that would record them), the data from what was loaded;
  `carried`: an earlier run's spend this run continues (`spec.steps` counts it);
  `tuning_record`: how the hyperparameters were chosen (`TuningResult.record()`)."""
  rule = None
  if config.mode != mask_modes.NONE:
    rule = mask_provenance.rule_record(make_rule(config), config.effective_select_every,
                                       config.effective_frozen_value)
  metadata = privacy_label.build(
      spec, model, expected_batch_size=expected_batch_size,
      data=privacy_label.DataRecord(
          num_private=info.num_private, num_public=info.num_public, num_test=info.num_test,
          public_fingerprint=info.public_fingerprint.to_dict(), dataset=info.dataset,
          public_dataset=info.public_dataset, public_split=info.public_split,
          private_split=info.private_split, seed=config.seed),
      mask_mode=config.mode, mask_rule=rule,
      mechanism_randomness=privacy_label.mechanism_randomness(
          config.mechanism_randomness, model.optimizer.mechanism_randomness),
      insecure_statement=INSECURE_STATEMENT,
      carried_statement=carried_spend.statement(carried) if carried is not None else "")
  return dataclasses.replace(metadata, tuning=tuning_record)


def summary(metadata: metadata_lib.PrivacyMetadata, test_accuracy: Optional[float],
            export_path: Optional[str],
            public_only_test_accuracy: Optional[float] = None) -> str:
  """The lines `tfdp-train` prints at the end: `test_accuracy` is the DP model's, and the
  public-only comparison (`metadata.public_guard`) says which model was exported."""
  if metadata.private:
    privacy = f"epsilon = {metadata.epsilon:.4g}, delta = {delta_text(metadata)}"
  else:
    privacy = "NON-PRIVATE (epsilon = inf)"
  lines = [f"privacy: {privacy} after {metadata.steps} logical steps ({metadata.accountant}, "
           f"{metadata.sampling} sampling)",
           f"mechanism randomness: {metadata.mechanism_randomness}"
           + (" (INSECURE: reproducible from --insecure_mechanism_seed; do not release)"
              if metadata.insecure else ""),
           f"test accuracy: {'n/a' if test_accuracy is None else f'{test_accuracy:.4f}'}"]
  if metadata.tuning:
    if not metadata_lib.is_private_search(metadata.tuning):
      lines.append(tuning.record_summary(metadata.tuning))
    else:
      lines.insert(1, f"private search: a random number of trials (kept secret), "
                      f"{metadata.tuning['method']}; the epsilon above is the whole search's "
                      f"(one trial: {metadata.tuning['trial_epsilon']:.4g}), the steps one "
                      "trial's")
  if public_only_test_accuracy is not None:
    lines.append(f"public-only model test accuracy: {public_only_test_accuracy:.4f}")
  if metadata.public_guard is not None:
    lines.append(f"public-only check: {metadata_lib.describe_public_guard(metadata.public_guard)}")
  if export_path:
    lines.append(f"exported: {export_path}")
  return "\n".join(lines)


def delta_text(metadata: metadata_lib.PrivacyMetadata) -> str:
  """The delta, with the sampler's overflow term shown apart (rounding would hide it)."""
  base = (metadata.privacy_spec or {}).get("delta", metadata.delta)
  extra = metadata.delta - base
  return f"{base:g} + {extra:.2g} (sampler overflow)" if extra > 0 else f"{metadata.delta:g}"


# ---- a private hyperparameter search (--tune=private) -------------------------------------------

def _train_tuned(config: TrainConfig, splits: data_lib.DataSplits, callbacks) -> TrainResult:
  """K random trials (each a full DP run of `train` on the training part, a candidate drawn
  uniformly), the best by a noisy count of correct predictions on the held-out private
  validation part; exported with the WHOLE search's epsilon (`tuning_accounting`). The held-out
  part is private data: its use is the noisy score, which is part of each trial's accounted
  output, and the selection is part of the procedure the theorem analyses."""
  rng = private_tuning.entropy_rng()
  # K is independent of the data: drawn first, so that K = 0 ends the search before any work.
  trials = private_tuning.draw_trial_count(config.tune_distribution, config.tune_trials, rng)
  if trials == 0:
    raise private_tuning.EmptySearchError(private_tuning.empty_search_message(config.tune_trials))
  try:
    train_part, validation = private_tuning.split_validation(
        splits.private, config.tune_validation_fraction, rng)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  trial_splits = dataclasses.replace(
      splits, private=train_part, test=None,
      info=dataclasses.replace(splits.info, num_private=len(train_part[1])))
  # The trials pre-train on all the public data and return their DP models: the public-only
  # comparison is not made for a search (its public validation part would be chosen per trial).
  base = dataclasses.replace(config, tune=train_config.TUNE_NONE, tune_candidates=None,
                             export_dir=None, verbose=0, public_validation_fraction=0.0,
                             export_choice=public_guard.DP)
  spec = _plan_tuned(config, make_sampler(base, train_part))
  trial_config = dataclasses.replace(base, epsilon=None, noise_multiplier=spec.noise_multiplier)
  tuning = tuning_accounting.record(spec, config.tune_score_noise, config.tune_distribution,
                                    config.tune_trials)
  candidates = private_tuning.parse_candidates(config.tune_candidates)
  outcome = private_tuning.search(
      candidates, trials,
      train_trial=lambda candidate: _checked_trial(
          train(dataclasses.replace(trial_config, **candidate), splits=trial_splits,
                callbacks=callbacks), spec),
      score=lambda result: private_tuning.noisy_score(
          private_tuning.count_correct(result.model, validation), config.tune_score_noise, rng),
      rng=rng)
  best = outcome.best
  # Not published: the number of trials run. Papernot-Steinke's theorems cover the best trial's
  # output with K hidden; with K known, the output is best-of-K with K fixed, which costs more.
  tuning.update(mode=train_config.TUNE_PRIVATE, candidates=[dict(c) for c in candidates],
                selected_candidate=best.candidate_index,
                selected_noisy_accuracy=best.score / len(validation[1]),
                validation_fraction=config.tune_validation_fraction,
                num_validation_examples=len(validation[1]))
  metadata = _tuned_metadata(best.result.metadata, tuning, splits.info.num_test)
  (test_accuracy, _), export_path, metadata = _evaluate_and_export(
      config, best.result.model, None, splits, metadata, validation=None, public_only=None)
  if config.verbose:
    print(summary(metadata, test_accuracy, export_path))
  return TrainResult(model=best.result.model, metadata=metadata, history=best.result.history,
                     test_accuracy=test_accuracy, export_path=export_path, resumed_from=None)


def _checked_trial(result: TrainResult, spec: accounting.PrivacySpec) -> TrainResult:
  """A privacy guard (never an assert): the trial ran the accounted mechanism, for at most the
  accounted steps."""
  ran = accounting.PrivacySpec.from_dict(result.metadata.privacy_spec)
  if ran.with_steps(0) != spec.with_steps(0) or ran.steps > spec.steps:
    raise RuntimeError(f"A trial of the private search ran {ran}, not the accounted {spec}; "
                       "its output is not released.")
  return result


def _plan_tuned(config: TrainConfig, sampler) -> accounting.PrivacySpec:
  """One trial's spec at its planned steps: sigma given, or calibrated so that the SEARCH's
  epsilon (not one trial's) is within --epsilon."""
  steps = config.steps or accounting.steps_for_epochs(config.epochs, sampler.num_examples,
                                                      sampler.expected_batch_size)
  template = sampler.privacy_spec(noise_multiplier=1.0, steps=steps, delta=config.delta,
                                  accountant=config.accountant)
  sigma = config.noise_multiplier
  if sigma is None:
    try:
      sigma = tuning_accounting.calibrate_noise_multiplier(
          template, config.tune_score_noise, config.tune_distribution, config.tune_trials,
          config.epsilon)
    except accounting.UnreachableEpsilonError as error:
      raise ConfigError(f"Expected an --epsilon that the private search can reach. Received: "
                        f"--epsilon={config.epsilon}: {error} Use a larger --tune_score_noise, "
                        "a smaller --tune_trials, or a larger --epsilon.") from None
  return dataclasses.replace(template, noise_multiplier=float(sigma))


def _tuned_metadata(trial: metadata_lib.PrivacyMetadata, tuning: Dict[str, Any],
                    num_test: int) -> metadata_lib.PrivacyMetadata:
  """The best trial's metadata, with the search's epsilon and delta, the record, and a statement
  that says the total covers every trial."""
  statement = (f"Private hyperparameter search, {tuning['method']}: a random number of trials "
               f"(kept secret: the guarantee covers only the best trial's output) of "
               f"{len(tuning['candidates'])} candidates, the best by a noisy score on held-out "
               f"private data. Epsilon and delta are the WHOLE search's (dp_accounting RDP); one "
               f"trial's epsilon is {tuning['trial_epsilon']:.4g}. Each trial: {trial.statement}")
  # `created` is when the search ended: the best trial's own time would tell how many trials
  # ran after it.
  return dataclasses.replace(trial, epsilon=tuning["epsilon"], delta=tuning["delta"],
                             statement=statement, tuning=tuning, num_test_examples=num_test,
                             created=metadata_lib.utc_now())


# ---- public tuning (--tune=public) -------------------------------------------------------------

def tune_on_public(config: TrainConfig, splits: data_lib.DataSplits) -> tuning.TuningResult:
  """The settings of `config.tune_space` (by default the learning rate, clip norm and
  sparsity) chosen on `splits.public` (`tuning.tune`).

  Each simulated run's steps and sigma come from the privacy plan of its config, computed from
  the private part's size alone (`plan_for_size`; one calibration per length tried); no
  private example is read."""
  info = splits.info

  def plan(candidate: TrainConfig) -> tuning.PrivatePlan:
    private_plan, expected_batch_size = plan_for_size(candidate, info.num_private)
    return tuning.PrivatePlan(steps=private_plan.steps,
                              noise_multiplier=private_plan.noise_multiplier,
                              expected_batch_size=expected_batch_size)

  return tuning.tune(config, splits.public, plan=plan, num_classes=info.num_classes,
                     simulate=simulate_on_public)


def read_tuning_record(checkpoint_dir: Optional[str]) -> Optional[Dict[str, Any]]:
  """The `TUNING_RECORD` of a checkpointed run, or None (no directory, or an untuned run)."""
  path = os.path.join(checkpoint_dir, TUNING_RECORD) if checkpoint_dir else None
  if path is None or not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise ConfigError(f"The tuning record {path} is unreadable ({error}). Remove it to tune "
                      "again (a resumed run then may choose other values, which its run record "
                      "refuses), or use a new --checkpoint_dir.") from None


def _tuning_record_of(config: TrainConfig, checkpoint_dir: str) -> Optional[Dict[str, Any]]:
  """The run's tuning record, if the run was tuned on public data and trained with what it
  chose (a stray file from another run is not this run's record)."""
  record = read_tuning_record(checkpoint_dir)
  if (record is None or config.tune != train_config.TUNE_PUBLIC
      or any(getattr(config, name) != value for name, value in record["chosen"].items())):
    return None
  return record


def _tune(config: TrainConfig, splits):
  """(config with the chosen values, the tuning record or None). A checkpointed run records
  the choice in its directory; its resumption reuses it (another choice would not match its
  checkpoints, and the noise of the simulated runs can change the choice)."""
  if config.tune == train_config.TUNE_NONE:
    return config, None
  record = read_tuning_record(config.checkpoint_dir)
  if record is None:
    if config.verbose:
      print("tfdp-train: --tune=public: simulating the run on public data for each candidate "
            "(no private example is read)...")
    record = tune_on_public(config, splits).record()  # `train` writes it once the run is checked
  return dataclasses.replace(config, **record["chosen"]), record


def plan_for_size(config: TrainConfig, num_private: int):
  """(`plan_privacy`, the expected batch) of a run on `num_private` private examples, from the
  size alone: the sampler's accounting depends on it only, so a placeholder of that many empty
  rows stands in for the private part."""
  placeholder = (np.zeros((num_private, 0), np.float32), np.zeros((num_private,), np.int32))
  sampler = make_sampler(config, placeholder)
  return plan_privacy(config, sampler), sampler.expected_batch_size


def simulate_on_public(config: TrainConfig, train_part, validation,
                       simulation: tuning.Simulation) -> float:
  """One simulated run (tuning): `train`'s procedure (public pre-training, masks, the DP
  optimizer, the sampling) on public `train_part` with `simulation`'s batch, sigma and steps;
  returns the accuracy on public `validation`. Public data only: no budget, checkpoint, EMA or
  export."""
  config = dataclasses.replace(config, batch_size=simulation.batch_size,
                               physical_batch_size=None, checkpoint_dir=None,
                               carry_spend_from=None, verbose=0)
  sampler = make_sampler(config, train_part)
  model = compile_model(config, np.shape(train_part[0])[1:], simulation.num_classes,
                        simulation.noise_multiplier, sampler.expected_batch_size)
  if config.public_epochs:
    freezing.pretrain_on_public_data(model, train_part, config.public_epochs,
                                     config.public_learning_rate, batch_size=64)
  callbacks = [StopAfterSteps(simulation.steps)]
  mask_callback = make_mask_callback(config, train_part)
  if mask_callback is not None:
    callbacks.insert(0, mask_callback)
  _fit(model, config, sampler, simulation.steps, 0, callbacks)
  results = model.evaluate(*validation, batch_size=256, verbose=0, return_dict=True)
  return float(results["accuracy"])


# ---- a carried spend (--carry_spend_from) -------------------------------------------------------

def read_carried_spend(config: TrainConfig, plan: _Plan,
                       info: data_lib.DataInfo) -> Optional[carried_spend.CarriedSpend]:
  """The old run's spend named by --carry_spend_from (None without it), checked to be of this
  run's mechanism on its private data (`carried_spend.read`). The old run's record comes from
  its run.json, else from its newest checkpoint (damaged checkpoints are why one carries)."""
  if config.carry_spend_from is None:
    return None
  old = config.carry_spend_from
  if not os.path.isdir(old):
    raise ConfigError(f"Expected --carry_spend_from to be the checkpoint directory of an earlier "
                      f"run. Received: --carry_spend_from={old}, which is not a directory.")
  record = None
  try:
    record = run_record_lib.read_run_record(old)
  except ConfigError:
    try:
      newest = checkpointing.latest_checkpoint(old)
      record = None if newest is None else newest.metadata.get("run_record")
    except checkpointing.CheckpointError:
      pass
  return carried_spend.read(old, record, plan.spec, json.loads(json.dumps(info.to_dict())))


def _check_room_left(budget, carried) -> None:
  """A carried spend that already reaches the target epsilon leaves no step to train."""
  if carried is None or budget.target_epsilon is None:
    return
  if carried.steps >= budget.max_steps:
    raise ConfigError(
        f"Expected room for training within --epsilon={budget.target_epsilon}. Received: "
        f"--carry_spend_from={os.path.dirname(carried.source['path'])} carries {carried.steps} "
        f"logical steps, and this target allows {budget.max_steps} in all. Nothing more may be "
        "trained on this data at this target.")


# ---- internals ----------------------------------------------------------------------------------

def check_export_target(config):
  """Every output path is usable, checked before any data is read (an unusable one found after
  training would lose the model): `--export_dir` and `--checkpoint_dir` are directories, or can
  be created, and can be written to; an explicit export version that exists is refused unless
  `--overwrite`. Nothing is created here (the probe that tests writability removes itself)."""
  for flag in ("checkpoint_dir", "export_dir"):
    path = getattr(config, flag)
    if path:
      check_output_dir(f"--{flag}", path)
  if config.export_dir and config.export_version is not None and not config.overwrite:
    target = os.path.join(config.export_dir, str(config.export_version))
    if os.path.exists(target):
      raise ConfigError(f"--export_dir={config.export_dir} already holds version "
                        f"{config.export_version}. Pass --overwrite to replace it, or another "
                        "--export_version.")


def check_output_dir(flag: str, path: str) -> None:
  """Raises ConfigError unless `path` is a writable directory or can be created as one (its
  nearest existing ancestor is a writable directory). `flag` names the setting in the error."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"Expected {flag} to be a directory. Received: {flag}={path}, which is a "
                      "file. Pass a directory path (it is created if missing).")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"Expected {flag} to be a directory that can be created. Received: "
                      f"{flag}={path}, under {existing}, which is a file. Pass a path under a "
                      "directory.")
  try:  # os.access is not enough: root ignores modes, and a read-only mount is not a mode
    os.rmdir(tempfile.mkdtemp(prefix=".tfdp_write_probe_", dir=existing))
  except OSError as error:
    where = "" if existing == path else f" (its nearest existing parent {existing})"
    raise ConfigError(f"Expected {flag} to be writable. Received: {flag}={path}{where}, which "
                      f"cannot be written to ({error.strerror}). Pass a writable path, or fix "
                      "its permissions.") from None


@contextlib.contextmanager
def _overlap_refused(parts: str, remedy_source: str):
  """Re-raises an `overlap.OverlapError` from the block with train()'s message: `parts` must
  be disjoint, remove the examples from `remedy_source`."""
  try:
    yield
  except overlap.OverlapError as error:
    raise overlap.OverlapError(
        f"{error.found} Expected {parts} to be disjoint (masks are chosen from public data at "
        "no privacy cost); train() never allows an overlap. Remove these examples from "
        f"{remedy_source}.", error.found) from None


def _check_given_splits(splits):
  """`data.check_splits` (as load_data checks); train() has no allow_overlap switch."""
  with _overlap_refused("splits.public and splits.private", "splits.public"):
    data_lib.check_splits(splits)


def _check_callback_public_data(callbacks, private):
  """A mask callback given to train() with its own public data (e.g. ParameterFreezing(
  public_data=...)) gets the public part's checks: finite, non-empty, the private inputs'
  shape, and disjoint from the private part."""
  for callback in callbacks:
    public = getattr(callback, "public_data", None)
    if not isinstance(callback, _mask_callback.MaskCallback) or public is None:
      continue
    name = f"{type(callback).__name__}(public_data=...)"
    public_data_lib.check(public, np.shape(private[0])[1:], source=name)
    with _overlap_refused(f"the public_data of {name} and the private part",
                          "its public_data"):
      overlap.check_disjoint(public, private)


def _check_model_and_data(config, input_shape):
  rank = len(input_shape)
  if config.model == "mlp" and rank != 1:
    raise ConfigError(f"--model=mlp takes vector inputs; --dataset={config.dataset} has inputs "
                      f"of shape {tuple(input_shape)}. Use --model=mnist_cnn or wrn<d>_<w>.")
  if config.model != "mlp" and rank != 3:
    raise ConfigError(f"--model={config.model} takes images (height, width, channels); "
                      f"--dataset={config.dataset} has inputs of shape {tuple(input_shape)}. "
                      "Use --model=mlp.")
  if config.augmult > 1 and rank != 3:
    raise ConfigError(f"--augmult={config.augmult} augments images; --dataset={config.dataset} "
                      f"has inputs of shape {tuple(input_shape)}. Use --augmult=0.")


def _fit(model, config, sampler, steps, start, callbacks):
  dataset = sampler.dataset(start_step=start)
  if config.augmult > 1:
    dataset = dataset.map(augmult.augmult_map(config.augmult, seed=config.seed))
  per_epoch = sampler.steps_per_epoch  # logical
  epochs = -(-steps // per_epoch)
  history = model.fit(dataset, epochs=epochs, initial_epoch=start // per_epoch,
                      steps_per_epoch=per_epoch * sampler.gradient_accumulation_steps,
                      callbacks=callbacks, verbose=config.verbose)
  return history.history


def _evaluate_and_export(config, model, ema, splits, metadata, validation, public_only):
  """The public-only comparison (recorded in the metadata), the test accuracies of the DP model
  (its EMA weights when the run kept an average) and of the public-only model, and the export of
  the model the comparison chose. Returns ((DP, public-only test accuracy), export path,
  metadata)."""
  with _dp_weights(model, ema):
    dp_accuracy = None if validation is None else public_guard.accuracy(model, validation)
    test_accuracy = _test_accuracy(model, splits)
  guard = compare_with_public_only(config, model, validation, public_only, dp_accuracy)
  public_only_test_accuracy = None
  if guard is not None:
    metadata = dataclasses.replace(metadata, public_guard=guard)
    if guard["compared"]:
      with public_guard.weights_of(model, public_only):
        public_only_test_accuracy = _test_accuracy(model, splits)
  export_path = None
  if config.export_dir:
    # Either model carries the run's epsilon and delta: the choice read only public data and the
    # DP model, so it is post-processing of the DP release (it is not free of it).
    chosen = (public_guard.weights_of(model, public_only)
              if guard is not None and guard["exported"] == public_guard.PUBLIC_ONLY
              else _dp_weights(model, ema))
    with chosen:
      # No rows of any split in the warmup requests: they are synthetic (zeros of the input).
      export_path = export_lib.export_saved_model(
          model, config.export_dir, metadata, version=config.export_version,
          overwrite=config.overwrite)
  return (test_accuracy, public_only_test_accuracy), export_path, metadata


def _test_accuracy(model, splits) -> Optional[float]:
  if splits.test is None or not len(splits.test[1]):
    return None
  results = model.evaluate(*splits.test, batch_size=256, verbose=0, return_dict=True)
  return float(results["accuracy"])


def _dp_weights(model, ema):
  """The DP model's weights inside the block: the EMA average when the run kept one."""
  if ema is not None and ema.num_updates > 0:
    return ema.averaged_weights()
  return contextlib.nullcontext(model)
