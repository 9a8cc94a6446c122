"""Checkpoint and resume: model, DP optimizer (masks, noise RNG, accumulators), ledger, sampler.

The claims (DESIGN.md rules 8, 9, 10):
  - a resumed run ends bit-identical to an uninterrupted one, with the same logical steps and
    epsilon, in process (noise and sampling from OS entropy: the checkpoint brings back the
    noise generator's state and the sampler's secret) and across processes after a SIGKILL in
    the middle of training (seeded, insecure, so that a separate reference process can match);
  - checkpoints are taken between logical batches only;
  - a kill leaves no checkpoint that a reader trusts unless it is complete: temporary and
    incomplete directories are ignored, then deleted by the next writer;
  - resuming never lowers the spent budget, and refuses another sampler or other DP settings.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tfdp_prune
from tfdp_prune import atomic_files
from tfdp_prune import checkpointing
from tfdp_prune.compat import tf
from tests.tfdp_prune import _testing as T

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
_WORKER = os.path.join(_HERE, "_resume_worker.py")

SIGMA = 1.0
K = 2  # gradient accumulation: one logical step is two physical batches


def _sampler(q=0.25):
  return tfdp_prune.PoissonSampler(T.dense_data(n=64), sampling_probability=q,
                                   gradient_accumulation_steps=K)


def _model(sampler, init_seed=4, noise_multiplier=SIGMA):
  return T.dp_model(T.dense_model(seed=init_seed), noise_multiplier=noise_multiplier,
                    momentum=0.9, learning_rate=0.2, gradient_accumulation_steps=K,
                    expected_batch_size=sampler.expected_batch_size)


def _budget(sampler):
  return tfdp_prune.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=SIGMA, steps=0, delta=1e-5, accountant="rdp"))


def _set_masks(model):
  model.optimizer.build(model.trainable_variables)
  masks = T.random_masks(model.trainable_variables, seed=9)
  model.optimizer.set_update_masks(model.trainable_variables, masks)
  return masks


def _train(model, sampler, start, stop, callbacks=()):
  model.fit(sampler.dataset(start_step=start), steps_per_epoch=K * (stop - start), epochs=1,
            verbose=0, callbacks=list(callbacks))


def _is_complete(path):
  """Independently of the library: the marker, and every file of the sidecar at its size."""
  if not os.path.isfile(os.path.join(path, checkpointing.MARKER)):
    return False
  with open(os.path.join(path, checkpointing.SIDECAR), encoding="utf-8") as f:
    files = json.load(f)["files"]
  return all(os.path.getsize(os.path.join(path, n)) == size for n, size in files.items())


# ---- in process -------------------------------------------------------------------------------

def test_resume_in_process_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  # The noise and the sampling come from OS entropy: the run that writes the checkpoints is the
  # reference, and goes on uninterrupted to step 7.
  sampler = _sampler()
  reference, reference_budget = _model(sampler), _budget(sampler)
  masks = _set_masks(reference)
  _train(reference, sampler, 0, 4, [reference_budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=2, budget=reference_budget, sampler=sampler)])
  assert sorted(os.listdir(tmp_path)) == ["ckpt-2", "ckpt-4", "latest", checkpointing.LEDGER]
  _train(reference, sampler, 4, 7, [reference_budget])  # not checkpointed, nor in the ledger

  # Other initial weights, optimizer not built, all-ones masks, a new noise generator and a new
  # sampler secret (fresh entropy): everything must come back from the checkpoint.
  resumed_sampler = _sampler()
  assert not all(np.array_equal(resumed_sampler.indices(s), sampler.indices(s)) for s in range(4))
  resumed, resumed_budget = _model(resumed_sampler, init_seed=99), _budget(resumed_sampler)
  step = checkpointing.restore_latest(tmp_path, resumed, budget=resumed_budget,
                                      sampler=resumed_sampler)
  assert step == 4 == int(resumed.optimizer.iterations.numpy()) == resumed_budget.ledger.steps
  for got, want in zip(resumed.optimizer.update_masks(resumed.trainable_variables), masks):
    np.testing.assert_array_equal(got.numpy(), want.astype("float32"))
  assert int(resumed.optimizer._micro_steps.numpy()) == K * 4  # pylint: disable=protected-access
  _train(resumed, resumed_sampler, step, 7, [resumed_budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=2, budget=resumed_budget, sampler=resumed_sampler)])

  assert int(resumed.optimizer.iterations.numpy()) == 7 == resumed_budget.steps
  assert resumed_budget.epsilon() == reference_budget.epsilon() == (
      sampler.privacy_spec(noise_multiplier=SIGMA, steps=7, delta=1e-5,
                           accountant="rdp").epsilon())
  for got, want in zip(T.weights(resumed), T.weights(reference)):
    np.testing.assert_array_equal(got, want)
  assert checkpointing.latest_checkpoint(tmp_path).step == 6


def test_saves_only_between_logical_batches_and_epoch_ends_wait_for_one(tmp_path):
  x, y = T.dense_data(n=48)  # 3 physical batches of 16 per epoch: an epoch ends mid-logical-batch
  model = T.dp_model(T.dense_model(), noise_multiplier=SIGMA, gradient_accumulation_steps=K)
  saved = []

  class _Record(checkpointing.DPCheckpoint):
    def save(self):
      assert self.model.optimizer.at_logical_batch_start()
      saved.append(int(self.model.optimizer.iterations.numpy()))
      return super().save()

  model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
            callbacks=[_Record(tmp_path, every_epoch=True)])
  assert saved == [2, 3]  # epoch 1 ends after 1.5 logical steps: saved at step 2
  info = checkpointing.latest_checkpoint(tmp_path)
  assert info.step == 3 and info.metadata["budget"] is None and info.metadata["sampler"] is None
  assert info.metadata["tfdp_prune_version"] == tfdp_prune.__version__
  model.fit(x[:16], y[:16], batch_size=16, verbose=0)  # now inside a logical batch
  callback = checkpointing.DPCheckpoint(tmp_path, every_steps=1)
  callback.set_model(model)
  with pytest.raises(RuntimeError, match="between logical batches"):
    callback.save()


def test_ignores_temporary_directories_and_the_writer_deletes_them(tmp_path):
  sampler = _sampler()
  model, budget = _model(sampler), _budget(sampler)
  _set_masks(model)
  _train(model, sampler, 0, 3, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, budget=budget, sampler=sampler, keep=5)])
  at_step_3 = T.weights(model)
  # What a kill during a write leaves: a half-written temporary directory.
  half = tmp_path / ".tmp-ckpt-4-12345-abcdef01"
  half.mkdir()
  (half / "state.index").write_bytes(b"\x00\x01half")
  (tmp_path / checkpointing.POINTER).write_text("ckpt-9\n")  # a pointer is not trusted either

  assert checkpointing.latest_checkpoint(tmp_path).step == 3
  resumed, resumed_budget = _model(sampler, init_seed=99), _budget(sampler)
  assert checkpointing.restore_latest(tmp_path, resumed, budget=resumed_budget,
                                      sampler=sampler) == 3
  for got, want in zip(T.weights(resumed), at_step_3):
    np.testing.assert_array_equal(got, want)
  assert os.path.isdir(half)  # a reader deletes nothing (it may run beside the writer)

  _train(resumed, sampler, 3, 4, [resumed_budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, budget=resumed_budget, sampler=sampler, keep=3)])
  assert sorted(os.listdir(tmp_path)) == ["ckpt-2", "ckpt-3", "ckpt-4", "latest",
                                         checkpointing.LEDGER]
  assert all(_is_complete(tmp_path / f"ckpt-{s}") for s in (2, 3, 4))
  assert (tmp_path / checkpointing.POINTER).read_text() == "ckpt-4\n"


def test_resuming_never_lowers_the_budget(tmp_path):
  sampler = _sampler()
  model, budget = _model(sampler), _budget(sampler)
  _train(model, sampler, 0, 2, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=2, budget=budget, sampler=sampler)])
  spent = _budget(sampler)  # a budget that already counted 5 steps (another model, same data)
  _train(_model(sampler), sampler, 0, 5, [spent])
  resumed = _model(sampler)
  assert checkpointing.restore_latest(tmp_path, resumed, budget=spent, sampler=sampler) == 2
  assert spent.ledger.steps == 5
  _train(resumed, sampler, 2, 3, [spent])
  assert spent.steps == 6  # the re-run step is counted again, never refunded


def test_refuses_another_sampler_other_dp_settings_and_a_stale_ledger(tmp_path):
  sampler = _sampler()
  model, budget = _model(sampler), _budget(sampler)
  _train(model, sampler, 0, 1, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, budget=budget, sampler=sampler)])
  with pytest.raises(ValueError, match="sampler differs"):
    checkpointing.restore_latest(tmp_path, _model(sampler), sampler=_sampler(q=0.5))
  with pytest.raises(ValueError, match="noise_multiplier: checkpointed 1.0, now 2.0"):
    checkpointing.restore_latest(tmp_path, _model(sampler, noise_multiplier=2.0))
  plain = T.dense_model()
  plain.compile(optimizer="sgd", loss="mse")
  with pytest.raises(ValueError, match="DP optimizer"):
    checkpointing.restore_latest(tmp_path, plain)
  # The budget is not among fit's callbacks: its ledger lags the optimizer; saving it would
  # under-report epsilon.
  with pytest.raises(RuntimeError, match="fewer than the optimizer's"):
    _train(_model(sampler), sampler, 0, 1, [checkpointing.DPCheckpoint(
        tmp_path / "other", every_steps=1, budget=_budget(sampler))])


def test_refuses_optimizer_state_built_for_another_trainable_set(tmp_path):
  # Masks and accumulators are checkpointed by their position in the optimizer's build order;
  # with equal shapes, a restore into an optimizer built for fewer variables would silently
  # give the second layer the first one's (all frozen) mask.
  sampler = _sampler()

  def build(first_trainable):
    model = T.dp_model(T.dense_model(seed=4, hidden=8, classes=8), noise_multiplier=SIGMA,
                       gradient_accumulation_steps=K,
                       expected_batch_size=sampler.expected_batch_size)
    model.layers[0].trainable = first_trainable
    model.optimizer.build(model.trainable_variables)
    return model

  model = build(first_trainable=True)
  variables = model.trainable_variables
  model.optimizer.set_update_masks(variables[:2], [np.zeros((8, 8), bool), np.zeros(8, bool)])
  budget = _budget(sampler)
  _train(model, sampler, 0, 1, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, budget=budget, sampler=sampler)])
  with pytest.raises(ValueError, match=r"positions \[0, 1, 2, 3\].*built for \[2, 3\]"):
    checkpointing.restore_latest(tmp_path, build(first_trainable=False))
  assert checkpointing.restore_latest(tmp_path, build(first_trainable=True)) == 1


def test_more_trackable_state_is_saved_and_restored_by_name(tmp_path):
  # What `ExponentialMovingAverage.state` is: a tf.Module of variables outside model/optimizer.
  sampler = _sampler()
  model, state = _model(sampler), tf.Module()
  state.average = tf.Variable([1.5, -2.0])
  _train(model, sampler, 0, 1, [checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, trackables={"ema": state})])
  restored = tf.Module()
  restored.average = tf.Variable([0.0, 0.0])
  assert checkpointing.restore_latest(tmp_path, _model(sampler),
                                      trackables={"ema": restored}) == 1
  np.testing.assert_array_equal(restored.average.numpy(), [1.5, -2.0])
  assert checkpointing.latest_checkpoint(tmp_path).metadata["trackables"] == ["ema"]
  with pytest.raises(ValueError, match="holds no"):
    checkpointing.restore_latest(tmp_path, _model(sampler), trackables={"other": restored})


def test_no_checkpoint_returns_none_and_changes_nothing(tmp_path):
  sampler = _sampler()
  model = _model(sampler)
  before = T.weights(model)
  assert checkpointing.restore_latest(tmp_path / "missing", model) is None
  assert checkpointing.restore_latest(tmp_path, model) is None
  assert int(model.optimizer.iterations.numpy()) == 0
  for got, want in zip(T.weights(model), before):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "every_steps=<int> or every_epoch=True"),
    (dict(every_steps=0), "every_steps"),
    (dict(every_steps=1, keep=0), "keep"),
    (dict(every_epoch=1), "every_epoch to be a bool"),
    (dict(every_steps=1, budget=object()), "PrivacyBudget"),
    (dict(every_steps=1, sampler=object()), "sampler"),
    (dict(every_steps=1, trackables={"model": tf.Module()}), "trackables"),
    (dict(every_steps=1, trackables={"ema": object()}), "trackables"),
])
def test_invalid_arguments_raise(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    checkpointing.DPCheckpoint(tmp_path, **kwargs)


def test_get_config_round_trips(tmp_path):
  callback = checkpointing.DPCheckpoint(tmp_path, every_steps=3, every_epoch=True, keep=2)
  config = callback.get_config()
  assert checkpointing.DPCheckpoint.from_config(config).get_config() == config
  assert config == {"directory": str(tmp_path), "every_steps": 3, "every_epoch": True, "keep": 2,
                    "run_record": None}


# ---- across processes: SIGKILL in the middle, then resume ---------------------------------------

_TOTAL_STEPS = 40
_KILL_AFTER = 10  # kill once the pointer names a checkpoint at or beyond this logical step
_TIMEOUT_S = 150  # per process; each takes about 10 s alone on 2 cores


def _worker_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def _pointer_step(directory):
  try:
    with open(os.path.join(directory, checkpointing.POINTER), encoding="utf-8") as f:
      return int(f.read().strip()[len("ckpt-"):])
  except (OSError, ValueError):
    return None


@pytest.fixture
def processes():
  """Started worker processes; any still running at the end is killed."""
  started = []
  yield started
  for proc, log in started:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=30)
    log.close()


# 50-75 s (three training processes); fast: test_resume_in_process_is_bit_identical_... (resume)
# and the tests of interrupted writes (a temporary directory left behind, a failed write).
@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, processes):
  ckpt_dir = str(tmp_path / "ckpt")

  def start(mode, out, sleep):
    log = open(tmp_path / f"{out}.log", "w")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(
        [sys.executable, _WORKER, mode, ckpt_dir, str(tmp_path / out), str(_TOTAL_STEPS),
         str(sleep)], env=_worker_env(), cwd=_REPO, stdout=log, stderr=subprocess.STDOUT)
    processes.append((proc, log))
    return proc

  def wait(proc, out):
    try:
      code = proc.wait(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      code = None
    if code != 0:
      pytest.fail(f"{out} exited with {code} (None: killed after {_TIMEOUT_S}s):\n"
                  + (tmp_path / f"{out}.log").read_text()[-3000:])
    return np.load(tmp_path / out)

  reference = start("reference", "reference.npz", 0.0)  # runs beside the one to be killed
  victim = start("train", "victim.npz", 0.05)
  deadline = time.monotonic() + _TIMEOUT_S
  while (_pointer_step(ckpt_dir) or 0) < _KILL_AFTER:
    if victim.poll() is not None or time.monotonic() > deadline:
      pytest.fail(f"the training process never reached step {_KILL_AFTER} (exit code "
                  f"{victim.poll()}):\n" + (tmp_path / "victim.npz.log").read_text()[-3000:])
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait(timeout=30) == -signal.SIGKILL
  killed_at = checkpointing.latest_checkpoint(ckpt_dir).step
  assert _KILL_AFTER <= killed_at < _TOTAL_STEPS  # killed in the middle, not after the end
  assert not os.path.exists(tmp_path / "victim.npz")
  # The ledger is ahead of the newest checkpoint, or at it: never behind.
  assert checkpointing.read_ledger(ckpt_dir)["state"]["steps"] >= killed_at

  want = wait(reference, "reference.npz")
  got = wait(start("train", "resumed.npz", 0.0), "resumed.npz")
  assert int(got["start"]) == killed_at
  assert int(got["iterations"]) == int(want["iterations"]) == _TOTAL_STEPS
  assert int(got["budget_steps"]) == int(want["budget_steps"]) == _TOTAL_STEPS
  assert float(got["epsilon"]) == float(want["epsilon"]) == _sampler().privacy_spec(
      noise_multiplier=SIGMA, steps=_TOTAL_STEPS, delta=1e-5, accountant="rdp").epsilon()
  weight_keys = sorted(k for k in want.files if k.startswith("w"))
  assert weight_keys == sorted(k for k in got.files if k.startswith("w")) and weight_keys
  for key in weight_keys:
    np.testing.assert_array_equal(got[key], want[key])
  # Only complete checkpoints are left (keep=3), the newest named by the pointer.
  names = sorted(os.listdir(ckpt_dir))
  assert names == sorted([checkpointing.POINTER, checkpointing.LEDGER] + [
      f"ckpt-{s}" for s in range(_TOTAL_STEPS - 2, _TOTAL_STEPS + 1)]), names
  assert checkpointing.read_ledger(ckpt_dir)["state"]["steps"] == _TOTAL_STEPS
  assert all(_is_complete(os.path.join(ckpt_dir, n)) for n in names if n.startswith("ckpt-"))
  assert _pointer_step(ckpt_dir) == _TOTAL_STEPS


# ---- faults: damaged checkpoints and ledger, another model, a full disk (DESIGN.md rule 15) ---

def _listing(directory):
  """Every file under `directory` with its bytes: what a fault must not lose."""
  found = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = f.read()
  return found


def _ledger_steps(directory):
  return checkpointing.read_ledger(directory)["state"]["steps"]


def _three_checkpoints(tmp_path):
  sampler = _sampler()
  model, budget = _model(sampler), _budget(sampler)
  _set_masks(model)
  _train(model, sampler, 0, 3, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, budget=budget, sampler=sampler, keep=5)])
  return sampler


def _truncate_all(path):
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 2)


def _flip_a_bit(path):
  data = next(p for p in path.iterdir() if p.name.startswith("state.data"))
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, named", [
    (lambda d: [_truncate_all(d / f"ckpt-{s}") for s in (1, 2, 3)], "ckpt-3"),
    (lambda d: _truncate_all(d / "ckpt-3"), "ckpt-3"),
    (lambda d: _flip_a_bit(d / "ckpt-3"), "ckpt-3/state.data"),
    (lambda d: (d / "ckpt-3" / checkpointing.MARKER).unlink(), "ckpt-3"),
])
def test_a_damaged_checkpoint_is_an_error_naming_it_and_nothing_is_deleted(tmp_path, damage,
                                                                           named):
  sampler = _three_checkpoints(tmp_path)
  damage(tmp_path)
  before = _listing(tmp_path)
  with pytest.raises(checkpointing.CheckpointError, match=f"(?s){named}.*backup.*new run"):
    checkpointing.restore_latest(tmp_path, _model(sampler), budget=_budget(sampler),
                                 sampler=sampler)
  # Neither a fresh start over it nor the writer rolls the run back or deletes anything.
  with pytest.raises(ValueError, match="records 3 logical steps"):
    budget = _budget(sampler)
    _train(_model(sampler), sampler, 0, 1, [budget, checkpointing.DPCheckpoint(
        tmp_path, every_steps=1, budget=budget, sampler=sampler)])
  assert _listing(tmp_path) == before
  assert _ledger_steps(tmp_path) == 3


def test_the_ledger_ahead_of_the_checkpoint_is_kept_and_a_rerun_step_counts_once(tmp_path):
  sampler = _sampler()
  model, budget = _model(sampler), _budget(sampler)
  _train(model, sampler, 0, 5, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=2, budget=budget, sampler=sampler)])
  assert _ledger_steps(tmp_path) == 5  # step 5 ran after the last checkpoint (ckpt-4)
  shutil.rmtree(tmp_path / "ckpt-4")  # ... and the newest checkpoint is lost as well
  resumed, resumed_budget = _model(sampler), _budget(sampler)
  assert checkpointing.restore_latest(tmp_path, resumed, budget=resumed_budget,
                                      sampler=sampler) == 2
  assert resumed_budget.steps == 5  # the ledger's, not the checkpoint's
  _train(resumed, sampler, 2, 4, [resumed_budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=2, budget=resumed_budget, sampler=sampler)])
  assert resumed_budget.steps == 5 == _ledger_steps(tmp_path)  # steps 3, 4 re-ran, same draws
  _train(resumed, sampler, 4, 7, [resumed_budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=2, budget=resumed_budget, sampler=sampler)])
  assert resumed_budget.steps == 7 == _ledger_steps(tmp_path)
  newest = checkpointing.latest_checkpoint(tmp_path)
  assert newest.step == 6 == newest.metadata["budget"]["steps"]
  # No checkpoint at all, but a ledger: an error, not a fresh start at step 0.
  for name in os.listdir(tmp_path):
    if name.startswith("ckpt-"):
      shutil.rmtree(tmp_path / name)
  with pytest.raises(checkpointing.CheckpointError, match="records 7 logical steps"):
    checkpointing.restore_latest(tmp_path, _model(sampler), budget=_budget(sampler))


def test_a_damaged_ledger_line_is_an_error_and_an_interrupted_append_is_ignored(tmp_path):
  _three_checkpoints(tmp_path)
  path = tmp_path / checkpointing.LEDGER
  lines = path.read_bytes().split(b"\n")
  assert len(lines) == 4 and lines[-1] == b""  # steps 1, 2, 3
  path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[0][:20])  # a torn append
  assert _ledger_steps(tmp_path) == 3
  path.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"steps": 2', b'"steps": 1'),
                               lines[2], b""]))
  with pytest.raises(checkpointing.CheckpointError, match=f"(?s){checkpointing.LEDGER} is "
                     "corrupt at line 2.*backup"):
    checkpointing.read_ledger(tmp_path)


def test_restoring_into_another_model_says_so(tmp_path):
  sampler = _three_checkpoints(tmp_path)
  wider = T.dp_model(T.dense_model(hidden=32), noise_multiplier=SIGMA, momentum=0.9,
                     learning_rate=0.2, gradient_accumulation_steps=K,
                     expected_batch_size=sampler.expected_batch_size)
  with pytest.raises(ValueError, match="ckpt-3 belongs to another model.*shapes"):
    checkpointing.restore_latest(tmp_path, wider, sampler=sampler)
  adam = T.dp_model(T.dense_model(), noise_multiplier=SIGMA, learning_rate=0.2,
                    gradient_accumulation_steps=K, expected_batch_size=sampler.expected_batch_size,
                    optimizer_class=tfdp_prune.DPKerasAdamOptimizer)
  with pytest.raises(ValueError, match="ckpt-3 belongs to another model.*Adam"):
    checkpointing.restore_latest(tmp_path, adam, sampler=sampler)


def test_a_full_disk_stops_training_before_a_step_the_ledger_does_not_cover(tmp_path,
                                                                           monkeypatch):
  sampler = _three_checkpoints(tmp_path)
  before = _listing(tmp_path)
  model, budget = _model(sampler), _budget(sampler)
  checkpointing.restore_latest(tmp_path, model, budget=budget, sampler=sampler)

  def full(fd):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(checkpointing.CheckpointWriteError, match="No space left"):
    _train(model, sampler, 3, 6, [budget, checkpointing.DPCheckpoint(
        tmp_path, every_steps=1, budget=budget, sampler=sampler, keep=5)])
  monkeypatch.undo()
  assert int(model.optimizer.iterations.numpy()) <= _ledger_steps(tmp_path)
  after = _listing(tmp_path)
  assert {k: v for k, v in after.items() if k in before and k != checkpointing.LEDGER} == {
      k: v for k, v in before.items() if k != checkpointing.LEDGER}
  assert after[checkpointing.LEDGER].startswith(before[checkpointing.LEDGER])
  assert checkpointing.latest_checkpoint(tmp_path).step >= 3


# ---- full disk, read-only file system (simulated: tests run as root, so modes stop nothing) --

def _failing_open_for(name, code, monkeypatch):
  """`os.open` raises OSError(code) for files named `name` (EROFS: a read-only file system)."""
  real_open = os.open
  def open_(path, *args, **kwargs):
    if os.path.basename(os.fspath(path)) == name:
      raise OSError(code, os.strerror(code), os.fspath(path))
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_loses_nothing(
    tmp_path, monkeypatch, code):
  sampler = _three_checkpoints(tmp_path)
  before = _listing(tmp_path)
  model, budget = _model(sampler), _budget(sampler)
  assert checkpointing.restore_latest(tmp_path, model, budget=budget, sampler=sampler) == 3
  real_write_file = atomic_files.write_durably
  def full_disk(path, text):
    if os.path.basename(path) == checkpointing.SIDECAR:  # the TF state was written already
      raise OSError(code, os.strerror(code), path)
    real_write_file(path, text)
  monkeypatch.setattr(atomic_files, "write_durably", full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=f"(?s)Cannot write the checkpoint .*ckpt-4 \\({os.strerror(code)}\\)"
                     ".*earlier checkpoints and the privacy ledger are intact"):
    _train(model, sampler, 3, 5, [budget, checkpointing.DPCheckpoint(
        tmp_path, every_steps=1, budget=budget, sampler=sampler, keep=5)])
  after = _listing(tmp_path)
  assert {k: v for k, v in after.items() if k in before and k != checkpointing.LEDGER} == {
      k: v for k, v in before.items() if k != checkpointing.LEDGER}  # no earlier file lost
  assert after[checkpointing.LEDGER].startswith(before[checkpointing.LEDGER])  # append-only
  assert _ledger_steps(tmp_path) == 4  # step 4 ran, its ledger line came first
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or n == "ckpt-4"]
  monkeypatch.undo()  # space freed: the run resumes from ckpt-3, the ledger keeps step 4
  resumed = _budget(sampler)
  assert checkpointing.restore_latest(tmp_path, _model(sampler), budget=resumed,
                                      sampler=sampler) == 3
  assert resumed.steps == 4


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_ledger_line_that_cannot_be_written_stops_before_its_step(tmp_path, monkeypatch,
                                                                    code):
  sampler = _three_checkpoints(tmp_path)
  before = _listing(tmp_path)
  model, budget = _model(sampler), _budget(sampler)
  checkpointing.restore_latest(tmp_path, model, budget=budget, sampler=sampler)
  if code == errno.EROFS:
    _failing_open_for(checkpointing.LEDGER, code, monkeypatch)
  else:  # the file opens; the write finds the disk full after part of the line
    real_write = os.write
    def write(fd, data):
      if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == checkpointing.LEDGER:
        real_write(fd, bytes(data[:10]))
        raise OSError(code, os.strerror(code))
      return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=f"Cannot write the privacy ledger .*{checkpointing.LEDGER} "
                     f"\\({os.strerror(code)}\\)"):
    _train(model, sampler, 3, 5, [budget, checkpointing.DPCheckpoint(
        tmp_path, every_steps=1, budget=budget, sampler=sampler, keep=5)])
  monkeypatch.undo()
  assert int(model.optimizer.iterations.numpy()) == 3  # the step without a ledger line never ran
  assert _ledger_steps(tmp_path) == 3  # not backwards (a torn tail is ignored)
  after = _listing(tmp_path)
  assert {k: v for k, v in after.items() if k != checkpointing.LEDGER} == {
      k: v for k, v in before.items() if k != checkpointing.LEDGER}
  assert after[checkpointing.LEDGER].startswith(before[checkpointing.LEDGER])
  # The next append cuts the torn tail and goes on.
  budget = _budget(sampler)
  model = _model(sampler)
  checkpointing.restore_latest(tmp_path, model, budget=budget, sampler=sampler)
  _train(model, sampler, 3, 4, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=1, budget=budget, sampler=sampler, keep=5)])
  assert _ledger_steps(tmp_path) == 4


def test_the_ledger_line_before_each_step_computes_no_epsilon(tmp_path, monkeypatch):
  """A Poisson sampler with a cap has an overflow term, whose statement computes epsilon (a PLD
  evaluation, 0.2 s at the default run's settings): the per-step ledger line leaves it out."""
  from tfdp_prune import _pld  # pylint: disable=g-import-not-at-top
  from tfdp_prune import accounting  # pylint: disable=g-import-not-at-top
  sampler = _sampler()
  assert sampler.overflow_probability > 0
  model = _model(sampler)
  budget = tfdp_prune.PrivacyBudget(sampler.privacy_spec(noise_multiplier=SIGMA, steps=0,
                                                         delta=1e-5, accountant="pld"))
  assert budget.spec.overflow_probability > 0
  budget.log_every_epoch = False  # only the ledger could compute epsilons here
  evaluations = []
  accounting._epsilon.cache_clear()  # pylint: disable=protected-access
  real = _pld.epsilon
  monkeypatch.setattr(_pld, "epsilon", lambda *a: evaluations.append(a) or real(*a))
  _train(model, sampler, 0, 5, [budget, checkpointing.DPCheckpoint(
      tmp_path, every_steps=100, budget=budget, sampler=sampler)])
  assert _ledger_steps(tmp_path) == 5
  assert evaluations == []
  full = budget.get_state()
  assert checkpointing.read_ledger(tmp_path)["state"] == {
      key: value for key, value in full.items() if key != "statement"}
