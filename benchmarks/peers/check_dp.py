"""Checks that the peer DP arms time real DP-SGD steps (run in the peers' environment).

On a tiny batch, with noise 0 and learning rate 1, each DP arm's step must move the parameters
by exactly -(sum of per-example gradients clipped to C) / batch, where the per-example gradients
are computed one example at a time with `jax.grad` (no vmap, no library). C is the median
per-example norm (so some examples are clipped and some are not) and 1.0 (the benchmark's).
The PyTorch arms get the JAX model's weights: their logits and non-private step must match JAX's
too, which checks that both frameworks build the same model.

  nice -n 19 env OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/check_dp.py
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax_arms  # pylint: disable=wrong-import-position
import torch_arms  # pylint: disable=wrong-import-position

RTOL = 2e-4  # float32, two frameworks, different convolution algorithms


def reference_clipped_sum(apply, params, x, y, l2_norm_clip):
  """(sum of clipped per-example gradients, per-example norms), one example at a time."""
  grad = jax.jit(jax.grad(lambda p, xi, yi: jax_arms.mean_loss(apply, p, xi, yi)))
  total, norms = None, []
  for i in range(x.shape[0]):
    g = grad(params, x[i:i + 1], y[i:i + 1])
    norm = float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values())))
    factor = min(1.0, l2_norm_clip / norm)
    clipped = {k: np.asarray(v, np.float64) * factor for k, v in g.items()}
    total = clipped if total is None else {k: total[k] + clipped[k] for k in total}
    norms.append(norm)
  return total, np.array(norms)


def to_torch(name, value, model_name):
  """A JAX parameter (HWIO kernels, (in, out) dense) in the layout of the torch module."""
  value = np.asarray(value)
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2 and model_name == "cnn" and name == "fc1.weight":
    # JAX flattens (h, w, c), torch (c, h, w)
    return value.reshape(4, 4, 32, -1).transpose(3, 2, 0, 1).reshape(value.shape[1], -1)
  if value.ndim == 2:
    return value.T
  return value


def from_torch(name, value, model_name):
  """The inverse of `to_torch`."""
  value = np.asarray(value)
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2 and model_name == "cnn" and name == "fc1.weight":
    return value.reshape(-1, 32, 4, 4).transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
  if value.ndim == 2:
    return value.T
  return value


def compare(what, actual, expected):
  """Max relative error over the whole parameter vector; raises if above RTOL."""
  scale = max(float(np.max(np.abs(v))) for v in expected.values())
  error = max(float(np.max(np.abs(np.asarray(actual[k], np.float64) - expected[k])))
              for k in expected) / scale
  status = "ok" if error <= RTOL else "MISMATCH"
  print(f"  {what}: max |difference| / max |expected| = {error:.2e} [{status}]", flush=True)
  if error > RTOL:
    raise AssertionError(f"{what}: relative error {error:.2e} > {RTOL}")


def jax_update(arm, apply, params, x, y, l2_norm_clip):
  """-(params after one step - before) x batch, for noise 0 and learning rate 1."""
  step, opt_state, noise_state = jax_arms.make_step(
      arm, apply, params, x.shape[0], l2_norm_clip=l2_norm_clip, noise_multiplier=0.0,
      learning_rate=1.0, seed=0)
  new, _, _, _ = step(params, opt_state, noise_state, x, y)
  return {k: (np.asarray(params[k], np.float64) - np.asarray(new[k], np.float64)) * x.shape[0]
          for k in params}


def torch_update(arm, model_name, params, x, y, l2_norm_clip):
  """The same for a PyTorch arm given the JAX weights; returned in the JAX layout."""
  conv_cls = (torch_arms.WSConv2dFunctorch if arm == "opacus_dp_functorch_ws"
              else torch_arms.WSConv2d)
  module = torch_arms.model(model_name, conv_cls=conv_cls)
  names = [n for n, _ in module.named_parameters()]
  if sorted(names) != sorted(params):
    raise AssertionError(f"parameter names differ: torch {names}, jax {sorted(params)}")
  with torch.no_grad():
    for n, p in module.named_parameters():
      p.copy_(torch.from_numpy(np.array(to_torch(n, params[n], model_name))))
  named = dict(module.named_parameters())  # updated in place by the step, wrapped or not
  before = {n: p.detach().double().clone() for n, p in named.items()}
  xt = torch_arms.nchw(x)
  yt = torch.from_numpy(np.asarray(y).astype(np.int64))
  if arm == "torch_nonprivate":
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
  else:
    module, optimizer = torch_arms.make_private(module, x.shape[0], xt, yt,
                                                l2_norm_clip=l2_norm_clip, noise_multiplier=0.0,
                                                learning_rate=1.0)
    fallback = torch_arms.functorch_layers(module)
    expected = (sum(isinstance(m, torch_arms.WSConv2dFunctorch) for m in module.modules())
                if arm == "opacus_dp_functorch_ws" else 0)
    print(f"  {arm}: {fallback} layers use Opacus' functorch fallback (expected {expected})")
    if fallback != expected:
      raise AssertionError(f"{arm}: {fallback} functorch layers, expected {expected}")
  optimizer.zero_grad()
  logits = module(xt)
  torch.nn.functional.cross_entropy(logits, yt).backward()
  optimizer.step()
  update = {n: from_torch(n, (before[n] - p.detach().double()).numpy() * x.shape[0], model_name)
            for n, p in named.items()}
  return update, logits.detach().numpy()


def check(model_name, batch, seed):
  print(f"{model_name}, batch {batch}:", flush=True)
  params, apply = jax_arms.model(model_name, seed)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.random((batch,) + jax_arms.INPUT_SHAPES[model_name], dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 10, size=(batch,)), dtype=jnp.int32)
  print(f"  parameters: {jax_arms.count_params(params):,} (JAX), "
        f"{torch_arms.count_params(torch_arms.model(model_name)):,} (PyTorch)")

  # Non-private: the mean gradient; and the PyTorch model computes the same logits.
  mean_grad = jax.grad(lambda p: jax_arms.mean_loss(apply, p, x, y))(params)
  expected = {k: np.asarray(v, np.float64) * batch for k, v in mean_grad.items()}
  compare("jax_nonprivate step", jax_update("jax_nonprivate", apply, params, x, y, 1.0), expected)
  update, logits = torch_update("torch_nonprivate", model_name, params, x, y, 1.0)
  compare("torch logits", {"logits": logits},
          {"logits": np.asarray(apply(params, x), np.float64)})
  compare("torch_nonprivate step", update, expected)

  _, norms = reference_clipped_sum(apply, params, x, y, np.inf)
  print(f"  per-example gradient norms: {np.array2string(norms, precision=3)}")
  for l2_norm_clip in (float(np.median(norms)), 1.0):
    expected, _ = reference_clipped_sum(apply, params, x, y, l2_norm_clip)
    print(f"  C = {l2_norm_clip:.4g} ({int(np.sum(norms > l2_norm_clip))} of {batch} clipped)")
    for arm in ("jax_vmap_dp", "jax_privacy_dp"):
      compare(f"{arm} step", jax_update(arm, apply, params, x, y, l2_norm_clip), expected)
    for arm in ("opacus_dp", "opacus_dp_functorch_ws"):
      compare(f"{arm} step", torch_update(arm, model_name, params, x, y, l2_norm_clip)[0],
              expected)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="cnn,wrn")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for name in args.models.split(","):
    check(name, args.batch, args.seed)
  print("all DP steps match the per-example reference")


if __name__ == "__main__":
  main()
