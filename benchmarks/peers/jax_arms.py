"""JAX peer arms of `step_time.py`: the two benchmark models in plain JAX, and three train steps.

  jax_nonprivate  optax SGD on the mean loss, jitted.
  jax_vmap_dp     per-example gradients with `jax.vmap(jax.grad(...))`, clip to C, sum,
                  + N(0, sigma^2 C^2), / batch, optax SGD; one jitted step.
  jax_privacy_dp  `jax_privacy.clipped_grad` (per-example clip, sum, normalize_by=batch) and
                  `jax_privacy.noise_addition.gaussian_privatizer` (stddev = sigma times the
                  clipped function's sensitivity), optax SGD; one jitted step. This is how
                  jax_privacy 2.0's own Keras API composes them (`keras_api._noised_clipped_grads`).

The models are `benchmarks/models.py`'s, layer for layer (NHWC, kernels HWIO, padding "SAME" as
TF's): parameter names are those of the PyTorch modules in `torch_arms.py`, so weights can be
copied across (`check_dp.py`).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import arms
import harness

GN_GROUPS = 16
GN_EPSILON = 1e-5  # benchmarks/models.py: GroupNormalization(epsilon=1e-5)
WS_EPSILON = 1e-4  # tfdp_prune.models.WSConv2D's default
INPUT_SHAPES = {"cnn": (28, 28, 1), "wrn": (32, 32, 3)}


# ------------------------------------------------------------------------------------------------
# Models: init(rng) -> {name: array}; apply(params, x) -> logits.
# ------------------------------------------------------------------------------------------------

def _glorot(rng, shape, fan_in, fan_out):
  limit = math.sqrt(6.0 / (fan_in + fan_out))
  return jnp.asarray(rng.uniform(-limit, limit, size=shape), dtype=jnp.float32)


def _conv_kernel(rng, kh, kw, cin, cout):
  return _glorot(rng, (kh, kw, cin, cout), kh * kw * cin, kh * kw * cout)


def _dense_kernel(rng, cin, cout):
  return _glorot(rng, (cin, cout), cin, cout)


def _conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _max_pool_2x2_stride1(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")


def init_cnn(seed):
  """TF Privacy's MNIST tutorial CNN: 26,010 parameters."""
  rng = np.random.default_rng(seed)
  return {
      "conv1.weight": _conv_kernel(rng, 8, 8, 1, 16), "conv1.bias": jnp.zeros(16),
      "conv2.weight": _conv_kernel(rng, 4, 4, 16, 32), "conv2.bias": jnp.zeros(32),
      "fc1.weight": _dense_kernel(rng, 4 * 4 * 32, 32), "fc1.bias": jnp.zeros(32),
      "fc2.weight": _dense_kernel(rng, 32, 10), "fc2.bias": jnp.zeros(10),
  }


def apply_cnn(p, x):
  """Conv(16, 8, stride 2, same)-relu-maxpool(2, 1)-Conv(32, 4, stride 2, valid)-relu-
  maxpool(2, 1)-flatten-Dense(32)-relu-Dense(10)."""
  x = jax.nn.relu(_conv(x, p["conv1.weight"], 2, "SAME") + p["conv1.bias"])
  x = _max_pool_2x2_stride1(x)
  x = jax.nn.relu(_conv(x, p["conv2.weight"], 2, "VALID") + p["conv2.bias"])
  x = _max_pool_2x2_stride1(x)
  x = x.reshape(x.shape[0], -1)  # (h, w, c) order, as Keras' Flatten
  x = jax.nn.relu(x @ p["fc1.weight"] + p["fc1.bias"])
  return x @ p["fc2.weight"] + p["fc2.bias"]


def standardize(kernel):
  """Weight standardization per output channel over (h, w, in), as tfdp_prune's WSConv2D."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(var + WS_EPSILON)


def group_norm(x, gamma, beta):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, GN_GROUPS, c // GN_GROUPS)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.var(g, axis=(1, 2, 4), keepdims=True)
  g = (g - mean) * jax.lax.rsqrt(var + GN_EPSILON)
  return g.reshape(n, h, w, c) * gamma + beta


def wrn_blocks(width_factor=4, depth=16):
  """[(name, in_width, width, stride, has_shortcut_conv)] of WRN-depth-width_factor."""
  blocks, in_width, i = [], 16, 0
  for width, stride in zip((16 * width_factor, 32 * width_factor, 64 * width_factor), (1, 2, 2)):
    for j in range((depth - 4) // 6):
      s = stride if j == 0 else 1
      blocks.append((f"blocks.{i}", in_width, width, s, s != 1 or in_width != width))
      in_width, i = width, i + 1
  return blocks


def init_wrn(seed, width_factor=4):
  """WRN-16-4 with GroupNorm(16) and weight-standardized convolutions: 2,748,890 parameters."""
  rng = np.random.default_rng(seed)
  p = {"stem.weight": _conv_kernel(rng, 3, 3, 3, 16)}
  for name, cin, cout, _, shortcut in wrn_blocks(width_factor):
    p[f"{name}.gn1.weight"], p[f"{name}.gn1.bias"] = jnp.ones(cin), jnp.zeros(cin)
    if shortcut:
      p[f"{name}.shortcut.weight"] = _conv_kernel(rng, 1, 1, cin, cout)
    p[f"{name}.conv1.weight"] = _conv_kernel(rng, 3, 3, cin, cout)
    p[f"{name}.gn2.weight"], p[f"{name}.gn2.bias"] = jnp.ones(cout), jnp.zeros(cout)
    p[f"{name}.conv2.weight"] = _conv_kernel(rng, 3, 3, cout, cout)
  width = 64 * width_factor
  p["gn.weight"], p["gn.bias"] = jnp.ones(width), jnp.zeros(width)
  p["fc.weight"], p["fc.bias"] = _dense_kernel(rng, width, 10), jnp.zeros(10)
  return p


def apply_wrn(p, x, width_factor=4):
  """Pre-activation blocks GN-relu-conv3x3-GN-relu-conv3x3 (+ 1x1 projection shortcut where the
  shape changes), then GN-relu-global average pool-Dense(10); as benchmarks/models.build_wrn."""
  ws_conv = lambda x, name, stride: _conv(x, standardize(p[name]), stride, "SAME")
  x = ws_conv(x, "stem.weight", 1)
  for name, _, _, stride, shortcut in wrn_blocks(width_factor):
    out = jax.nn.relu(group_norm(x, p[f"{name}.gn1.weight"], p[f"{name}.gn1.bias"]))
    skip = ws_conv(out, f"{name}.shortcut.weight", stride) if shortcut else x
    out = ws_conv(out, f"{name}.conv1.weight", stride)
    out = jax.nn.relu(group_norm(out, p[f"{name}.gn2.weight"], p[f"{name}.gn2.bias"]))
    x = ws_conv(out, f"{name}.conv2.weight", 1) + skip
  x = jax.nn.relu(group_norm(x, p["gn.weight"], p["gn.bias"]))
  x = jnp.mean(x, axis=(1, 2))
  return x @ p["fc.weight"] + p["fc.bias"]


def model(name, seed, width_factor=4):
  """(params, apply) of the benchmark model `name` ("cnn" or "wrn")."""
  if name == "cnn":
    return init_cnn(seed), apply_cnn
  if name == "wrn":
    return init_wrn(seed, width_factor), functools.partial(apply_wrn, width_factor=width_factor)
  raise ValueError(f"Expected model in {sorted(INPUT_SHAPES)}. Received: model={name!r}.")


def count_params(params):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))


def mean_loss(apply, params, x, y):
  """Mean softmax cross-entropy of the logits (Keras' SparseCategoricalCrossentropy)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y))


# ------------------------------------------------------------------------------------------------
# Train steps: step(params, opt_state, noise_state, x, y) -> (params, opt_state, noise_state, loss)
# ------------------------------------------------------------------------------------------------

def nonprivate_step(apply, optimizer):
  def step(params, opt_state, noise_state, x, y):
    loss, grads = jax.value_and_grad(functools.partial(mean_loss, apply))(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, noise_state, loss
  return step


def vmap_clipped_sum(apply, params, x, y, l2_norm_clip):
  """Sum over the batch of per-example gradients clipped to L2 norm `l2_norm_clip`, and the
  per-example losses; plain `jax.vmap(jax.value_and_grad(...))`."""
  def one(params, xi, yi):
    return mean_loss(apply, params, xi[None], yi[None])
  losses, grads = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0))(params, x, y)
  sq = sum(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in jax.tree.leaves(grads))
  norms = jnp.sqrt(sq)
  factors = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, 1e-12))
  summed = jax.tree.map(lambda g: jnp.tensordot(factors, g, axes=1), grads)
  return summed, losses


def gaussian_noise(key, tree, stddev):
  """Independent N(0, stddev^2) for every coordinate of `tree`, and the key for the next step."""
  key, sub = jax.random.split(key)
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(sub, len(leaves))
  noise = [stddev * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, noise), key


def vmap_dp_step(apply, optimizer, l2_norm_clip, noise_multiplier):
  def step(params, opt_state, key, x, y):
    summed, losses = vmap_clipped_sum(apply, params, x, y, l2_norm_clip)
    noise, key = gaussian_noise(key, summed, noise_multiplier * l2_norm_clip)
    grads = jax.tree.map(lambda s, n: (s + n) / x.shape[0], summed, noise)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key, jnp.mean(losses)
  return step


def jax_privacy_dp_parts(apply, batch, l2_norm_clip, noise_multiplier, seed):
  """(clipped_grad_fn, privatizer) of jax_privacy: the clipped sum / batch, and Gaussian noise of
  stddev sigma x the function's L2 sensitivity (C / batch)."""
  import jax_privacy  # pylint: disable=import-outside-toplevel
  clipped_grad_fn = jax_privacy.clipped_grad(
      functools.partial(mean_loss, apply), l2_clip_norm=l2_norm_clip, batch_argnums=(1, 2),
      normalize_by=batch, return_values=True)
  privatizer = jax_privacy.noise_addition.gaussian_privatizer(
      stddev=noise_multiplier * clipped_grad_fn.sensitivity(), prng_key=jax.random.key(seed))
  return clipped_grad_fn, privatizer


def jax_privacy_dp_step(clipped_grad_fn, privatizer, optimizer):
  def step(params, opt_state, noise_state, x, y):
    grads, aux = clipped_grad_fn(params, x, y)
    grads, noise_state = privatizer.update(grads, noise_state)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, noise_state, jnp.mean(aux.values)
  return step


ARMS = tuple(a for a in arms.PEER_ARMS if arms.module_name(a) == "jax_arms")


def make_step(arm, apply, params, batch, *, l2_norm_clip, noise_multiplier, learning_rate, seed):
  """(jitted step, opt_state, noise_state) of `arm`; the step's signature is
  step(params, opt_state, noise_state, x, y) -> (params, opt_state, noise_state, loss)."""
  optimizer = optax.sgd(learning_rate)
  opt_state = optimizer.init(params)
  if arm == "jax_nonprivate":
    step, noise_state = nonprivate_step(apply, optimizer), ()
  elif arm == "jax_vmap_dp":
    step = vmap_dp_step(apply, optimizer, l2_norm_clip, noise_multiplier)
    noise_state = jax.random.key(seed)
  elif arm == "jax_privacy_dp":
    clipped_grad_fn, privatizer = jax_privacy_dp_parts(apply, batch, l2_norm_clip,
                                                       noise_multiplier, seed)
    step = jax_privacy_dp_step(clipped_grad_fn, privatizer, optimizer)
    noise_state = privatizer.init(params)
  else:
    raise ValueError(f"Expected arm in {ARMS}. Received: arm={arm!r}.")
  return jax.jit(step), opt_state, noise_state


def thread_notes():
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": jax.device_count(), "XLA_FLAGS": os.environ.get("XLA_FLAGS")}


def build(model_name, arm, batch, seed, *, l2_norm_clip, noise_multiplier, learning_rate,
          width_factor=4):
  """A `harness.Arm` of `arm` on `model_name`, on one fixed random batch."""
  params, apply = model(model_name, seed, width_factor)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.random((batch,) + INPUT_SHAPES[model_name], dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 10, size=(batch,)), dtype=jnp.int32)
  step, opt_state, noise_state = make_step(
      arm, apply, params, batch, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      learning_rate=learning_rate, seed=seed)
  state = [params, opt_state, noise_state]

  def run_step():
    state[0], state[1], state[2], loss = step(state[0], state[1], state[2], x, y)
    jax.block_until_ready(state)
    return float(loss)

  notes = thread_notes()
  if arm == "jax_privacy_dp":
    import jax_privacy  # pylint: disable=import-outside-toplevel
    notes["jax_privacy"] = jax_privacy.__version__
  return harness.Arm(step=run_step, params=count_params(params), notes=notes)
