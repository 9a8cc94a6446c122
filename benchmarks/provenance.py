"""Which code a benchmark measured: the git commit of a checkout (shared by the benchmarks)."""

import subprocess
from typing import Optional


def git_commit(directory: str) -> Optional[str]:
  """HEAD of the checkout at `directory`, with "+dirty(tfdp_prune)" when the library has
  uncommitted changes; None outside a git checkout."""
  try:
    rev = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", directory, "status", "--porcelain", "--", "tfdp_prune"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return rev + ("+dirty(tfdp_prune)" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None
