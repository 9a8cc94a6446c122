"""Sampling schemes: one module per scheme (its accounting, statement, agreement checks and the
draw of its sampler), and the registry that names them (see
`registry.register_sampling_scheme`). Design: docs/sampling-and-accounting.md."""

from tfdp_prune.sampling_schemes.base import Draw
from tfdp_prune.sampling_schemes.base import SamplingScheme
from tfdp_prune.sampling_schemes.registry import register_sampling_scheme
from tfdp_prune.sampling_schemes.registry import unregister_sampling_scheme

__all__ = ["Draw", "SamplingScheme", "register_sampling_scheme", "unregister_sampling_scheme"]
