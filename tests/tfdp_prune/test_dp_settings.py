import dataclasses

import pytest

import tfdp_prune
from tfdp_prune import dp_settings
from tfdp_prune import per_example
from tests.tfdp_prune import _testing as T


def test_values_are_normalized_once():
  settings = dp_settings.DPSettings(l2_norm_clip=1, noise_multiplier=2, insecure_noise_seed=3,
                                    per_example_engine="vectorized")
  assert type(settings.l2_norm_clip) is float and type(settings.noise_multiplier) is float
  assert settings.insecure_noise_seed == 3
  assert type(settings.per_example_engine) is per_example.VectorizedEngine


def test_settings_cannot_change_after_validation():
  settings = dp_settings.DPSettings(l2_norm_clip=1.0, noise_multiplier=1.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.noise_multiplier = 0.0  # would skip the validation


@pytest.mark.parametrize("kwargs,message", [
    (dict(l2_norm_clip=0.0), "l2_norm_clip > 0"),
    (dict(noise_multiplier=float("inf")), "noise_multiplier >= 0"),
    (dict(num_microbatches=2.5), "num_microbatches"),
    (dict(expected_batch_size=-1.0), "expected_batch_size > 0"),
    (dict(expected_batch_size=8.0, num_microbatches=2), "cannot be combined"),
    (dict(gradient_accumulation_steps=True), "gradient_accumulation_steps"),
    (dict(per_example_engine="ghost"), "per_example_engine"),
])
def test_invalid_settings_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    dp_settings.DPSettings(**dict(dict(l2_norm_clip=1.0, noise_multiplier=1.0), **kwargs))


def test_the_config_rebuilds_equal_settings():
  settings = dp_settings.DPSettings(l2_norm_clip=0.5, noise_multiplier=1.2,
                                    expected_batch_size=64.0, gradient_accumulation_steps=4,
                                    per_example_engine="vectorized")
  config = settings.to_config()
  assert dp_settings.DPSettings(**config).to_config() == config
  assert config["per_example_engine"] == {"name": "vectorized", "config": {}}


class _RecordingEngine(per_example.VectorizedEngine):

  def __init__(self):
    self.clips = []

  def clipped_sum(self, model, loss_fn, x, y, sample_weight, variables, masks, l2_norm_clip,
                  num_microbatches=None):
    self.clips.append((l2_norm_clip, num_microbatches))
    return super().clipped_sum(model, loss_fn, x, y, sample_weight, variables, masks,
                               l2_norm_clip, num_microbatches)


def test_the_train_step_clips_with_the_optimizers_settings():
  engine = _RecordingEngine()
  model = T.dp_model(T.dense_model(), l2_norm_clip=0.3, num_microbatches=2,
                     per_example_engine=engine)
  settings = model.optimizer.dp_settings
  assert settings.per_example_engine is engine
  assert (model.optimizer.l2_norm_clip, model.optimizer.num_microbatches) == (0.3, 2)
  x, y = T.dense_data(n=4)
  model.train_on_batch(x, y)
  assert engine.clips and set(engine.clips) == {(0.3, 2)}  # at every trace


def test_the_optimizers_settings_are_read_only():
  optimizer = tfdp_prune.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0)
  with pytest.raises(AttributeError):
    optimizer.noise_multiplier = 0.0  # settings are validated once, in `dp_settings`
