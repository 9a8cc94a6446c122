"""The settings of the DP mechanism, in one value object validated once.

The train step reads the clipping ones (`l2_norm_clip`, `num_microbatches`,
`per_example_engine`); the DP optimizer reads the aggregation ones (`noise_multiplier`,
`expected_batch_size`, `gradient_accumulation_steps`, `insecure_noise_seed`). The stages that use
them are in `dp_step`.
"""

import dataclasses
from typing import Optional

from tfdp_prune import _validate
from tfdp_prune import engines
from tfdp_prune import per_example
from tfdp_prune import randomness


@dataclasses.dataclass(frozen=True)
class DPSettings:
  """What one DP step clips to, how it is noised, and over how many examples it averages.

  Attributes:
    l2_norm_clip: C, the bound on each clipping unit's L2 norm (updated coordinates only).
    noise_multiplier: sigma; the noise on the sum has std sigma * C.
    num_microbatches: None clips each example; an integer clips each of that many groups of
      consecutive rows (TF Privacy's microbatches).
    expected_batch_size: for Poisson sampling, the expected number of examples in one LOGICAL
      batch over all replicas (q * N); the noisy sum is divided by it. None divides by the
      actual number of rows (padding included), for fixed-size batches.
    gradient_accumulation_steps: physical batches summed into one logical batch, i.e. one
      noisy update and one accounting step.
    insecure_noise_seed: None: the noise comes from OS entropy. An integer makes it
      reproducible, which is INSECURE (tests and debugging only).
    per_example_engine: a `per_example.PerExampleEngine`, or its name or config
      ("per_layer", "vectorized"), which is resolved to an engine instance.

  Raises:
    ValueError: for a value out of range, or `expected_batch_size` with `num_microbatches`.
  """
  l2_norm_clip: float
  noise_multiplier: float
  num_microbatches: Optional[int] = None
  expected_batch_size: Optional[float] = None
  gradient_accumulation_steps: int = 1
  insecure_noise_seed: Optional[int] = None
  per_example_engine: per_example.PerExampleEngine = "per_layer"

  def __post_init__(self):
    _validate.positive("l2_norm_clip", self.l2_norm_clip)
    _validate.non_negative("noise_multiplier", self.noise_multiplier)
    if self.num_microbatches is not None:
      _validate.positive_int("num_microbatches", self.num_microbatches)
    if self.expected_batch_size is not None:
      _validate.positive("expected_batch_size", self.expected_batch_size)
      if self.num_microbatches is not None:
        raise ValueError(
            "expected_batch_size (Poisson sampling, variable batch) cannot be combined with "
            f"num_microbatches={self.num_microbatches} (fixed groups of the batch). Received "
            "both; drop num_microbatches to clip per example.")
    _validate.positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
    normalized = dict(
        l2_norm_clip=float(self.l2_norm_clip),
        noise_multiplier=float(self.noise_multiplier),
        insecure_noise_seed=randomness.check_insecure_seed("insecure_noise_seed",
                                                           self.insecure_noise_seed),
        # The one place the engine registry is used, both ways (see `to_config`).
        per_example_engine=engines.get(self.per_example_engine))
    for name, value in normalized.items():
      object.__setattr__(self, name, value)  # frozen: set once, here

  def to_config(self) -> dict:
    """The settings as JSON-able optimizer config entries (the constructor's keywords)."""
    return dict(l2_norm_clip=self.l2_norm_clip, noise_multiplier=self.noise_multiplier,
                num_microbatches=self.num_microbatches,
                expected_batch_size=self.expected_batch_size,
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                insecure_noise_seed=self.insecure_noise_seed,
                per_example_engine=engines.serialize(self.per_example_engine))
