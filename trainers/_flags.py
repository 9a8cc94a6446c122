"""Absl flags generated from a settings dataclass: each field is one flag, its help text beside it.

A field declares its help text in `metadata["help"]` and, for a choice, the accepted names in
`metadata["choices"]` (`train_config.setting` does both); the flag's kind follows the field's
type. Every flag defaults to None, which the binaries read as "not given, keep the default".
"""

import dataclasses
import typing
from typing import Tuple, Union

from absl import flags

_KINDS = {str: "string", int: "integer", float: "float", bool: "bool"}
_DEFINES = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
            "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}
# The flags `define` creates are key flags of its caller (the binary, whose --help lists them).
flags.disclaim_key_flags()

# (name, kind, help): kind is "string", "integer", "float", "bool" or a tuple of choices.
FlagSpec = Tuple[str, Union[str, Tuple[str, ...]], str]


def flag_kind(field: dataclasses.Field) -> Union[str, Tuple[str, ...]]:
  """The kind of flag that sets `field`: its choices (an enum flag), or its type's kind."""
  if field.metadata.get("choices"):
    return tuple(field.metadata["choices"])
  value_type = field.type
  not_none = [arg for arg in typing.get_args(value_type) if arg is not type(None)]
  if typing.get_origin(value_type) is Union and len(not_none) == 1:  # Optional[X]
    value_type = not_none[0]
  if value_type not in _KINDS:
    raise TypeError(f"Expected the setting {field.name} to be a str, int, float or bool (or "
                    f"Optional of one) to have a flag. Received: {field.type}.")
  return _KINDS[value_type]


def flag_specs(config_class) -> Tuple[FlagSpec, ...]:
  """(name, kind, help) of every field of the dataclass `config_class`, in field order."""
  specs = []
  for field in dataclasses.fields(config_class):
    help_text = field.metadata.get("help")
    if not help_text:
      raise TypeError(f"Expected {config_class.__name__}.{field.name} to have the help text of "
                      f"its flag (declare it with train_config.setting(default, help_text)).")
    specs.append((field.name, flag_kind(field), help_text))
  return tuple(specs)


def help_text(config_class, name: str) -> str:
  """The help text of the flag that sets the field `name` of `config_class`."""
  return {spec_name: text for spec_name, _, text in flag_specs(config_class)}[name]


def define(name: str, kind, help_text: str) -> flags.FlagHolder:
  """Defines the flag `--name` of `kind` with default None ("not given")."""
  if isinstance(kind, tuple):
    return flags.DEFINE_enum(name, None, list(kind), help_text)
  return _DEFINES[kind](name, None, help_text)
