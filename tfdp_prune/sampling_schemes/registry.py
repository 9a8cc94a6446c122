"""The sampling schemes by name: the built-in ones, and those users register."""

from typing import Dict, Tuple

from tfdp_prune.sampling_schemes import base
from tfdp_prune.sampling_schemes import poisson
from tfdp_prune.sampling_schemes import shuffle

# The one list of built-in schemes; every list of sampling names comes from the registry.
_BUILT_IN = (poisson.SCHEME, shuffle.SCHEME)

_schemes: Dict[str, base.SamplingScheme] = {scheme.name: scheme for scheme in _BUILT_IN}


def register_sampling_scheme(scheme: base.SamplingScheme) -> None:
  """Makes `scheme.name` a sampling that `PrivacySpec`, `sampling.make_sampler`, the agreement
  checks and `TrainConfig` accept (flags defined before keep their choices).

  Raises:
    TypeError: `scheme` is not a `SamplingScheme`.
    ValueError: its name is empty or already registered (unregister it first).
  """
  if not isinstance(scheme, base.SamplingScheme):
    raise TypeError(f"Expected a tfdp_prune SamplingScheme instance. Received: scheme={scheme!r}.")
  if not isinstance(scheme.name, str) or not scheme.name:
    raise ValueError(f"Expected a non-empty string scheme.name. Received: {scheme.name!r}.")
  if scheme.name in _schemes:
    raise ValueError(f"Expected a new sampling name. Received: {scheme.name!r}, already "
                     f"registered as {_schemes[scheme.name]!r}.")
  _schemes[scheme.name] = scheme


def unregister_sampling_scheme(name: str) -> None:
  """Removes a scheme that `register_sampling_scheme` added (built-in ones stay)."""
  if name in {scheme.name for scheme in _BUILT_IN}:
    raise ValueError(f"Expected the name of a registered, not built-in, scheme. Received: "
                     f"{name!r}.")
  if name not in _schemes:
    raise ValueError(f"Expected the name of a registered scheme. Received: {name!r}.")
  del _schemes[name]


def names() -> Tuple[str, ...]:
  """The sampling names, built-in first, in the order they were registered."""
  return tuple(_schemes)


def schemes() -> Tuple[base.SamplingScheme, ...]:
  """The schemes, in the order of `names()`."""
  return tuple(_schemes.values())


def get(name: str) -> base.SamplingScheme:
  """The scheme called `name` (KeyError if none is)."""
  return _schemes[name]
