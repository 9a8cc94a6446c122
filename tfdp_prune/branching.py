"""Branches of the traced step, decided when it is traced or when it runs: a Python bool picks
its branch at trace time (one branch in the graph, no `tf.cond` to trace or run); a boolean
tensor picks it when the step runs, by `tf.cond`."""

from tfdp_prune.compat import tf


def static_or_cond(pred, true_fn, false_fn):
  """The branch `pred` picks: a Python bool picks it now, a boolean tensor by `tf.cond` (which
  refuses a Python bool)."""
  if isinstance(pred, bool):
    return true_fn() if pred else false_fn()
  return tf.cond(pred, true_fn, false_fn)


def both(a, b):
  """a and b, each a Python bool or a boolean tensor (a Python bool when both are)."""
  if isinstance(a, bool) and isinstance(b, bool):
    return a and b
  return tf.logical_and(a, b)
