"""TrainConfig: every setting is checked before training, and each error names its flag."""

import dataclasses

import pytest

from tfdp_prune import train_config
from tfdp_prune import tune_space
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig


@pytest.mark.parametrize("name", sorted(train_config.CONFIGS))
def test_named_configs_are_valid(name):
  config = train_config.named_config(name)
  assert config.to_dict() == TrainConfig.from_dict(config.to_dict()).to_dict()


def test_paper_config_has_de_et_al_hyperparameters():
  config = train_config.named_config("cifar10_wrn16_4_eps8")
  assert (config.batch_size, config.augmult, config.l2_norm_clip, config.learning_rate,
          config.steps, config.ema_decay, config.epsilon, config.model) == (
              4096, 16, 1.0, 2.0, 875, 0.9999, 8.0, "wrn16_4")
  assert config.gradient_accumulation_steps == 16


def test_default_config_is_dp_with_pruning_on_digits():
  config = train_config.resolve()
  assert config.dataset == "digits" and config.private
  assert config.mode == "freeze" and config.effective_sparsity == 0.8
  assert config.effective_rule == "magnitude"


@pytest.mark.parametrize("settings, flag", [
    (dict(epsilon=2.0, noise_multiplier=1.0), "--noise_multiplier"),
    (dict(mode="none", sparsity=0.5), "--sparsity"),
    (dict(mode="none", rule="random"), "--rule"),
    (dict(mode="freeze", select_every=3), "--select_every"),
    (dict(batch_size=100, physical_batch_size=30), "--physical_batch_size"),
    (dict(epochs=2.0, steps=10), "--steps"),
    (dict(epochs=None, steps=None), "--epochs"),
    (dict(epsilon=None, noise_multiplier=None), "--noise_multiplier"),
    (dict(model="resnet50"), "--model"),
    (dict(mode="prune"), "--mode"),
    (dict(rule="largest"), "--rule"),
    (dict(sparsity=1.0), "--sparsity"),
    (dict(epsilon=-1.0), "--epsilon"),
    (dict(delta=1.0), "--delta"),
    (dict(batch_size=0), "--batch_size"),
    (dict(strategy="horovod"), "--strategy"),
    (dict(ema_decay=1.0), "--ema_decay"),
    (dict(steps=2.5, epochs=None), "--steps"),
    (dict(insecure_mechanism_seed=-1), "--insecure_mechanism_seed"),
    (dict(insecure_mechanism_seed=2**63), "--insecure_mechanism_seed"),
    (dict(insecure_mechanism_seed=1.5), "--insecure_mechanism_seed"),
])
def test_invalid_settings_name_the_flag(settings, flag):
  with pytest.raises(ConfigError, match=flag):
    TrainConfig(**settings)


def test_override_of_one_exclusive_setting_clears_the_other():
  config = train_config.resolve("default", {"noise_multiplier": 1.1})
  assert config.epsilon is None and config.noise_multiplier == 1.1
  config = train_config.resolve("cifar10_wrn16_4_eps8", {"epochs": 2.0})
  assert config.steps is None and config.epochs == 2.0


def test_overriding_both_exclusive_settings_is_an_error():
  with pytest.raises(ConfigError, match="--epsilon.*--noise_multiplier"):
    train_config.resolve("default", {"epsilon": 2.0, "noise_multiplier": 1.0})
  with pytest.raises(ConfigError, match="--epochs.*--steps"):
    train_config.resolve("default", {"epochs": 2.0, "steps": 4})


def test_mode_none_drops_the_config_mask_settings_but_refuses_given_ones():
  base = dict(train_config.CONFIGS)
  assert train_config.resolve("default", {"mode": "none"}).effective_sparsity == 0.0
  with pytest.raises(ConfigError, match="--sparsity"):
    train_config.resolve("default", {"mode": "none", "sparsity": 0.9})
  assert train_config.CONFIGS == base  # resolving never edits the named configs


def test_unknown_config_and_settings_are_refused():
  with pytest.raises(ConfigError, match="--config"):
    train_config.resolve("cifar100_paper")
  with pytest.raises(ConfigError, match="bogus"):
    train_config.resolve("default", {"bogus": 1})
  with pytest.raises(ConfigError, match="bogus"):
    TrainConfig.from_dict({"bogus": 1})


def test_select_defaults_and_accumulation():
  config = TrainConfig(mode="select", batch_size=256, physical_batch_size=64)
  assert config.effective_select_every == train_config.DEFAULT_SELECT_EVERY
  assert config.gradient_accumulation_steps == 4
  assert TrainConfig(noise_multiplier=0.0, epsilon=None).private is False


def test_the_mechanism_is_seeded_only_by_the_insecure_setting():
  assert TrainConfig().insecure_mechanism_seed is None
  assert TrainConfig().mechanism_randomness == "os_entropy"
  assert TrainConfig(seed=7).mechanism_randomness == "os_entropy"  # --seed is not the mechanism's
  assert TrainConfig(insecure_mechanism_seed=0).mechanism_randomness == "insecure_seed"


def test_the_choices_are_the_names_of_what_implements_them():
  """--rule, --mode, --sampling and --accountant accept what the library implements, no more."""
  from tfdp_prune import accounting  # pylint: disable=g-import-not-at-top
  from tfdp_prune import freezing  # pylint: disable=g-import-not-at-top
  from tfdp_prune import masks  # pylint: disable=g-import-not-at-top
  from tfdp_prune import sampling  # pylint: disable=g-import-not-at-top
  from tfdp_prune import selection  # pylint: disable=g-import-not-at-top
  choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)}
  assert set(choices["rule"]) == {rule.name for rule in masks.MaskRule.__subclasses__()}
  assert choices["mode"] == ("none", freezing.ParameterFreezing.mask_mode,
                             selection.ParameterSelection.mask_mode)
  assert set(choices["sampling"]) == {sampling.PoissonSampler.sampling,
                                      sampling.ShuffleSampler.sampling}
  for name in choices["accountant"]:
    spec = accounting.PrivacySpec(noise_multiplier=1.0, steps=1, delta=1e-5,
                                  sampling_probability=0.1, accountant=name)
    assert name in type(spec.make_accountant()).__name__.lower()
  for name in choices["rule"]:
    assert masks.get(name, sparsity=0.5).name == name


def test_numpy_numbers_are_accepted_as_the_python_numbers_a_run_record_can_hold():
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = TrainConfig(batch_size=np.int64(50), learning_rate=np.float32(0.25), sparsity=0.5,
                       overwrite=True)
  assert type(config.batch_size) is int and type(config.learning_rate) is float
  assert json.loads(json.dumps(config.to_dict()))["batch_size"] == 50
  with pytest.raises(ConfigError, match="--overwrite to be True or False"):
    TrainConfig(overwrite=1)


def test_the_default_config_takes_its_models_tuned_values_unless_a_flag_sets_them():
  tuned = train_config.MODEL_DEFAULTS["mlp"]
  config = train_config.resolve()
  assert (config.learning_rate, config.l2_norm_clip) == (tuned["learning_rate"],
                                                         tuned["l2_norm_clip"])
  assert train_config.resolve("default", {"learning_rate": 0.2}).learning_rate == 0.2
  assert train_config.resolve("default", {"l2_norm_clip": 2.0}).learning_rate == (
      tuned["learning_rate"])
  cnn = train_config.resolve("default", {"model": "mnist_cnn", "dataset": "mnist"})
  assert cnn.learning_rate == train_config.MODEL_DEFAULTS["mnist_cnn"]["learning_rate"]
  wrn = train_config.resolve("default", {"model": "wrn16_4", "dataset": "cifar10"})
  defaults = TrainConfig()  # a model without an entry: the dataclass defaults
  assert (wrn.learning_rate, wrn.l2_norm_clip) == (defaults.learning_rate, defaults.l2_norm_clip)
  named = train_config.resolve("mnist_tfp_tutorial")  # other configs keep their own values
  assert (named.learning_rate, named.l2_norm_clip) == (0.25, 1.5)


def test_tune_takes_the_tuner_names_only():
  assert TrainConfig(tune="public").tune == "public"
  with pytest.raises(ConfigError, match="--tune"):
    TrainConfig(tune="everything")


def test_tune_space_takes_the_tuners_names_in_stage_order():
  config = TrainConfig(tune="public", tune_space=" epochs, masks,learning_rate")
  assert tune_space.parse(config.tune_space) == ("learning_rate", "masks", "epochs")
  assert tune_space.parse(None) == ("learning_rate", "l2_norm_clip", "sparsity")
  assert train_config.resolve("default", {"tune": "public", "tune_space": "masks"}).tune_space
  for bad, why in (("learning_rate,momentum", r"unknown \['momentum'\]"),
                   (" , ", "an empty list")):
    with pytest.raises(ConfigError, match=rf"Expected --tune_space .*Received: .*{why}"):
      TrainConfig(tune="public", tune_space=bad)


@pytest.mark.parametrize("tune", ["none", "private"])
def test_tune_space_without_public_tuning_is_refused(tune):
  extra = dict(accountant="rdp", tune_candidates="learning_rate=0.1") if tune == "private" else {}
  with pytest.raises(ConfigError, match=rf"--tune_space has no effect without --tune=public\. "
                     rf"Received: --tune_space='epochs' with --tune={tune}"):
    TrainConfig(tune=tune, tune_space="epochs", **extra)


def test_tuning_the_length_at_a_fixed_noise_multiplier_is_refused():
  """Another length at a fixed sigma is another epsilon: the candidates would differ in
  privacy, not only in accuracy."""
  with pytest.raises(ConfigError, match="epochs needs --epsilon.*another length at a fixed "
                     "noise multiplier is another epsilon"):
    TrainConfig(tune="public", tune_space="epochs", epsilon=None, noise_multiplier=1.0)
  with pytest.raises(ConfigError, match="another epsilon"):  # the flags' way: one clears other
    train_config.resolve("default", {"tune": "public", "tune_space": "epochs",
                                     "noise_multiplier": 0.5})
  # Non-private: no guarantee at any length, so the lengths compare fairly (the experiments'
  # non-private reference is tuned like the DP arms).
  assert train_config.resolve("default", {"tune": "public", "tune_space": "epochs",
                                          "noise_multiplier": 0.0}).tune_space == "epochs"
  assert TrainConfig(tune="public", tune_space="learning_rate", epsilon=None,
                     noise_multiplier=1.0).tune_space == "learning_rate"


def test_tuning_the_sparsity_of_a_dense_run_is_refused_unless_the_masks_are_tuned():
  with pytest.raises(ConfigError, match="sparsity needs masks: --mode=none"):
    TrainConfig(tune="public", tune_space="sparsity", mode="none")
  assert TrainConfig(tune="public", tune_space="masks,sparsity", mode="none").mode == "none"
  assert TrainConfig(tune="public", mode="none").tune_space is None  # the default space


def test_tuning_the_length_of_a_run_that_carries_a_spend_is_refused(tmp_path):
  """Each length has its own sigma, and a carried spend must be of the run's mechanism: the
  refusal comes before the tuning, not after it."""
  carry = dict(carry_spend_from=str(tmp_path / "old"), checkpoint_dir=str(tmp_path / "new"))
  with pytest.raises(ConfigError, match=r"Expected --tune_space without epochs when "
                     r"--carry_spend_from is given.*Received: --tune_space='masks,epochs' with "
                     r"--carry_spend_from=.*old\. Drop epochs from --tune_space"):
    TrainConfig(tune="public", tune_space="masks,epochs", **carry)
  assert TrainConfig(tune="public", tune_space="masks", **carry).tune_space == "masks"
