"""docs/: every page a module docstring points to exists, and docs/README.md indexes every page."""

import ast
import os
import re

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = os.path.join(_REPO, "docs")
# The directories pyproject.toml installs as the package tfdp_prune (tests/test_layout.py).
_PACKAGE_DIRS = ("tfdp_prune", "trainers", "export")
_POINTER = re.compile(r"docs/([\w.-]+\.md)")
_MAX_MODULE_DOCSTRING_LINES = 15  # a few lines and a pointer; the essays live in docs/


def _module_docstrings():
  """(path relative to the repository, docstring) of every module of the package."""
  found = []
  for top in _PACKAGE_DIRS:
    for root, _, files in os.walk(os.path.join(_REPO, top)):
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(root, name)
          with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()), clean=False)
          if doc:
            found.append((os.path.relpath(path, _REPO), doc))
  return found


def _pages():
  return sorted(name for name in os.listdir(_DOCS) if name.endswith(".md") and name != "README.md")


def test_every_docs_pointer_in_a_module_docstring_names_an_existing_page():
  pointers = [(path, page) for path, doc in _module_docstrings() for page in _POINTER.findall(doc)]
  assert pointers, "no module docstring points to docs/"
  missing = [f"{path}: docs/{page}" for path, page in pointers
             if not os.path.isfile(os.path.join(_DOCS, page))]
  assert not missing, f"module docstrings point to pages that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_index_and_every_link_exists():
  with open(os.path.join(_DOCS, "README.md"), encoding="utf-8") as f:
    index = f.read()
  links = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
  assert not [p for p in _pages() if p not in links], "pages missing from docs/README.md"
  assert not [l for l in links if not os.path.isfile(os.path.join(_DOCS, l))], "dead links"


@pytest.mark.parametrize("page", _pages())
def test_every_docs_page_is_pointed_to_by_a_module(page):
  assert any(f"docs/{page}" in doc for _, doc in _module_docstrings()), page


def test_module_docstrings_are_a_few_lines():
  long = [f"{path}: {doc.count(chr(10)) + 1} lines" for path, doc in _module_docstrings()
          if doc.count("\n") + 1 > _MAX_MODULE_DOCSTRING_LINES]
  assert not long, f"move the design essay into docs/ and point to it: {long}"
