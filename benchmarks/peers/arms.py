"""The peer arms of `step_time.py`: which framework runs each, its non-private baseline, a label.

Standard library only: `step_time.py` reads it in the main environment, where neither JAX nor
PyTorch is installed; `run_arm.py` reads it in the peers' own environment.
"""

# name: (framework, module that builds it, the same framework's non-private arm, label)
PEER_ARMS = {
    "jax_nonprivate": ("jax", "jax_arms", "jax_nonprivate", "non-private JAX + optax SGD, jit"),
    "jax_vmap_dp": ("jax", "jax_arms", "jax_nonprivate",
                    "plain JAX DP-SGD: vmap(grad) per-example gradients, clip, sum, noise, jit"),
    "jax_privacy_dp": ("jax", "jax_arms", "jax_nonprivate",
                       "jax_privacy clipped_grad + gaussian_privatizer, optax SGD, jit"),
    "torch_nonprivate": ("torch", "torch_arms", "torch_nonprivate",
                         "non-private PyTorch SGD (eager)"),
    "opacus_dp": ("torch", "torch_arms", "torch_nonprivate",
                  "Opacus make_private (hooks, flat clipping); WSConv2d grad sampler registered"),
    "opacus_dp_functorch_ws": ("torch", "torch_arms", "torch_nonprivate",
                               "Opacus make_private; WSConv2d per-sample grads by Opacus' "
                               "functorch fallback"),
}


def framework(arm):
  return PEER_ARMS[arm][0]


def module_name(arm):
  return PEER_ARMS[arm][1]


def baseline(arm):
  return PEER_ARMS[arm][2]


def label(arm):
  return PEER_ARMS[arm][3]
