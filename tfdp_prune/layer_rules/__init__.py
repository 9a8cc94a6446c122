"""Layer rules of the per-layer engine: one module per rule, and the registry that maps layer
classes to rules (see `registry.register_layer_rule`)."""

from tfdp_prune.layer_rules.base import CapturedCall
from tfdp_prune.layer_rules.base import ExampleLoop
from tfdp_prune.layer_rules.base import LayerRule
from tfdp_prune.layer_rules.base import Pieces
from tfdp_prune.layer_rules.generic import GENERIC
from tfdp_prune.layer_rules.registry import register_layer_rule
from tfdp_prune.layer_rules.registry import rule_for
from tfdp_prune.layer_rules.base import from_per_example
from tfdp_prune.layer_rules.base import select
