"""PyTorch peer arms of `step_time.py`: the two benchmark models as torch modules, two train steps.

  torch_nonprivate       torch.optim.SGD on the mean loss.
  opacus_dp              Opacus `PrivacyEngine.make_private` (hooks mode, flat clipping, mean
                         loss) on the same model: per-sample gradients from Opacus' grad samplers
                         (Conv2d, Linear, GroupNorm built in; `WSConv2d` below registers its own),
                         clip to C, sum, + N(0, sigma^2 C^2), / expected batch, SGD.
  opacus_dp_functorch_ws the same, but the weight-standardized convolutions use Opacus' generic
                         functorch fallback (per-example vmap(grad) of the layer) instead of the
                         registered grad sampler. Same as opacus_dp on the CNN (no WS layer).

The modules' parameter names are those of the JAX models in `jax_arms.py`; `TF "same"` padding,
asymmetric for strided 3x3 convolutions (0 before, 1 after), is a `ZeroPad2d` before the
convolution there, so both frameworks compute the same function (`check_dp.py`).
"""

import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import arms
import harness

GN_GROUPS = 16
GN_EPSILON = 1e-5
WS_EPSILON = 1e-4
INPUT_SHAPES = {"cnn": (28, 28, 1), "wrn": (32, 32, 3)}  # HWC, as the data is generated


def same_padding(size, kernel, stride):
  """(before, after) padding of TF's "SAME" for one spatial axis."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class MnistCnn(nn.Module):
  """TF Privacy's MNIST tutorial CNN (26,010 parameters)."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=same_padding(28, 8, 2)[0])  # (3, 3)
    self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
    self.fc1 = nn.Linear(4 * 4 * 32, 32)
    self.fc2 = nn.Linear(32, 10)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2, stride=1)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2, stride=1)
    x = torch.flatten(x, 1)  # (c, h, w) order; check_dp.py permutes fc1's weight accordingly
    return self.fc2(F.relu(self.fc1(x)))


class WSConv2d(nn.Conv2d):
  """Conv2d whose kernel is standardized per output channel over (in, h, w) before each use:
  `(w - mean) / sqrt(var + 1e-4)`, as tfdp_prune.models.WSConv2D. The trained parameter is the
  raw kernel."""

  def standardized_weight(self, weight=None):
    w = self.weight if weight is None else weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) * torch.rsqrt(var + WS_EPSILON)

  def forward(self, x):
    return self._conv_forward(x, self.standardized_weight(), self.bias)


class WSConv2dFunctorch(WSConv2d):
  """The same layer under another type, which has no registered grad sampler: Opacus computes
  its per-sample gradients with its functorch fallback."""


def _register_ws_grad_sampler():
  """Registers Opacus' per-sample gradient rule for WSConv2d: Opacus' own Conv2d rule (unfolded
  inputs x output gradients) gives the per-sample gradient w.r.t. the standardized kernel; the
  chain rule through the standardization (its VJP, vmapped over the examples) gives the gradient
  w.r.t. the raw kernel."""
  from opacus.grad_sample import register_grad_sampler  # pylint: disable=import-outside-toplevel
  from opacus.utils.tensor_utils import unfold2d  # pylint: disable=import-outside-toplevel

  @register_grad_sampler(WSConv2d)
  def ws_conv2d_grad_sample(layer, activations, backprops):
    patches = unfold2d(activations[0].to(backprops.dtype), kernel_size=layer.kernel_size,
                       padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    n = patches.shape[0]
    backprops = backprops.reshape(n, -1, patches.shape[-1])
    grad_standardized = torch.einsum("noq,npq->nop", backprops, patches).reshape(
        (n,) + tuple(layer.weight.shape))
    _, vjp = torch.func.vjp(layer.standardized_weight, layer.weight.detach())
    (grad_sample,) = torch.vmap(vjp)(grad_standardized)
    return {layer.weight: grad_sample.contiguous()}

  return ws_conv2d_grad_sample


class Block(nn.Module):
  """Pre-activation basic block GN-relu-conv3x3-GN-relu-conv3x3, 1x1 projection shortcut where
  the shape changes."""

  def __init__(self, cin, cout, stride, size, conv_cls):
    super().__init__()
    self.gn1 = nn.GroupNorm(GN_GROUPS, cin, eps=GN_EPSILON)
    self.shortcut = (conv_cls(cin, cout, 1, stride=stride, bias=False)
                     if stride != 1 or cin != cout else None)
    before, after = same_padding(size, 3, stride)
    if before == after:
      self.pad, padding = None, before
    else:
      self.pad, padding = nn.ZeroPad2d((before, after, before, after)), 0
    self.conv1 = conv_cls(cin, cout, 3, stride=stride, padding=padding, bias=False)
    self.gn2 = nn.GroupNorm(GN_GROUPS, cout, eps=GN_EPSILON)
    self.conv2 = conv_cls(cout, cout, 3, padding=1, bias=False)

  def forward(self, x):
    out = F.relu(self.gn1(x))
    skip = x if self.shortcut is None else self.shortcut(out)
    out = self.conv1(out if self.pad is None else self.pad(out))
    out = F.relu(self.gn2(out))
    return self.conv2(out) + skip


class WideResNet(nn.Module):
  """WRN-16-4 with GroupNorm(16) and weight-standardized convolutions (2,748,890 parameters)."""

  def __init__(self, width_factor=4, depth=16, conv_cls=WSConv2d):
    super().__init__()
    self.stem = conv_cls(3, 16, 3, padding=1, bias=False)
    blocks, cin, size = [], 16, 32
    for width, stride in zip((16 * width_factor, 32 * width_factor, 64 * width_factor),
                             (1, 2, 2)):
      for j in range((depth - 4) // 6):
        s = stride if j == 0 else 1
        blocks.append(Block(cin, width, s, size, conv_cls))
        cin, size = width, math.ceil(size / s)
    self.blocks = nn.ModuleList(blocks)
    self.gn = nn.GroupNorm(GN_GROUPS, cin, eps=GN_EPSILON)
    self.fc = nn.Linear(cin, 10)

  def forward(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    x = F.relu(self.gn(x)).mean(dim=(2, 3))
    return self.fc(x)


def model(name, width_factor=4, conv_cls=WSConv2d):
  if name == "cnn":
    return MnistCnn()
  if name == "wrn":
    return WideResNet(width_factor, conv_cls=conv_cls)
  raise ValueError(f"Expected model in {sorted(INPUT_SHAPES)}. Received: model={name!r}.")


def count_params(module):
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


ARMS = tuple(a for a in arms.PEER_ARMS if arms.module_name(a) == "torch_arms")


def make_private(module, batch, x, y, *, l2_norm_clip, noise_multiplier, learning_rate):
  """(GradSampleModule, DPOptimizer) of Opacus' `PrivacyEngine.make_private` for SGD, with a
  data loader over the fixed batch (one batch per epoch: expected batch size = `batch`)."""
  import opacus  # pylint: disable=import-outside-toplevel
  _register_ws_grad_sampler()
  loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
  private_module, optimizer, _ = opacus.PrivacyEngine().make_private(
      module=module, optimizer=torch.optim.SGD(module.parameters(), lr=learning_rate),
      data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=l2_norm_clip)
  return private_module, optimizer


def nchw(images):
  """NHWC numpy images as an NCHW tensor with NCHW strides.

  Not `np.ascontiguousarray(images.transpose(0, 3, 1, 2))`: with one channel that is a view
  whose strides are channels-last, which propagates through the convolutions, and Opacus 1.6.0's
  `unfold2d` (its Conv2d grad sampler) assumes NCHW strides: it silently returns wrong
  per-sample gradients for channels-last activations (found by check_dp.py)."""
  x = torch.from_numpy(np.array(images).transpose(0, 3, 1, 2))
  return x.clone(memory_format=torch.contiguous_format)


def functorch_layers(module):
  """How many layers of an Opacus-wrapped module get their per-sample gradients from Opacus'
  functorch fallback (no registered grad sampler) rather than a grad sampler."""
  return sum(hasattr(m, "ft_compute_sample_grad") for m in module.modules())


def fixed_batch(model_name, batch, seed):
  """The batch step_time.py's child draws (same generator calls), as NCHW float32 tensors."""
  rng = np.random.default_rng(seed)
  x = rng.random((batch,) + INPUT_SHAPES[model_name], dtype=np.float32)
  y = rng.integers(0, 10, size=(batch,))
  return nchw(x), torch.from_numpy(y)


def thread_notes():
  return {"torch": torch.__version__, "intra_op_threads": torch.get_num_threads(),
          "inter_op_threads": torch.get_num_interop_threads(),
          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def build(model_name, arm, batch, seed, *, l2_norm_clip, noise_multiplier, learning_rate,
          width_factor=4):
  """A `harness.Arm` of `arm` on `model_name`, on one fixed random batch."""
  if arm not in ARMS:
    raise ValueError(f"Expected arm in {ARMS}. Received: arm={arm!r}.")
  torch.manual_seed(seed)
  conv_cls = WSConv2dFunctorch if arm == "opacus_dp_functorch_ws" else WSConv2d
  module = model(model_name, width_factor, conv_cls)
  params = count_params(module)
  x, y = fixed_batch(model_name, batch, seed)
  notes = thread_notes()
  if arm == "torch_nonprivate":
    optimizer = torch.optim.SGD(module.parameters(), lr=learning_rate)
  else:
    import opacus  # pylint: disable=import-outside-toplevel
    module, optimizer = make_private(module, batch, x, y, l2_norm_clip=l2_norm_clip,
                                     noise_multiplier=noise_multiplier,
                                     learning_rate=learning_rate)
    notes["opacus"] = opacus.__version__
    notes["functorch_layers"] = functorch_layers(module)
  module.train()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()

  return harness.Arm(step=step, params=params, notes=notes)
