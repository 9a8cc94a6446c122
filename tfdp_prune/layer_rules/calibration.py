"""Choices between equivalent computations made from costs measured on the running machine:
each candidate is timed once on random data of the real shapes (when the train step is first
traced), the fastest is kept per shape signature, and every choice is recorded (`choices`).

Which of two exact ways to form per-example gradients is faster depends on the CPU (AVX-512 or
not, cache sizes, oneDNN's kernels), so a threshold measured on one machine misleads on another.
"""

import time
from typing import Callable, Dict, Hashable, Optional

from absl import logging

from tfdp_prune.compat import tf

_TIMED_CALLS = 3  # after one call that traces and warms up; the minimum is kept
_choices: Dict[Hashable, dict] = {}
_enabled = True


def set_enabled(enabled: bool) -> None:
  """Turns measuring off (every choice then comes from the callers' fallback heuristic) or on;
  choices already made are kept until `clear`."""
  global _enabled
  _enabled = bool(enabled)


def enabled() -> bool:
  return _enabled


def clear() -> None:
  _choices.clear()


def choices() -> Dict[str, dict]:
  """Every choice made in this process: {signature: {"choice": name, "ms": {name: ms}}}."""
  return {str(key): dict(value) for key, value in _choices.items()}


def fastest(key: Hashable, candidates: Dict[str, Callable[[], object]]) -> Optional[str]:
  """The name of the fastest of `candidates` (functions of no arguments that run the
  computation and return tensors), measured once per `key`; None if measuring is off or
  failed (the caller then decides without it)."""
  if key in _choices:
    return _choices[key]["choice"]
  if not _enabled:
    return None
  if len(candidates) == 1:
    return next(iter(candidates))
  with tf.init_scope():  # eager, also when called while a tf.function is traced
    try:
      ms = {name: _best_ms(fn) for name, fn in candidates.items()}
    except (tf.errors.OpError, ValueError, TypeError) as error:  # e.g. out of memory
      logging.warning("calibration of %s failed (%s); using the default choice.", key, error)
      return None
  choice = min(ms, key=ms.get)
  _choices[key] = {"choice": choice, "ms": {k: round(v, 3) for k, v in ms.items()}}
  logging.info("calibration: %s -> %s (ms: %s)", key, choice, _choices[key]["ms"])
  return choice


def _best_ms(fn) -> float:
  fn()  # traces and warms up
  best = float("inf")
  for _ in range(_TIMED_CALLS):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
    best = min(best, time.perf_counter() - start)
  return best * 1e3
