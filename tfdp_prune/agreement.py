"""The sampler, the DP optimizer and the privacy budget agree on what a logical batch is, or
training does not start (DESIGN.md rule 10).

`check_agreement(optimizer, sampler=..., spec=...)` compares what it is given.

Design: docs/sampling-and-accounting.md
"""

import math
from typing import List, Optional

from tfdp_prune.accounting import PrivacySpec

_FIX = ("Build the optimizer and the budget from the sampler: "
        "`DPKeras...Optimizer(..., expected_batch_size=sampler.expected_batch_size, "
        "gradient_accumulation_steps=sampler.gradient_accumulation_steps)` and "
        "`PrivacyBudget(sampler.privacy_spec(noise_multiplier=<the optimizer's>, steps=0, "
        "delta=...), sampler=sampler)`.")


def check_agreement(optimizer, *, sampler=None, spec: Optional[PrivacySpec] = None,
                    num_examples: Optional[int] = None) -> None:
  """Raises if the optimizer, the sampler and the spec describe different logical batches.

  Args:
    optimizer: a tfdp_prune DP optimizer.
    sampler: the sampler (`PoissonSampler`, `ShuffleSampler`, ...) whose `dataset()` feeds
      `fit`, or None. What depends on its sampling scheme, the scheme says
      (`sampling_schemes`).
    spec: the budget's `PrivacySpec`, or None.
    num_examples: the private dataset size N (defaults to the sampler's, then the spec's), to
      check a Poisson `expected_batch_size` = q N without a sampler.

  Raises:
    ValueError: listing each disagreement, what each of the three says, and the fix.
  """
  if num_examples is None:
    num_examples = sampler.num_examples if sampler is not None else (
        spec.num_examples if spec is not None else None)
  problems = []
  if sampler is not None:
    problems += _sampler_and_optimizer(sampler, optimizer)
  if spec is not None:
    problems += _spec_and_optimizer(spec, optimizer, num_examples, check_microbatches=(
        sampler is None))
  if sampler is not None and spec is not None:
    problems += _sampler_and_spec(sampler, spec)
  if problems:
    said = [f"the optimizer: {_describe_optimizer(optimizer)}"]
    if sampler is not None:
      said.append(f"the sampler: {_describe_sampler(sampler)}")
    if spec is not None:
      said.append(f"the budget: {_describe_spec(spec)}")
    raise ValueError(
        "The sampler, the DP optimizer and the privacy budget must agree on what one logical "
        "batch is, or the reported epsilon does not describe the training done. Received: "
        + "; ".join(said) + ". Disagreements: " + " ".join(f"({i + 1}) {p}"
                                                             for i, p in enumerate(problems))
        + " " + _FIX)


def _sampler_and_optimizer(sampler, optimizer) -> List[str]:
  problems = []
  steps = sampler.gradient_accumulation_steps
  if steps != optimizer.gradient_accumulation_steps:
    problems.append(
        f"the sampler cuts each draw into {steps} physical batch(es), the optimizer sums "
        f"{optimizer.gradient_accumulation_steps} into one noisy update: each update would hold "
        f"{optimizer.gradient_accumulation_steps / steps:g} draws while the budget counts one. "
        "Pass the same gradient_accumulation_steps to both.")
  # Padding rows per logical batch (None: their number varies, as with Poisson batches).
  padding = sampler.scheme.padding_rows(sampler)
  expected = optimizer.expected_batch_size
  if padding is None or padding > 0:
    if expected is None:
      problems.append(
          "the optimizer divides the noisy sum by the rows of each logical batch, padding "
          f"included ({sampler.physical_batch_size * steps}), not by the expected batch size "
          f"{sampler.expected_batch_size:g}. Pass expected_batch_size=sampler.expected_batch_size.")
  if expected is not None and not math.isclose(expected, sampler.expected_batch_size,
                                               rel_tol=1e-9):
    problems.append(
        f"the optimizer divides by expected_batch_size={expected:g}, the sampler's expected "
        f"logical batch is {sampler.expected_batch_size:g}. Pass "
        "expected_batch_size=sampler.expected_batch_size.")
  problems += _microbatch_problems(optimizer.num_microbatches, sampler, padding)
  return problems


def _microbatch_problems(num_microbatches, sampler, padding) -> List[str]:
  """Microbatches group consecutive rows: only fixed-size batches without padding keep each
  group made of the same examples whatever one example does (issue: with Poisson batches one
  more example shifts every later row into another group)."""
  if not num_microbatches or num_microbatches == sampler.physical_batch_size:
    return []  # None, or one row per microbatch: per-example clipping
  problems = sampler.scheme.microbatch_problems(num_microbatches, sampler, padding)
  if problems:
    return problems
  if sampler.physical_batch_size % num_microbatches:
    return [f"num_microbatches={num_microbatches} does not divide the physical batch size "
            f"{sampler.physical_batch_size}. Use num_microbatches=None (per-example clipping) "
            "or a divisor of the physical batch size."]
  return []


def _spec_and_optimizer(spec, optimizer, num_examples, check_microbatches) -> List[str]:
  problems = []
  if float(optimizer.noise_multiplier) != spec.noise_multiplier:
    problems.append(
        f"the optimizer's noise_multiplier={optimizer.noise_multiplier} differs from the "
        f"spec's noise_multiplier={spec.noise_multiplier}: the epsilon would not describe the "
        "noise actually added.")
  problems += spec.scheme.spec_and_optimizer_problems(spec, optimizer, num_examples,
                                                      check_microbatches)
  return problems


def _sampler_and_spec(sampler, spec) -> List[str]:
  if sampler.sampling != spec.sampling:
    return [f"the sampler draws {sampler.sampling} batches, the budget accounts for "
            f"{spec.sampling} sampling. Build the spec with `sampler.privacy_spec(...)`."]
  return spec.scheme.sampler_and_spec_problems(sampler, spec)


def _describe_optimizer(optimizer) -> str:
  return (f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}, "
          f"expected_batch_size={optimizer.expected_batch_size}, "
          f"num_microbatches={optimizer.num_microbatches}, "
          f"noise_multiplier={optimizer.noise_multiplier}")


def _describe_sampler(sampler) -> str:
  draw = sampler.scheme.describe_sampler(sampler)
  return (f"{draw}, {sampler.gradient_accumulation_steps} physical batch(es) of "
          f"{sampler.physical_batch_size} rows per logical batch")


def _describe_spec(spec) -> str:
  draw = spec.scheme.describe_spec(spec)
  return (f"{draw}, noise_multiplier={spec.noise_multiplier}, one accounting step per "
          "optimizer update")
