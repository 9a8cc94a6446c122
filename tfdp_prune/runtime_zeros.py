"""Zeros made when the step runs, for a `tf.cond` branch that returns "nothing" of a tensor's
shape.

Grappler folds `tf.zeros`, `tf.zeros_like` and `tf.fill` of a known shape into a constant, and
a constant inside a cond branch is not shared with any other: each stays allocated for as long
as the traced step exists, whether the branch runs or not (the WRN-16-4's DP step held 145 MB of
them). `Empty(init=True)` is not folded (XLA compiles it too). Outside a branch, `tf.where(c, t,
0.0)` needs no zeros tensor at all.
"""

from tfdp_prune.compat import tf


def zeros_like(t) -> tf.Tensor:
  """Zeros of `t`'s shape and dtype (`t` a tensor or a variable), formed when the op runs."""
  return tf.raw_ops.Empty(shape=tf.shape(t), dtype=t.dtype, init=True)
