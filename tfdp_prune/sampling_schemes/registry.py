"""The sampling schemes by name: the built-in ones, and those users register."""

from typing import Dict, Set, Tuple

from tfdp_prune.sampling_schemes import base
from tfdp_prune.sampling_schemes import poisson
from tfdp_prune.sampling_schemes import shuffle

# The one list of built-in schemes; every list of sampling names comes from the registry.
_BUILT_IN = (poisson.SCHEME, shuffle.SCHEME)

BUILT_IN_NAMES = tuple(scheme.name for scheme in _BUILT_IN)

_schemes: Dict[str, base.SamplingScheme] = {scheme.name: scheme for scheme in _BUILT_IN}
# Names once registered and then removed: never given to another scheme in this process, since
# specs, caches (epsilons, step limits), ledgers and samplers know a scheme by its name only.
_retired: Set[str] = set()


def register_sampling_scheme(scheme: base.SamplingScheme) -> None:
  """Makes `scheme.name` a sampling that `PrivacySpec`, `sampling.make_sampler`, the agreement
  checks and `TrainConfig` accept (flags defined before keep their choices).

  Raises:
    TypeError: `scheme` is not a `SamplingScheme`, or its `draw_class` is not a `Draw`.
    ValueError: its name is empty, registered, or was registered before in this process (a
      name always means one scheme: pick a new name, or restart); its adjacency is not one of
      the two relations; it claims the PLD shortcut (`pld_steps_compose`) without
      add-or-remove adjacency.
  """
  if not isinstance(scheme, base.SamplingScheme):
    raise TypeError(f"Expected a tfdp_prune SamplingScheme instance. Received: scheme={scheme!r}.")
  if not isinstance(scheme.name, str) or not scheme.name:
    raise ValueError(f"Expected a non-empty string scheme.name. Received: {scheme.name!r}.")
  if scheme.name in _schemes or scheme.name in _retired:
    raise ValueError(f"Expected a sampling name never used in this process. Received: "
                     f"{scheme.name!r}, {'registered' if scheme.name in _schemes else 'used'} "
                     "before (specs, ledgers and cached epsilons know a scheme by its name): "
                     "give the scheme a new name, or restart the process.")
  if scheme.adjacency not in base.ADJACENCIES:
    raise ValueError(f"Expected scheme.adjacency in {base.ADJACENCIES}. Received: "
                     f"{scheme.adjacency!r}.")
  if scheme.pld_steps_compose and scheme.adjacency != base.ADD_OR_REMOVE_ONE:
    raise ValueError("Expected pld_steps_compose=False for a scheme accounted under "
                     f"{scheme.adjacency!r}: the PLD shortcut composes the add-or-remove "
                     "Poisson Gaussian of pld_step.")
  if not (isinstance(scheme.draw_class, type) and issubclass(scheme.draw_class, base.Draw)):
    raise TypeError(f"Expected scheme.draw_class to be a sampling_schemes.base.Draw subclass. "
                    f"Received: {scheme.draw_class!r}.")
  _schemes[scheme.name] = scheme


def unregister_sampling_scheme(name: str) -> None:
  """Removes a scheme that `register_sampling_scheme` added (built-in ones stay); its name is
  not available again in this process."""
  if name in {scheme.name for scheme in _BUILT_IN}:
    raise ValueError(f"Expected the name of a registered, not built-in, scheme. Received: "
                     f"{name!r}.")
  if name not in _schemes:
    raise ValueError(f"Expected the name of a registered scheme. Received: {name!r}.")
  del _schemes[name]
  _retired.add(name)


def names() -> Tuple[str, ...]:
  """The sampling names, built-in first, in the order they were registered."""
  return tuple(_schemes)


def schemes() -> Tuple[base.SamplingScheme, ...]:
  """The schemes, in the order of `names()`."""
  return tuple(_schemes.values())


def get(name: str) -> base.SamplingScheme:
  """The scheme called `name` (KeyError if none is)."""
  return _schemes[name]
