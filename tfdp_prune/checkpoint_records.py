"""What a checkpoint's sidecar records to identify its run, and the checks a resume makes.

The model (optimizer class, weight shapes), the DP optimizer's settings, the positions of its
per-variable state, and the sampler's class and settings: `DPCheckpoint` writes them,
`restore_latest` refuses a model, optimizer or sampler that differs from them.
"""

import json
from typing import Any, Dict

from tfdp_prune import version

# The optimizer settings that decide what a logical step means for privacy: a resumed run must
# use the same ones, or the checkpointed ledger would describe another mechanism.
_DP_SETTINGS = ("l2_norm_clip", "noise_multiplier", "num_microbatches", "expected_batch_size",
                "gradient_accumulation_steps")


def state_layout(model, optimizer) -> list:
  """For each variable the optimizer's state was built for (in build order: the positions of its
  masks, accumulators and slots in the checkpoint), its position in `model.weights`: the same
  in every process that builds the same architecture, whatever the layer names."""
  position = {w.ref(): i for i, w in enumerate(model.weights)}
  return [position.get(v.ref(), -1) for v in optimizer.state_variables()]


def check_state_layout(saved, current, path) -> None:
  """The optimizer's per-variable state is checkpointed by position: restoring it into an
  optimizer built for another trainable set would give one variable another's mask."""
  if saved is not None and list(saved) != list(current):
    raise ValueError(
        f"Checkpoint {path} holds DP optimizer state (update masks, accumulators, slots) for "
        f"the model weights at positions {saved} of `model.weights`, in that order; this "
        f"model's optimizer is built for {current}. Restoring would give variables each "
        "other's masks. Expected the same trainable layers as the run that wrote it: restore "
        "first, then change `trainable` and recompile with the same optimizer.")


def model_record(model, optimizer) -> Dict[str, Any]:
  """What identifies the model a checkpoint belongs to: the optimizer's class and the shapes of
  `model.weights`, in order."""
  return {"optimizer": type(optimizer).__name__,
          "weight_shapes": [[int(d) for d in w.shape] for w in model.weights]}


def check_model(saved, current, path) -> None:
  """Refuses a model whose record (`model_record`) differs from the checkpointed one."""
  if saved is None or saved == current:
    return
  if saved["optimizer"] != current["optimizer"]:
    what = f"a {saved['optimizer']} optimizer, this model has a {current['optimizer']}"
  else:
    what = (f"{len(saved['weight_shapes'])} weights of shapes {saved['weight_shapes']}, this "
            f"model has {len(current['weight_shapes'])} of shapes {current['weight_shapes']}")
  raise ValueError(f"Checkpoint {path} belongs to another model: it holds {what}. Build and "
                   "compile the same architecture and optimizer as the run that wrote it, or "
                   "use another checkpoint directory.")


def dp_settings(optimizer) -> Dict[str, Any]:
  """The optimizer's settings that decide what a logical step means for privacy."""
  return {name: getattr(optimizer, name) for name in _DP_SETTINGS}


def check_settings(saved, current, path):
  """Refuses DP settings that differ from the checkpointed ones."""
  differ = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
  if differ:
    details = ", ".join(f"{k}: checkpointed {a!r}, now {b!r}" for k, (a, b) in differ.items())
    raise ValueError(f"The DP optimizer's settings differ from checkpoint {path} ({details}); "
                     "the steps taken were accounted with the checkpointed settings. Compile "
                     "the model with the same DP settings to resume.")


def sampler_record(sampler) -> Dict[str, Any]:
  """The sampler's class and `get_config()`, as the sidecar holds them."""
  # Through JSON, so that the record compares equal to one read back from a sidecar.
  return json.loads(json.dumps({"class": type(sampler).__name__,
                                "config": sampler.get_config()}))


def library_version() -> str:
  """The tfdp_prune version that writes the checkpoint."""
  return version.__version__
