"""Durable, atomic file writes: the one place the write protocol lives.

A file or directory appears under its final name complete or not at all: it is written under a
temporary `.tmp-*` name in the same directory (same file system: a rename is atomic on POSIX),
fsync'ed with the directory that holds it, renamed into place, and the parent is fsync'ed so that
the rename survives a crash. Used by checkpoints, the privacy ledger, run records, exports and
reports; it imports nothing of the library.
"""

import os
import shutil
import uuid

# Entries with this prefix are work in progress or leftovers: readers never trust them, and the
# one writer of a directory deletes them.
TMP_PREFIX = ".tmp-"


def temporary_path(directory: str, label: str, suffix_length: int = 8) -> str:
  """A fresh `.tmp-<label>-<random>` path in `directory` (nothing is created)."""
  return os.path.join(directory, f"{TMP_PREFIX}{label}-{uuid.uuid4().hex[:suffix_length]}")


def fsync(path: str) -> None:
  """Flushes a file's contents or a directory's entries (its renames) to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """Flushes every file and directory under `root` (and `root`) to disk, deepest first."""
  for directory, _, names in os.walk(root, topdown=False):
    for name in names:
      fsync(os.path.join(directory, name))
    fsync(directory)


def write_durably(path: str, text: str) -> None:
  """Writes `text` to `path` (UTF-8) and fsyncs it before returning. Not atomic by itself: use
  it inside a temporary directory, or through `replace_file`."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def replace_file(path: str, text: str) -> None:
  """Replaces the file `path` by `text` atomically and durably: a temporary `.tmp-*` file in
  the same directory, fsync, one `os.replace`, fsync of the directory."""
  directory, name = os.path.split(path)
  tmp = temporary_path(directory, name)
  write_durably(tmp, text)
  os.replace(tmp, path)
  fsync(directory or ".")


def rename_into_place(tmp: str, final: str) -> None:
  """Renames the complete, flushed `tmp` to `final` (one rename) and fsyncs the parent.

  `final` must not exist (a directory cannot be renamed over a non-empty one): move an old one
  aside first."""
  os.rename(tmp, final)
  fsync(os.path.dirname(final) or ".")


def remove(path: str) -> None:
  """Deletes `path` (a file or a directory tree) without ever leaving it half-deleted under its
  name: it is first renamed to a `.tmp-delete-*` name (atomic, fsync'ed), then deleted."""
  directory, name = os.path.split(path)
  if not name.startswith(TMP_PREFIX):
    doomed = os.path.join(directory, f"{TMP_PREFIX}delete-{uuid.uuid4().hex[:8]}-{name}")
    os.rename(path, doomed)
    fsync(directory)
    path = doomed
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass
