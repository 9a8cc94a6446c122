"""tfdp_prune: differentially private Keras training of the parameters chosen from public data."""

from tfdp_prune.accounting import PrivacyLedger
from tfdp_prune.accounting import PrivacySpec
from tfdp_prune.accounting import calibrate_noise_multiplier
from tfdp_prune.agreement import check_agreement
from tfdp_prune.audit import AuditConfig
from tfdp_prune.audit import audit_training
from tfdp_prune.audit_bounds import epsilon_lower_bound
from tfdp_prune.augmult import augment_views
from tfdp_prune.augmult import augmult_map
from tfdp_prune.budget import PrivacyBudget
from tfdp_prune.budget import PrivacyBudgetExhaustedError
from tfdp_prune.checkpointing import DPCheckpoint
from tfdp_prune.checkpointing import latest_checkpoint
from tfdp_prune.checkpointing import restore_latest
from tfdp_prune.data import DatasetNotAvailableError
from tfdp_prune.data import DataSplits
from tfdp_prune.data import load as load_data
from tfdp_prune.ema import ExponentialMovingAverage
from tfdp_prune.freezing import ParameterFreezing
from tfdp_prune.layer_rules import LayerRule
from tfdp_prune.layer_rules import register_layer_rule
from tfdp_prune.maskable import MaskableSpec
from tfdp_prune.masks import MagnitudeRule
from tfdp_prune.masks import MaskRule
from tfdp_prune.masks import PublicGradientRule
from tfdp_prune.masks import RandomRule
from tfdp_prune.metadata import PrivacyMetadata
from tfdp_prune.models import WSConv2D
from tfdp_prune.models import mlp
from tfdp_prune.models import mnist_cnn
from tfdp_prune.models import wide_resnet
from tfdp_prune.optimizer import DPKerasAdamOptimizer
from tfdp_prune.optimizer import DPKerasSGDOptimizer
from tfdp_prune.optimizer import make_dp_optimizer_class
from tfdp_prune.overlap import PublicDataFingerprint
from tfdp_prune.overlap import check_disjoint
from tfdp_prune.overlap import fingerprint_examples
from tfdp_prune.per_example import PerExampleEngine
from tfdp_prune.per_example import VectorizedEngine
from tfdp_prune.per_layer import PerLayerEngine
from tfdp_prune.sampling import PoissonSampler
from tfdp_prune.sampling import ShuffleSampler
from tfdp_prune.sampling import make_sampler
from tfdp_prune.selection import ParameterSelection
from tfdp_prune.train_config import TrainConfig
from tfdp_prune.train_step import make_private
from tfdp_prune.training import train
from tfdp_prune.training import tune_on_public
from tfdp_prune.tuning import TuningResult
from tfdp_prune.version import __version__
from tfdp_prune.ws_conv_rule import WSConv2DRule

__all__ = [
    "AuditConfig",
    "DPCheckpoint",
    "DPKerasAdamOptimizer",
    "DPKerasSGDOptimizer",
    "DataSplits",
    "DatasetNotAvailableError",
    "ExponentialMovingAverage",
    "LayerRule",
    "MagnitudeRule",
    "MaskRule",
    "MaskableSpec",
    "ParameterFreezing",
    "ParameterSelection",
    "PerExampleEngine",
    "PerLayerEngine",
    "PoissonSampler",
    "PrivacyBudget",
    "PrivacyBudgetExhaustedError",
    "PrivacyLedger",
    "PrivacyMetadata",
    "PrivacySpec",
    "PublicDataFingerprint",
    "PublicGradientRule",
    "RandomRule",
    "ShuffleSampler",
    "TrainConfig",
    "TuningResult",
    "VectorizedEngine",
    "WSConv2D",
    "WSConv2DRule",
    "audit_training",
    "augment_views",
    "augmult_map",
    "calibrate_noise_multiplier",
    "check_agreement",
    "check_disjoint",
    "epsilon_lower_bound",
    "fingerprint_examples",
    "latest_checkpoint",
    "load_data",
    "make_dp_optimizer_class",
    "make_private",
    "make_sampler",
    "mlp",
    "mnist_cnn",
    "register_layer_rule",
    "restore_latest",
    "train",
    "tune_on_public",
    "wide_resnet",
]
