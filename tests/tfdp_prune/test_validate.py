"""The argument checks every module shares: what they accept, and errors naming the argument."""

import numpy as np
import pytest

from tfdp_prune import _validate


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999, np.float32(0.25)])
def test_fraction_accepts_zero_up_to_but_excluding_one(value):
  _validate.fraction("sparsity", value)


@pytest.mark.parametrize("value", [1, 1.0, -0.1, float("nan"), float("inf"), True, "0.5", None])
def test_fraction_refuses_the_rest_naming_the_argument_and_the_meaning(value):
  with pytest.raises(ValueError, match=r"^Expected sparsity in \[0, 1\) \(frozen\)\. Received: "
                                       r"sparsity="):
    _validate.fraction("sparsity", value, " (frozen)")


def test_boolean_accepts_only_true_and_false():
  _validate.boolean("--overwrite", True)
  _validate.boolean("--overwrite", False)
  for value in (0, 1, "true", None, np.bool_(True)):
    with pytest.raises(ValueError, match="Expected --overwrite to be True or False"):
      _validate.boolean("--overwrite", value)


def test_one_of_names_the_choices():
  _validate.one_of("mode", "freeze", ("freeze", "select"))
  with pytest.raises(ValueError, match=r"Expected mode in \['freeze', 'select'\]\. Received: "
                                       r"mode='prune'\."):
    _validate.one_of("mode", "prune", ("freeze", "select"))
