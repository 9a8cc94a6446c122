"""One checkpoint for a DP run: model, optimizer, privacy ledger and sampler, written atomically.

The checkpoint API in one place, re-exported from the modules that implement it, one job each:
`checkpoint_format` (the directory's layout, atomic writes, reading only intact checkpoints),
`privacy_ledger_file` (the append-only ledger, DESIGN.md rule 15), `checkpoint_records` (what
identifies a run's model, optimizer and sampler), `checkpoint_restore` (`restore_latest`),
`dp_checkpoint` (the `DPCheckpoint` callback) and `checkpoint_errors`.

Checkpoints are taken only between logical batches (`optimizer.at_logical_batch_start()`), so
the accumulators are zero and a resumed run restarts its sampler exactly at a logical step:

  model = build_and_compile()                       # the same architecture and DP optimizer
  budget = tfdp_prune.PrivacyBudget(spec, target_epsilon=...)
  sampler = tfdp_prune.PoissonSampler(data, q, gradient_accumulation_steps=K)
  step = restore_latest(directory, model, budget=budget, sampler=sampler) or 0
  model.fit(sampler.dataset(start_step=step), steps_per_epoch=K * (total_steps - step),
            callbacks=[budget, DPCheckpoint(directory, every_steps=10, budget=budget,
                                            sampler=sampler)])

Resuming continues epsilon and the step count: the ledger comes back from the sidecar, or from
`privacy_ledger.jsonl` when more steps ran after the checkpoint, and is never lowered
(`PrivacyBudget.restore`); `iterations` comes back with the optimizer. Steps re-run after a
resume from a checkpoint older than the ledger draw the same batches and noise (restored from
the checkpoint) and count once; randomness outside the checkpoint (below) makes them differ.
Randomness that lives outside the optimizer and the sampler (e.g. Dropout's) is not part of the
checkpoint: a resumed run with such layers is valid but not bit-identical to an uninterrupted one.
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
