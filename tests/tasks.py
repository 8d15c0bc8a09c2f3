"""Helpers shared by the tests: a synthetic classification task (attack and evaluation
tests), and the contrastive methods' loss written out from DESIGN §3 (training tests)."""

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


def contrastive_loss_by_definition(model, cfg, y, a1, a2, x_adv):
    """(loss, ce, con) of a SupCon-AT / ANCHOR step from its three views, as DESIGN §3 defines
    it: one pass in train mode over ``a1, a2, x_adv``, CE on the adversarial view only, the
    contrastive term over the first two or three views (β = 0 for SupCon-AT), total CE + λ·con."""
    from anchor_lib import losses

    model.train()
    n = len(y)
    logits, z = model.forward_all(torch.cat([a1, a2, x_adv]))
    ce = F.cross_entropy(logits[2 * n:], y)  # the classifier sees the adversarial view only
    views = 3 if cfg.adv_in_contrastive else 2
    beta = 0.0 if cfg.method == "supcon_at" else cfg.beta
    con = losses.anchor_loss(z[: views * n], y.repeat(views), temperature=cfg.temperature,
                             beta=beta)
    return ce + cfg.lam * con, ce, con
