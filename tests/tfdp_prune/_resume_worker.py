"""One training process of the kill-and-resume test in test_checkpointing.py.

Run as a script (imported by nobody):
  python _resume_worker.py MODE CKPT_DIR OUT.npz TOTAL_STEPS STEP_SLEEP_S
MODE "reference": trains TOTAL_STEPS logical steps without checkpoints.
MODE "train": restores the newest complete checkpoint of CKPT_DIR if there is one, then trains
  up to TOTAL_STEPS logical steps with `DPCheckpoint(every_steps=1)`, sleeping STEP_SLEEP_S after
  each physical batch (so the parent can kill it in the middle; sleeping changes no state).
Both write OUT.npz at the end: the final weights, iterations, epsilon, budget steps and the
logical step the run started from.

The run: a small Dense model, DP SGD with momentum, noise on, gradient accumulation 2, random
update masks set at the start, Poisson sampling, a PrivacyBudget (RDP). The noise and the sampling
are seeded with the INSECURE switches: the reference runs in another process than the resumed
run, and only seeded randomness can be the same in both (the in-process resume test covers the
default, OS entropy).
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # pylint: disable=g-import-not-at-top

import tfdp_prune  # pylint: disable=g-import-not-at-top
from tfdp_prune import checkpointing  # pylint: disable=g-import-not-at-top
from tfdp_prune.compat import keras  # pylint: disable=g-import-not-at-top

ACCUMULATION = 2
SIGMA = 1.0


class _Sleep(keras.callbacks.Callback):

  def __init__(self, seconds):
    super().__init__()
    self.seconds = seconds

  def on_train_batch_end(self, batch, logs=None):
    time.sleep(self.seconds)


def _log(message):
  print(f"[{os.getpid()} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(mode, ckpt_dir, out_path, total_steps, step_sleep):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype("float32")
  y = rng.integers(0, 3, size=64).astype("int32")
  sampler = tfdp_prune.PoissonSampler((x, y), sampling_probability=0.25,
                                      gradient_accumulation_steps=ACCUMULATION,
                                      insecure_sampling_seed=11)
  keras.utils.set_random_seed(4)
  model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                            keras.layers.Dense(3)])
  model.compile(
      optimizer=tfdp_prune.DPKerasSGDOptimizer(
          l2_norm_clip=1.0, noise_multiplier=SIGMA, learning_rate=0.2, momentum=0.9,
          insecure_noise_seed=5,
          expected_batch_size=sampler.expected_batch_size,
          gradient_accumulation_steps=ACCUMULATION),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"))
  tfdp_prune.make_private(model)
  budget = tfdp_prune.PrivacyBudget(
      sampler.privacy_spec(noise_multiplier=SIGMA, steps=0, delta=1e-5, accountant="rdp"))
  callbacks = [budget]
  start = None
  if mode == "train":
    start = checkpointing.restore_latest(ckpt_dir, model, budget=budget, sampler=sampler)
    callbacks += [checkpointing.DPCheckpoint(ckpt_dir, every_steps=1, budget=budget,
                                             sampler=sampler, keep=3),
                  _Sleep(step_sleep)]
  elif mode != "reference":
    raise ValueError(f"Unknown mode {mode!r}.")
  if start is None:  # a fresh run: masks chosen at random (seeded), then training from step 0
    start = 0
    model.optimizer.build(model.trainable_variables)
    mask_rng = np.random.default_rng(9)
    model.optimizer.set_update_masks(
        model.trainable_variables,
        [mask_rng.random(v.shape) < 0.5 for v in model.trainable_variables])
  _log(f"{mode}: starting at logical step {start}")
  model.fit(sampler.dataset(start_step=start),
            steps_per_epoch=ACCUMULATION * (total_steps - start), epochs=1, verbose=0,
            callbacks=callbacks)
  weights = {f"w{i}": v.numpy() for i, v in enumerate(model.trainable_variables)}
  np.savez(out_path + ".tmp.npz", start=start, iterations=int(model.optimizer.iterations.numpy()),
           epsilon=budget.epsilon(), budget_steps=budget.steps, **weights)
  os.replace(out_path + ".tmp.npz", out_path)
  _log(f"{mode}: done, iterations {int(model.optimizer.iterations.numpy())}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
