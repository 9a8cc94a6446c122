"""The repository's layout: the design card's top-level folders, installed as one package, and the
README's layout table, which names every directory and module."""

import os
import re
import tomllib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_OURS = {".git", ".venv", "build", "dist", "tfdp_export"}


def _pyproject():
  with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["tool"]["setuptools"]


def _layout_rows():
  """{path cell without backticks: what cell} of the README's Layout table."""
  with open(os.path.join(_REPO, "README.md"), encoding="utf-8") as f:
    section = f.read().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| (.+?) \| (.+) \|$", section, flags=re.M)
  return {path.replace("`", ""): what for path, what in rows if path != "path" and "---" not in path}


def _source_dir(package: str) -> str:
  """The directory pyproject.toml installs `package` from."""
  mapping = _pyproject()["package-dir"]
  for parent in sorted(mapping, key=len, reverse=True):
    if package == parent or package.startswith(parent + "."):
      return os.path.join(mapping[parent], *package[len(parent):].split(".")[1:])
  raise AssertionError(f"{package} has no package-dir entry")


def test_the_design_cards_top_level_folders_are_installed_as_the_one_package_tfdp_prune():
  tool = _pyproject()
  assert {"tfdp_prune", "trainers", "export"} <= set(tool["package-dir"].values())
  assert all(name.split(".")[0] == "tfdp_prune" for name in tool["packages"])
  listed = {os.path.normpath(_source_dir(name)) for name in tool["packages"]}
  on_disk = {os.path.relpath(root, _REPO) for top in set(tool["package-dir"].values())
             for root, _, files in os.walk(os.path.join(_REPO, top))
             if "__init__.py" in files}
  assert listed == on_disk, "pyproject.toml's packages and the package directories differ"


def test_the_readme_layout_table_has_a_row_for_every_top_level_entry_and_no_other():
  rows = _layout_rows()
  named = {path.strip("/") for cell in rows for path in cell.split(", ") if path[0] != "."}
  tracked = {name for name in os.listdir(_REPO)
             if not name.startswith(".") and name not in _NOT_OURS
             and not name.endswith(".egg-info") and name not in ("README.md", "RESULTS.md",
                                                                 "pyproject.toml", "pytest.ini")}
  assert named == tracked


def test_the_readme_layout_table_names_every_module_of_the_package():
  rows = _layout_rows()
  missing = []
  for top in _pyproject()["package-dir"].values():
    text = rows[f"{top}/"]
    for root, _, files in os.walk(os.path.join(_REPO, top)):
      for name in files:
        if name.endswith(".py") and name != "__init__.py" and f"`{name[:-3]}`" not in text:
          missing.append(os.path.relpath(os.path.join(root, name), _REPO))
  assert not missing, f"modules the README's Layout table does not name: {missing}"


def test_every_console_script_is_the_run_main_the_binary_tests_call():
  """The tests run `tfdp_prune.trainers.<binary>.run_main` in process (or in a driver); the
  installed scripts must be exactly those functions (CI also runs each script's --help)."""
  with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert set(scripts) == {"tfdp-train", "tfdp-export", "tfdp-audit"}
  for name, target in scripts.items():
    module, function = target.split(":")
    assert (module, function) == (f"tfdp_prune.trainers.{name[len('tfdp-'):]}", "run_main"), name
    package, leaf = module.rsplit(".", 1)
    with open(os.path.join(_REPO, _source_dir(package), leaf + ".py"), encoding="utf-8") as f:
      assert re.search(r"^def run_main\(\):", f.read(), flags=re.M), target
