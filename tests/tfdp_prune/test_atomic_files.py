"""The atomic-write protocol: a file appears under its name complete or not at all, durably."""

import os

import pytest

from tfdp_prune import atomic_files


def _fsynced(monkeypatch):
  """Records the path of every fsync'ed descriptor."""
  paths = []
  real = os.fsync
  def fsync(fd):
    paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    real(fd)
  monkeypatch.setattr(os, "fsync", fsync)
  return paths


def test_replace_file_writes_the_text_and_flushes_file_and_directory(tmp_path, monkeypatch):
  path = tmp_path / "run.json"
  path.write_text("old")
  fsynced = _fsynced(monkeypatch)
  atomic_files.replace_file(str(path), "new ü")
  assert path.read_text(encoding="utf-8") == "new ü"
  assert os.listdir(tmp_path) == ["run.json"]  # no temporary file left
  assert len(fsynced) == 2 and fsynced[-1] == str(tmp_path)  # the file, then its directory
  assert os.path.basename(fsynced[0]).startswith(atomic_files.TMP_PREFIX)


def test_a_failed_replace_keeps_the_old_file_under_its_name(tmp_path, monkeypatch):
  path = tmp_path / "report.json"
  path.write_text("old")
  def full(fd):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space left"):
    atomic_files.replace_file(str(path), "new")
  assert path.read_text() == "old"
  # Whatever was left is a temporary that no reader trusts.
  assert all(n.startswith(atomic_files.TMP_PREFIX) for n in os.listdir(tmp_path)
             if n != "report.json")


def test_temporary_paths_are_fresh_and_beside_their_target(tmp_path):
  first = atomic_files.temporary_path(str(tmp_path), "ckpt-3")
  second = atomic_files.temporary_path(str(tmp_path), "ckpt-3")
  assert first != second
  assert os.path.dirname(first) == str(tmp_path)
  assert os.path.basename(first).startswith(atomic_files.TMP_PREFIX + "ckpt-3-")
  assert len(os.path.basename(atomic_files.temporary_path(str(tmp_path), "1", 32))) == len(
      ".tmp-1-") + 32


def test_fsync_tree_flushes_every_file_and_directory_deepest_first(tmp_path, monkeypatch):
  (tmp_path / "v" / "assets.extra").mkdir(parents=True)
  (tmp_path / "v" / "saved_model.pb").write_text("x")
  (tmp_path / "v" / "assets.extra" / "privacy_metadata.json").write_text("{}")
  fsynced = _fsynced(monkeypatch)
  atomic_files.fsync_tree(str(tmp_path / "v"))
  assert sorted(fsynced) == sorted([
      str(tmp_path / "v" / "saved_model.pb"), str(tmp_path / "v" / "assets.extra"),
      str(tmp_path / "v" / "assets.extra" / "privacy_metadata.json"), str(tmp_path / "v")])
  assert fsynced[-1] == str(tmp_path / "v")
  assert fsynced.index(str(tmp_path / "v" / "assets.extra")) > fsynced.index(
      str(tmp_path / "v" / "assets.extra" / "privacy_metadata.json"))


def test_rename_into_place_moves_a_complete_directory_and_flushes_the_parent(tmp_path,
                                                                             monkeypatch):
  tmp = atomic_files.temporary_path(str(tmp_path), "ckpt-1")
  os.mkdir(tmp)
  (tmp_path / os.path.basename(tmp) / "COMPLETE").write_text("complete\n")
  fsynced = _fsynced(monkeypatch)
  atomic_files.rename_into_place(tmp, str(tmp_path / "ckpt-1"))
  assert os.listdir(tmp_path) == ["ckpt-1"]
  assert (tmp_path / "ckpt-1" / "COMPLETE").read_text() == "complete\n"
  assert fsynced == [str(tmp_path)]


def test_remove_never_leaves_a_half_deleted_entry_under_its_name(tmp_path, monkeypatch):
  (tmp_path / "ckpt-1").mkdir()
  (tmp_path / "ckpt-1" / "state.index").write_text("x")
  deleted_under = []
  real_rmtree = atomic_files.shutil.rmtree
  def rmtree(path, **kwargs):
    deleted_under.append(os.path.basename(path))
    real_rmtree(path, **kwargs)
  monkeypatch.setattr(atomic_files.shutil, "rmtree", rmtree)
  atomic_files.remove(str(tmp_path / "ckpt-1"))
  assert os.listdir(tmp_path) == []
  assert len(deleted_under) == 1 and deleted_under[0].startswith(".tmp-delete-")
  (tmp_path / "latest").write_text("ckpt-1\n")  # a file, too
  atomic_files.remove(str(tmp_path / "latest"))
  assert os.listdir(tmp_path) == []
