"""DP training under MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1.

The workers (`_multi_worker_worker.py`) train the same model on the same global batches, each
on its autosharded half. Checked here, against single-process references:
  - both workers end with identical weights;
  - noise 0 and no clipping equals plain tf_keras SGD on the mean loss of the global batch (a
    division by the local batch, or a gradient scaled by the number of replicas, breaks this);
  - noise 0 with clipping equals the mean of the clipped per-example gradients of the global
    batch;
  - the noise of one step has std noise_multiplier * l2_norm_clip over the global batch in total
    (each replica sigma*C/sqrt(2), independent across replicas), with noise from OS entropy;
  - a sampler built with `strategy=` holds the same secret, hence draws the same batches, on
    every worker (else each worker would read its shard of another batch, and the accounting
    of one draw per step would be wrong), while samplers built apart draw apart.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorflow as tf
import tf_keras as keras

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
_WORKER = os.path.join(_HERE, "_multi_worker_worker.py")
_NUM_WORKERS = 2
_TIMEOUT_S = 240  # ~35 s alone; generous for a loaded 2-core machine

_INIT_SEED = 7
_NUM_FEATURES, _NUM_CLASSES = 8, 4
_GLOBAL_BATCH = 16
_EXACT_STEPS = 4
_LR = 0.5
_CLIP = 2.8  # about the median per-example gradient norm at init
_SIGMA = 2.0


def _free_ports(n):
  socks = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def _worker_env(cluster, index):
  env = dict(os.environ)
  # gRPC honours proxy variables; the cluster must talk over loopback directly.
  for var in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "GRPC_PROXY", "ALL_PROXY"):
    env.pop(var, None)
  env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
  env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env.pop("TF_USE_LEGACY_KERAS", None)
  return env


def _run_cluster(tmp_path, data_path):
  """Starts the workers, waits for them (bounded), kills any left; returns their outputs."""
  ports = _free_ports(_NUM_WORKERS)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  procs, logs, outs = [], [], []
  try:
    for i in range(_NUM_WORKERS):
      out = tmp_path / f"worker{i}.npz"
      log = open(tmp_path / f"worker{i}.log", "w+")
      procs.append(subprocess.Popen(
          [sys.executable, _WORKER, str(data_path), str(out)], env=_worker_env(cluster, i),
          cwd=_REPO, stdout=log, stderr=subprocess.STDOUT))
      logs.append(log)
      outs.append(out)
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one worker failed: the other would wait for it until the timeout
      time.sleep(0.2)
    codes = [p.poll() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
  if codes != [0] * _NUM_WORKERS:
    tails = []
    for i, log in enumerate(logs):
      log.seek(0)
      tails.append(f"--- worker {i} (exit {codes[i]}) ---\n" + log.read()[-4000:])
    for log in logs:
      log.close()
    pytest.fail("MultiWorkerMirroredStrategy workers failed or timed out "
                f"(None = killed after {_TIMEOUT_S}s): {codes}\n" + "\n".join(tails))
  for log in logs:
    log.close()
  return [dict(np.load(out)) for out in outs]


def _model():
  keras.utils.set_random_seed(_INIT_SEED)
  return keras.Sequential([
      keras.Input(shape=(_NUM_FEATURES,)),
      keras.layers.Dense(16, activation="tanh"),
      keras.layers.Dense(_NUM_CLASSES),
  ])


def _set_flat_weights(model, flat):
  weights, offset = [], 0
  for w in model.get_weights():
    weights.append(flat[offset:offset + w.size].reshape(w.shape))
    offset += w.size
  assert offset == flat.size
  model.set_weights(weights)


def _flat(model):
  return np.concatenate([w.ravel() for w in model.get_weights()])


def _plain_sgd(init, x, y):
  """Single-process, non-private tf_keras SGD on the mean loss of each global batch."""
  model = _model()
  _set_flat_weights(model, init)
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=_LR),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, batch_size=_GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
  return _flat(model)


def _clipped_mean_step(init, x, y):
  """One SGD step on the mean of per-example gradients clipped to _CLIP; also the norms."""
  model = _model()
  _set_flat_weights(model, init)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  total, norms = None, []
  for i in range(x.shape[0]):
    with tf.GradientTape() as tape:
      loss = loss_fn(y[i:i + 1], model(x[i:i + 1], training=True))
    grad = np.concatenate([g.numpy().ravel() for g in
                           tape.gradient(loss, model.trainable_variables)])
    norm = np.linalg.norm(grad)
    norms.append(norm)
    grad = grad * min(1.0, _CLIP / norm)
    total = grad if total is None else total + grad
  return init - _LR * total / x.shape[0], np.array(norms)


@pytest.mark.slow  # 20 s: two worker processes and a chief
def test_multi_worker_dp_sgd_matches_single_process(tmp_path):
  rng = np.random.default_rng(0)
  rows = _GLOBAL_BATCH * _EXACT_STEPS
  x = rng.normal(size=(rows, _NUM_FEATURES)).astype(np.float32)
  y = rng.integers(0, _NUM_CLASSES, size=rows).astype(np.int32)
  data_path = tmp_path / "data.npz"
  np.savez(data_path, x=x, y=y, init_seed=_INIT_SEED, global_batch=_GLOBAL_BATCH,
           exact_steps=_EXACT_STEPS, clip=_CLIP, sigma=_SIGMA, lr=_LR)

  w0, w1 = _run_cluster(tmp_path, data_path)

  # (a) the workers agree, bit for bit, in every run (noise included).
  for key in ("exact_init", "exact", "clip_init", "clip", "noisy_init", "noisy"):
    np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)
  assert int(w0["exact_iterations"]) == _EXACT_STEPS
  assert int(w0["clip_iterations"]) == int(w0["noisy_iterations"]) == 1
  np.testing.assert_array_equal(w0["clip_init"], w0["noisy_init"])

  # The sampler's secret: the chief's OS entropy on every worker, not derivable from anything.
  np.testing.assert_array_equal(w0["shared_secret"], w1["shared_secret"])
  np.testing.assert_array_equal(w0["shared_draws"], w1["shared_draws"])
  assert not np.array_equal(w0["local_secret"], w1["local_secret"])  # each worker's own entropy
  assert not np.array_equal(w0["shared_secret"], w0["local_secret"])

  # (b) noise 0, no clipping: plain SGD on the mean loss of the same global batches.
  expected = _plain_sgd(w0["exact_init"], x, y)
  assert not np.allclose(expected, w0["exact_init"], atol=1e-3)  # training moved the weights
  np.testing.assert_allclose(w0["exact"], expected, rtol=0, atol=1e-5)

  # noise 0, clipping: the mean over the GLOBAL batch of each example's clipped gradient.
  expected, norms = _clipped_mean_step(w0["clip_init"], x[:_GLOBAL_BATCH], y[:_GLOBAL_BATCH])
  assert (norms > _CLIP).any() and (norms < _CLIP).any(), norms  # the clip bites, not always
  np.testing.assert_allclose(w0["clip"], expected, rtol=0, atol=1e-5)

  # noise: one step's deviation from the noiseless step is -lr * N(0, (sigma C)^2) / B on every
  # coordinate. Its std estimate over the coordinates is within ~5%; R = 2 replicas adding
  # sigma*C each (or the same noise twice) would be 41% off, no noise at all 100%.
  deviation = w0["noisy"] - w0["clip"]
  measured = np.sqrt(np.mean(np.square(deviation)))
  target = _LR * _SIGMA * _CLIP / _GLOBAL_BATCH
  assert deviation.size > 200
  assert abs(measured / target - 1) < 0.2, (measured, target)
