"""Where the mechanism's randomness comes from: OS entropy, and the insecure switch's checks."""

import warnings

import pytest

from tfdp_prune import randomness


def test_os_entropy_words_are_64_bit_words_read_from_os_urandom(monkeypatch):
  requested = []

  def fake_urandom(size):
    requested.append(size)
    return bytes(range(size))

  monkeypatch.setattr(randomness.os, "urandom", fake_urandom)
  words = randomness.os_entropy_words(2)
  assert requested == [16]
  assert words == [int.from_bytes(bytes(range(8)), "little"),
                   int.from_bytes(bytes(range(8, 16)), "little")]


def test_os_entropy_words_differ_between_calls():
  first, second = randomness.os_entropy_words(2), randomness.os_entropy_words(2)
  assert first != second and all(0 <= w < 2**64 for w in first + second)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_invalid_insecure_seeds_are_refused(seed):
  with pytest.raises(ValueError, match="insecure_x"):
    randomness.check_insecure_seed("insecure_x", seed)


def test_labels_and_the_warning():
  assert randomness.source(None) == randomness.OS_ENTROPY
  assert randomness.source(0) == randomness.INSECURE_SEED
  assert randomness.check_insecure_seed("insecure_x", 987654321) == 987654321
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    randomness.warn_insecure("the noise", "insecure_x")
  assert len(caught) == 1 and issubclass(caught[0].category, randomness.InsecureRandomnessWarning)
  assert str(caught[0].message).startswith("INSECURE: the noise is derived from insecure_x")


def test_the_removed_seed_error_names_the_replacement():
  error = randomness.removed_seed_error("PoissonSampler", "insecure_sampling_seed")
  assert isinstance(error, TypeError)
  assert "no longer takes `seed=`" in str(error) and "insecure_sampling_seed" in str(error)
