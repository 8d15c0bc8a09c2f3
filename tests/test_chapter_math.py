"""The from-scratch computations of chapters 3-5 agree with the library (fast; no data, no book).

The chapters check themselves when the book is built; these tests catch a library change that
would break a chapter's "by hand == library" cell during ``make unit`` already:

- chapter 3's SupCon and chapter 4's mining weights / ANCHOR loss, written with explicit masks;
- chapter 5's one training step assembled from ``data.augment``, ``attacks.pgd``,
  ``model.forward_all`` and ``losses.anchor_loss`` in the trainer's order of random draws
  (a1, PGD random start, a2), compared with ``train.training_loss``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tasks import contrastive_loss_by_definition

from anchor_lib import attacks, data, losses
from anchor_lib.train import TrainConfig, build_model, training_loss

# --- chapter 3 and 4 helpers, as the notebooks write them ---------------------------------------


def supcon_from_scratch(z, labels, tau=0.1):
    n = len(labels)
    self_mask = torch.eye(n, dtype=torch.bool)
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    logits = z @ z.T / tau
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1,
                                        keepdim=True)
    n_pos = pos_mask.sum(dim=1)
    has_pos = n_pos > 0
    return (-(log_prob * pos_mask).sum(dim=1)[has_pos] / n_pos[has_pos]).mean()


def mining_weights(z, labels, tau=0.1, beta=1.0):
    z = z.detach()
    self_mask = torch.eye(len(labels), dtype=torch.bool)
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    scores = (-beta * (z @ z.T) / tau).masked_fill(~pos_mask, -math.inf)
    soft = torch.softmax(scores, dim=1).nan_to_num(0.0)
    return pos_mask.sum(dim=1, keepdim=True) * soft


def anchor_loss_from_scratch(z, labels, tau=0.1, beta=1.0):
    n = len(labels)
    self_mask = torch.eye(n, dtype=torch.bool)
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    logits = z @ z.T / tau
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1,
                                        keepdim=True)
    w = mining_weights(z, labels, tau, beta)
    n_pos = pos_mask.sum(dim=1)
    has_pos = n_pos > 0
    return (-(w * log_prob).sum(dim=1)[has_pos] / n_pos[has_pos]).mean()


def batch(n=48, d=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[-1] = classes  # one anchor without a positive
    return z, labels


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_chapter3_supcon_matches_library(tau):
    z, labels = batch()
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours, lib = supcon_from_scratch(za, labels, tau), losses.supcon_loss(zb, labels, tau)
    ours.backward()
    lib.backward()
    torch.testing.assert_close(ours, lib)
    torch.testing.assert_close(za.grad, zb.grad)


def test_chapter3_overflow_threshold_and_the_unused_diagonal():
    """Chapter 3, step 3: a float32 sum of N - 1 = 7 raw exponentials of similarity 1 overflows
    below tau ~ 0.0115 and not above; exp(log_prob)'s diagonal is not a probability (above 1 here),
    while the rows without it sum to 1."""
    def raw_sum(tau):
        return torch.exp(torch.full((7,), 1 / tau, dtype=torch.float32)).sum()

    assert math.isfinite(raw_sum(0.0116)) and math.isinf(raw_sum(0.0114))
    assert abs(1 / (math.log(torch.finfo(torch.float32).max) - math.log(7)) - 0.0115) < 5e-5
    z, labels = batch(n=8, d=2)
    self_mask = torch.eye(8, dtype=torch.bool)
    logits = z @ z.T / 0.1
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, -math.inf), 1, keepdim=True)
    assert (log_prob.exp().diagonal() > 1).any()
    torch.testing.assert_close(log_prob.exp().masked_fill(self_mask, 0).sum(1),
                               torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
def test_chapter4_weights_and_loss_match_library(beta):
    z, labels = batch(seed=1)
    torch.testing.assert_close(mining_weights(z, labels, 0.1, beta),
                               losses.hard_positive_weights(z, labels, 0.1, beta))
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours, lib = anchor_loss_from_scratch(za, labels, 0.1, beta), losses.anchor_loss(zb, labels,
                                                                                   0.1, beta)
    ours.backward()
    lib.backward()
    torch.testing.assert_close(ours, lib)
    torch.testing.assert_close(za.grad, zb.grad)


# --- chapter 5: one ANCHOR step by hand == train.training_loss -----------------------------------


def step_by_hand(model, cfg, x, y, gen_seed, rng_seed):
    gen = torch.Generator().manual_seed(gen_seed)
    torch.manual_seed(rng_seed)
    a1 = data.augment(x, gen)
    x_adv = attacks.pgd(model, a1, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps)
    if cfg.method == "pgd_at":
        model.train()
        ce = F.cross_entropy(model(x_adv), y)
        return ce, ce, torch.zeros(())
    a2 = data.augment(x, gen)
    return contrastive_loss_by_definition(model, cfg, y, a1, a2, x_adv)


@pytest.mark.parametrize("method, overrides", [
    ("anchor", {}),
    ("anchor", {"beta": 2.0, "lam": 0.5, "temperature": 0.2}),
    ("anchor", {"adv_in_contrastive": False}),
    ("supcon_at", {}),
    ("pgd_at", {}),
])
def test_chapter5_step_by_hand_matches_training_loss(method, overrides):
    cfg = TrainConfig(method=method, data="synthetic", width=4, proj_dim=16, batch_size=16,
                      attack_steps=2, device="cpu", progress=False, **overrides)
    ds = data.synthetic(n_train=64, n_test=16, size=16, seed=0)
    x, y = ds.x_train[:16], ds.y_train[:16]
    torch.manual_seed(0)
    model = build_model(cfg)
    state = copy.deepcopy(model.state_dict())  # the by-hand forward pass moves BN statistics

    loss, ce, con = step_by_hand(model, cfg, x, y, gen_seed=3, rng_seed=4)

    model.load_state_dict(state)
    model.train()
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    loss_lib, parts = training_loss(model, cfg, x, y, gen, False)
    torch.testing.assert_close(loss_lib, loss)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["con"], con.detach())
