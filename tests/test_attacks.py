"""Tests for anchor_lib.attacks on CPU with a tiny CNN trained on a synthetic 10-class task.

The task: each class is a smooth random 16x16 template near grey; images are a template plus
uniform noise. A small CNN reaches ~100% clean accuracy in a few seconds and, at eps = 4/255,
loses about half of it to PGD: the attacks have something to break and something left to
compare.
"""

from __future__ import annotations

import copy
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from tasks import template_task
from torch import nn

from anchor_lib import attacks
from anchor_lib.attacks import (
    attack_mode,
    autoattack,
    cross_entropy_per_example,
    cw_l2,
    cw_linf,
    fgsm,
    logits_only,
    margin_loss,
    pgd,
    pgd_core,
    square,
)
from anchor_lib.models import PreActResNet18

K = 10
make_task = partial(template_task, num_classes=K)
EPS = 4 / 255
L2_EPS = 0.5


# --------------------------------------------------------------------------------------------
# Fixtures: synthetic task and a tiny trained model
# --------------------------------------------------------------------------------------------

class TinyCNN(nn.Module):
    """Conv-BN-ReLU-pool twice and a linear layer; has BatchNorm so eval mode matters."""

    def __init__(self, num_classes: int = K) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_tiny(steps: int = 80) -> TinyCNN:
    torch.manual_seed(0)
    sample = make_task()
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        x, y = sample(128, 1000 + i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[TinyCNN, torch.Tensor, torch.Tensor]:
    model = train_tiny()
    x, y = make_task()(400, 1)
    return model, x, y


@pytest.fixture
def small(trained):
    model, x, y = trained
    return model, x[:64], y[:64]


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(dim=1)


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def test_fixture_model_is_accurate_but_breakable(trained):
    model, x, y = trained
    assert acc(model, x, y) > 0.95
    x_adv = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=20)
    assert 0.1 < acc(model, x_adv, y) < 0.8


# --------------------------------------------------------------------------------------------
# Output contract: box, ball, shape, dtype, detached
# --------------------------------------------------------------------------------------------

ATTACKS_LINF = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=EPS),
    "pgd": lambda m, x, y: pgd(m, x, y, eps=EPS, alpha=EPS / 4, steps=10),
    "pgd_restarts": lambda m, x, y: pgd(m, x, y, eps=EPS, alpha=EPS / 4, steps=5, restarts=2),
    "pgd_big_step": lambda m, x, y: pgd(m, x, y, eps=EPS, alpha=1.0, steps=3),
    "cw_linf": lambda m, x, y: cw_linf(m, x, y, eps=EPS, alpha=EPS / 4, steps=10),
    "square": lambda m, x, y: square(m, x, y, eps=EPS, n_queries=20),
}
ATTACKS_L2 = {
    "pgd_l2": lambda m, x, y: pgd(m, x, y, eps=L2_EPS, alpha=L2_EPS / 4, steps=10, norm="L2"),
    "pgd_l2_big_step": lambda m, x, y: pgd(m, x, y, eps=L2_EPS, alpha=10.0, steps=3, norm="L2"),
    "pgd_l2_restarts": lambda m, x, y: pgd(m, x, y, eps=L2_EPS, alpha=0.1, steps=3, norm="L2",
                                           restarts=2),
}


def _check_contract(x_adv: torch.Tensor, x: torch.Tensor, perturbed: bool = True) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if perturbed:
        assert not torch.equal(x_adv, x), "the attack did not perturb anything"


@pytest.mark.parametrize("name", sorted(ATTACKS_LINF))
def test_linf_attacks_stay_in_box_and_ball(small, name):
    model, x, y = small
    x_adv = ATTACKS_LINF[name](model, x, y)
    # torchattacks' Square returns the clean image wherever it fails (it does at 20 queries).
    _check_contract(x_adv, x, perturbed=name != "square")
    assert linf(x_adv, x).max() <= EPS + 1e-6
    # Sign steps of size >= eps land on the ball's surface: the budget is used, not wasted.
    if name in ("fgsm", "pgd_big_step"):
        assert linf(x_adv, x).min() >= EPS - 1e-6


@pytest.mark.parametrize("name", sorted(ATTACKS_L2))
def test_l2_attacks_stay_in_box_and_ball(small, name):
    model, x, y = small
    x_adv = ATTACKS_L2[name](model, x, y)
    _check_contract(x_adv, x)
    norms = l2(x_adv, x)
    assert norms.max() <= L2_EPS * (1 + 1e-5)
    if name == "pgd_l2_big_step":
        # Steps much larger than eps are projected back onto the sphere.
        assert norms.min() >= 0.9 * L2_EPS


@pytest.mark.parametrize("name", sorted(ATTACKS_LINF) + sorted(ATTACKS_L2))
def test_box_respected_at_image_edges(name):
    # Saturated pixels (exactly 0 or 1) are where a missing clamp to [0, 1] shows.
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = make_task()(16, 3)
    x = torch.where(torch.rand_like(x) < 0.5, (x > 0.5).float(), x)
    call = {**ATTACKS_LINF, **ATTACKS_L2}[name]
    x_adv = call(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if name in ATTACKS_L2:
        assert l2(x_adv, x).max() <= L2_EPS * (1 + 1e-5)
    else:
        assert linf(x_adv, x).max() <= EPS + 1e-6


def test_linf_random_start_is_uniform_in_ball(small):
    model, x, y = small
    torch.manual_seed(0)
    x0 = pgd(model, x, y, eps=EPS, alpha=EPS, steps=0)
    delta = x0 - x
    assert delta.abs().max() <= EPS + 1e-6
    # Uniform on [-eps, eps] (the images are far from 0 and 1, so no clamping): mean |d| = eps/2.
    assert abs(delta.abs().mean().item() - EPS / 2) < 0.02 * EPS
    assert abs(delta.mean().item()) < 0.02 * EPS


def test_l2_random_start_radius_uniform(small):
    model, x, y = small
    torch.manual_seed(0)
    x0 = pgd(model, x, y, eps=L2_EPS, alpha=0.1, steps=0, norm="L2")
    radii = l2(x0, x) / L2_EPS
    assert radii.max() <= 1 + 1e-5
    assert radii.min() < 0.25 and radii.max() > 0.75
    assert 0.35 < radii.mean().item() < 0.65


@pytest.mark.parametrize("call", [
    lambda m, x, y: fgsm(m, x, y, eps=0.0),
    lambda m, x, y: pgd(m, x, y, eps=0.0, alpha=0.01, steps=5),
    lambda m, x, y: pgd(m, x, y, eps=0, alpha=0.01, steps=5, norm="L2", restarts=3),
    lambda m, x, y: cw_linf(m, x, y, eps=0.0, alpha=0.01, steps=5),
    lambda m, x, y: square(m, x, y, eps=0.0),
    lambda m, x, y: autoattack(m, x, y, eps=0.0),
    lambda m, x, y: pgd(m, x, y, eps=EPS, alpha=0.01, steps=0, random_start=False),
], ids=["fgsm", "pgd", "pgd_l2", "cw_linf", "square", "autoattack", "steps0"])
def test_zero_budget_returns_x_exactly(small, call):
    model, x, y = small
    x_adv = call(model, x, y)
    assert torch.equal(x_adv, x)
    assert x_adv is not x


def test_fgsm_is_one_pgd_step_without_random_start(small):
    model, x, y = small
    assert torch.equal(fgsm(model, x, y, eps=EPS),
                       pgd(model, x, y, eps=EPS, alpha=EPS, steps=1, random_start=False))


# --------------------------------------------------------------------------------------------
# Strength
# --------------------------------------------------------------------------------------------

def test_pgd_stronger_than_fgsm_and_robust_below_clean(trained):
    model, x, y = trained
    clean = acc(model, x, y)
    torch.manual_seed(0)
    a_fgsm = acc(model, fgsm(model, x, y, eps=EPS), y)
    a_pgd = acc(model, pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=20), y)
    a_cw = acc(model, cw_linf(model, x, y, eps=EPS, alpha=EPS / 4, steps=20), y)
    assert a_pgd <= a_fgsm <= clean
    assert a_pgd < clean - 0.2
    assert a_cw < clean - 0.2


def test_pgd_agrees_with_torchattacks(trained):
    model, x, y = trained
    torch.manual_seed(0)
    ours = acc(model, pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=10), y)
    reference = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=True)
    theirs = acc(model, reference(x, y), y)
    assert 0.1 < theirs < 0.9, "the comparison is only informative at intermediate accuracy"
    assert abs(ours - theirs) <= 0.02


def test_pgd_l2_agrees_with_torchattacks(trained):
    model, x, y = trained
    eps = 0.3
    ours = acc(model, pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm="L2",
                          random_start=False), y)
    reference = torchattacks.PGDL2(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)
    theirs = acc(model, reference(x, y), y)
    assert 0.1 < theirs < 0.9
    assert abs(ours - theirs) <= 0.02


def test_restarts_never_raise_accuracy(trained):
    model, x, y = trained
    kwargs = dict(eps=EPS, alpha=EPS / 8, steps=3)
    torch.manual_seed(0)
    one = pgd(model, x, y, **kwargs, restarts=1)
    torch.manual_seed(0)
    three = pgd(model, x, y, **kwargs, restarts=3)
    with torch.no_grad():
        wrong_one = model(one).argmax(1) != y
        wrong_three = model(three).argmax(1) != y
    # The first restart is the single run; a found adversarial is never given up.
    assert bool((wrong_three | ~wrong_one).all())
    assert wrong_three.sum() >= wrong_one.sum()
    # Where both fail, the kept restart has at least the single run's loss.
    both_fail = ~wrong_one & ~wrong_three
    with torch.no_grad():
        loss_one = F.cross_entropy(model(one), y, reduction="none")
        loss_three = F.cross_entropy(model(three), y, reduction="none")
    assert bool((loss_three[both_fail] >= loss_one[both_fail] - 1e-6).all())


def test_restarts_prefer_misclassified_over_loss(trained):
    # With a loss that is flat (zero everywhere) PGD never moves and every restart is just a
    # random start with the same loss: only "is it misclassified?" can pick the worst case.
    model, x, y = trained
    flat = lambda logits, labels: logits.sum(dim=1) * 0  # noqa: E731
    kwargs = dict(eps=0.3, alpha=0.01, steps=1, loss_fn=flat)
    torch.manual_seed(0)
    one = acc(model, pgd(model, x, y, **kwargs), y)
    torch.manual_seed(0)
    five = acc(model, pgd(model, x, y, **kwargs, restarts=5), y)
    assert one < 0.9, "random noise should fool the model sometimes for this test to matter"
    assert five < one - 0.1


def test_loss_fn_hook(small):
    model, x, y = small
    torch.manual_seed(0)
    via_hook = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5, loss_fn=margin_loss)
    torch.manual_seed(0)
    cw = cw_linf(model, x, y, eps=EPS, alpha=EPS / 4, steps=5)
    assert torch.equal(via_hook, cw)
    torch.manual_seed(0)
    with_ce = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5)
    assert not torch.equal(via_hook, with_ce)
    # A loss without gradient leaves x where it started: the hook is what drives the steps.
    flat = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5, random_start=False,
               loss_fn=lambda logits, labels: logits.sum() * 0)
    assert torch.equal(flat, x)
    # Minimising cross-entropy (maximising its negative) makes examples *more* correct.
    helped = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=10,
                 loss_fn=lambda logits, labels: -F.cross_entropy(logits, labels))
    assert acc(model, helped, y) >= acc(model, x, y)


def test_loss_fn_wrong_shape_rejected(small):
    model, x, y = small
    with pytest.raises(ValueError, match="loss_fn must return"):
        pgd(model, x, y, eps=EPS, alpha=0.01, steps=1, loss_fn=lambda logits, labels: logits)


def test_margin_loss_values():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-1.0, 3.0]))


def test_cw_l2_search_and_minimality(small):
    model, x, y = small
    results = {s: cw_l2(model, x, y, c_init=1e-3, steps=20, search_steps=s) for s in (1, 2, 4)}
    success = {}
    for s, x_adv in results.items():
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            wrong = model(x_adv).argmax(1) != y
        # Each example is either adversarial or the untouched original.
        unchanged = (x_adv == x).flatten(1).all(dim=1)
        assert bool((wrong | unchanged).all())
        success[s] = wrong
    rates = [success[s].float().mean().item() for s in (1, 2, 4)]
    assert rates == sorted(rates), f"success rate dropped with more search steps: {rates}"
    assert rates[-1] > rates[0] + 0.5, f"the binary search over c does not help: {rates}"
    # The best result is kept across rounds, so more rounds never lengthen a perturbation.
    both = success[2] & success[4]
    assert bool((l2(results[4], x)[both] <= l2(results[2], x)[both] + 1e-6).all())
    # And the distance is small compared with an image's norm (a *minimal* perturbation).
    assert l2(results[4], x)[success[4]].median() < 1.0


# --------------------------------------------------------------------------------------------
# AutoAttack and Square through torchattacks
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fast_autoattack(monkeypatch):
    # The reference budget (100 iterations, 5,000 queries) takes minutes on this CPU; the call
    # path, n_classes, batching and the output contract are the same with a tiny budget.
    monkeypatch.setattr(attacks, "AUTOATTACK_ITERATIONS", 3)
    monkeypatch.setattr(attacks, "AUTOATTACK_SQUARE_QUERIES", 20)


def test_autoattack_valid_and_preserves_rng(trained, fast_autoattack):
    model, x, y = trained
    x, y = x[:12], y[:12]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    x_adv = autoattack(model, x, y, eps=EPS, batch_size=5)
    assert torch.equal(torch.rand(3), expected), "autoattack changed the caller's RNG stream"
    _check_contract(x_adv, x)
    assert linf(x_adv, x).max() <= EPS + 1e-6
    assert acc(model, x_adv, y) < acc(model, x, y)
    # Deterministic given the seed.
    assert torch.equal(autoattack(model, x, y, eps=EPS, batch_size=5), x_adv)


def test_autoattack_passes_number_of_classes(fast_autoattack):
    # torchattacks assumes 10 classes unless told; with 5 its APGD-T would index out of range.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(6, 3, 8, 8)
    y = model(x).argmax(1)
    x_adv = autoattack(model, x, y, eps=0.05)
    assert linf(x_adv, x).max() <= 0.05 + 1e-6
    model3 = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        autoattack(model3, x, model3(x).argmax(1), eps=0.05)


def test_square_valid_and_preserves_rng(small):
    model, x, y = small
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    x_adv = square(model, x[:16], y[:16], eps=2 * EPS, n_queries=50)
    assert torch.equal(torch.rand(2), expected)
    _check_contract(x_adv, x[:16])
    assert linf(x_adv, x[:16]).max() <= 2 * EPS + 1e-6
    assert acc(model, x_adv, y[:16]) < acc(model, x[:16], y[:16])


# --------------------------------------------------------------------------------------------
# Model mode and parameter flags
# --------------------------------------------------------------------------------------------

class Probe(nn.Module):
    """Records the mode and parameter flags it sees during forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = K
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training or any(m.training for m in self.modules()),
                          any(p.requires_grad for p in self.parameters())))
        return self.inner(x)


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


ALL_ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=EPS),
    "pgd": lambda m, x, y: pgd(m, x, y, eps=EPS, alpha=0.01, steps=2, restarts=2),
    "pgd_l2": lambda m, x, y: pgd(m, x, y, eps=0.5, alpha=0.1, steps=2, norm="L2"),
    "cw_linf": lambda m, x, y: cw_linf(m, x, y, eps=EPS, alpha=0.01, steps=2),
    "cw_l2": lambda m, x, y: cw_l2(m, x, y, c_init=0.1, steps=2, search_steps=2),
    "square": lambda m, x, y: square(m, x, y, eps=EPS, n_queries=5),
    "autoattack": lambda m, x, y: autoattack(m, x, y, eps=EPS),
}


@pytest.mark.parametrize("name", sorted(ALL_ATTACKS))
@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_mode_and_requires_grad_restored(fast_autoattack, name, start):
    torch.manual_seed(0)
    model = Probe(TinyCNN())
    x, y = make_task()(8, 3)
    if start == "train":
        model.train()
    elif start == "eval":
        model.eval()
    else:  # training, but with a frozen first conv and a BatchNorm kept in eval mode
        model.train()
        model.inner.net[0].requires_grad_(False)
        model.inner.net[1].eval()
    before = _state(model)
    bn = model.inner.net[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    ALL_ATTACKS[name](model, x, y)
    assert _state(model) == before
    assert model.seen and all(seen == (False, False) for seen in model.seen), \
        "the attack ran a forward pass in train mode or with parameter gradients on"
    assert all(p.grad is None for p in model.parameters())
    # Eval mode means BatchNorm statistics are not polluted by adversarial images.
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])


def test_mode_restored_after_exception():
    model = TinyCNN().train()
    model.net[0].requires_grad_(False)
    before = _state(model)
    x, y = make_task()(4, 3)

    calls = []

    def exploding_loss(logits, labels):
        calls.append(1)
        if len(calls) > 2:  # the first call validates the hook; fail inside the attack loop
            raise RuntimeError("boom")
        return margin_loss(logits, labels)

    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x, y, eps=EPS, alpha=0.01, steps=2, loss_fn=exploding_loss)
    assert _state(model) == before
    with pytest.raises(KeyError):
        with attack_mode(model):
            assert not model.training
            raise KeyError("inside")
    assert _state(model) == before


def test_attack_mode_nests():
    model = TinyCNN().train()
    before = _state(model)
    with attack_mode(model):
        with attack_mode(model):
            assert not model.training
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert _state(model) == before


def test_pgd_core_leaves_mode_alone():
    # A fresh model: in train mode BatchNorm updates its statistics, which would spoil `trained`.
    torch.manual_seed(0)
    model = TinyCNN().train()
    x, y = make_task()(8, 3)
    x_adv = pgd_core(model, x, y, EPS, EPS / 4, 2)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert linf(x_adv, x).max() <= EPS + 1e-6 and not x_adv.requires_grad


def test_attacks_work_under_no_grad_and_with_amp_flag_on_cpu(small):
    model, x, y = small
    torch.manual_seed(0)
    plain = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=3)
    torch.manual_seed(0)
    with torch.no_grad():
        no_grad = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=3, amp=True)
    assert torch.equal(plain, no_grad)  # amp is ignored on CPU


def test_input_requiring_grad_is_not_modified(small):
    model, x, y = small
    xg = x.clone().requires_grad_(True)
    x_adv = pgd(model, xg, y, eps=EPS, alpha=EPS / 4, steps=2)
    assert not x_adv.requires_grad and xg.grad is None and torch.equal(xg.detach(), x)


def test_preact_resnet_tiny(fast_autoattack):
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=K, width=4).train()
    x = torch.rand(4, 3, 16, 16)
    y = torch.arange(4)
    before = _state(model)
    x_adv = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=2)
    assert linf(x_adv, x).max() <= EPS + 1e-6
    assert _state(model) == before


# --------------------------------------------------------------------------------------------
# Tuple-returning models
# --------------------------------------------------------------------------------------------

class TupleModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = K

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x), x.flatten(1)


def test_tuple_model_rejected_then_wrapped(small):
    model, x, y = small
    tuple_model = TupleModel(model)
    with pytest.raises(TypeError, match="logits_only"):
        pgd(tuple_model, x, y, eps=EPS, alpha=0.01, steps=1)
    wrapped = logits_only(tuple_model)
    assert isinstance(wrapped, nn.Module) and wrapped.num_classes == K
    torch.manual_seed(0)
    a = pgd(wrapped, x, y, eps=EPS, alpha=0.01, steps=2)
    torch.manual_seed(0)
    b = pgd(model, x, y, eps=EPS, alpha=0.01, steps=2)
    assert torch.equal(a, b)
    assert logits_only(model)(x).shape == (64, K)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _bad_cases():
    x, y = make_task()(4, 3)
    ok = dict(eps=EPS, alpha=0.01, steps=2)
    return {
        "x_not_tensor": (dict(x=x.numpy()), {}, TypeError, "torch.Tensor"),
        "x_3d": (dict(x=x[0]), {}, ValueError, r"\(N, C, H, W\)"),
        "x_uint8": (dict(x=(x * 255).to(torch.uint8)), {}, ValueError, "float"),
        "x_above_1": (dict(x=x * 2), {}, ValueError, r"\[0, 1\]"),
        "x_negative": (dict(x=x - 0.6), {}, ValueError, r"\[0, 1\]"),
        "x_nan": (dict(x=x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan")))),
                  {}, ValueError, "NaN"),
        "x_empty": (dict(x=x[:0], y=y[:0]), {}, ValueError, "empty"),
        "y_float": (dict(y=y.float()), {}, ValueError, "integer"),
        "y_wrong_length": (dict(y=y[:3]), {}, ValueError, r"shape \(4,\)"),
        "y_2d": (dict(y=y[:, None]), {}, ValueError, r"shape \(4,\)"),
        "y_out_of_range": (dict(y=y + K), {}, ValueError, f"{K} classes"),
        "y_negative": (dict(y=y - 100), {}, ValueError, "negative"),
        "eps_negative": ({}, dict(ok, eps=-0.1), ValueError, "eps must be >= 0"),
        "eps_nan": ({}, dict(ok, eps=float("nan")), ValueError, "eps must be finite"),
        "eps_string": ({}, dict(ok, eps="8/255"), TypeError, "eps must be a number"),
        "alpha_zero": ({}, dict(ok, alpha=0.0), ValueError, "alpha must be > 0"),
        "alpha_negative": ({}, dict(ok, alpha=-1.0), ValueError, "alpha must be > 0"),
        "steps_negative": ({}, dict(ok, steps=-1), ValueError, "steps must be >= 0"),
        "steps_float": ({}, dict(ok, steps=2.5), TypeError, "steps must be an int"),
        "steps_bool": ({}, dict(ok, steps=True), TypeError, "steps must be an int"),
        "restarts_zero": ({}, dict(ok, restarts=0), ValueError, "restarts must be >= 1"),
        "norm_unknown": ({}, dict(ok, norm="L1"), ValueError, "norm must be one of"),
        "loss_fn_not_callable": ({}, dict(ok, loss_fn=3), TypeError, "loss_fn must be callable"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_pgd_rejects_bad_input(case):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = make_task()(4, 3)
    overrides, kwargs, error, message = BAD[case]
    args = {"x": x, "y": y, **overrides}
    before = _state(model)
    with pytest.raises(error, match=message):
        pgd(model, args["x"], args["y"], **(kwargs or dict(eps=EPS, alpha=0.01, steps=2)))
    assert _state(model) == before


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x, y: fgsm(m, x, y, eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda m, x, y: cw_linf(m, x, y, eps=EPS, alpha=0.0, steps=3), ValueError, "alpha"),
    (lambda m, x, y: cw_l2(m, x, y, c_init=0.0, steps=3, search_steps=1), ValueError, "c_init"),
    (lambda m, x, y: cw_l2(m, x, y, c_init=1.0, steps=3, search_steps=-1), ValueError,
     "search_steps"),
    (lambda m, x, y: cw_l2(m, x, y, c_init=1.0, steps=3, search_steps=1, kappa=-1), ValueError,
     "kappa"),
    (lambda m, x, y: autoattack(m, x, y, eps=EPS, norm="L1"), ValueError, "norm"),
    (lambda m, x, y: autoattack(m, x, y, eps=EPS, version="fast"), ValueError, "version"),
    (lambda m, x, y: autoattack(m, x, y, eps=EPS, batch_size=0), ValueError, "batch_size"),
    (lambda m, x, y: square(m, x, y, eps=EPS, n_queries=0), ValueError, "n_queries"),
    (lambda m, x, y: fgsm(lambda t: m(t), x, y, eps=EPS), TypeError, "nn.Module"),
    (lambda m, x, y: fgsm(m, x, y.float(), eps=EPS), ValueError, "integer"),
], ids=["fgsm_eps", "cw_alpha", "cw_l2_c", "cw_l2_search", "cw_l2_kappa", "aa_norm",
        "aa_version", "aa_batch", "square_queries", "not_a_module", "fgsm_labels"])
def test_other_attacks_reject_bad_input(call, error, message):
    model = TinyCNN().eval()
    x, y = make_task()(4, 3)
    with pytest.raises(error, match=message):
        call(model, x, y)


def test_wrong_number_of_classes_rejected():
    model = TinyCNN(num_classes=5)
    model.num_classes = K  # claims 10 classes, returns 5 logits
    x, y = make_task()(4, 3)
    with pytest.raises(ValueError, match=re.escape("returned 5 logits per image, expected 10")):
        pgd(model, x, y % 5, eps=EPS, alpha=0.01, steps=1)
    # Without the attribute the output decides, and labels beyond it are rejected.
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    with pytest.raises(ValueError, match="5 classes"):
        fgsm(plain, x, torch.tensor([0, 1, 2, 7]), eps=EPS)


def test_model_returning_wrong_shape_rejected():
    x, y = make_task()(4, 3)
    model = nn.Sequential(nn.Flatten(0))  # returns a 1-D tensor
    with pytest.raises(ValueError, match="logits of shape"):
        fgsm(model, x, y, eps=EPS)


# --------------------------------------------------------------------------------------------
# Gaps a mutation run of attacks.py found (2026-11-27): each test fails for a changed line that
# every other test let through.
# --------------------------------------------------------------------------------------------

def test_the_autoattack_record_is_the_attack_that_runs():
    """metrics.json's autoattack_config says what ran: it is read off the configured attack
    here, with the reference budgets of the standard version (Croce and Hein, 2020)."""
    import torchattacks

    config = attacks.autoattack_config()
    assert (config["iterations"], config["square_queries"]) == (100, 5000)
    attack = attacks._configured_autoattack(TinyCNN().eval(), "Linf", EPS, "standard", K, 0)
    subs = attack._autoattack.attacks
    assert [type(s).__name__ for s in subs] == ["APGD", "APGDT", "FAB", "Square"]
    assert subs[0].loss == "ce" and subs[2].multi_targeted   # APGD-CE, FAB-T
    for sub in subs:
        assert sub.n_restarts == config["restarts"] and sub.eps == EPS and sub.seed == 0
        if isinstance(sub, torchattacks.Square):
            assert sub.n_queries == config["square_queries"]
            assert sub.rescale_schedule == config["square_rescale_schedule"]
        else:
            assert sub.steps == config["iterations"]
    # "every class but the true one" for the targeted attacks, APGD-T and FAB-T
    assert subs[1].n_target_classes == subs[2].n_target_classes == K - 1


def test_the_attacks_defaults_are_their_documented_values(small):
    """A default is part of the attack's contract: PGD starts at a random point and runs in
    fp32; CW-L2 uses kappa = 0 and Adam's lr = 0.01; Square 1,000 queries; seeds 0."""
    model, x, y = small
    x, y = x[:8], y[:8]

    def same(call, **explicit):
        torch.manual_seed(1)
        a = call()
        torch.manual_seed(1)
        b = call(**explicit)
        assert torch.equal(a, b), explicit

    same(lambda **k: pgd_core(model, x, y, EPS, 0.01, 2, **k), random_start=True, amp=False,
         norm="Linf")
    same(lambda **k: pgd(model, x, y, eps=EPS, alpha=0.01, steps=2, **k), random_start=True,
         amp=False, norm="Linf", restarts=1)
    same(lambda **k: cw_l2(model, x, y, c_init=0.1, steps=3, search_steps=1, **k), kappa=0.0,
         lr=0.01)
    same(lambda **k: square(model, x, y, eps=EPS, **k), n_queries=1000, seed=0, norm="Linf")
    # PGD's default start is random: without it, two seeds give the same attack.
    torch.manual_seed(2)
    a = pgd_core(model, x, y, EPS, 0.01, 0)
    assert not torch.equal(a, x) and linf(a, x).max() <= EPS + 1e-6


def test_cw_l2_handles_saturated_pixels(small):
    """CIFAR-10 images have pixels at exactly 0 and 1: the tanh-space start must stay finite
    there (atanh(+-1) is infinite), and the attack must still find adversarial examples."""
    model, x, y = small
    x = x.clone()
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    x_adv = cw_l2(model, x, y, c_init=1.0, steps=20, search_steps=3)
    assert torch.isfinite(x_adv).all()
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    assert wrong.float().mean() > 0.5


def linear_two_class_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, w, x, y): logits (0, w.x) on 16 images of 3x4x4 near 0.5, far from the box's
    faces (so they do not bind), labelled with the model's own prediction."""
    torch.manual_seed(0)
    d = 3 * 4 * 4
    head = nn.Linear(d, 2)
    w = torch.randn(d)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[1] = w
        head.bias.zero_()
    model = nn.Sequential(nn.Flatten(), head).eval()
    x = 0.5 + 0.02 * torch.randn(16, 3, 4, 4)
    return model, w, x, (x.flatten(1) @ w > 0).long()


def test_cw_l2_finds_the_minimal_perturbation_of_a_linear_model():
    """Ground truth: for logits (0, w.x) the smallest L2 change of class is |w.x| / |w|. CW-L2's
    binary search over c must bring it within 5 % of that (it reaches 0.6 to 2 % here; a search
    that only grew c stopped 10 to 14 % above it), and never below it."""
    model, w, x, y = linear_two_class_task()
    margin = x.flatten(1) @ w
    x_adv = cw_l2(model, x, y, c_init=1.0, steps=50, search_steps=6)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) != y).all())
    ratio = l2(x_adv, x) / (margin.abs() / w.norm())
    assert ratio.min() >= 0.999 and ratio.max() <= 1.05, ratio


def test_two_class_and_four_class_models_are_attackable(fast_autoattack):
    """The smallest models each attack supports: 2 classes for the gradient attacks, 4 for
    AutoAttack (APGD-T's DLR loss needs 4)."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    binary = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2)).eval()
    y2 = torch.tensor([0, 1, 0, 1, 0, 1])
    assert pgd(binary, x, y2, eps=EPS, alpha=0.01, steps=2).shape == x.shape
    four = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    y4 = torch.tensor([0, 1, 2, 3, 0, 1])
    assert autoattack(four, x, y4, eps=EPS).shape == x.shape


def test_a_whole_box_budget_breaks_every_image(small):
    """eps = 1 allows any image: PGD reaches a wrong class for every input (a budget that
    silently attacked nothing would keep them)."""
    model, x, y = small
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, eps=1.0, alpha=0.1, steps=20)
    assert acc(model, x_adv, y) == 0.0
    assert acc(model, fgsm(model, x, y, eps=1.0), y) < acc(model, x, y)


def test_pgd_spends_exactly_its_budget(small):
    """Model calls: one for the checks, steps per restart, and with restarts one scoring pass
    per restart (the budget the results report, no more and no less)."""
    model, x, y = small
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for restarts, expected in ((1, 1 + 5), (3, 1 + 3 * 5 + 3)):
            calls.clear()
            pgd(model, x, y, eps=EPS, alpha=0.01, steps=5, restarts=restarts)
            assert len(calls) == expected, (restarts, len(calls))
    finally:
        handle.remove()


@pytest.mark.bad_input(cases=8)
def test_budgets_must_be_whole_numbers():
    model = TinyCNN().eval()
    x, y = make_task()(4, 3)
    for call, message in [
            (lambda: pgd(model, x, y, eps=EPS, alpha=0.01, steps=2, restarts=1.5),
             "restarts must be an int"),
            (lambda: cw_l2(model, x, y, c_init=1.0, steps=2.5, search_steps=1), "steps must be an int"),
            (lambda: cw_l2(model, x, y, c_init=1.0, steps=2, search_steps=1.5),
             "search_steps must be an int"),
            (lambda: autoattack(model, x, y, eps=EPS, seed=0.5), "seed must be an int"),
            (lambda: autoattack(model, x, y, eps=EPS, batch_size=2.0), "batch_size must be an int"),
            (lambda: square(model, x, y, eps=EPS, n_queries=10.5), "n_queries must be an int"),
            (lambda: square(model, x, y, eps=EPS, seed=1.5), "seed must be an int")]:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match="lr must be > 0"):
        cw_l2(model, x, y, c_init=1.0, steps=2, search_steps=1, lr=0.0)


def test_restarts_keep_the_worst_case_of_the_callers_loss(trained):
    """With a per-example ``loss_fn``, restarts compare examples by *that* loss, not by the
    cross-entropy: here the loss is minus the cross-entropy (an attack that helps the model), so
    among the examples still correct the kept restart has the lowest cross-entropy."""
    model, x, y = trained
    helpful = lambda logits, labels: -cross_entropy_per_example(logits, labels)  # noqa: E731
    kwargs = dict(eps=0.3, alpha=0.02, steps=1, loss_fn=helpful)
    torch.manual_seed(0)
    one = pgd(model, x, y, **kwargs)
    torch.manual_seed(0)
    five = pgd(model, x, y, **kwargs, restarts=5)
    with torch.no_grad():
        ce_one = F.cross_entropy(model(one), y, reduction="none")
        ce_five = F.cross_entropy(model(five), y, reduction="none")
        correct = (model(one).argmax(1) == y) & (model(five).argmax(1) == y)
    assert correct.sum() >= 20, "the test needs examples that stay correct"
    assert bool((ce_five[correct] <= ce_one[correct] + 1e-6).all())
    assert bool((ce_five[correct] < ce_one[correct] - 1e-4).any()), "restarts changed nothing"


def test_a_whole_box_budget_breaks_every_image_black_box_and_autoattack(small, fast_autoattack):
    """eps = 1 allows any image, for Square and AutoAttack too: a shortcut that returned ``x``
    for a budget other than 0 would leave the images correct."""
    model, x, y = small
    x, y = x[:16], y[:16]
    assert acc(model, square(model, x, y, eps=1.0, n_queries=50), y) < 0.5 * acc(model, x, y)
    assert acc(model, autoattack(model, x, y, eps=1.0), y) == 0.0


def test_the_smallest_budgets_are_accepted(small):
    """The documented lower bounds are inclusive: CW-L2 with 0 Adam steps or 0 search rounds
    returns ``x`` (nothing was tried), and Square runs with a single query."""
    model, x, y = small
    x, y = x[:8], y[:8]
    assert torch.equal(cw_l2(model, x, y, c_init=1.0, steps=0, search_steps=2), x)
    assert torch.equal(cw_l2(model, x, y, c_init=1.0, steps=5, search_steps=0), x)
    x_adv = square(model, x, y, eps=EPS, n_queries=1)
    assert x_adv.shape == x.shape and linf(x_adv, x).max() <= EPS + 1e-6


def test_autoattacks_default_seed_is_zero(small, fast_autoattack):
    """The record in metrics.json says seed 0; the default must be it (another seed draws other
    APGD starts and gives another result on these images)."""
    model, x, y = small
    x, y = x[:16], y[:16]
    default = autoattack(model, x, y, eps=EPS)
    assert torch.equal(default, autoattack(model, x, y, eps=EPS, seed=0))
    assert not torch.equal(default, autoattack(model, x, y, eps=EPS, seed=1))


def test_cw_l2_reaches_the_confidence_margin_kappa():
    """With kappa > 0 an example counts as broken only with a margin above kappa, and the loss
    keeps pushing until it gets there (the clamp is at -kappa, not +kappa)."""
    model, _, x, y = linear_two_class_task()
    x_adv = cw_l2(model, x, y, c_init=1.0, steps=50, search_steps=6, kappa=1.0)
    with torch.no_grad():
        assert bool((margin_loss(model(x_adv), y) > 1.0).all())


# --------------------------------------------------------------------------------------------
# Low precision, non-finite gradients, inference mode and memory layout
# --------------------------------------------------------------------------------------------

LOW_PRECISION_ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=8 / 255),
    "pgd": lambda m, x, y: pgd(m, x, y, eps=8 / 255, alpha=2 / 255, steps=3),
    "cw_linf": lambda m, x, y: cw_linf(m, x, y, eps=8 / 255, alpha=2 / 255, steps=3),
    "pgd_l2": lambda m, x, y: pgd(m, x, y, eps=L2_EPS, alpha=0.2, steps=3, norm="L2"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LOW_PRECISION_ATTACKS))
def test_low_precision_results_stay_in_the_ball(name, dtype):
    """In bf16/fp16, ``x + eps`` rounded to nearest can lie half an ulp outside the ball (up to
    8.47/255 in bf16 at eps = 8/255): the ball's bounds must be rounded towards x, so that it
    holds exactly when x_adv and x are compared in fp32 or fp64. (A linear model: fp16 convs
    are not available on every CPU build.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, K)).to(dtype).eval()
    x = torch.rand(16, 3, 16, 16).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = LOW_PRECISION_ATTACKS[name](model, x, y)
    _check_contract(x_adv, x)
    for wide in (torch.float32, torch.float64):
        a, b = x_adv.to(wide), x.to(wide)
        if name == "pgd_l2":  # the projection itself is computed in fp32
            assert l2(a, b).max() <= L2_EPS * (1 + 1e-6), (wide, l2(a, b).max())
        else:
            assert linf(a, b).max() <= 8 / 255, (wide, linf(a, b).max() * 255)


class SqrtModel(nn.Module):
    """Logits from ``sqrt(x)`` masked to 0 at x = 0: finite outputs, but a NaN input gradient
    (inf * 0) at every pixel equal to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin((x.sqrt() * (x > 0)).flatten(1))


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_pgd_survives_a_non_finite_input_gradient(random_start):
    """One NaN in an example's gradient made its L2 norm, and so the whole image, NaN; the
    non-finite entries must count as 0 (as sign(NaN) = 0 does for L-inf)."""
    torch.manual_seed(0)
    model = SqrtModel().eval()
    x = torch.rand(8, 3, 8, 8)
    x[:, :, :2] = 0.0  # CIFAR-10 has black pixels
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = pgd(model, x, y, eps=L2_EPS, alpha=0.2, steps=3, norm="L2", random_start=random_start)
    assert torch.isfinite(x_adv).all()
    _check_contract(x_adv, x)
    assert l2(x_adv, x).max() <= L2_EPS * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(set(ALL_ATTACKS) - {"square"}))
def test_inference_mode_is_refused_with_a_clear_message(fast_autoattack, name):
    """Inference mode switches autograd off for good; the gradient attacks say so instead of
    failing deep inside with "element 0 of tensors does not require grad". Square only queries
    the model's outputs and runs there."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = make_task()(4, 3)
    before = _state(model)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"inference_mode\(\).*no_grad\(\) is fine"):
            ALL_ATTACKS[name](model, x, y)
        assert square(model, x, y, eps=EPS, n_queries=5).shape == x.shape
    assert _state(model) == before


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_l2", "cw_linf", "cw_l2", "autoattack"])
def test_images_made_in_inference_mode_are_attacked_outside_it(fast_autoattack, name):
    """Images and labels made under inference_mode, attacked after it: the same result as plain
    tensors (an inference tensor cannot be saved for backward; the attack copies it). A model
    built in inference mode is refused with a message."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = make_task()(4, 3)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
    assert x_inf.is_inference()
    torch.manual_seed(1)
    expected = ALL_ATTACKS[name](model, x, y)
    torch.manual_seed(1)
    assert torch.equal(ALL_ATTACKS[name](model, x_inf, y_inf), expected)
    with torch.inference_mode():
        frozen = TinyCNN().eval()
    with pytest.raises(RuntimeError, match="created under torch.inference_mode"):
        ALL_ATTACKS[name](frozen, x, y)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_random_start_does_not_depend_on_memory_layout(norm):
    """The same images and seed give the same attack whether x is contiguous or channels_last
    (noise drawn with *_like followed x's memory format, so the start came out permuted)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K)).eval()
    x = torch.rand(4, 3, 8, 8)
    y = torch.arange(4)
    eps = EPS if norm == "Linf" else L2_EPS
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        results.append(pgd(model, x.contiguous(memory_format=layout), y, eps=eps, alpha=eps / 4,
                           steps=2, norm=norm))
    assert torch.equal(*results)


@pytest.mark.bad_input(cases=5)
def test_autoattack_and_square_name_a_bad_seed_and_autoattack_a_bad_dtype(small):
    model, x, y = small
    for call in (partial(attacks.autoattack, eps=8 / 255), partial(attacks.square, eps=8 / 255)):
        for seed in (2**64, -1):
            with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
                call(model, x[:2], y[:2], seed=seed)
    model64 = copy.deepcopy(model).double()  # the fixture's model is shared: leave it float32
    with pytest.raises(ValueError, match="AutoAttack .* runs in float32, got .* torch.float64"):
        attacks.autoattack(model64, x[:2].double(), y[:2], eps=8 / 255)
