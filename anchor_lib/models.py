"""PreAct ResNet-18 for 32x32 images, with a projection head for contrastive learning.

The model takes images in [0, 1] and normalises them itself, so attacks never need to know
the dataset statistics. ``forward`` returns logits only (what attacks expect); ``features``
returns the pooled backbone representation and ``project`` the L2-normalised embedding ``z``
used by the contrastive losses. Its BatchNorm layers are :class:`BatchNorm2d`: PyTorch's, with an
eval-mode backward that keeps channels_last gradients in channels_last (what attack steps need).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a layer, so normalisation is part of the model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _EvalBatchNormFn(torch.autograd.Function):
    """Eval-mode batch normalisation, ``(x - running_mean) / sqrt(running_var + eps) * w + b``.

    The forward pass is ``F.batch_norm``'s own. The backward pass exists for the gradient's memory
    layout: PyTorch's CUDA backward of eval-mode BatchNorm (``batch_norm_elementwise_backward_eval``)
    allocates the input gradient contiguous (NCHW) whatever the input's layout, so with
    channels_last activations its kernel writes across strides and the layers below receive the
    gradient in the other layout. The H100 kernel profile of a training step
    (``data/results/bench/kernels_w64-*.json``) shows one strided BatchNorm-backward kernel per
    layer per attack step and about as many layout copies, together about a third of the step.
    Here the input gradient is ``grad * w / sqrt(var + eps)`` in the gradient's own layout; the
    weight and bias gradients are computed only for inputs that require them. The backward is
    made of differentiable operations, so second derivatives work.
    """

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        ctx.eps = eps
        # The input is needed only for the weight's gradient (not during an attack's steps).
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, mean, var, weight)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        x, mean, var, weight = ctx.saved_tensors
        acc = torch.promote_types(grad.dtype, torch.float32)  # fp32 for bf16/fp16 activations
        invstd = torch.rsqrt(var.to(acc) + ctx.eps)
        scale = invstd * weight.to(acc) if weight is not None else invstd
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        dims = [0, *range(2, grad.dim())]
        need_x, _, _, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = grad * scale.to(grad.dtype).view(shape) if need_x else None
        grad_w = grad_b = None
        if need_w:
            x_hat = (x.to(acc) - mean.to(acc).view(shape)) * invstd.view(shape)
            grad_w = (grad.to(acc) * x_hat).sum(dims).to(weight.dtype)
        if need_b:
            grad_b = grad.to(acc).sum(dims).to(weight.dtype)
        return grad_x, None, None, grad_w, grad_b, None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state_dict) whose eval-mode backward keeps
    the gradient in the input's memory layout (see ``_EvalBatchNormFn``).

    Train mode, and eval mode without an input gradient to compute, are ``nn.BatchNorm2d``'s own
    code; eval mode with one (every attack step) has the same forward arithmetic and a backward
    equal to PyTorch's up to rounding. Inputs ``(N, C, H, W)``, any float dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None or not (torch.is_grad_enabled()
                                                              and x.requires_grad):
            return super().forward(x)
        self._check_input_dim(x)
        return _EvalBatchNormFn.apply(x, self.running_mean, self.running_var, self.weight,
                                      self.bias, self.eps)


def use_torch_batchnorm(model: nn.Module) -> nn.Module:
    """Make every :class:`BatchNorm2d` of ``model`` a plain ``nn.BatchNorm2d``, in place (the
    subclass adds no state, so its tensors, device and mode stay as they are); returns ``model``.
    For comparisons with PyTorch's own layer (the tests, the GPU probe); the results differ by
    rounding only."""
    for module in model.modules():
        if type(module) is BatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    return model


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv twice, identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The shortcut branches off *after* the first BN-ReLU, as in the original PreAct code.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 with a classifier and a two-layer projection head.

    Args:
        num_classes: number of output logits (>= 2).
        width: channels of the first stage; stages use ``width * (1, 2, 4, 8)``. 64 is the
            standard ResNet-18; 8 or 16 give tiny CPU-friendly models for tests and tutorials.
        proj_dim: dimension of the contrastive embedding ``z``.

    Inputs are float tensors of shape ``(N, 3, H, W)`` with values in [0, 1], in the parameters'
    dtype unless autocast is on (the range is not checked; another shape raises ValueError, an
    integer or other dtype TypeError). The constructor raises ValueError when
    ``num_classes`` (>= 2), ``width`` or ``proj_dim`` (>= 1) is not an int in range.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, proj_dim: int = 128) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 2), ("width", width, 1),
                                 ("proj_dim", proj_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.num_classes, self.width, self.proj_dim = num_classes, width, proj_dim
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers.append(nn.Sequential(PreActBlock(in_planes, planes, stride),
                                        PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        self.head = nn.Sequential(nn.Linear(in_planes, in_planes), nn.ReLU(inplace=True),
                                  nn.Linear(in_planes, proj_dim))
        self.feature_dim = in_planes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, shape ``(N, 8 * width)``, in the parameters' dtype
        (bfloat16 under autocast)."""
        if x.dim() != 4 or x.shape[1] != 3:
            # Normalize would silently broadcast a 1-channel batch to 3 channels.
            raise ValueError(f"expected RGB images of shape (N, 3, H, W), got {tuple(x.shape)} "
                             "(wrong number of channels or dimensions)")
        if not x.is_floating_point():
            # uint8 images would be normalised as if in [0, 1] and give confident nonsense.
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype} "
                            "(anchor_lib.data.to_float converts uint8 images)")
        weight = self.conv1.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # PyTorch's own error here names neither the model nor the fix.
            raise TypeError(f"expected images in the model's dtype {weight.dtype}, got {x.dtype} "
                            f"(convert with x.to({weight.dtype}), or the model with .to(x.dtype))")
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape ``(N, num_classes)``, unbounded, in the parameters' dtype (bfloat16
        under autocast)."""
        return self.linear(self.features(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding ``z``, shape ``(N, proj_dim)``, in the parameters' dtype
        (bfloat16 under autocast, where the rows are unit only up to bf16 rounding)."""
        return F.normalize(self.head(self.features(x)), dim=1)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (N, num_classes), z (N, proj_dim) with unit rows)`` from one backbone pass
        over images ``(N, 3, H, W)`` in [0, 1] (what the contrastive trainers need)."""
        feats = self.features(x)
        return self.linear(feats), F.normalize(self.head(feats), dim=1)
