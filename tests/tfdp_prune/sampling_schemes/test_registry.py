"""The sampling-scheme registry: every list of sampling names comes from it, no module outside it
branches on a name, and a new scheme is one module (here: this file) plus its registration."""

import dataclasses
import math
import os
import re
import types

import dp_accounting
import numpy as np
import pytest
from absl import flags
from dp_accounting.pld import pld_privacy_accountant

from tfdp_prune import accounting
from tfdp_prune import agreement
from tfdp_prune import sampling
from tfdp_prune import sampling_schemes
from tfdp_prune.compat import tf
from tfdp_prune.sampling_schemes import base
from tfdp_prune.sampling_schemes import poisson
from tfdp_prune.sampling_schemes import registry
from tfdp_prune.sampling_schemes import shuffle
from tfdp_prune.train_config import ConfigError
from tfdp_prune.train_config import TrainConfig
from tfdp_prune.trainers import train

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
_SCANNED = ("tfdp_prune", "trainers", "export")
_REGISTRY_PACKAGE = os.path.join("tfdp_prune", "sampling_schemes")

# ---- a toy scheme: what a new scheme's module holds ---------------------------------------


class FixedDraw(base.Draw):
  """Each logical step: `batch_size` distinct rows drawn afresh (without replacement)."""

  def __init__(self, batch_size: int):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"Expected batch_size to be an integer >= 1. Received: {batch_size!r}.")
    self.scheme = FIXED
    self._batch_size = batch_size

  def bind(self, num_examples, accumulation):
    if self._batch_size > num_examples:
      raise ValueError(f"Expected batch_size <= num_examples. Received: {self._batch_size}.")
    super().bind(num_examples, accumulation)

  @property
  def batch_size(self):
    return self._batch_size

  @property
  def expected_batch_size(self):
    return float(self._batch_size)

  @property
  def steps_per_epoch(self):
    return self._num_examples // self._batch_size

  def logical_capacity(self):
    return self._batch_size

  def config(self, common):
    return dict(batch_size=self._batch_size, **common)

  def spec_kwargs(self):
    return dict(sampling=FIXED.name, batch_size=self._batch_size,
                num_examples=self._num_examples)

  def padded_indices(self, step, secret):
    uniform = base.step_uniform(secret, step, self._num_examples)
    chosen = tf.cast(tf.argsort(uniform, stable=True)[:self._batch_size], tf.int64)
    extra = self.physical_batch_size * self._accumulation - self._batch_size
    return tf.concat([chosen, tf.fill([extra], tf.constant(self._num_examples, tf.int64))], 0)


class FixedScheme(shuffle.ShuffleScheme):
  """Fixed-size batches drawn afresh each step, accounted like shuffle but per step: one
  Gaussian of sigma / 2 per step (replace-one, sensitivity 2C), no amplification claimed."""

  name = "toy_fixed"
  flag_help = "toy_fixed (fixed batches drawn afresh, one Gaussian per step)"
  draw_class = FixedDraw

  def passes(self, spec):
    return None

  def dp_event(self, spec):
    return dp_accounting.SelfComposedDpEvent(
        event=dp_accounting.GaussianDpEvent(spec.noise_multiplier / 2), count=spec.steps)

  def pld_step(self, spec):
    return spec.noise_multiplier / 2 / math.sqrt(spec.steps), 1.0

  def statement(self, spec, common):
    return (f"Toy fixed batches of {spec.batch_size} of {spec.num_examples}, replace-one, no "
            f"amplification; {common}.")

  def describe_sampler(self, sampler):
    return f"toy batches of {sampler.draw.batch_size} from N={sampler.num_examples}"

  def make_sampler_arguments(self, sampling_probability, batch_size, extra):
    if sampling_probability is not None or extra:
      raise ValueError("Expected only batch_size with sampling='toy_fixed'.")
    return dict(batch_size=batch_size)


FIXED = FixedScheme()

# ---- tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_scheme():
  # Registered once: a name once removed is never registered again in the process.
  sampling_schemes.register_sampling_scheme(FIXED)
  yield FIXED
  sampling_schemes.unregister_sampling_scheme(FIXED.name)


def _sampler(name, **kwargs):
  scheme = registry.get(name)
  x = np.arange(200, dtype=np.float32).reshape(100, 2)
  y = np.arange(100) % 3
  return sampling.make_sampler((x, y), sampling=name, insecure_sampling_seed=1,
                               **scheme.sampler_arguments(10, 100), **kwargs)


def test_every_scheme_is_a_choice_of_the_config_the_flag_the_spec_and_make_sampler():
  config_choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)}
  holder = train._FLAGS["sampling"]  # pylint: disable=protected-access
  flag_choices = flags.FLAGS[holder.name].parser.enum_values
  assert registry.names() == accounting.SAMPLINGS == ("poisson", "shuffle")
  for name in registry.names():
    assert name in config_choices["sampling"]
    assert name in flag_choices
    assert TrainConfig(sampling=name).sampling == name
    sampler = _sampler(name)
    assert sampler.sampling == name and sampler.scheme is registry.get(name)
    spec = sampler.privacy_spec(noise_multiplier=1.0, steps=3, delta=1e-5)
    assert spec.sampling == name and spec.scheme is registry.get(name)
    assert accounting.PrivacySpec.from_dict(spec.to_dict()) == spec


def _comparisons_with_a_sampling_name(source):
  names = "|".join(re.escape(name) for name in registry.names())
  literal = rf"""["'](?:{names})["']"""
  pattern = re.compile(rf"(?:==|!=|\bis\b|\bin\b)\s*{literal}|{literal}\s*(?:==|!=|\bis\b)"
                       rf"|\bin\b\s*[\(\[\{{][^\)\]\}}]*{literal}")
  return [line.strip() for line in source.splitlines() if pattern.search(line)]


def test_the_scan_finds_the_comparisons_it_forbids():
  assert _comparisons_with_a_sampling_name(
      'if spec.sampling == "poisson":\nx = "shuffle" != s\nif s in ("a", \'shuffle\'):\n'
      'name = "poisson"\nrng.poisson(3)') == [
          'if spec.sampling == "poisson":', 'x = "shuffle" != s', 'if s in ("a", \'shuffle\'):']


def test_no_module_outside_the_registry_compares_a_sampling_name_to_a_literal():
  """What depends on the sampling is asked of its scheme (`spec.scheme`, `sampler.scheme`)."""
  found = []
  for top in _SCANNED:
    for folder, _, files in os.walk(os.path.join(_ROOT, top)):
      relative = os.path.relpath(folder, _ROOT)
      if relative == _REGISTRY_PACKAGE or relative.startswith(_REGISTRY_PACKAGE + os.sep):
        continue
      for name in sorted(f for f in files if f.endswith(".py")):
        with open(os.path.join(folder, name), encoding="utf-8") as file:
          found += [f"{os.path.join(relative, name)}: {line}"
                    for line in _comparisons_with_a_sampling_name(file.read())]
  assert found == []


@pytest.mark.slow  # end to end (~6-13 s on 2 cores); CI runs it
def test_a_scheme_registered_in_one_module_accounts_states_and_samples(fixed_scheme):
  assert fixed_scheme.name in registry.names()
  assert TrainConfig(sampling=fixed_scheme.name).sampling == fixed_scheme.name
  spec = accounting.PrivacySpec(noise_multiplier=2.0, steps=50, delta=1e-5,
                                sampling=fixed_scheme.name, batch_size=10, num_examples=100)
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 50)
  assert spec.dp_event() == event
  assert spec.adjacency == accounting.REPLACE_ONE and spec.passes is None
  accountant = pld_privacy_accountant.PLDAccountant(
      dp_accounting.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4)
  assert spec.epsilon() == pytest.approx(accountant.compose(event).get_epsilon(1e-5), abs=1e-6)
  assert spec.statement().startswith("Toy fixed batches of 10 of 100, replace-one")
  assert accounting.PrivacySpec.from_dict(spec.to_dict()) == spec
  with pytest.raises(ValueError, match="sampling_probability=None"):
    dataclasses.replace(spec, sampling_probability=0.1)

  sampler = sampling.make_sampler(
      (np.arange(200, dtype=np.float32).reshape(100, 2), np.arange(100) % 3),
      sampling=fixed_scheme.name, batch_size=10, gradient_accumulation_steps=3,
      insecure_sampling_seed=7)
  assert isinstance(sampler, sampling.SchemeSampler) and sampler.sampling == fixed_scheme.name
  assert sampler.physical_batch_size == 4 and sampler.expected_batch_size == 10.0
  batches = list(sampler.dataset().take(6))  # two logical steps of 3 physical batches
  assert [tuple(t.shape[0] for t in batch) for batch in batches] == [(4, 4, 4)] * 6
  x, _, weight = [np.concatenate([batch[i].numpy() for batch in batches[:3]]) for i in range(3)]
  assert weight.tolist() == [1.0] * 10 + [0.0] * 2
  drawn = (x[weight == 1][:, 0] // 2).astype(int)  # x[i] = (2i, 2i + 1)
  assert len(set(drawn)) == 10 and sorted(drawn) == sorted(sampler.indices(0).tolist())
  assert sampler.privacy_spec(noise_multiplier=2.0, steps=50, delta=1e-5) == spec
  rebuilt = sampling.SchemeSampler.from_config(sampler.get_config(), sampler.data)
  assert rebuilt.get_config() == sampler.get_config()
  optimizer = types.SimpleNamespace(gradient_accumulation_steps=3, expected_batch_size=10.0,
                                    num_microbatches=None, noise_multiplier=2.0)
  agreement.check_agreement(optimizer, sampler=sampler, spec=spec.with_steps(0))
  halved = types.SimpleNamespace(**{**vars(optimizer), "expected_batch_size": 5.0})
  with pytest.raises(ValueError, match="toy batches of 10 from N=100"):
    agreement.check_agreement(halved, sampler=sampler, spec=spec.with_steps(0))


class _RemovedScheme(FixedScheme):
  name = "toy_removed"


def test_an_unregistered_scheme_is_refused_and_its_name_never_given_to_another():
  """Specs, ledgers and cached epsilons know a scheme by its name: a name that meant one scheme
  never means another in the same process (its cached epsilon would be the other's)."""
  removed = _RemovedScheme()
  sampling_schemes.register_sampling_scheme(removed)
  spec = accounting.PrivacySpec(noise_multiplier=1.0, steps=3, delta=1e-5, sampling=removed.name,
                                batch_size=1, num_examples=2, accountant="rdp")
  assert spec.epsilon() > 0  # cached under the name
  sampling_schemes.unregister_sampling_scheme(removed.name)
  with pytest.raises(ValueError, match="Expected sampling in"):
    accounting.PrivacySpec(noise_multiplier=1.0, steps=1, delta=1e-5, sampling=removed.name,
                           batch_size=1, num_examples=2)
  with pytest.raises(ConfigError, match="--sampling"):
    TrainConfig(sampling=removed.name)
  for again in (removed, _RemovedScheme()):  # the same scheme, or another under its name
    with pytest.raises(ValueError, match="never used in this process"):
      sampling_schemes.register_sampling_scheme(again)


class _PoissonTwice(poisson.PoissonScheme):
  """Two Poisson-sampled Gaussians per step: not the event the PLD shortcut composes."""
  name = "toy_poisson_twice"

  def dp_event(self, spec):
    return dp_accounting.SelfComposedDpEvent(super().dp_event(spec), 2)


def test_a_subclass_with_another_event_gets_its_own_events_epsilon_not_the_pld_shortcuts():
  scheme = _PoissonTwice()
  sampling_schemes.register_sampling_scheme(scheme)
  try:
    spec = accounting.PrivacySpec(noise_multiplier=1.0, steps=100, delta=1e-5,
                                  sampling=scheme.name, sampling_probability=0.01)
    accountant = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    expected = accountant.compose(spec.dp_event()).get_epsilon(1e-5)
    assert spec.epsilon() == pytest.approx(expected, abs=1e-6)
    once = dataclasses.replace(spec, sampling="poisson")
    assert accounting._pld_shortcut_applies(once)  # pylint: disable=protected-access
    assert not accounting._pld_shortcut_applies(spec)  # pylint: disable=protected-access
    assert spec.epsilon() > once.epsilon() + 0.1  # the shortcut would have given this
  finally:
    sampling_schemes.unregister_sampling_scheme(scheme.name)


def test_registration_checks_the_adjacency_the_pld_claim_and_the_draw():
  for attributes, error, message in [
      (dict(name="toy_bad_adjacency", adjacency="replace"), ValueError, "adjacency"),
      (dict(name="toy_bad_pld", pld_steps_compose=True), ValueError, "pld_steps_compose"),
      (dict(name="toy_bad_draw", draw_class=object), TypeError, "draw_class")]:
    scheme = type("Bad", (FixedScheme,), attributes)()
    with pytest.raises(error, match=message):
      sampling_schemes.register_sampling_scheme(scheme)
    assert scheme.name not in registry.names()


def test_registration_refuses_what_is_not_a_new_scheme():
  with pytest.raises(TypeError, match="SamplingScheme"):
    sampling_schemes.register_sampling_scheme(object())
  with pytest.raises(ValueError, match="registered before"):
    sampling_schemes.register_sampling_scheme(shuffle.ShuffleScheme())
  with pytest.raises(ValueError, match="not built-in"):
    sampling_schemes.unregister_sampling_scheme("poisson")
  assert registry.names()[:2] == registry.BUILT_IN_NAMES == ("poisson", "shuffle")
