"""One worker of the MultiWorkerMirroredStrategy cluster started by test_multi_worker.py.

Run as a script (imported by nobody): `python _multi_worker_worker.py DATA.npz OUT.npz`, with
TF_CONFIG naming this worker. It trains the same small Dense model three times on the cluster,
each run on the global batches of DATA.npz sharded across the workers by tf.data autosharding
(policy DATA), and writes every run's final weights to OUT.npz:
  exact:      noise_multiplier=0, l2_norm_clip=1e9 (no clipping), several steps;
  clip:       noise_multiplier=0, l2_norm_clip=CLIP, one step;
  noisy:      noise_multiplier=SIGMA, l2_norm_clip=CLIP, one step (same start as `clip`).
The noise comes from OS entropy (the default). It also builds two Poisson samplers over the data
and writes their secrets and first draws: `shared_*` built with strategy= (every worker must hold
the chief's secret), `local_*` without (each worker's own entropy: the check has power).
"""

import json
import os
import sys
import time

_START = time.monotonic()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Two workers share two cores: one thread each keeps them from starving each other.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(2)

import tf_keras as keras  # pylint: disable=g-import-not-at-top

import tfdp_prune  # pylint: disable=g-import-not-at-top


def build_model(seed, num_features, num_classes):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input(shape=(num_features,)),
      keras.layers.Dense(16, activation="tanh"),
      keras.layers.Dense(num_classes),
  ])


def _log(msg):
  print(f"[{time.monotonic() - _START:6.1f}s] {msg}", flush=True)


def main(data_path, out_path):
  _log("imported")
  cfg = json.loads(os.environ["TF_CONFIG"])
  task_index = cfg["task"]["index"]
  data = np.load(data_path)
  x, y = data["x"], data["y"]
  init_seed = int(data["init_seed"])
  global_batch = int(data["global_batch"])
  exact_steps = int(data["exact_steps"])
  clip, sigma, lr = float(data["clip"]), float(data["sigma"]), float(data["lr"])

  strategy = tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=tf.distribute.experimental.CommunicationOptions(
          implementation=tf.distribute.experimental.CommunicationImplementation.RING,
          timeout_seconds=60))
  if strategy.num_replicas_in_sync != 2:
    raise RuntimeError(f"expected 2 replicas, got {strategy.num_replicas_in_sync}")

  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

  def dataset(steps):
    rows = steps * global_batch
    return (tf.data.Dataset.from_tensor_slices((x[:rows], y[:rows]))
            .batch(global_batch, drop_remainder=True).with_options(options))

  _log("strategy ready")
  results = {}
  shared = tfdp_prune.PoissonSampler((x, y), 0.25, strategy=strategy)
  local = tfdp_prune.PoissonSampler((x, y), 0.25)
  for name, sampler in (("shared", shared), ("local", local)):
    results[f"{name}_secret"] = sampler.state.secret.numpy()
    results[f"{name}_draws"] = np.concatenate([sampler.indices(s) for s in range(5)])
  _log("samplers ready")

  def run(name, l2_norm_clip, noise_multiplier, steps):
    with strategy.scope():
      model = build_model(init_seed, x.shape[1], int(y.max()) + 1)
      model.compile(
          optimizer=tfdp_prune.DPKerasSGDOptimizer(
              l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, learning_rate=lr,
              expected_batch_size=None),
          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none"))
    results[f"{name}_init"] = np.concatenate([w.ravel() for w in model.get_weights()])
    tfdp_prune.make_private(model)
    model.fit(dataset(steps), epochs=1, verbose=0)
    _log(f"run {name} done")
    results[name] = np.concatenate([w.ravel() for w in model.get_weights()])
    results[f"{name}_iterations"] = np.array(int(model.optimizer.iterations.numpy()))

  run("exact", 1e9, 0.0, exact_steps)
  run("clip", clip, 0.0, 1)
  run("noisy", clip, sigma, 1)
  results["task_index"] = np.array(task_index)
  np.savez(out_path, **results)
  _log(f"worker {task_index} done")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
