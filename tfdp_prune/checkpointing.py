"""One checkpoint for a DP run: model, optimizer, privacy ledger and sampler, written atomically.

The checkpoint API in one place (`DPCheckpoint`, `restore_latest`, `latest_checkpoint`, the
ledger functions), re-exported from the modules that implement it, one job each.

Design: docs/checkpoints.md
"""

from tfdp_prune.checkpoint_errors import CheckpointError
from tfdp_prune.checkpoint_errors import CheckpointWriteError
from tfdp_prune.checkpoint_format import FORMAT_VERSION
from tfdp_prune.checkpoint_format import MARKER
from tfdp_prune.checkpoint_format import POINTER
from tfdp_prune.checkpoint_format import SIDECAR
from tfdp_prune.checkpoint_format import STATE_PREFIX
from tfdp_prune.checkpoint_format import CheckpointInfo
from tfdp_prune.checkpoint_format import clean_incomplete
from tfdp_prune.checkpoint_format import latest_checkpoint
from tfdp_prune.checkpoint_format import write_checkpoint
from tfdp_prune.checkpoint_restore import restore_latest
from tfdp_prune.dp_checkpoint import DPCheckpoint
from tfdp_prune.privacy_ledger_file import CARRY_FLAG
from tfdp_prune.privacy_ledger_file import LEDGER
from tfdp_prune.privacy_ledger_file import append_ledger
from tfdp_prune.privacy_ledger_file import ledger_file_digest
from tfdp_prune.privacy_ledger_file import read_carried
from tfdp_prune.privacy_ledger_file import read_ledger
from tfdp_prune.privacy_ledger_file import start_carried_ledger

__all__ = [
    "append_ledger",
    "CARRY_FLAG",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWriteError",
    "clean_incomplete",
    "DPCheckpoint",
    "FORMAT_VERSION",
    "latest_checkpoint",
    "LEDGER",
    "ledger_file_digest",
    "MARKER",
    "POINTER",
    "read_carried",
    "read_ledger",
    "restore_latest",
    "SIDECAR",
    "start_carried_ledger",
    "STATE_PREFIX",
    "write_checkpoint",
]
