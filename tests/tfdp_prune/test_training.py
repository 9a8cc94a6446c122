"""The training entry point: config -> data -> DP fit -> checkpoint -> metadata -> export."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfdp_prune
from tfdp_prune import accounting
from tfdp_prune import data as data_lib
from tfdp_prune import freezing
from tfdp_prune import randomness
from tfdp_prune import run_record
from tfdp_prune import sampling
from tfdp_prune import train_config
from tfdp_prune import training
from tfdp_prune.compat import keras
from tfdp_prune.compat import tf
from tfdp_prune import export as export_lib
from tfdp_prune.export import serving_files
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig
from tests.tfdp_prune._testing import fake_tfds_as_dataset
from tests.tfdp_prune._testing import write_image_folder

# A short run: digits, public pre-training, freeze 80%, Poisson. RDP accounting: PLD (the
# default) costs seconds per calibration or epsilon and is the subject only of `short_run` (the
# default path) and of the PLD planning test below.
SHORT = dict(steps=6, epochs=None, public_epochs=1, verbose=0, accountant="rdp")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """The default path, shortened: PLD accounting, as tfdp-train without flags."""
  export_dir = str(tmp_path_factory.mktemp("export"))
  return training.train(TrainConfig(**dict(SHORT, accountant="pld"), epsilon=4.0,
                                    export_dir=export_dir))


def test_short_run_spends_what_it_reports(short_run):
  metadata = short_run.metadata
  model = short_run.model
  assert int(model.optimizer.iterations.numpy()) == 6 == metadata.steps
  assert metadata.private and metadata.epsilon <= 4.0
  # The epsilon is dp_accounting's for the sampling actually done (Poisson, q = 100 / n).
  spec = accounting.PrivacySpec(noise_multiplier=model.optimizer.noise_multiplier, steps=6,
                                delta=1e-5, sampling_probability=100 / 1258)
  assert metadata.epsilon == pytest.approx(spec.epsilon(), abs=1e-9)
  # delta is that of the guarantee: the sampler's overflow term (its cap) included.
  p = metadata.privacy_spec["overflow_probability"]
  assert 0 < p < 1e-15
  assert metadata.delta == pytest.approx(1e-5 + (1 + math.exp(metadata.epsilon)) * 6 * p,
                                         rel=1e-12, abs=0)
  assert metadata.delta > 1e-5
  assert metadata.sampling_probability == pytest.approx(100 / 1258)
  assert metadata.noise_multiplier == model.optimizer.noise_multiplier
  assert metadata.num_private_examples == 1258 and metadata.num_public_examples == 180


def test_short_run_freezes_eighty_percent_and_keeps_them_zero(short_run):
  model = short_run.model
  per_variable = short_run.metadata.mask_sparsity_per_variable
  assert sorted(per_variable) == sorted(v.name.split(":")[0] for v in model.trainable_variables
                                         if "kernel" in v.name)
  for variable in model.trainable_variables:
    if "kernel" in variable.name:
      mask = model.optimizer.update_masks([variable])[0].numpy()
      assert per_variable[variable.name.split(":")[0]] == pytest.approx(0.8, abs=1e-3)
      assert np.all(variable.numpy()[mask == 0] == 0)  # frozen at zero through every step


def test_short_run_exports_its_metadata(short_run):
  assert short_run.export_path.endswith(os.sep + "1")
  assert export_lib.read_metadata(short_run.export_path) == short_run.metadata
  assert short_run.test_accuracy is not None and 0 <= short_run.test_accuracy <= 1


def _train_keeping_the_pretrained_weights(monkeypatch, **settings):
  """A freeze run, with the weights right after its public pre-training."""
  pretrained = {}
  real = freezing.pretrain_on_public_data

  def pretrain(model, *args, **kwargs):
    real(model, *args, **kwargs)
    pretrained.update({v.name: v.numpy() for v in model.trainable_variables})

  monkeypatch.setattr(freezing, "pretrain_on_public_data", pretrain)
  result = training.train(TrainConfig(**dict(SHORT, mode="freeze", export_dir=None,
                                             noise_multiplier=1.0, epsilon=None), **settings))
  return result, pretrained


@pytest.mark.parametrize("frozen_value", ["keep", "zero"])
def test_frozen_value_keeps_the_pretrained_values_or_zeros_them(frozen_value, monkeypatch):
  result, pretrained = _train_keeping_the_pretrained_weights(monkeypatch,
                                                             frozen_value=frozen_value)
  model = result.model
  assert result.metadata.mask_rule["frozen_value"] == frozen_value
  kernels = [v for v in model.trainable_variables if "kernel" in v.name]
  for variable in kernels:
    mask = model.optimizer.update_masks([variable])[0].numpy()
    frozen, before = variable.numpy()[mask == 0], pretrained[variable.name][mask == 0]
    assert frozen.size and np.any(before != 0)
    expected = before if frozen_value == "keep" else np.zeros_like(before)
    np.testing.assert_array_equal(frozen, expected)  # bit-exact through every DP step
    assert np.any(variable.numpy()[mask > 0] != pretrained[variable.name][mask > 0])


def test_frozen_value_applies_to_mode_freeze_only():
  with pytest.raises(ConfigError, match="--frozen_value applies to --mode=freeze only"):
    TrainConfig(mode="select", frozen_value="keep")
  with pytest.raises(ConfigError, match="--frozen_value has no effect with --mode=none"):
    TrainConfig(mode="none", frozen_value="keep")
  assert TrainConfig().effective_frozen_value == "zero"
  assert TrainConfig(mode="select").effective_frozen_value is None
  assert train_config.resolve("default", dict(frozen_value="keep")).effective_frozen_value == "keep"


def test_short_run_exports_synthetic_warmup_requests_and_says_so(short_run):
  """The export's TF Serving warmup requests hold no row of any split: synthetic zeros of the
  input shape, as the model card says."""
  logs = serving_files.read_warmup_file(
      os.path.join(short_run.export_path, "assets.extra", "tf_serving_warmup_requests"))
  requests = [log.predict_log.request for log in logs]
  batches = [tf.make_ndarray(r.inputs["inputs"]) for r in requests
             if r.model_spec.signature_name == "serving_default"]
  synthetic = serving_files.synthetic_warmup_batches((64,))
  assert len(batches) == len(synthetic)
  for batch, expected in zip(batches, synthetic):
    np.testing.assert_array_equal(batch, expected)
  splits = training.load_data(TrainConfig(**SHORT))
  data_rows = {row.tobytes() for part in (splits.private, splits.test, splits.public)
               for row in part[0]}
  assert not [row for batch in batches for row in batch if row.tobytes() in data_rows]
  with open(os.path.join(short_run.export_path, "model_card.md"), encoding="utf-8") as f:
    card = f.read()
  assert "Warmup inputs: **synthetic**." in card
  assert "training loss and metrics" in card and "not covered" in card


def test_splits_passed_in_are_refused_when_they_overlap_as_the_load_path_refuses_them(
    monkeypatch):
  overlapping = dict(public_split="train[:10%]", private_split="train[9%:]")
  monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("fit must not run"))
  config = TrainConfig(**SHORT, **overlapping, export_dir=None)
  with pytest.raises(ConfigError, match=r"18 private example\(s\)") as loaded:
    training.train(config)  # the load path: the fix is a flag
  assert "--public_split" in str(loaded.value)
  splits = data_lib.load(**overlapping, allow_overlap=True)  # loaded elsewhere, allowed there
  with pytest.raises(data_lib.OverlapError, match=r"18 private example\(s\)") as passed:
    training.train(config, splits=splits)
  assert "splits.public" in str(passed.value)
  # train() has no allow_overlap: neither message may suggest it.
  assert "allow_overlap" not in str(loaded.value) + str(passed.value)


def test_non_finite_or_empty_public_data_is_refused_before_any_training(monkeypatch):
  monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("fit must not run"))
  config = TrainConfig(**SHORT, export_dir=None)
  splits = data_lib.load()
  x = splits.public[0].copy()
  x[3, 5] = np.nan
  x[7, 0] = np.inf
  nan_public = data_lib.DataSplits(public=(x, splits.public[1]), private=splits.private,
                                   test=splits.test, info=splits.info)
  with pytest.raises(data_lib.DataError, match="2 of the 180 examples.*NaN or inf"):
    training.train(config, splits=nan_public)
  with pytest.raises(ConfigError, match="non-empty public part.*--public_split"):
    training.train(TrainConfig(**SHORT, export_dir=None, public_split="train[:0%]"))
  with pytest.raises(ConfigError, match="non-empty private part.*--private_split"):
    training.train(TrainConfig(**SHORT, export_dir=None, private_split="train[:0%]"))


def test_a_mask_callback_with_its_own_public_data_gets_the_public_checks(monkeypatch):
  monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("fit must not run"))
  monkeypatch.setattr(training.freezing, "pretrain_on_public_data",
                      lambda *a, **k: pytest.fail("pre-training must not run"))
  config = TrainConfig(**dict(SHORT, public_epochs=0), export_dir=None, mode="none")
  splits = data_lib.load()
  leaked = (np.concatenate([splits.public[0], splits.private[0][:4]]),
            np.concatenate([splits.public[1], splits.private[1][:4]]))
  callback = tfdp_prune.ParameterFreezing(tfdp_prune.PublicGradientRule(0.5), public_data=leaked)
  with pytest.raises(data_lib.OverlapError, match=r"4 private example\(s\).*ParameterFreezing"):
    training.train(config, splits=splits, callbacks=[callback])
  wrong_shape = (splits.public[0][:, :10], splits.public[1])
  callback = tfdp_prune.ParameterFreezing(tfdp_prune.PublicGradientRule(0.5),
                                          public_data=wrong_shape)
  with pytest.raises(data_lib.DataError, match="private inputs' shape"):
    training.train(config, splits=splits, callbacks=[callback])


class _ReadRecordingLogs(dict):
  """Logs that record every key a callback reads (iterating reads them all); writes are free."""

  def __init__(self, logs, reads):
    super().__init__(logs)
    self._reads = reads

  def _all(self):
    self._reads.update(dict.keys(self))

  def __getitem__(self, key):
    self._reads.add(key)
    return super().__getitem__(key)

  def get(self, key, default=None):
    self._reads.add(key)
    return super().get(key, default)

  def __contains__(self, key):
    self._reads.add(key)
    return super().__contains__(key)

  def pop(self, key, *default):
    self._reads.add(key)
    return super().pop(key, *default)

  def setdefault(self, key, default=None):
    self._reads.add(key)
    return super().setdefault(key, default)

  def __iter__(self):
    self._all()
    return super().__iter__()

  def keys(self):
    self._all()
    return super().keys()

  def values(self):
    self._all()
    return super().values()

  def items(self):
    self._all()
    return super().items()

  def copy(self):
    self._all()
    return dict(dict.items(self))


# Keras' training hooks, and whether they take an index (epoch or batch) before the logs.
_HOOKS = {"on_train_begin": False, "on_train_end": False, "on_epoch_begin": True,
          "on_epoch_end": True, "on_train_batch_begin": True, "on_train_batch_end": True}


def _record_log_reads(callback, reads):
  """Makes every training hook of `callback` see recording logs; what it writes goes through."""
  for name, indexed in _HOOKS.items():
    original = getattr(callback, name)

    def hook(*args, logs=None, _original=original, _positional=1 + indexed):
      if len(args) == _positional:  # Keras passes the logs positionally
        *args, logs = args
      recording = None if logs is None else _ReadRecordingLogs(logs, reads)
      _original(*args, logs=recording)
      if recording is not None:
        logs.update(dict.items(recording))

    setattr(callback, name, hook)


@pytest.mark.parametrize("settings", [
    dict(mode="select", ema_decay=0.9),  # ParameterSelection, EMA
    dict(mode="freeze"),                 # ParameterFreezing
])
def test_no_callback_tfdp_train_installs_reads_the_training_loss_or_metrics(
    settings, tmp_path, monkeypatch):
  """The training loss and metrics are computed on private batches without noise: no callback
  that train() installs may act on them. Each installed callback's hooks get logs that record
  every key read; a Keras EarlyStopping on the loss, passed as a user callback, shows that the
  recording sees such a read."""
  reads, installed = {}, []
  fit = training._fit

  def recording_fit(model, config, sampler, steps, start, callbacks):
    for callback in callbacks:
      reads[id(callback)] = set()
      _record_log_reads(callback, reads[id(callback)])
      installed.append(callback)
    return fit(model, config, sampler, steps, start, callbacks)

  monkeypatch.setattr(training, "_fit", recording_fit)
  user = keras.callbacks.EarlyStopping(monitor="loss", patience=1000)
  config = TrainConfig(**dict(SHORT, steps=4), **settings, export_dir=None,
                       checkpoint_dir=str(tmp_path / "ckpt"))  # SHORT's RDP: a cheap budget check
  result = training.train(config, callbacks=[user])
  metrics = set(result.model.metrics_names) | {"loss"}
  assert "loss" in reads[id(user)]  # the recording sees a callback that reads the loss
  ours = [callback for callback in installed if callback is not user]
  names = {type(callback).__name__ for callback in ours}
  assert names >= {"PrivacyBudget", "StopAfterSteps", "DPCheckpoint",
                   "ParameterSelection" if settings["mode"] == "select" else "ParameterFreezing"}
  if "ema_decay" in settings:
    assert "ExponentialMovingAverage" in names
  for callback in ours:
    assert not reads[id(callback)] & metrics, (type(callback).__name__, reads[id(callback)])


# ---- where the mechanism's randomness comes from (DESIGN.md rules 11 and 14) -------------------

# A tiny run: digits, the MLP, no pre-training, no masks, 3 noisy steps, exported.
_TINY = dict(steps=3, epochs=None, public_epochs=0, mode="none", epsilon=None,
             noise_multiplier=1.0, verbose=0, seed=0, accountant="rdp")
_INSECURE_SEED = 8675309


def _export_files(path):
  """{relative name: bytes} of every file of an export version."""
  files = {}
  for directory, _, names in os.walk(path):
    for name in names:
      with open(os.path.join(directory, name), "rb") as f:
        files[os.path.relpath(os.path.join(directory, name), path)] = f.read()
  return files


def _encodings(word):
  """How a 64-bit secret word could be written into a file."""
  signed = word - 2**64 if word >= 2**63 else word
  return [str(word).encode(), str(signed).encode(), f"{word:x}".encode(),
          f"{word:016x}".encode(), word.to_bytes(8, "little"), word.to_bytes(8, "big")]


def test_two_runs_with_identical_settings_draw_other_noise_and_publish_no_secret(tmp_path,
                                                                              monkeypatch):
  drawn = []
  real = randomness.os_entropy_words
  monkeypatch.setattr(randomness, "os_entropy_words",
                      lambda count: drawn.extend(real(count)) or drawn[-count:])
  results = [training.train(TrainConfig(**_TINY, export_dir=str(tmp_path / f"export{i}"),
                                        checkpoint_dir=str(tmp_path / f"ckpt{i}")))
             for i in range(2)]
  # The same seed, data, settings and initialization; other noise and other batches. Two float32
  # weights can still coincide by chance (about 1e-6 per coordinate here): the same noise would
  # make ALL of them equal, so a few equal coordinates pass and more than 1% fail.
  for a, b in zip(results[0].model.get_weights(), results[1].model.get_weights()):
    assert a.shape == b.shape and np.mean(a == b) < 0.01, np.mean(a == b)
  assert len(drawn) >= 2 * (3 + 2)  # per run: the noise state (3 words), the sampler's (2)
  for result in results:
    metadata = result.metadata
    assert metadata.mechanism_randomness == "os_entropy" and not metadata.insecure
    assert metadata.seed == 0 and not metadata.statement.startswith("INSECURE")
    files = _export_files(result.export_path)
    assert {"assets.extra/privacy_metadata.json", "model_card.md"} <= set(files)
    for name, content in files.items():
      for word in drawn:
        for encoding in _encodings(word):
          assert encoding not in content, (name, word)
  # Nor in the checkpoints' JSON files (run.json, the sidecars): only the TF checkpoint holds
  # the secrets (so that a resumed run continues them).
  for i in range(2):
    for directory, _, names in os.walk(tmp_path / f"ckpt{i}"):
      for name in (n for n in names if n.endswith(".json")):
        with open(os.path.join(directory, name), "rb") as f:
          content = f.read()
        assert not any(e in content for w in drawn for e in _encodings(w)), name


# End-to-end, 7-11 s: in the slow set (CI runs it), for a default run under 10 minutes.
@pytest.mark.slow
def test_the_insecure_switch_reproduces_a_run_and_labels_its_export(tmp_path):
  config = dict(_TINY, insecure_mechanism_seed=_INSECURE_SEED)
  with pytest.warns(randomness.InsecureRandomnessWarning):
    results = [training.train(TrainConfig(**config, export_dir=str(tmp_path / f"export{i}")))
               for i in range(2)]
  for a, b in zip(results[0].model.get_weights(), results[1].model.get_weights()):
    np.testing.assert_array_equal(a, b)
  metadata = export_lib.read_metadata(results[0].export_path)
  assert metadata == results[0].metadata
  assert metadata.mechanism_randomness == "insecure_seed" and metadata.insecure
  assert metadata.statement.startswith("INSECURE") and metadata.guarantee.startswith("INSECURE")
  files = _export_files(results[0].export_path)
  card = files["model_card.md"].decode()
  assert card.split("\n\n")[1].startswith("> **INSECURE: reproducible noise and sampling.**")
  # The seed itself (and what it derives) is published nowhere in the export.
  derived = sampling._initial_secret(_INSECURE_SEED)  # pylint: disable=protected-access
  for name, content in files.items():
    assert str(_INSECURE_SEED).encode() not in content, name
    for word in [_INSECURE_SEED] + derived:
      assert not any(e in content for e in _encodings(word)), (name, word)


def test_the_seed_flag_seeds_only_what_is_not_the_mechanism(monkeypatch):
  """--seed reaches the data split, the initialization, the random masks and augmentation;
  the optimizer and the sampler get OS entropy (or --insecure_mechanism_seed) only."""
  config = TrainConfig(**dict(_TINY, seed=5, mode="freeze", rule="random"), export_dir=None)
  optimizer = training.compile_model(config, (64,), 10, 1.0, 10.0).optimizer
  assert optimizer.mechanism_randomness == "os_entropy" and optimizer.insecure_noise_seed is None
  sampler = training.make_sampler(config, (np.zeros((100, 4), "float32"), np.zeros(100, int)))
  assert sampler.mechanism_randomness == "os_entropy"
  assert sampler.get_config()["insecure_sampling_seed"] is None
  assert training.make_mask_callback(config, None).rule.seed == 5
  seeded = TrainConfig(**dict(_TINY, seed=5, insecure_mechanism_seed=9), export_dir=None)
  assert training.compile_model(seeded, (64,), 10, 1.0, 10.0).optimizer.insecure_noise_seed == 9
  assert training.make_sampler(seeded, (np.zeros((100, 4), "float32"), np.zeros(100, int))
                               ).get_config()["insecure_sampling_seed"] == 9


def test_the_summary_shows_the_overflow_term_and_an_insecure_run():
  from tests.export import _export_testing as E  # pylint: disable=g-import-not-at-top
  plain = E.private_metadata()
  assert "delta = 1e-05 after 300 logical steps" in training.summary(plain, 0.9, None)
  assert "mechanism randomness: os_entropy\n" in training.summary(plain, 0.9, None)
  capped = E.private_metadata(delta=1e-5 + 4.8e-10)
  assert "delta = 1e-05 + 4.8e-10 (sampler overflow)" in training.summary(capped, 0.9, None)
  insecure = E.private_metadata(mechanism_randomness="insecure_seed",
                                statement=training.INSECURE_STATEMENT + plain.statement)
  assert "insecure_seed (INSECURE" in training.summary(insecure, 0.9, None)


def test_noise_multiplier_zero_is_labelled_non_private(tmp_path):
  result = training.train(TrainConfig(**dict(SHORT, steps=2), epsilon=None, noise_multiplier=0.0,
                                      mode="none", export_dir=str(tmp_path)))
  assert not result.metadata.private and math.isinf(result.metadata.epsilon)
  stored = json.load(open(os.path.join(result.export_path, "assets.extra",
                                       "privacy_metadata.json")))
  assert stored["private"] is False and stored["epsilon"] == "inf"


def test_calibrated_sigma_meets_the_target_for_the_planned_steps():
  config = TrainConfig(steps=40, epochs=None, epsilon=2.0, delta=1e-5, accountant="rdp")
  sampler = training.make_sampler(config, (np.zeros((1000, 4), "float32"), np.zeros(1000, int)))
  plan = training.plan_privacy(config, sampler)
  assert plan.steps == 40 and plan.spec.steps == 0
  assert plan.spec.with_steps(40).epsilon() <= 2.0
  assert plan.spec.with_steps(40).epsilon() > 1.9  # calibrated, not merely safe


def test_a_run_the_pld_cannot_account_for_fails_at_planning_not_after_training():
  private = (np.zeros((1000, 4), "float32"), np.zeros(1000, int))
  config = TrainConfig(noise_multiplier=0.01, epsilon=None, steps=10, epochs=None)
  with pytest.raises(ConfigError, match="--accountant=rdp"):  # 6e7 points for one step
    training.plan_privacy(config, training.make_sampler(config, private))
  rdp = TrainConfig(noise_multiplier=0.01, epsilon=None, steps=10, epochs=None, accountant="rdp")
  assert training.plan_privacy(rdp, training.make_sampler(rdp, private)).steps == 10


def test_shuffle_sampling_is_accounted_as_shuffle():
  config = TrainConfig(sampling="shuffle", noise_multiplier=1.0, epsilon=None, epochs=2.0)
  sampler = training.make_sampler(config, (np.zeros((1000, 4), "float32"), np.zeros(1000, int)))
  plan = training.plan_privacy(config, sampler)
  assert plan.spec.sampling == "shuffle" and plan.spec.sampling_probability is None
  assert plan.steps == 20


@pytest.mark.parametrize("settings, flag", [
    (dict(dataset="no_such_dataset_xyz"), "--dataset"),
    (dict(model="mnist_cnn"), "--model"),           # digits are vectors
    (dict(augmult=4), "--augmult"),
    (dict(batch_size=5000), "--batch_size"),
])
def test_bad_settings_fail_before_any_training(settings, flag, monkeypatch):
  def no_fit(*args, **kwargs):
    raise AssertionError("fit must not run")
  monkeypatch.setattr(keras.Model, "fit", no_fit)
  with pytest.raises(ConfigError, match=flag):
    training.train(TrainConfig(**SHORT, **settings, export_dir=None))


def test_existing_export_version_is_refused_before_training(tmp_path, monkeypatch):
  os.makedirs(tmp_path / "1")
  monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("fit must not run"))
  with pytest.raises(ConfigError, match="--overwrite"):
    training.train(TrainConfig(**SHORT, export_dir=str(tmp_path), export_version=1))


def test_a_sampler_that_disagrees_with_the_optimizer_fails_before_any_training(monkeypatch):
  # As if the sampler were built for one physical batch per draw while the optimizer
  # accumulates two: each update would sum two draws that the ledger counts as one.
  make_sampler = training.make_sampler
  monkeypatch.setattr(training, "make_sampler", lambda config, private, strategy=None: make_sampler(
      TrainConfig(**dict(config.to_dict(), physical_batch_size=None)), private, strategy))
  monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("fit must not run"))
  with pytest.raises(ValueError, match=r"cuts each draw into 1 physical batch\(es\), the "
                                       "optimizer sums 2"):
    training.train(TrainConfig(**SHORT, physical_batch_size=50, export_dir=None))


def _weights(model):
  return [v.numpy() for v in model.trainable_variables]


# 12 s; resuming's epsilon is in the default run too (test_budget, test_carried_spend).
@pytest.mark.slow
def test_resume_continues_steps_epsilon_and_weights(tmp_path):
  # Seeded (insecure): the uninterrupted run is another train() call, with its own randomness.
  common = dict(SHORT, epsilon=None, noise_multiplier=1.0, export_dir=None,
                insecure_mechanism_seed=3)
  straight = training.train(TrainConfig(**dict(common, steps=8)))
  checkpoints = str(tmp_path / "ckpt")
  first = training.train(TrainConfig(**dict(common, steps=4), checkpoint_dir=checkpoints))
  assert first.resumed_from is None
  resumed = training.train(TrainConfig(**dict(common, steps=8), checkpoint_dir=checkpoints))
  assert resumed.resumed_from == 4
  assert resumed.metadata.steps == 8
  assert resumed.metadata.epsilon == straight.metadata.epsilon
  for a, b in zip(_weights(resumed.model), _weights(straight.model)):
    np.testing.assert_array_equal(a, b)
  # Running the finished job again trains nothing and reports the same guarantee.
  again = training.train(TrainConfig(**dict(common, steps=8), checkpoint_dir=checkpoints))
  assert again.resumed_from == 8 and again.history == {}
  assert again.metadata.steps == 8 and again.metadata.epsilon == straight.metadata.epsilon


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_resume_under_other_settings_is_refused(tmp_path):
  checkpoints = str(tmp_path / "ckpt")
  common = dict(SHORT, epsilon=None, noise_multiplier=1.0, export_dir=None, steps=2,
                checkpoint_dir=checkpoints)
  training.train(TrainConfig(**common))
  with pytest.raises(ConfigError, match="--l2_norm_clip"):
    training.train(TrainConfig(**dict(common, l2_norm_clip=2.0)))
  with pytest.raises(ConfigError, match="privacy_spec"):
    training.train(TrainConfig(**dict(common, noise_multiplier=2.0)))


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_resume_record_damaged_or_removed_run_json_and_spelled_out_defaults(tmp_path):
  checkpoints = str(tmp_path / "ckpt")
  common = dict(SHORT, epsilon=None, noise_multiplier=1.0, export_dir=None,
                checkpoint_dir=checkpoints)
  training.train(TrainConfig(**dict(common, steps=2)))
  run_json = os.path.join(checkpoints, run_record.RUN_RECORD)
  with open(run_json, encoding="utf-8") as f:
    text = f.read()
  with open(run_json, "w", encoding="utf-8") as f:
    f.write(text[:len(text) // 2])  # truncated
  with pytest.raises(ConfigError, match=f"(?s)run record {run_json} is unreadable.*backup"):
    training.train(TrainConfig(**dict(common, steps=3)))
  os.remove(run_json)
  # The checkpoint carries the settings it was trained under: other masks are refused ...
  with pytest.raises(ConfigError, match="checkpoint.json: --sparsity: .* there, 0.5 now"):
    training.train(TrainConfig(**dict(common, steps=3, sparsity=0.5)))
  assert not os.path.exists(run_json)
  # ... the default spelled out is the same setting; run.json is written again.
  resumed = training.train(TrainConfig(**dict(common, steps=3, sparsity=0.8, rule="magnitude")))
  assert resumed.resumed_from == 2 and resumed.metadata.steps == 3
  assert run_record.read_run_record(checkpoints)["config"]["sparsity"] is None  # as first run
  # Exporting reads the settings the checkpoint carries, run.json or not.
  os.remove(run_json)
  path = training.export_checkpoint(checkpoints, str(tmp_path / "export"))
  assert export_lib.read_metadata(path).steps == 3


def _files(directory):
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        found[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return found


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_export_checkpoint_killed_loses_no_checkpoint_ledger_or_earlier_export(tmp_path):
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  checkpoints, exports = str(tmp_path / "ckpt"), str(tmp_path / "export")
  training.train(TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0, export_dir=None,
                             checkpoint_dir=checkpoints))
  first = training.export_checkpoint(checkpoints, exports)
  before, exported = _files(checkpoints), _files(first)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, "-c", "import sys; from tfdp_prune import training; "
       "training.export_checkpoint(sys.argv[1], sys.argv[2])", checkpoints, exports],
      cwd=repo, env=dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2"),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while set(os.listdir(exports)) == {os.path.basename(first)} and proc.poll() is None:
    if time.monotonic() > deadline:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL  # killed while it was writing, not after
  assert _files(checkpoints) == before  # the ledger, run.json and checkpoints: not a byte less
  assert _files(first) == exported  # the earlier export is intact
  second = training.export_checkpoint(checkpoints, exports)  # and exporting works again
  assert export_lib.read_metadata(second).steps == export_lib.read_metadata(first).steps


def test_export_checkpoint_matches_the_trained_model(tmp_path):
  checkpoints = str(tmp_path / "ckpt")
  result = training.train(TrainConfig(**SHORT, epsilon=None, noise_multiplier=1.0,
                                      export_dir=None, checkpoint_dir=checkpoints))
  path = training.export_checkpoint(checkpoints, str(tmp_path / "export"))
  exported = export_lib.read_metadata(path)
  for field in ("epsilon", "steps", "noise_multiplier", "mask_sparsity_per_variable",
                "public_fingerprint", "privacy_spec"):
    assert getattr(exported, field) == getattr(result.metadata, field), field
  x = np.random.default_rng(0).random((5, 64)).astype("float32")
  probabilities = tf.saved_model.load(path).signatures["serving_default"](
      inputs=tf.constant(x))["probabilities"].numpy()
  np.testing.assert_allclose(probabilities, tf.nn.softmax(result.model(x)).numpy(), atol=1e-6)


def test_export_checkpoint_checks_the_export_dir_before_reading_the_checkpoint(tmp_path):
  (tmp_path / "models").write_text("a file")
  with pytest.raises(ConfigError, match="--export_dir to be a directory"):
    training.export_checkpoint(str(tmp_path / "no_run"), str(tmp_path / "models"))


def test_export_checkpoint_without_a_run_record_says_so(tmp_path):
  with pytest.raises(ValueError, match="run.json"):
    training.export_checkpoint(str(tmp_path), str(tmp_path / "export"))


# 20-40 s; fast: test_distribute.py checks the step under MirroredStrategy replica by replica;
# train() under --strategy=mirrored runs only in the slow set (CI).
@pytest.mark.slow
def test_mirrored_two_replicas_train_like_one_device(tmp_path):
  """--strategy=mirrored: public pre-training, the DP steps and the export work with two
  replicas; without noise the weights equal a single-device run's."""
  worker = os.path.join(os.path.dirname(__file__), "_train_worker.py")
  weights, runs = {}, {}
  for strategy in ("default", "mirrored"):  # both at once: separate processes and directories
    (tmp_path / strategy).mkdir()
    runs[strategy] = subprocess.Popen(
        [sys.executable, worker, strategy, str(tmp_path / strategy)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  for strategy, run in runs.items():
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    out = tmp_path / strategy
    assert os.path.isdir(out / "export" / "1")
    with np.load(out / "weights.npz") as arrays:
      weights[strategy] = [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k[4:]))]
  for single, mirrored in zip(weights["default"], weights["mirrored"]):
    np.testing.assert_allclose(mirrored, single, atol=1e-5)


def _run_named_config_on_mock_data(name, tmp_path, **overrides):
  with tfds.testing.mock_data(as_dataset_fn=fake_tfds_as_dataset):
    return training.run(name, verbose=0, export_dir=str(tmp_path), **overrides)


# End-to-end, 7-11 s: in the slow set (CI runs it), for a default run under 10 minutes.
@pytest.mark.slow
def test_mnist_tutorial_config_pipeline_on_mock_data(tmp_path):
  """The TF Privacy tutorial config: its MNIST data path, CNN, dense mode and fixed sigma (mock
  MNIST has 196 private examples, so the batch is smaller than the tutorial's 250)."""
  result = _run_named_config_on_mock_data("mnist_tfp_tutorial", tmp_path, batch_size=49)
  metadata = result.metadata
  assert (metadata.dataset, metadata.mask_mode, metadata.noise_multiplier) == ("mnist", "none",
                                                                              1.3)
  assert metadata.steps == 12 and metadata.epochs == pytest.approx(3.0)  # 3 epochs of q = 1/4
  assert result.model.name == "mnist_cnn"
  assert export_lib.read_metadata(result.export_path) == metadata


# 45-100 s of tracing; fast: test_train_config.py checks the config, and accumulation, augmult
# and EMA each have their own tests (test_optimizer, test_augmult, test_ema); train() with all
# three together runs only in the slow set (CI).
@pytest.mark.slow
def test_paper_config_pipeline_on_mock_data(tmp_path):
  """De et al.'s config path: CIFAR-shaped data, WS-conv WRN, accumulation of physical batches,
  augmult views, EMA, epsilon target. A narrow WRN-10-1 and tiny batches; the next test runs
  WRN-16-4."""
  result = _run_named_config_on_mock_data(
      "cifar10_wrn16_4_eps8", tmp_path, model="wrn10_1", batch_size=16, physical_batch_size=8,
      augmult=2, steps=2)
  metadata = result.metadata
  assert metadata.steps == 2 and metadata.private and metadata.epsilon <= 8.0
  assert result.model.optimizer.gradient_accumulation_steps == 2
  assert int(result.model.optimizer.iterations.numpy()) == 2


@pytest.mark.slow
def test_paper_config_wrn16_4_on_mock_data(tmp_path):
  result = _run_named_config_on_mock_data(
      "cifar10_wrn16_4_eps8", tmp_path, batch_size=32, physical_batch_size=16, steps=1)
  assert result.model.count_params() == 2748890 and result.metadata.steps == 1


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_train_on_arrays_from_the_documented_python_path(tmp_path):
  """README: `train(config, splits=DataSplits.from_arrays(...))`, the overlap check on."""
  x, y = (np.random.default_rng(0).normal(size=(120, 6)).astype("float32"),
          np.arange(120) % 3)
  splits = tfdp_prune.DataSplits.from_arrays(public=(x[:20], y[:20]),
                                             private=(x[20:100], y[20:100]),
                                             test=(x[100:], y[100:]), num_classes=3,
                                             name="clinic_2026")
  config = TrainConfig(steps=2, epochs=None, public_epochs=0, batch_size=20, export_dir=None,
                       verbose=0)
  result = tfdp_prune.train(config, splits=splits)
  assert result.metadata.dataset == "clinic_2026" and result.metadata.num_private_examples == 80
  assert result.model.output_shape == (None, 3) and result.test_accuracy is not None


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_train_reads_a_folder_of_class_folders_and_records_it(tmp_path):
  """The in-process twin of the slow end-to-end `tfdp-train --dataset=<folder>` test."""
  write_image_folder(tmp_path / "scans", classes=("healthy", "sick"), per_class=20,
                     size=(16, 16))
  config = TrainConfig(dataset=f"{tmp_path}/scans", model="mnist_cnn", steps=2, epochs=None,
                       public_epochs=0, batch_size=10, export_dir=None, verbose=0,
                       checkpoint_dir=str(tmp_path / "run"))
  result = training.train(config)
  assert result.model.input_shape == (None, 16, 16, 1) and result.model.output_shape == (None, 2)
  assert result.metadata.dataset == f"{tmp_path}/scans"
  with open(tmp_path / "run" / run_record.RUN_RECORD) as f:
    assert json.load(f)["data_info"]["class_names"] == ["healthy", "sick"]


def test_load_data_passes_the_file_flags(tmp_path):
  write_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=5, size=(9, 7))
  write_image_folder(tmp_path / "imgs", classes=("b",), per_class=1, size=(4, 4), seed=1)
  with pytest.raises(ConfigError, match="--image_size=HEIGHTxWIDTH"):
    training.load_data(TrainConfig(dataset=f"{tmp_path}/imgs"))
  splits = training.load_data(TrainConfig(dataset=f"{tmp_path}/imgs", image_size="6x5"))
  assert splits.info.input_shape == (6, 5, 1)
