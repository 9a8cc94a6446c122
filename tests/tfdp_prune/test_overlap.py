import collections
import hashlib
from unittest import mock

import numpy as np
import pytest

from tfdp_prune import overlap
from tfdp_prune.compat import tf


def _images(n, seed):
  rng = np.random.default_rng(seed)
  return (rng.random((n, 6, 6)).astype("float32"), rng.integers(0, 10, n).astype("int32"))


def _digests(data, **kwargs):
  return overlap.fingerprint_examples(data, **kwargs)


def test_private_examples_copied_into_public_are_an_error_that_reports_the_count():
  private_x, private_y = _images(20, seed=0)
  public_x, public_y = _images(50, seed=1)
  public_x = np.concatenate([public_x, private_x[[2, 5, 11]]])
  public_y = np.concatenate([public_y, (private_y[[2, 5, 11]] + 1) % 10])  # relabeled copies
  with pytest.raises(ValueError) as error:
    overlap.check_disjoint((public_x, public_y), (private_x, private_y))
  message = str(error.value)
  assert "3 private example(s) (3 distinct)" in message
  assert "20 private and 53 public" in message
  assert "Remove these examples from the public data" in message
  assert "allow_overlap=True" in message


def test_disjoint_data_passes_and_returns_zero():
  assert overlap.check_disjoint(_images(50, seed=1), _images(20, seed=0)) == 0


def test_a_repeated_private_example_counts_once_per_copy():
  private_x, _ = _images(10, seed=0)
  private_x = np.concatenate([private_x, private_x[:1]])  # example 0 twice in the private data
  public_x = np.concatenate([_images(30, seed=1)[0], private_x[:1]])
  assert overlap.check_disjoint(public_x, private_x, allow_overlap=True) == 2
  with pytest.raises(ValueError, match=r"2 private example\(s\) \(1 distinct\)"):
    overlap.check_disjoint(public_x, private_x)


def test_allow_overlap_logs_a_warning_with_the_count_and_returns_it():
  private = _images(20, seed=0)
  public_x = np.concatenate([_images(40, seed=1)[0], private[0][:4]])
  with mock.patch.object(overlap.logging, "warning") as warning:
    assert overlap.check_disjoint(public_x, private, allow_overlap=True) == 4
  warning.assert_called_once()
  message = warning.call_args.args[0] % warning.call_args.args[1:]
  assert "4 private example(s) (4 distinct)" in message


def test_labels_do_not_take_part_in_the_fingerprint():
  x, y = _images(8, seed=0)
  assert _digests((x, y)) == _digests((x, (y + 3) % 10)) == _digests(x)
  assert _digests((x, y, np.ones(8))) == _digests(x)


def test_float_examples_that_differ_in_one_bit_are_different():
  for dtype, bits in (("float32", "uint32"), ("float64", "uint64")):
    x = np.random.default_rng(0).random((2, 5)).astype(dtype)
    flipped = x.copy()
    flipped.view(bits)[1, 3] ^= np.dtype(bits).type(1)  # lowest mantissa bit, example 1
    assert not np.array_equal(x, flipped)
    (kept, changed) = (list(_digests(x[i:i + 1]))[0] for i in range(2))
    assert _digests(flipped)[kept] == 1 and _digests(flipped)[changed] == 0, dtype
    assert overlap.check_disjoint(flipped[1:], x[1:]) == 0, dtype


def test_large_integers_are_compared_exactly_not_through_float64():
  a = np.array([[2 ** 53]], np.int64)
  b = np.array([[2 ** 53 + 1]], np.int64)  # the same float64 as 2 ** 53
  assert _digests(a) != _digests(b)
  huge = np.array([[2 ** 64 - 1], [2 ** 64 - 2]], np.uint64)
  assert len(_digests(huge)) == 2
  assert _digests(np.array([[2 ** 60]], np.uint64)) == _digests(np.array([[2 ** 60]], np.int64))


def test_storage_type_and_layout_do_not_take_part():
  # Decision: the same values are the same example, however stored: uint8 pixels copied into a
  # float32 public set (without rescaling) or reshaped for another model are still that person.
  pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4)).astype("uint8")
  expected = _digests(pixels)
  for same in (pixels.astype("float32"), pixels.astype("int64"), pixels.astype("float16"),
               pixels.reshape(5, 16), pixels.reshape(5, 4, 4, 1)):
    assert _digests(same) == expected, (same.dtype, same.shape)
  assert _digests(tf.constant(pixels, tf.bfloat16)) == expected
  assert _digests(np.array([[True, False]])) == _digests(np.array([[1.0, 0.0]]))
  assert _digests(np.array([[-0.0, np.nan]])) == _digests(np.array([[0.0, -np.nan]]))
  assert _digests(pixels / 255.0) != expected  # a rescaled copy is another example
  assert _digests(pixels.transpose(0, 2, 1)) != expected  # so is a transposed one


def test_fingerprints_are_stable_across_versions_of_the_code():
  # The format is recorded in privacy metadata: changing it needs a new FINGERPRINT_VERSION.
  values = np.array([1.0, 2.0, 3.0]).astype("<f8").tobytes()
  want = hashlib.sha256(b"tfdp_prune.overlap.v1\n" + b"n" + (24).to_bytes(8, "little") + values)
  assert overlap.FINGERPRINT_VERSION == "tfdp_prune.overlap.v1"
  assert _digests(np.array([[1, 2, 3]], np.int32)) == {want.hexdigest(): 1}


def test_datasets_and_numpy_give_the_same_fingerprints_and_are_iterated_once():
  x, y = _images(23, seed=0)
  expected = _digests((x, y), batch_size=7)
  assert sum(expected.values()) == 23 and len(expected) == 23
  assert _digests((x, y), batch_size=100) == expected
  assert _digests((tf.constant(x), tf.constant(y))) == expected
  assert _digests(tf.data.Dataset.from_tensor_slices((x, y)).batch(5)) == expected
  assert _digests(tf.data.Dataset.from_tensor_slices(x).batch(4)) == expected
  iterations = []

  def generator():
    iterations.append(1)
    for start in range(0, 23, 10):
      yield x[start:start + 10], y[start:start + 10]

  dataset = tf.data.Dataset.from_generator(generator, output_signature=(
      tf.TensorSpec((None, 6, 6), tf.float32), tf.TensorSpec((None,), tf.int32)))
  assert _digests(dataset) == expected
  assert len(iterations) == 1
  with pytest.raises(ValueError, match=r"1 private example"):
    overlap.check_disjoint(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), x[4:5])


def test_dict_features_are_taken_in_sorted_key_order():
  rng = np.random.default_rng(0)
  image, tokens = rng.random((6, 3, 3)), rng.integers(0, 100, (6, 5))
  expected = _digests({"image": image, "tokens": tokens})
  assert _digests({"tokens": tokens, "image": image}) == expected
  assert _digests(({"tokens": tokens, "image": image}, np.zeros(6))) == expected
  dataset = tf.data.Dataset.from_tensor_slices(({"tokens": tokens, "image": image}, np.zeros(6)))
  assert _digests(dataset.batch(4)) == expected
  assert _digests([image, tokens]) == expected  # a list of inputs, in its order
  assert _digests({"image": image}) == _digests(image)
  changed = tokens.copy()
  changed[2, 0] += 1
  assert len(set(_digests({"image": image, "tokens": changed})) & set(expected)) == 5
  assert not set(_digests({"image": image, "tokens": tokens[::-1]})) & set(expected)


def test_text_features_compare_as_utf8_whatever_the_container():
  text = np.array([["héllo", "a"], ["b", "c"], ["ab", ""]])
  expected = _digests(text)
  assert len(expected) == 3
  assert _digests(np.char.encode(text, "utf-8").astype(object)) == expected
  assert _digests(tf.data.Dataset.from_tensor_slices(text).batch(2)) == expected
  # Elements are framed: ["ab", ""] is not ["a", "b"].
  assert not set(_digests(np.array([["a", "b"]]))) & set(expected)


def test_a_counter_of_fingerprints_can_stand_for_the_data():
  private = _images(10, seed=0)
  public_x = np.concatenate([_images(30, seed=1)[0], private[0][:2]])
  public = overlap.fingerprint_examples(public_x)
  assert isinstance(public, collections.Counter)
  assert overlap.check_disjoint(public, private, allow_overlap=True) == 2
  assert overlap.check_disjoint(public, _digests(private), allow_overlap=True) == 2


def test_public_data_fingerprint_is_order_independent_and_changes_with_one_example():
  x, y = _images(30, seed=0)
  fingerprint = overlap.PublicDataFingerprint.from_data((x, y))
  assert fingerprint.num_examples == 30
  order = np.random.default_rng(1).permutation(30)
  assert overlap.PublicDataFingerprint.from_data((x[order], y[order]), batch_size=4) == fingerprint
  shuffled = tf.data.Dataset.from_tensor_slices(x[order]).batch(7)
  assert overlap.PublicDataFingerprint.from_data(shuffled) == fingerprint
  changed = x.copy()
  changed[17, 2, 3] = np.nextafter(changed[17, 2, 3], np.float32(2))
  assert overlap.PublicDataFingerprint.from_data(changed).sha256 != fingerprint.sha256
  repeated = overlap.PublicDataFingerprint.from_data(np.concatenate([x, x[:1]]))
  assert repeated.num_examples == 31 and repeated.sha256 != fingerprint.sha256
  assert overlap.PublicDataFingerprint.from_data(x[1:]).sha256 != fingerprint.sha256


def test_public_data_fingerprint_round_trips_through_a_dict_and_is_frozen():
  fingerprint = overlap.PublicDataFingerprint.from_data(_images(5, seed=0))
  as_dict = fingerprint.to_dict()
  assert as_dict == {"num_examples": 5, "sha256": fingerprint.sha256,
                     "version": "tfdp_prune.overlap.v1"}
  assert overlap.PublicDataFingerprint.from_dict(as_dict) == fingerprint
  with pytest.raises(AttributeError):
    fingerprint.num_examples = 6
  with pytest.raises(ValueError, match="sha256"):
    overlap.PublicDataFingerprint(num_examples=5, sha256="abc")
  with pytest.raises(ValueError, match="num_examples"):
    overlap.PublicDataFingerprint(num_examples=-1, sha256="0" * 64)


def test_invalid_inputs_are_clear_errors():
  x = np.zeros((4, 2))
  with pytest.raises(ValueError, match="allow_overlap to be True or False"):
    overlap.check_disjoint(x, x, allow_overlap="yes")
  with pytest.raises(ValueError, match="batch_size"):
    overlap.fingerprint_examples(x, batch_size=0)
  with pytest.raises(ValueError, match="tuple of 4"):
    overlap.fingerprint_examples((x, x, x, x))
  with pytest.raises(ValueError, match="same number of examples"):
    overlap.fingerprint_examples({"a": x, "b": np.zeros((3, 2))})
  with pytest.raises(ValueError, match="leading example"):
    overlap.fingerprint_examples(np.float32(1.0))
  with pytest.raises(TypeError, match="RaggedTensor"):
    overlap.fingerprint_examples(tf.ragged.constant([[1, 2], [3]]))
  with pytest.raises(TypeError, match="dtype complex128"):
    overlap.fingerprint_examples(np.zeros((2, 2), complex))
  with pytest.raises(TypeError, match="str or bytes"):
    overlap.fingerprint_examples(np.array([[1, "a"]], dtype=object))
