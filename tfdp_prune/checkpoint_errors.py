"""The errors of a checkpoint directory: a damaged checkpoint or ledger, and a failed write.

Both kinds keep what was written before; the messages name the file and the choices
(`checkpoint_format` describes the directory).
"""


class CheckpointError(ValueError):
  """A checkpoint, or the privacy ledger, of a checkpoint directory is corrupt or unreadable.

  Nothing is deleted or rolled back: the message names the file and the choices."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint or the ledger could not be written (a full disk, a read-only file system).

  What was written before is kept: no earlier checkpoint is lost, the ledger does not go back,
  and a step whose ledger line could not be written does not run."""


def write_failed(what: str, path: str, error: Exception) -> CheckpointWriteError:
  """The error to raise when writing `what` at `path` failed with `error`."""
  reason = getattr(error, "strerror", None) or getattr(error, "message", None) or error
  return CheckpointWriteError(
      f"Cannot write {what} {path} ({reason}). Nothing written before was "
      "lost: the earlier checkpoints and the privacy ledger are intact. Free space on that file "
      "system (or make it writable), then rerun with the same flags to resume.")
