"""The append-only privacy ledger of a checkpoint directory, `privacy_ledger.jsonl` (DESIGN.md
rule 15).

Before each logical step runs, a line with the spent budget after it (and its SHA-256) is
appended and fsync'ed, so that no crash, damaged or lost checkpoint rolls the spent privacy
back. A ledger may begin with the spend of an older run that it carries (`start_carried_ledger`).
"""

import json
import os
from typing import Any, Dict, Optional

from absl import logging

from tfdp_prune import _digests
from tfdp_prune import atomic_files
from tfdp_prune.checkpoint_errors import CheckpointError
from tfdp_prune.checkpoint_errors import write_failed

LEDGER = "privacy_ledger.jsonl"
# The setting that starts a new run's ledger at an old run's spend (`start_carried_ledger`).
CARRY_FLAG = "--carry_spend_from"


def _ledger_choices(directory) -> str:
  """A damaged ledger cannot be carried: the spent privacy is unknown."""
  return (f"Nothing was deleted. The privacy already spent on this data cannot be read, so it "
          f"cannot be carried into a new run either: restore {os.path.join(directory, LEDGER)} "
          "from a backup.")


def read_ledger(directory: str) -> Optional[Dict[str, Any]]:
  """The record with the most logical steps in `directory/LEDGER`, `{"state": <PrivacyLedger
  state>, "iterations": <the optimizer's iterations after those steps>}`, or None without a
  ledger file.

  The ledger is append-only: one line per record, the record and its SHA-256, fsync'ed before
  the steps it covers run. A last line without its
  newline is a write that a kill interrupted (its steps never ran) and is ignored; any other
  line that does not parse or match its digest raises `CheckpointError`."""
  records = _ledger_records(directory)
  if records is None:
    return None
  best = max(records, key=lambda body: body["state"]["steps"])
  return {"state": best["state"], "iterations": best["iterations"]}


def read_carried(directory: str) -> Optional[Dict[str, Any]]:
  """What the ledger of `directory` carried from an older run when it began (`{"path": the
  old ledger, "sha256": its digest then, "steps": its steps}`), or None (no ledger, or one that
  began at 0 steps). Raises CheckpointError as `read_ledger`."""
  records = _ledger_records(directory)
  return None if not records else records[0].get("carried")


def ledger_file_digest(directory: str) -> str:
  """The SHA-256 of `directory/LEDGER` as it is now (what a carried spend records)."""
  return _digests.file_digest(os.path.join(directory, LEDGER))


def start_carried_ledger(directory: str, state: Dict[str, Any],
                         carried: Dict[str, Any]) -> None:
  """Begins the ledger of a new run's `directory` at an old run's spend: its first line records
  `state` (the old steps, before any step of the new run: iterations 0) and `carried` (where
  they come from). A ledger that already began with the same carried spend (a resumed new run)
  is left as it is; any other ledger there is refused: that directory belongs to another run."""
  os.makedirs(directory, exist_ok=True)
  existing = read_carried(directory)
  if existing is None and read_ledger(directory) is None:
    append_ledger(directory, state, 0, carried=carried)
    return
  if existing != carried:
    raise CheckpointError(
        f"{os.path.join(directory, LEDGER)} belongs to another run (it began "
        f"{'with no carried spend' if existing is None else f'carrying {existing}'}, not "
        f"{carried}). Pass a new directory for the run that carries the old spend.")


def _ledger_records(directory: str):
  """Every record of `directory/LEDGER` in order (`{"state", "iterations"[, "carried"]}`), or
  None without a ledger file; see `read_ledger` for what is refused."""
  path = os.path.join(directory, LEDGER)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise CheckpointError(f"Cannot read the privacy ledger {path} ({e}). "
                          f"{_ledger_choices(directory)}") from e
  lines = data.split(b"\n")
  lines.pop()  # after the last newline: empty, or a write a kill interrupted
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line.decode("utf-8"))
      body = {key: record[key] for key in ("state", "iterations", "carried") if key in record}
      if (record["sha256"] != _digests.json_digest(body)
          or not isinstance(body["state"].get("steps"), int)):
        raise ValueError("its digest does not match")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"The privacy ledger {path} is corrupt at line {number} ({e}). "
                            f"{_ledger_choices(directory)}") from e
    records.append(body)
  return records


def append_ledger(directory: str, state: Dict[str, Any], iterations: int,
                  carried: Optional[Dict[str, Any]] = None) -> None:
  """Appends `state` (a `PrivacyLedger` state, the spent budget once the optimizer reaches
  `iterations`) to `directory/LEDGER` and makes it durable (fsync of the file, and of the
  directory when the file is new) before returning. `carried`: see `start_carried_ledger`."""
  path = os.path.join(directory, LEDGER)
  new = not os.path.exists(path)
  body = {"state": state, "iterations": int(iterations)}
  if carried is not None:
    body["carried"] = carried
  line = json.dumps(dict(body, sha256=_digests.json_digest(body)), sort_keys=True) + "\n"
  try:
    _append_line(path, line)
    if new:
      atomic_files.fsync(directory)
  except OSError as error:  # the step it covers has not run: the ledger did not go back
    raise write_failed("the privacy ledger", path, error) from error


def _append_line(path: str, line: str) -> None:
  """Appends `line` to the ledger file and fsyncs it (a torn earlier append is cut first)."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    if size:  # drop the tail of an append a kill interrupted (it covered no step that ran)
      with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
          f.seek(0)
          keep = f.read().rfind(b"\n") + 1
          logging.warning("DPCheckpoint: %s ends in an interrupted write; truncating it to %d "
                          "bytes.", path, keep)
          os.ftruncate(fd, keep)
    view = memoryview(line.encode("utf-8"))
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)
