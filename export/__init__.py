"""The export stage: a SavedModel in the TF Serving layout with its privacy guarantee attached."""

from tfdp_prune.export.inspection import ExportError
from tfdp_prune.export.inspection import ExportReport
from tfdp_prune.export.inspection import VersionReport
from tfdp_prune.export.inspection import format_report
from tfdp_prune.export.inspection import inspect_export
from tfdp_prune.export.inspection import read_metadata
from tfdp_prune.export.saved_model import export_saved_model
from tfdp_prune.export.serving_files import SignatureInfo
from tfdp_prune.export.serving_files import TensorSpecInfo
from tfdp_prune.export.serving_files import render_model_card

__all__ = [
    "ExportError",
    "ExportReport",
    "SignatureInfo",
    "TensorSpecInfo",
    "VersionReport",
    "export_saved_model",
    "format_report",
    "inspect_export",
    "read_metadata",
    "render_model_card",
]
