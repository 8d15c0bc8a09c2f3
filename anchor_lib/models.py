"""PreAct ResNet-18 for 32x32 images, with a projection head for contrastive learning.

The model takes images in [0, 1] and normalises them itself, so attacks never need to know
the dataset statistics. ``forward`` returns logits only (what attacks expect); ``features``
returns the pooled backbone representation and ``project`` the L2-normalised embedding ``z``
used by the contrastive losses.
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


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv twice, identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
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

    Inputs are float tensors of shape ``(N, 3, H, W)`` with values in [0, 1].
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
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        self.head = nn.Sequential(nn.Linear(in_planes, in_planes), nn.ReLU(inplace=True),
                                  nn.Linear(in_planes, proj_dim))
        self.feature_dim = in_planes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, shape ``(N, 8 * width)``, float."""
        if x.dim() != 4 or x.shape[1] != 3:
            # Normalize would silently broadcast a 1-channel batch to 3 channels.
            raise ValueError(f"expected RGB images of shape (N, 3, H, W), got {tuple(x.shape)} "
                             "(wrong number of channels or dimensions)")
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape ``(N, num_classes)``."""
        return self.linear(self.features(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding ``z``, shape ``(N, proj_dim)``."""
        return F.normalize(self.head(self.features(x)), dim=1)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and ``z`` from one backbone pass (what the contrastive trainers need)."""
        feats = self.features(x)
        return self.linear(feats), F.normalize(self.head(feats), dim=1)
