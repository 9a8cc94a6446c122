"""The training entry point: one `TrainConfig` -> data -> DP model -> fit -> checkpoint -> export.

`train(config)` composes the library, in this order:
  1. `data.load`: public, private and test parts (disjointness checked there; splits passed in
     are checked the same way by `data.check_splits`);
  2. the sampler (Poisson or shuffle) over the private part, the logical steps, and the noise
     multiplier (given, or calibrated to the target epsilon for those steps and that sampling);
  3. under the tf.distribute strategy: the model, the DP optimizer (expected batch size from the
     sampler, accumulation = batch_size / physical_batch_size), `make_private`;
  4. resume: with `checkpoint_dir`, the run's record (`run.json`) is written or checked against
     the config, and the newest checkpoint is restored (weights, optimizer, masks, RNG, ledger);
  5. public pre-training (non-private, public part only) and the mask callback, both only for a
     fresh run (a resumed run has its masks and pre-trained weights in the checkpoint);
  6. `model.fit` with PrivacyBudget (stops before the target epsilon is exceeded), EMA,
     DPCheckpoint, and a stop after the planned number of logical steps;
  7. test accuracy (with the EMA weights when EMA is on), the privacy metadata, the export
     (its TF Serving warmup requests are synthetic: no row of any split leaves in them).

The training loss and metrics in fit's logs and History are computed on private batches without
noise, and the test accuracy on the test split: neither is covered by the guarantee. No callback
installed here reads them (the budget, EMA, checkpoints, the stop and the masks act on the
optimizer's step count, the weights and public data only).

`export_checkpoint(checkpoint_dir, export_dir)` exports the newest checkpoint of a run later, with
the same metadata, without the data. `run(config_name, **overrides)` is what `tfdp-train` calls.
"""

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
from absl import logging

from tfdp_prune import accounting
from tfdp_prune import augmult
from tfdp_prune import budget as budget_lib
from tfdp_prune import checkpointing
from tfdp_prune import data as data_lib
from tfdp_prune import ema as ema_lib
from tfdp_prune import freezing
from tfdp_prune import masks as masks_lib
from tfdp_prune import metadata as metadata_lib
from tfdp_prune import models
from tfdp_prune import optimizer as optimizer_lib
from tfdp_prune import overlap
from tfdp_prune import sampling
from tfdp_prune import selection
from tfdp_prune import train_config
from tfdp_prune import train_step
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune.export import saved_model as export_lib
from tfdp_prune.maskable import MaskableSpec
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig

RUN_RECORD = "run.json"
_RUN_RECORD_VERSION = 1
# Settings that may change between a run and its resumption: output and placement, and the
# length (a longer run under the same noise multiplier; with a target epsilon another length
# calibrates another sigma, and the privacy_spec check refuses it).
_RESUMABLE_CHANGES = ("checkpoint_dir", "export_dir", "export_version", "overwrite", "verbose",
                      "strategy", "data_dir", "steps", "epochs")
_RULES = {"magnitude": masks_lib.MagnitudeRule, "random": masks_lib.RandomRule,
          "public_gradient": masks_lib.PublicGradientRule}


@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
  """What `train` produced: the trained model (raw weights, not EMA), its privacy metadata, the
  fit history, test accuracy (None without a test part), the export's version directory (None
  without export_dir) and the logical step the run resumed from (None for a fresh run)."""

  model: Any
  metadata: metadata_lib.PrivacyMetadata
  history: Dict[str, list]
  test_accuracy: Optional[float]
  export_path: Optional[str]
  resumed_from: Optional[int]


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
    splits: data already loaded (e.g. in tests); None loads `config.dataset`. Given splits go
      through the checks `load_data` runs (`data.check_splits`: public and private disjoint,
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
  if splits is None:
    splits = load_data(config)  # checked there
  else:
    data_lib.check_splits(splits)  # as load_data checks: tfdp-train never allows an overlap
  info = splits.info
  _check_model_and_data(config, info.input_shape)
  sampler = make_sampler(config, splits.private)
  plan = plan_privacy(config, sampler)
  strategy = make_strategy(config.strategy)
  with strategy.scope():
    model = compile_model(config, info.input_shape, info.num_classes, plan.noise_multiplier,
                          sampler.expected_batch_size)
  budget = budget_lib.PrivacyBudget(plan.spec, target_epsilon=config.epsilon,
                                    num_examples=info.num_private)
  ema = ema_lib.ExponentialMovingAverage(config.ema_decay) if config.ema_decay else None
  if ema is not None:
    ema.build(model)
  trackables = {"ema": ema.state} if ema is not None else None
  resumed_from = None
  if config.checkpoint_dir:
    write_or_check_run_record(config, info, plan, sampler)
    resumed_from = checkpointing.restore_latest(config.checkpoint_dir, model, budget=budget,
                                                sampler=sampler, trackables=trackables)
  fit_callbacks = []
  if resumed_from is None:
    if config.public_epochs:
      freezing.pretrain_on_public_data(model, splits.public, config.public_epochs,
                                       config.public_learning_rate, batch_size=64)
    mask_callback = make_mask_callback(config, splits.public)
    if mask_callback is not None:
      fit_callbacks.append(mask_callback)
  elif config.mode == "select":  # re-selection continues on the restored weights
    fit_callbacks.append(make_mask_callback(config, splits.public))
  fit_callbacks.append(budget)
  if ema is not None:
    fit_callbacks.append(ema)
  fit_callbacks.append(StopAfterSteps(plan.steps))
  if config.checkpoint_dir:
    fit_callbacks.append(checkpointing.DPCheckpoint(
        config.checkpoint_dir, every_epoch=True, budget=budget, sampler=sampler,
        trackables=trackables))
  fit_callbacks.extend(callbacks)
  start = resumed_from or 0
  history = {}
  if start < plan.steps:
    history = _fit(model, config, sampler, plan.steps, start, fit_callbacks)
  elif config.verbose:
    print(f"tfdp-train: the checkpoint is already at step {start} of {plan.steps}; nothing to "
          "train.")
  metadata = build_metadata(config, budget.ledger.spec.with_steps(budget.steps), info,
                            model, sampler.expected_batch_size)
  test_accuracy, export_path = _evaluate_and_export(config, model, ema, splits, metadata)
  if config.verbose:
    print(summary(metadata, test_accuracy, export_path))
  return TrainResult(model=model, metadata=metadata, history=history,
                     test_accuracy=test_accuracy, export_path=export_path,
                     resumed_from=resumed_from)


def export_checkpoint(checkpoint_dir: str, export_dir: str, *, version: Optional[int] = None,
                      overwrite: bool = False, use_ema: bool = True) -> str:
  """Exports the newest complete checkpoint of a `tfdp-train --checkpoint_dir` run.

  The model is rebuilt from the run's record (`run.json`), its weights, masks and ledger are
  restored, and the metadata says what that checkpoint's steps cost. `use_ema` exports the EMA
  weights when the run kept them. Returns the export's version directory.
  """
  record = read_run_record(checkpoint_dir)
  config = TrainConfig.from_dict(record["config"])
  info = _info_from_dict(record["data_info"])
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
    raise ValueError(f"Expected a complete checkpoint in {checkpoint_dir}. Received a directory "
                     "without one (the run saved none yet).")
  metadata = build_metadata(config, budget.ledger.spec.with_steps(budget.steps), info, model,
                            record["expected_batch_size"])
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
                         data_dir=config.data_dir)
  except data_lib.DatasetNotAvailableError as error:
    flags = f"--dataset={config.dataset!r}"
    if config.public_dataset is not None:
      flags += f" / --public_dataset={config.public_dataset!r}"
    raise ConfigError(f"{flags}: {error}") from None


def make_sampler(config: TrainConfig, private) -> sampling._Sampler:
  """Poisson (q = batch_size / n) or shuffled batches over the private part."""
  num_examples = len(private[1])
  if config.batch_size > num_examples:
    raise ConfigError(f"Expected --batch_size <= the {num_examples} private examples. Received: "
                      f"--batch_size={config.batch_size}.")
  if config.sampling == "poisson":
    return sampling.PoissonSampler(private, config.batch_size / num_examples, seed=config.seed,
                                   gradient_accumulation_steps=config.gradient_accumulation_steps)
  return sampling.ShuffleSampler(private, config.batch_size, seed=config.seed,
                                 gradient_accumulation_steps=config.gradient_accumulation_steps)


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
  """The model with its DP optimizer, compiled and made private (call under the strategy)."""
  keras.utils.set_random_seed(config.seed)
  model = build_model(config, input_shape, num_classes)
  common = dict(l2_norm_clip=config.l2_norm_clip, noise_multiplier=noise_multiplier,
                learning_rate=config.learning_rate, seed=config.seed,
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


def make_mask_callback(config: TrainConfig, public):
  """ParameterFreezing (mode freeze) or ParameterSelection (mode select), or None."""
  if config.mode == "none":
    return None
  rule_class = _RULES[config.effective_rule]
  kwargs = {"seed": config.seed} if rule_class is masks_lib.RandomRule else {}
  rule = rule_class(config.effective_sparsity, **kwargs)
  if config.mode == "freeze":
    return freezing.ParameterFreezing(rule, public_data=public, frozen_value="zero")
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


def mask_summary(model, optimizer) -> Dict[str, Any]:
  """Frozen fraction of all trainable coordinates, and of each maskable variable, from the
  optimizer's current masks."""
  variables = MaskableSpec().variables(model)
  overall, per_variable = masks_lib.frozen_fractions(
      model, variables, [m.numpy() for m in optimizer.update_masks(variables)])
  return {"mask_sparsity": overall, "mask_sparsity_per_variable": per_variable}


def build_metadata(config: TrainConfig, spec: accounting.PrivacySpec, info: data_lib.DataInfo,
                   model, expected_batch_size: float) -> metadata_lib.PrivacyMetadata:
  """The run's `PrivacyMetadata` (one schema for training and export)."""
  epsilon = spec.epsilon()
  private = spec.noise_multiplier > 0 and math.isfinite(epsilon)
  masks = mask_summary(model, model.optimizer)
  rule = None
  if config.mode != "none":
    rule = {"name": config.effective_rule, "sparsity": config.effective_sparsity,
            "select_every": config.effective_select_every}
  return metadata_lib.PrivacyMetadata(
      private=private, epsilon=epsilon if private else math.inf, delta=spec.delta,
      accountant=spec.accountant,
      statement=spec.statement() if private else
      f"NON-PRIVATE: noise multiplier {spec.noise_multiplier}, no privacy guarantee.",
      privacy_spec=spec.to_dict(), noise_multiplier=spec.noise_multiplier,
      l2_norm_clip=config.l2_norm_clip, sampling=spec.sampling,
      sampling_probability=spec.sampling_probability, batch_size=float(expected_batch_size),
      steps=spec.steps, epochs=spec.steps * expected_batch_size / info.num_private,
      dataset=info.dataset, public_dataset=info.public_dataset, public_split=info.public_split,
      private_split=info.private_split, num_private_examples=info.num_private,
      num_public_examples=info.num_public, num_test_examples=info.num_test,
      public_fingerprint=info.public_fingerprint.to_dict(), mask_mode=config.mode,
      mask_rule=rule, mask_sparsity=masks["mask_sparsity"],
      mask_sparsity_per_variable=masks["mask_sparsity_per_variable"], seed=config.seed,
      library_versions=metadata_lib.library_versions(), created=metadata_lib.utc_now())


def summary(metadata: metadata_lib.PrivacyMetadata, test_accuracy: Optional[float],
            export_path: Optional[str]) -> str:
  """The lines `tfdp-train` prints at the end."""
  if metadata.private:
    privacy = f"epsilon = {metadata.epsilon:.4g}, delta = {metadata.delta:g}"
  else:
    privacy = "NON-PRIVATE (epsilon = inf)"
  lines = [f"privacy: {privacy} after {metadata.steps} logical steps ({metadata.accountant}, "
           f"{metadata.sampling} sampling)",
           f"test accuracy: {'n/a' if test_accuracy is None else f'{test_accuracy:.4f}'}"]
  if export_path:
    lines.append(f"exported: {export_path}")
  return "\n".join(lines)


# ---- run record (checkpoint_dir/run.json) ------------------------------------------------------

def write_or_check_run_record(config: TrainConfig, info: data_lib.DataInfo, plan: _Plan,
                              sampler) -> None:
  """Writes the run's record into the checkpoint directory, or checks that an existing one
  describes the same run (a checkpoint resumed under other settings would misreport privacy)."""
  record = {"format_version": _RUN_RECORD_VERSION, "config": config.to_dict(),
            "data_info": info.to_dict(), "privacy_spec": plan.spec.to_dict(),
            "planned_steps": plan.steps, "expected_batch_size": sampler.expected_batch_size}
  path = os.path.join(config.checkpoint_dir, RUN_RECORD)
  if os.path.exists(path):
    existing = read_run_record(config.checkpoint_dir)
    differences = _record_differences(existing, record)
    if differences:
      raise ConfigError(
          f"--checkpoint_dir={config.checkpoint_dir} holds a run with other settings "
          f"({'; '.join(differences)}). Resume with the same settings, or use a new "
          "--checkpoint_dir.")
    return
  os.makedirs(config.checkpoint_dir, exist_ok=True)
  checkpointing.replace_file(path, json.dumps(record, indent=1, sort_keys=True))


def read_run_record(checkpoint_dir: str) -> Dict[str, Any]:
  path = os.path.join(checkpoint_dir, RUN_RECORD)
  if not os.path.isfile(path):
    raise ValueError(f"Expected {path} (written by tfdp-train --checkpoint_dir). Received a "
                     "directory without it: was this directory written by tfdp-train?")
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  if record.get("format_version") != _RUN_RECORD_VERSION:
    raise ValueError(f"Expected {path} with format_version={_RUN_RECORD_VERSION}. Received: "
                     f"{record.get('format_version')!r}.")
  return record


def _record_differences(existing, new) -> list:
  differences = []
  old_config, new_config = existing["config"], new["config"]
  for name in sorted(set(old_config) | set(new_config)):
    if name not in _RESUMABLE_CHANGES and old_config.get(name) != new_config.get(name):
      differences.append(f"--{name}: {old_config.get(name)!r} there, {new_config.get(name)!r} now")
  for name in ("data_info", "privacy_spec", "expected_batch_size"):
    if existing[name] != new[name]:
      differences.append(f"{name} differs")
  return differences


def _info_from_dict(data: Dict[str, Any]) -> data_lib.DataInfo:
  return data_lib.DataInfo(**dict(
      data, input_shape=tuple(data["input_shape"]),
      public_fingerprint=overlap.PublicDataFingerprint.from_dict(data["public_fingerprint"])))


# ---- internals ----------------------------------------------------------------------------------

def check_export_target(config):
  """An explicit export version that exists is refused now, not after hours of training."""
  if config.export_dir and config.export_version is not None and not config.overwrite:
    target = os.path.join(config.export_dir, str(config.export_version))
    if os.path.exists(target):
      raise ConfigError(f"--export_dir={config.export_dir} already holds version "
                        f"{config.export_version}. Pass --overwrite to replace it, or another "
                        "--export_version.")


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


def _evaluate_and_export(config, model, ema, splits, metadata):
  """Test accuracy and the export, with the EMA weights when the run kept an average."""
  averaged = (ema.averaged_weights() if ema is not None and ema.num_updates > 0
              else contextlib.nullcontext())
  with averaged:
    accuracy = None
    if splits.test is not None and len(splits.test[1]):
      results = model.evaluate(*splits.test, batch_size=256, verbose=0, return_dict=True)
      accuracy = float(results["accuracy"])
    export_path = None
    if config.export_dir:
      # No rows of any split in the warmup requests: they are synthetic (zeros of the input).
      export_path = export_lib.export_saved_model(
          model, config.export_dir, metadata, version=config.export_version,
          overwrite=config.overwrite)
  return accuracy, export_path
