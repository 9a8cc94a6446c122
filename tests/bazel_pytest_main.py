"""Entry point of the Bazel py_test targets (see BUILD): runs one pytest file.

`bazel test //:test_noise` runs `tests/bazel_pytest_main.py tests/tfdp_prune/test_noise.py` in the
runfiles tree, where pytest.ini and tests/conftest.py are present, so it selects and sets up
tests exactly as `python -m pytest tests/tfdp_prune/test_noise.py` does. Not a test module.
"""

import sys

import pytest

if __name__ == "__main__":
  sys.exit(pytest.main(sys.argv[1:]))
