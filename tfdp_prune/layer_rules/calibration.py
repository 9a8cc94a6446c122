"""Choices between equivalent computations made from costs measured on the running machine:
each candidate is timed once on random data of the real shapes (when the train step is first
traced), the fastest is kept per shape signature, and every choice is recorded (`choices`).

Which of two exact ways to form per-example gradients is faster depends on the CPU (AVX-512 or
not, cache sizes, oneDNN's kernels), so a threshold measured on one machine misleads on another.
"""

import concurrent.futures
import statistics
import time
from typing import Callable, Dict, Hashable, Optional

from absl import logging

from tfdp_prune.compat import tf

# Rounds of one call per candidate, interleaved, after one call each that traces and warms
# up; the median per candidate is kept. Interleaving and the median, not the minimum: on a
# shared machine a minimum rewards the candidate that ran in a quiet moment.
_ROUNDS = 5
_choices: Dict[Hashable, dict] = {}
# Off by default: on a machine shared with other jobs (as measured in issue 18) the timings
# are noisy enough to pick a strategy that is several times slower in the step.
_enabled = False


def set_enabled(enabled: bool) -> None:
  """Turns measuring on (on a quiet machine) or off (every choice then comes from the callers'
  heuristic, the default); choices already made are kept until `clear`."""
  global _enabled
  _enabled = bool(enabled)


def enabled() -> bool:
  return _enabled


def clear() -> None:
  _choices.clear()


def choices() -> Dict[str, dict]:
  """Every choice made in this process: {signature: {"choice": name, "ms": {name: median CPU
  ms per call}}}."""
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
  # In a thread of its own: eager also when called while a tf.function is traced, and with
  # gradient tapes recording (`tf.init_scope` pauses every tape, so a candidate that takes a
  # gradient would time the gradient of nothing and win).
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    try:
      ms = pool.submit(_median_ms, candidates).result()
    except (tf.errors.OpError, ValueError, TypeError) as error:  # e.g. out of memory
      logging.warning("calibration of %s failed (%s); using the default choice.", key, error)
      return None
  choice = min(ms, key=ms.get)
  _choices[key] = {"choice": choice, "ms": {k: round(v, 3) for k, v in ms.items()}}
  logging.info("calibration: %s -> %s (ms: %s)", key, choice, _choices[key]["ms"])
  return choice


def _median_ms(candidates) -> Dict[str, float]:
  """Median CPU milliseconds (all threads of the process) per call. CPU time, not wall time:
  in a train step the other layers' ops keep the cores busy, so a candidate that is fast
  alone only by running in parallel on idle cores (a per-example loop) is not fast there; CPU
  time is also less disturbed by other processes on the machine."""
  for fn in candidates.values():
    _run(fn)  # traces and warms up
  times = {name: [] for name in candidates}
  for _ in range(_ROUNDS):
    for name, fn in candidates.items():
      start = time.process_time()
      _run(fn)
      times[name].append(time.process_time() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _run(fn):
  tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
