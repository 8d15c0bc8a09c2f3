"""A synthetic classification task shared by the attack and evaluation tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def template_task(seed: int = 0, num_classes: int = 10):
    """``sample(n, seed) -> (x, y)``: 16x16 images near one of ``num_classes`` smooth templates.

    Templates differ by about +-0.1 per pixel, so small eps-balls already overlap: a model can
    be accurate and still breakable, which is what attack tests need.
    """
    gen = torch.Generator().manual_seed(seed)
    templates = 0.5 + 0.1 * (torch.rand(num_classes, 3, 4, 4, generator=gen) * 2 - 1)
    templates = F.interpolate(templates, size=16, mode="bilinear", align_corners=False)

    def sample(n: int, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sample_seed)
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = (templates[y] + 0.1 * (torch.rand(n, 3, 16, 16, generator=g) * 2 - 1)).clamp(0, 1)
        return x, y

    return sample
