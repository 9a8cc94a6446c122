"""Flags generated from settings dataclasses: one field, one flag, help text beside the field."""

import dataclasses
from typing import List, Optional

import pytest
from absl import flags

from tfdp_prune import train_config
from tfdp_prune.trainers import _flags
from tfdp_prune.trainers import train


@dataclasses.dataclass
class _Settings:
  count: Optional[int] = train_config.setting(None, "How many.")
  rate: float = train_config.setting(0.5, "How fast.")
  name: str = train_config.setting("a", "Which one.", choices=("a", "b"))
  dry_run: bool = train_config.setting(False, "Only print.")


def test_each_field_becomes_a_flag_of_its_type_with_its_help():
  assert _flags.flag_specs(_Settings) == (
      ("count", "integer", "How many."), ("rate", "float", "How fast."),
      ("name", ("a", "b"), "Which one."), ("dry_run", "bool", "Only print."))


def test_a_field_without_help_text_is_refused_by_name():
  @dataclasses.dataclass
  class Undocumented:
    documented: int = train_config.setting(1, "Documented.")
    hidden: int = 2

  with pytest.raises(TypeError, match="Undocumented.hidden"):
    _flags.flag_specs(Undocumented)


def test_a_field_of_a_type_no_flag_can_hold_is_refused_by_name():
  @dataclasses.dataclass
  class Listed:
    names: List[str] = train_config.setting(None, "Names.")

  with pytest.raises(TypeError, match="names"):
    _flags.flag_specs(Listed)


def test_every_train_config_field_is_a_flag_with_the_field_help_and_the_default():
  defaults = train_config.resolve()
  for field in dataclasses.fields(train_config.TrainConfig):
    flag = flags.FLAGS[field.name]
    assert flag.default is None, field.name  # "not given": the config's value stays
    choices = field.metadata["choices"]
    listed = f"<{'|'.join(choices)}>: " if choices else ""  # absl lists an enum's values
    assert flag.help == (f"{listed}{field.metadata['help']} (default config: "
                         f"{getattr(defaults, field.name)!r})"), field.name


def test_the_training_flags_are_key_flags_of_tfdp_train():
  listed = {flag.name for flag in flags.FLAGS.get_key_flags_for_module(train)}
  assert {f.name for f in dataclasses.fields(train_config.TrainConfig)} | {"config"} <= listed


_FLAG_TYPES = {"integer": "int", "float": "float", "string": "string", "bool": "bool"}


def test_every_audit_config_field_is_a_tfdp_audit_flag_of_its_kind_with_its_help():
  from tfdp_prune import audit as audit_lib  # pylint: disable=g-import-not-at-top
  from tfdp_prune.trainers import audit  # pylint: disable=g-import-not-at-top
  defaults = audit_lib.AuditConfig()
  specs = _flags.flag_specs(audit_lib.AuditConfig)
  assert set(audit._AUDIT_FLAGS) == {name for name, _, _ in specs}
  for name, kind, help_text in specs:
    flag = flags.FLAGS[name]
    assert flag.default is None and flag.flag_type() == _FLAG_TYPES[kind], name
    assert flag.help == help_text.format(default=getattr(defaults, name)), name
  assert flags.FLAGS["canaries"].help == (
      "Canaries m taken out of the private part, each put back mislabelled with probability 1/2 "
      "(default: 200).")
