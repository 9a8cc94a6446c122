"""SHA-256 digests of files and JSON values: what checkpoints and the ledger record to detect
damage."""

import hashlib
import json


def file_digest(path) -> str:
  """The SHA-256 (hex) of the file at `path`, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def json_digest(value) -> str:
  """The SHA-256 (hex) of `value` as JSON with sorted keys."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()
