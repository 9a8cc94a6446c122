"""Versioned JSON records: one envelope (a name and a version field) for every record we write.

Each kind of record keeps the field names it has on disk (run records and checkpoint sidecars:
`format_version`; privacy metadata: `schema` + `schema_version`; a privacy spec: `format` +
`version`), so files written before this module read back unchanged.
"""

import dataclasses
from typing import Any, Dict, Optional


class VersionError(ValueError):
  """A record is not of the expected kind or version; the message names the record and what it
  holds."""


@dataclasses.dataclass(frozen=True)
class Envelope:
  """The header of one kind of versioned record.

  Attributes:
    version: the version this release writes and reads.
    version_key: the field that holds the version.
    name: the record kind's name (e.g. "tfdp_prune.PrivacyMetadata"), or None when the record
      carries no name.
    name_key: the field that holds `name`.
  """

  version: int
  version_key: str = "format_version"
  name: Optional[str] = None
  name_key: Optional[str] = None

  def __post_init__(self):
    if (self.name is None) != (self.name_key is None):
      raise ValueError(f"Expected both name and name_key, or neither. Received: "
                       f"name={self.name!r}, name_key={self.name_key!r}.")

  @property
  def keys(self) -> tuple:
    """The header's field names (not part of the record's body)."""
    return (self.name_key, self.version_key) if self.name_key else (self.version_key,)

  def header(self) -> Dict[str, Any]:
    """The fields that open a record of this kind: `{**envelope.header(), ...body}`."""
    header = {self.name_key: self.name} if self.name_key else {}
    header[self.version_key] = self.version
    return header

  def problem(self, data, source: Optional[str] = None) -> Optional[str]:
    """What makes `data` (read from `source`, e.g. a file name) not a record of this kind and
    version, or None if it is one."""
    where = f" in {source}" if source else ""
    if not isinstance(data, dict):
      return (f"Expected a JSON object{where} (a {self.name or 'versioned'} record). Received: "
              f"a {type(data).__name__}.")
    if self.name_key and data.get(self.name_key) != self.name:
      return (f"Expected a dict with {self.name_key}={self.name!r}{where}. Received: "
              f"{self.name_key}={data.get(self.name_key)!r}.")
    if data.get(self.version_key) != self.version:
      return (f"Expected {self.version_key}={self.version}{where}. Received: "
              f"{self.version_key}={data.get(self.version_key)!r}.")
    return None

  def check(self, data, source: Optional[str] = None) -> Dict[str, Any]:
    """`data`, if it is a record of this kind and version; else VersionError (see `problem`)."""
    problem = self.problem(data, source)
    if problem is not None:
      raise VersionError(problem)
    return data
