"""Tests for anchor_lib.evaluate on CPU: accuracies, the protocol suite and the sanity checks.

Same synthetic task as test_attacks.py (smooth class templates near grey plus noise, a tiny CNN
trained for a few seconds), repeated here so that each test file stands alone.
"""

from __future__ import annotations

import json
from functools import partial

import by_path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tasks import template_task
from torch import nn

from anchor_lib import attacks, evaluate
from anchor_lib.attacks import fgsm, pgd
from anchor_lib.evaluate import (
    ATTACKS,
    EVAL_EPS,
    accuracy,
    check_autoattack_gap,
    check_black_box_weaker,
    check_deterministic,
    check_eps_sweep,
    check_gradient_signs,
    check_more_steps,
    check_zero_gradients,
    evaluate_suite,
    robust_accuracy,
    sanity_checks,
    standard_attacks,
)

K = 10
make_task = partial(template_task, num_classes=K)
EPS = 4 / 255


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = K
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 4 * 4, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class QuantizedInput(nn.Module):
    """The gradient-masking trap: rounding the input to 8 bits has a zero gradient everywhere.

    The function is (almost) the same as the wrapped model's, so it is no more robust, but PGD
    sees a zero gradient and never moves. A black-box attack does not care.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


@pytest.fixture(scope="module")
def trained() -> tuple[TinyCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    sample = make_task()
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(80):
        x, y = sample(128, 1000 + i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = sample(200, 1)
    # A few wrong labels so that clean accuracy is below 1 and "clean-correct" matters.
    y = y.clone()
    y[:10] = (y[:10] + 1) % K
    return model, x, y


@pytest.fixture
def fast_autoattack(monkeypatch):
    # The reference AutoAttack budget takes minutes on this CPU; the call path is the same.
    monkeypatch.setattr(attacks, "AUTOATTACK_ITERATIONS", 3)
    monkeypatch.setattr(attacks, "AUTOATTACK_SQUARE_QUERIES", 20)


def manual_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------------
# accuracy and robust_accuracy
# --------------------------------------------------------------------------------------------

def test_accuracy_matches_manual_and_restores_mode(trained):
    model, x, y = trained
    expected = manual_accuracy(model, x, y)
    assert 0.9 < expected < 0.96  # 10 of 200 labels are wrong on purpose
    model.train()
    model.net[1].eval()
    modes = [m.training for m in model.modules()]
    stats = model.net[1].running_mean.clone()
    try:
        for batch_size in (7, 500):
            assert accuracy(model, x, y, batch_size=batch_size) == pytest.approx(expected)
        assert [m.training for m in model.modules()] == modes
        assert torch.equal(model.net[1].running_mean, stats)
    finally:
        model.eval()


def test_robust_accuracy_counts_clean_and_adversarial(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    attack = partial(fgsm, eps=EPS)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        adv_ok = model(fgsm(model, x, y, eps=EPS)).argmax(1) == y
    expected = (clean_ok & adv_ok).float().mean().item()
    assert robust_accuracy(model, x, y, attack) == pytest.approx(expected)
    assert robust_accuracy(model, x, y, attack, batch_size=13) == pytest.approx(expected)
    assert expected < clean
    # The identity "attack" gives back clean accuracy.
    assert robust_accuracy(model, x, y, lambda m, xb, yb: xb) == pytest.approx(clean)


def test_robust_accuracy_never_exceeds_clean(trained):
    model, x, y = trained
    with torch.no_grad():
        pred = model(x).argmax(1)
    # A "helpful attack" that swaps each image for one the model classifies as its label would
    # raise accuracy above clean if examples wrong on clean inputs could count as robust.
    prototype = {int(c): x[(pred == c) & (y == c)][0] for c in range(K)}

    def helpful(m, xb, yb):
        return torch.stack([prototype[int(c)] for c in yb])

    clean = accuracy(model, x, y)
    assert robust_accuracy(model, x, y, helpful) == pytest.approx(clean)
    seen = []

    def recording(m, xb, yb):
        seen.append(len(yb))
        return xb

    robust_accuracy(model, x, y, recording, batch_size=50)
    assert len(seen) == 4
    assert sum(seen) == round(clean * len(x)), "only clean-correct examples should be attacked"


def test_correct_masks_are_the_per_image_accuracies(trained):
    model, x, y = trained
    attack = partial(fgsm, eps=EPS)
    clean = evaluate.correct(model, x, y, batch_size=13)
    with torch.no_grad():
        assert torch.equal(clean, model(x).argmax(1) == y)
    robust = evaluate.correct(model, x, y, attack, batch_size=13)
    assert robust.dtype == torch.bool and robust.shape == (len(x),)
    # Image by image (FGSM in eval mode does not depend on the batch): right clean and attacked.
    with torch.no_grad():
        assert torch.equal(robust, clean & (model(fgsm(model, x, y, eps=EPS)).argmax(1) == y))
    assert robust.sum() < clean.sum()
    assert robust.float().mean().item() == pytest.approx(robust_accuracy(model, x, y, attack))
    suite = evaluate_suite(model, x, y, attacks="clean,fgsm", per_image=True, eps=EPS)
    assert np.array_equal(suite["clean"]["correct"], clean.numpy())
    assert suite["fgsm"]["correct"].mean() == pytest.approx(suite["fgsm"]["value"])


def test_robust_accuracy_rejects_bad_attack(trained):
    model, x, y = trained
    with pytest.raises(TypeError, match="callable"):
        robust_accuracy(model, x, y, "pgd20")
    with pytest.raises(ValueError, match="x_adv of shape"):
        robust_accuracy(model, x, y, lambda m, xb, yb: xb[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robust_accuracy(model, x * 3, y, partial(fgsm, eps=EPS))
    with pytest.raises(ValueError, match="10 classes"):
        accuracy(model, x, y + K)


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------

def test_standard_attacks_follow_the_protocol():
    table = standard_attacks()
    assert set(table) == {"fgsm", "pgd20", "cw", "autoattack"}
    assert table["pgd20"].keywords == dict(eps=EVAL_EPS, alpha=2 / 255, steps=20,
                                           random_start=True)
    assert table["cw"].func is attacks.cw_linf
    assert table["cw"].keywords["steps"] == 30 and table["cw"].keywords["eps"] == EVAL_EPS
    assert table["fgsm"].keywords == dict(eps=EVAL_EPS)
    assert table["autoattack"].keywords["eps"] == EVAL_EPS
    assert standard_attacks(4 / 255)["pgd20"].keywords["alpha"] == pytest.approx(1 / 255)


def test_evaluate_suite_structure_and_order(trained, fast_autoattack):
    model, x, y = trained
    torch.manual_seed(0)
    result = evaluate_suite(model, x, y, n=120, autoattack_n=16, batch_size=50, eps=EPS)
    assert list(result) == list(ATTACKS)
    for name, entry in result.items():
        assert set(entry) == {"value", "n", "seconds", "search"} and entry["search"] == "fp32"
        assert isinstance(entry["value"], float) and 0.0 <= entry["value"] <= 1.0
        assert entry["n"] == (16 if name == "autoattack" else 120)
    acc = {name: entry["value"] for name, entry in result.items()}
    assert acc["pgd20"] <= acc["fgsm"] <= acc["clean"]
    assert acc["cw"] <= acc["clean"] - 0.2
    assert acc["clean"] == pytest.approx(manual_accuracy(model, x[:120], y[:120]))
    json.dumps(result)  # goes straight into metrics.json


def test_autoattack_runs_on_the_first_autoattack_n_images(monkeypatch):
    """AutoAttack's subset is the first autoattack_n images (the ones the sanity checks and
    chapter 8's per-image comparisons pair with), not any autoattack_n of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(40) < 16, pred, (pred + 1) % 10)  # only the first 16 right
    table = evaluate.standard_attacks()
    table["autoattack"] = lambda model, x, y: x.clone()  # no attack: its mask is the clean one
    monkeypatch.setattr(evaluate, "standard_attacks", lambda *a, **k: table)
    monkeypatch.setattr(evaluate, "check_autoattack_inputs", lambda *a: None)
    out = evaluate.evaluate_suite(model, x, y, ("clean", "autoattack"), autoattack_n=16,
                                  per_image=True)
    assert out["autoattack"]["n"] == 16 and out["autoattack"]["value"] == 1.0
    assert out["autoattack"]["correct"].all()


def test_evaluate_suite_selection_and_errors(trained, capsys):
    model, x, y = trained
    result = evaluate_suite(model, x, y, attacks="clean,fgsm", progress=True, eps=EPS)
    assert list(result) == ["clean", "fgsm"] and result["clean"]["n"] == len(x)
    assert "fgsm" in capsys.readouterr().out
    with pytest.raises(ValueError, match="pgd100.*expected.*'clean'.*'autoattack'"):
        evaluate_suite(model, x, y, attacks=("clean", "pgd100"))
    with pytest.raises(ValueError, match="n must be >= 1"):
        evaluate_suite(model, x, y, attacks=("clean",), n=0)


# --------------------------------------------------------------------------------------------
# Sanity checks
# --------------------------------------------------------------------------------------------

def test_check_more_steps_passes_on_trained_model(trained):
    model, x, y = trained
    result = check_more_steps(model, x, y, EPS, steps=(1, 5, 20))
    assert result["passed"] is True, result
    assert result["steps"] == [1, 5, 20] and len(result["accuracy"]) == 3
    assert result["accuracy"][-1] < result["accuracy"][0]
    assert isinstance(result["detail"], str) and result["detail"]


def test_check_more_steps_needs_a_positive_radius(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="eps must be"):
        check_more_steps(model, x[:8], y[:8], 0.0, steps=(1, 2))


def test_check_eps_sweep(trained):
    model, x, y = trained
    result = check_eps_sweep(model, x, y, (0, 2 / 255, 4 / 255, 16 / 255), steps=10)
    assert result["passed"] is True, result
    assert result["accuracy"][0] == pytest.approx(accuracy(model, x, y))
    assert result["accuracy"][-1] < 0.1
    # Stopping the sweep at a small eps leaves accuracy far from 0: the check must fail.
    short = check_eps_sweep(model, x, y, (0, 2 / 255), steps=10)
    assert short["passed"] is False and "still" in short["detail"]


def test_black_box_weaker_on_trained_model(trained):
    model, x, y = trained
    result = check_black_box_weaker(model, x[:48], y[:48], EPS, n_queries=50)
    assert result["passed"] is True, result
    assert result["square"] >= result["pgd20"]


def test_gradient_masking_trap_is_caught(trained):
    model, x, y = trained
    masked = QuantizedInput(model)
    x, y = x[:48], y[:48]
    eps = 8 / 255
    # PGD sees zero gradients and only its random start: the model *looks* robust...
    torch.manual_seed(0)
    pgd_acc = robust_accuracy(masked, x, y, partial(pgd, eps=eps, alpha=eps / 4, steps=10))
    assert pgd_acc > accuracy(masked, x, y) - 0.1
    # ...while the same attack on the unmasked model breaks it.
    torch.manual_seed(0)
    assert robust_accuracy(model, x, y, partial(pgd, eps=eps, alpha=eps / 4, steps=10)) < 0.2
    # Square only queries outputs and is not fooled: the check fails, as it must.
    result = check_black_box_weaker(masked, x, y, eps, n_queries=200, pgd_acc=pgd_acc)
    assert result["passed"] is False, result
    assert result["square"] < pgd_acc - 0.4
    assert "gradient masking" in result["detail"]


# The two masking wrappers of benchmarks/zero_gradients.py (the file the README quotes): the
# green channel rounded to the 8-bit grid inside the model (partial masking, found by a red-team
# review: a third of the coordinates without gradient, and the four symptom checks pass on the
# tutorial PGD-AT model), and logits x 10,000 (a saturated softmax).
_masking = by_path.load("benchmarks/zero_gradients.py", "_zero_gradients")
RoundedChannel, ScaledLogits = _masking.RoundedGreen, _masking.ScaledLogits


def test_zero_gradients_pass_an_honest_model_and_catch_masking(trained):
    model, x, y = trained
    x, y = x[:48], y[:48]
    rng = torch.random.get_rng_state()
    honest = check_zero_gradients(model, x, y, EPS)
    assert torch.equal(torch.random.get_rng_state(), rng), "the check moved the caller's RNG"
    assert honest["passed"] is True, honest
    assert honest["zero_share"]["ce"] < 0.01 and honest["zero_share"]["margin"] < 0.01
    json.dumps(honest)
    # Rounding the whole input: every coordinate of every point, under both losses.
    rounded = check_zero_gradients(QuantizedInput(model), x, y, EPS)
    assert rounded["passed"] is False and "overstate robustness" in rounded["detail"]
    assert rounded["zero_share"] == {"ce": 1.0, "margin": 1.0}
    assert rounded["zero_images"] == {"ce": 96, "margin": 96}   # each image and its start
    # One channel of three: a third of the coordinates, no image wholly.
    partial_ = check_zero_gradients(RoundedChannel(model), x, y, EPS)
    assert partial_["passed"] is False, partial_
    for share in partial_["zero_share"].values():
        assert share == pytest.approx(1 / 3, abs=0.01)
    assert partial_["zero_images"] == {"ce": 0, "margin": 0}
    assert check_zero_gradients(RoundedChannel(model), x, y, EPS, max_share=0.4)["passed"]
    # A saturated softmax: the cross-entropy's gradient vanishes, the margin's does not.
    scaled = check_zero_gradients(ScaledLogits(model), x, y, EPS)
    assert scaled["passed"] is False
    assert scaled["zero_share"]["ce"] > 0.5 and scaled["zero_share"]["margin"] < 0.01
    assert "under the cross-entropy" in scaled["detail"]


def test_zero_gradients_look_in_eval_mode_and_at_a_random_start(trained):
    """Measured where the attacks measure: BatchNorm in eval mode (the caller's mode restored),
    and at PGD's random start as well as at the image (a model flat only at the image itself
    is still caught there)."""
    model, x, y = trained
    x, y = x[:16], y[:16]

    class FlatAtTheImage(nn.Module):
        """The wrapped model, but constant in a 1/255 ball around each of these images."""

        def __init__(self, inner: nn.Module, anchors: torch.Tensor) -> None:
            super().__init__()
            self.inner, self.anchors = inner, anchors

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            near = (xb - self.anchors[: len(xb)]).abs().flatten(1).amax(1) < 1 / 255
            return torch.where(near[:, None], self.inner(xb.detach()), self.inner(xb))

    model.train()
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    result = check_zero_gradients(FlatAtTheImage(model, x), x, y, EPS)
    assert model.training, "the caller's train mode was not restored"
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert stats and all(torch.equal(a, b) for a, b in zip(stats, after, strict=True)), \
        "the check ran BatchNorm in train mode (its running statistics moved)"
    assert result["zero_share"]["ce"] == pytest.approx(0.5, abs=0.01)   # the images, not starts
    assert result["zero_images"]["ce"] == 16
    model.eval()

    class Recording(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.seen = inner, []

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            self.seen.append(xb.detach().clone())
            return self.inner(xb)

    recording = Recording(model)
    x = x.clone()
    x[:, :, :4] = 1.0   # white rows: the start is clipped to the image box, as PGD's is
    check_zero_gradients(recording, x, y, EPS, seed=3)
    torch.manual_seed(3)
    assert torch.equal(recording.seen[0], x)
    assert torch.equal(recording.seen[1], attacks.random_point(x, EPS).clamp(0, 1))  # PGD's


def test_zero_gradients_refuse_broken_models_and_labels(trained):
    """A model with NaN logits has no gradient to look at (a NaN gradient is not == 0, so it
    used to pass), and a label beyond the model's classes is named as correct() names it."""
    model, x, y = trained

    class Broken(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return model(xb) * float("nan")

    with pytest.raises(ValueError, match="NaN or Inf logits"):
        check_zero_gradients(Broken(), x[:4], y[:4], EPS)
    with pytest.raises(ValueError, match=f"but the model has {K} classes"):
        check_zero_gradients(model, x[:4], torch.full_like(y[:4], K), EPS)

    class NaNGradient(nn.Module):   # finite logits, a NaN gradient wherever a pixel is 0
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return model(xb) + 0 * xb.sqrt().sum((1, 2, 3))[:, None]   # 0 x sqrt'(0) = NaN

    x0 = torch.zeros_like(x[:4])
    result = check_zero_gradients(NaNGradient(), x0, y[:4], EPS)
    assert result["passed"] is False and result["zero_share"]["ce"] >= 0.5


def test_gradient_signs_pass_an_honest_model_and_catch_shattered_gradients(trained):
    model, x, y = trained
    x, y = x[:48], y[:48]
    rng = torch.random.get_rng_state()
    honest = check_gradient_signs(model, x, y, EPS)
    assert torch.equal(torch.random.get_rng_state(), rng), "the check moved the caller's RNG"
    assert honest["passed"] is True, honest
    assert min(honest["agreement"].values()) > 0.95
    assert honest["sampled"] == 2 * 48 * 16
    assert 0 < honest["measured"]["ce"] <= honest["sampled"]
    json.dumps(honest)
    # A gradient of random sign on one channel: check 5 sees no zero, this check sees it.
    with torch.no_grad():
        assert torch.equal(ShatteredChannel(model)(x), RoundedChannel(model)(x))
    assert check_zero_gradients(ShatteredChannel(model), x, y, EPS)["passed"] is True
    shattered = check_gradient_signs(ShatteredChannel(model), x, y, EPS)
    assert shattered["passed"] is False, shattered
    for share in shattered["agreement"].values():
        assert 0.6 < share < 0.9   # two channels of three right, the third at random
    assert "points the wrong way" in shattered["detail"]
    # However small the wrong gradient: the attacks follow its sign.
    assert check_gradient_signs(ShatteredChannel(model, scale=1e-15), x, y, EPS)["passed"] is False
    # A zero gradient where the loss moves disagrees too, and whole-input rounding fails.
    assert check_gradient_signs(RoundedChannel(model), x, y, EPS)["passed"] is False
    rounded = check_gradient_signs(QuantizedInput(model), x, y, EPS)
    assert rounded["passed"] is False and max(rounded["agreement"].values()) < 0.1


def test_gradient_signs_step_where_the_attacks_look(trained):
    """One grey level up and down from the image and from PGD's random start, in eval mode."""
    model, x, y = trained
    x, y = x[:6], y[:6]

    class Recording(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.seen = inner, []

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            self.seen.append(xb.detach().clone())
            return self.inner(xb)

    model.train()
    recording = Recording(model)
    check_gradient_signs(recording, x, y, EPS, coordinates=2, seed=5)
    assert model.training, "the caller's train mode was not restored"
    model.eval()
    torch.manual_seed(5)
    start = attacks.random_point(x, EPS).clamp(0, 1)
    # the image, its two coordinates up and down, then the start and its four
    assert len(recording.seen) == 10
    assert torch.equal(recording.seen[0], x) and torch.equal(recording.seen[5], start)
    for k, point in ((1, x), (6, start)):
        for moved in recording.seen[k:k + 4]:
            diff = (moved - point).flatten(1).abs()
            assert ((diff != 0).sum(1) <= 1).all(), "more than one coordinate moved"
            assert (diff <= 1 / 255 + 1e-6).all()
        steps = torch.stack([(m - point).flatten(1).abs().amax(1)
                             for m in recording.seen[k:k + 4]])
        assert torch.isclose(steps, torch.tensor(1 / 255)).float().mean() > 0.9  # bar clipping
    # A step never leaves the image range: on a white image every step up is clipped.
    white = Recording(model.eval())
    check_gradient_signs(white, torch.ones_like(x[:2]), y[:2], EPS, coordinates=2)
    assert all(0 <= float(p.min()) and float(p.max()) <= 1 for p in white.seen)


def test_gradient_signs_need_a_loss_that_moves(trained):
    """A model whose loss moves on no sampled coordinate shows nothing about its gradient."""
    model, x, y = trained

    class Constant(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(xb), K) + 0 * xb.sum((1, 2, 3))[:, None]

    flat = check_gradient_signs(Constant(), x[:4], y[:4], EPS)
    assert flat["passed"] is False and flat["agreement"] == {"ce": None, "margin": None}
    assert "the loss moved on none" in flat["detail"]

    class Broken(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return model(xb) * float("nan")

    with pytest.raises(ValueError, match="NaN or Inf logits"):
        check_gradient_signs(Broken(), x[:4], y[:4], EPS)


def test_zero_gradients_pass_at_exactly_the_allowed_share(trained):
    """At most max_share passes: a share equal to it is allowed, like every limit of the checks."""
    model, x, y = trained
    share = check_zero_gradients(RoundedChannel(model), x[:8], y[:8], EPS)["zero_share"]
    assert check_zero_gradients(RoundedChannel(model), x[:8], y[:8], EPS,
                                max_share=max(share.values()))["passed"] is True


# The controls of benchmarks/later_checks.py (the file the README quotes), from the second
# red-team review and the checks it led to.
_later = by_path.load("benchmarks/later_checks.py", "_later_checks")
Noisy, BatchCentred, Decoy = _later.Noisy, _later.BatchCentred, _later.Decoy
ShatteredChannel, Remembering = _later.ShatteredGreen, _later.Remembering


def test_deterministic_passes_an_honest_model_in_eval_mode(trained):
    """BatchNorm in train mode would make logits depend on the batch: the check, like the
    attacks, runs in eval mode, restores the caller's mode and leaves its RNG alone."""
    model, x, y = trained
    x, y = x[:40], y[:40]
    model.train()
    rng = torch.random.get_rng_state()
    result = check_deterministic(model, x, y, batch_size=16)
    assert model.training, "the caller's train mode was not restored"
    model.eval()
    assert torch.equal(torch.random.get_rng_state(), rng), "the check moved the caller's RNG"
    assert result["passed"] is True, result
    assert set(result["max_change"]) == {"repeat", "autograd", "batch", "history"}
    assert all(v <= evaluate.MAX_LOGIT_CHANGE for v in result["max_change"].values())
    assert result["changed_predictions"] == dict.fromkeys(result["max_change"], 0)
    assert result["tolerance"] == evaluate.MAX_LOGIT_CHANGE
    json.dumps(result)


def test_deterministic_names_what_changes_the_logits(trained):
    """Each way of answering differently fails its own comparison, and only that one."""
    model, x, y = trained
    x, y = x[:40], y[:40]
    noisy = check_deterministic(Noisy(model, 0.05), x, y)
    assert noisy["passed"] is False
    assert all(v > evaluate.MAX_LOGIT_CHANGE for v in noisy["max_change"].values())
    assert "randomized model" in noisy["detail"] and "EOT" in noisy["detail"]
    # Noise far too small to flip a prediction is still randomness.
    faint = check_deterministic(Noisy(model, 1e-3), x, y)
    assert faint["passed"] is False and faint["changed_predictions"]["repeat"] == 0

    centred = check_deterministic(BatchCentred(model), x, y, batch_size=16)
    assert centred["passed"] is False
    assert centred["max_change"]["repeat"] == 0 and centred["max_change"]["autograd"] == 0
    assert centred["max_change"]["batch"] > 0.01
    assert "other images of its batch" in centred["detail"]

    other = TinyCNN().eval()
    decoy = check_deterministic(Decoy(model, other), x, y)
    assert decoy["passed"] is False
    assert decoy["max_change"]["repeat"] == 0 and decoy["max_change"]["batch"] == 0
    with torch.no_grad():
        differ = int((model(x).argmax(1) != other(x).argmax(1)).sum())
    assert decoy["changed_predictions"]["autograd"] == differ > 0
    assert "while autograd records" in decoy["detail"]


def test_deterministic_catches_a_model_that_remembers(trained):
    """The memory returns the model's own logits, so repeats, autograd and batches all agree;
    only points near images shown after them tell."""
    model, x, y = trained
    x, y = (x[:24] * 255).round() / 255, y[:24]   # 8-bit images, as the test set's
    remembering = Remembering(model)
    torch.manual_seed(0)
    with torch.no_grad():
        remembering(x)   # the protocol classifies the clean images first...
    fooled = robust_accuracy(remembering, x, y, partial(pgd, eps=EPS, alpha=EPS / 4, steps=10))
    torch.manual_seed(0)
    honest = robust_accuracy(model, x, y, partial(pgd, eps=EPS, alpha=EPS / 4, steps=10))
    assert fooled == accuracy(model, x, y) > honest   # ...so no attack gets through
    result = check_deterministic(Remembering(model), x, y, eps=EPS)
    assert result["passed"] is False
    assert all(result["max_change"][k] == 0 for k in ("repeat", "autograd", "batch"))
    assert result["max_change"]["history"] > 0.01
    assert "a model with a memory" in result["detail"]


def test_deterministic_changes_batches_and_their_order(trained):
    """The batch comparison sees other batch sizes and other neighbours, even when everything
    fits one batch."""
    model, x, y = trained
    x, y = x[:12], y[:12]

    class SizeAware(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return model(xb) + 0.01 * len(xb)

    class PositionAware(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return model(xb) + 0.01 * torch.arange(len(xb), dtype=xb.dtype)[:, None]

    for wrapper in (SizeAware(), PositionAware()):
        for batch_size in (500, 5):
            result = check_deterministic(wrapper, x, y, batch_size=batch_size)
            assert result["passed"] is False and result["max_change"]["batch"] > 0, (
                type(wrapper).__name__, batch_size)


def test_deterministic_measures_each_image_against_its_own_logits(trained):
    """One image with huge logits does not loosen the limit for the others."""
    model, x, y = trained
    x, y = x[:8], y[:8]

    class Loud(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            out = model(xb)
            loud = (xb.flatten(1)[:, 0] == x[0, 0, 0, 0]).to(out.dtype)[:, None]
            jitter = 0.05 * torch.randn_like(out) * (1 - loud)
            return out * (1 + 1e6 * loud) + jitter

    result = check_deterministic(Loud(), x, y)
    assert result["passed"] is False and result["max_change"]["repeat"] > 1e-3


def test_deterministic_allows_less_precise_logits_their_rounding(trained):
    """bfloat16 logits get 16 of their epsilons; the same change fails in float32."""
    model, x, y = trained
    x, y = x[:16], y[:16]

    class Jitter(nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.dtype = dtype

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            out = model(xb)
            return (out + 1e-3 * out.abs().amax(1, keepdim=True) * torch.rand_like(out)).to(
                self.dtype)

    low = check_deterministic(Jitter(torch.bfloat16), x, y)
    assert low["tolerance"] == pytest.approx(16 * torch.finfo(torch.bfloat16).eps)
    assert low["passed"] is True, low
    assert check_deterministic(Jitter(torch.float32), x, y)["passed"] is False


def test_deterministic_refuses_broken_models_and_labels(trained):
    model, x, y = trained

    class Broken(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return model(xb) * float("nan")

    with pytest.raises(ValueError, match="NaN or Inf logits"):
        check_deterministic(Broken(), x[:4], y[:4])
    with pytest.raises(ValueError, match=f"but the model has {K} classes"):
        check_deterministic(model, x[:4], torch.full_like(y[:4], K))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        check_deterministic(model, x[:4], y[:4], batch_size=0)
    with pytest.raises(ValueError, match="eps must be"):
        check_deterministic(model, x[:4], y[:4], eps=0.0)


def test_gradient_signs_pass_at_exactly_the_required_share_and_need_both_losses(trained):
    """At least min_agreement passes (a share equal to it is allowed), and under each loss:
    a model whose signs agree well enough under one loss only fails."""
    model, x, y = trained
    x, y, shattered = x[:12], y[:12], ShatteredChannel(model)   # shares well below 1
    found = check_gradient_signs(shattered, x, y, EPS, coordinates=4)["agreement"]
    low, high = min(found.values()), max(found.values())
    assert low < high, "the two losses agree on the same share: pick other images"
    at_low = check_gradient_signs(shattered, x, y, EPS, coordinates=4, min_agreement=low)
    assert at_low["passed"] is True and at_low["agreement"] == found
    assert check_gradient_signs(shattered, x, y, EPS, coordinates=4,
                                min_agreement=high)["passed"] is False


def test_gradient_signs_refuse_arguments_they_cannot_use(trained):
    model, x, y = trained
    x, y = x[:4], y[:4]
    for kwargs, match in (({"eps": 0.0}, "eps must be"),
                          ({"coordinates": 0}, "coordinates must be"),
                          ({"coordinates": 1.5}, "coordinates must be an int"),
                          ({"step": 0.0}, "step must be"),
                          ({"step": 1.5}, "step must be"),
                          ({"min_agreement": -0.1}, "min_agreement must be"),
                          ({"min_agreement": 1.5}, "min_agreement must be")):
        args = {"eps": EPS, **kwargs}
        with pytest.raises((ValueError, TypeError), match=match):
            check_gradient_signs(model, x, y, **args)
    # the extremes are allowed: one coordinate, a step across the whole range
    assert check_gradient_signs(model, x, y, EPS, coordinates=1, step=1.0,
                                min_agreement=1.0)["sampled"] == 2 * 4


def test_deterministic_shows_the_model_only_images(trained):
    """The history comparison's points near mirrored images stay in [0, 1], like every input
    the check gives the model: on a white image half of a random point's coordinates would
    leave the range unclipped."""
    model, x, y = trained
    seen = []

    class Recording(nn.Module):
        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            seen.append(xb.detach().clone())
            return model(xb)

    white = torch.ones_like(x[:4])
    assert check_deterministic(Recording().eval(), white, y[:4])["passed"] is True
    # first, repeat, autograd, batch (of 3 and 1), near, mirrored, near
    assert len(seen) == 8
    assert all(0 <= float(p.min()) and float(p.max()) <= 1 for p in seen)
    assert any(float(p.min()) < 1 for p in seen), "no point of the eps-ball was shown"


class _Drifting(nn.Module):
    """``model``'s logits times ``gain``, grown by ``factor`` at every call after the first: a
    change of ``factor`` relative to the logits' scale (their largest magnitude, at least 1)
    between the first call and any later one."""

    def __init__(self, model: nn.Module, factor: float, gain: float = 1.0) -> None:
        super().__init__()
        self.model, self.factor, self.gain, self.calls = model, factor, gain, 0

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        out = self.gain * self.model(xb).double()
        scale = out.abs().amax(1, keepdim=True).clamp(min=1.0)
        drift = self.factor * scale * min(self.calls, 1)
        self.calls += 1
        return (out + drift).float()


def test_deterministic_holds_float32_models_to_max_logit_change(trained, monkeypatch):
    """MAX_LOGIT_CHANGE is the float32 limit, and a change equal to the limit passes."""
    model, x, y = trained
    x, y = x[:8], y[:8]
    assert evaluate.MAX_LOGIT_CHANGE == pytest.approx(1e-4)
    # large logits (the scale is the largest magnitude) and tiny ones (the scale is 1)
    for gain in (100.0, 1e-3):
        assert check_deterministic(_Drifting(model, 0.5e-4, gain), x, y)["passed"] is True
        over = check_deterministic(_Drifting(model, 1.5e-4, gain), x, y)
        assert over["passed"] is False and over["tolerance"] == evaluate.MAX_LOGIT_CHANGE
        assert over["max_change"]["repeat"] == pytest.approx(1.5e-4, rel=0.05), gain
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "MAX_LOGIT_CHANGE", max(over["max_change"].values()))
        at_limit = check_deterministic(_Drifting(model, 1.5e-4, gain), x, y)
    assert at_limit["passed"] is True and "not to be trusted" not in at_limit["detail"]


def test_check_autoattack_gap():
    ok = check_autoattack_gap(0.50, 0.48)
    assert ok["passed"] is True and ok["gap"] == pytest.approx(0.02)
    bad = check_autoattack_gap(0.50, 0.30)
    assert bad["passed"] is False and "gradient masking" in bad["detail"]
    assert check_autoattack_gap(0.50, 0.30, max_gap=0.25)["passed"] is True
    # The default is issue 5's rule: AutoAttack within 5 points of PGD-20.
    assert check_autoattack_gap(0.50, 0.46)["passed"] is True
    assert check_autoattack_gap(0.50, 0.44)["passed"] is False
    # AutoAttack weaker than PGD-20 fails too, beyond one example or half a point of n
    weak = check_autoattack_gap(0.30, 0.60)
    assert weak["passed"] is False and "did not run as configured" in weak["detail"]
    assert check_autoattack_gap(0.50, 0.504, n=1000)["passed"] is True   # 4 images: noise
    assert check_autoattack_gap(0.50, 0.52, n=1000)["passed"] is False
    assert check_autoattack_gap(0.50, 0.52, n=50)["passed"] is True      # one image of 50
    with pytest.raises(ValueError, match="pgd20_acc must be <= 1"):
        check_autoattack_gap(1.5, 0.3)


def test_sanity_checks_all_pass_on_trained_model(trained, fast_autoattack):
    model, x, y = trained
    x, y = x[:48], y[:48]
    rng = torch.random.get_rng_state()
    result = sanity_checks(model, x, y, eps=EPS, n_queries=50)
    assert torch.equal(torch.random.get_rng_state(), rng), "sanity checks moved the caller's RNG"
    assert set(result) == {"more_steps", "eps_sweep", "black_box_weaker", "autoattack_gap",
                           "zero_gradients", "gradient_signs", "deterministic"}
    assert all(r["seconds"] >= 0 for r in result.values())  # where a GPU run's time goes
    assert all(r["n"] == 48 for r in result.values())  # how many images each verdict rests on
    for name, check in result.items():
        assert check["passed"] is True, (name, check)
        assert isinstance(check["detail"], str)
    assert result["eps_sweep"]["eps"][-1] == pytest.approx(8 * EPS)
    json.dumps(result)
    # Numbers measured elsewhere are used as given.
    given = sanity_checks(model, x, y, eps=EPS, n_queries=20, pgd20=0.9, autoattack=0.1)
    assert given["autoattack_gap"]["passed"] is False
    assert given["black_box_weaker"]["pgd20"] == 0.9


def test_sanity_defaults_are_the_protocol_of_the_committed_results():
    """The checks' defaults define what metrics.json calls "sanity": the committed full run's
    record holds the step counts, radii and Square budget the code uses now."""
    import inspect
    from pathlib import Path

    from anchor_lib.evaluate import eps_sweep

    metrics = json.loads((Path(__file__).resolve().parents[1] / "data" / "results"
                          / "full-pgd_at" / "metrics.json").read_text())
    record = metrics["sanity"]

    def default(f, name):
        return inspect.signature(f).parameters[name].default

    assert list(default(check_more_steps, "steps")) == record["more_steps"]["steps"] == [1, 5, 20, 50]
    assert default(sanity_checks, "n_queries") == record["black_box_weaker"]["n_queries"] == 1000
    # The sweep that sanity_checks runs, and check_eps_sweep's own default, are the same radii.
    np.testing.assert_allclose(eps_sweep(EVAL_EPS), record["eps_sweep"]["eps"], rtol=1e-12)
    np.testing.assert_allclose(default(check_eps_sweep, "eps_values"), eps_sweep(EVAL_EPS),
                               rtol=1e-12)
    assert eps_sweep(0.25) == [0.0, 0.0625, 0.125, 0.25, 0.5, 1.0]  # capped at the box, once
    # The sweep is PGD-20 and must end below 10 % accuracy; AutoAttack may trail by 5 points.
    assert (default(check_eps_sweep, "steps"), default(check_eps_sweep, "max_final")) == (20, 0.10)
    assert default(check_autoattack_gap, "max_gap") == record["autoattack_gap"]["max_gap"] == 0.05
    # The suite: every attack in fp32 on all images, AutoAttack on the first 1,000.
    assert default(evaluate_suite, "autoattack_n") == metrics["accuracy"]["autoattack"]["n"] == 1000
    assert (default(evaluate_suite, "n"), default(evaluate_suite, "search"),
            default(evaluate_suite, "per_image")) == (None, "fp32", False)


def test_square_may_trail_pgd_by_one_example_or_half_a_point(trained, monkeypatch):
    """Square below PGD-20 by no more than the comparison's slack is noise, not masking."""
    model, x, y = trained
    x, y = x[:100], y[:100]
    for square_acc, passed in ((0.496, True), (0.50, True), (0.485, False)):
        monkeypatch.setattr(evaluate, "robust_accuracy", lambda *a, v=square_acc, **k: v)
        result = check_black_box_weaker(model, x, y, EPS, n_queries=1, pgd_acc=0.5)
        assert result["passed"] is passed, (square_acc, result)


def test_suite_seconds_are_each_attacks_wall_time(trained):
    import time

    model, x, y = trained
    start = time.perf_counter()
    result = evaluate_suite(model, x, y, attacks="clean,pgd20", n=64, batch_size=1, eps=EPS)
    wall = time.perf_counter() - start
    seconds = [entry["seconds"] for entry in result.values()]
    assert all(s >= 0 for s in seconds) and sum(seconds) <= wall + 0.02, (seconds, wall)
    assert result["pgd20"]["seconds"] > result["clean"]["seconds"]  # 20 steps cost more than 1
    # A batch of one image is a batch like any other.
    assert result["clean"]["value"] == pytest.approx(accuracy(model, x[:64], y[:64]))


def test_tf32_is_available_from_ampere_on(monkeypatch):
    """TF32 exists on compute capability 8.0 (A100) and later: a V100 or T4 search in fp32."""
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert evaluate.tf32_available("cuda") is expected, capability
    assert evaluate.tf32_available("cpu") is False


def test_a_zero_radius_keeps_a_positive_step():
    """eps = 0 (the sweep's first point) still gives valid attacks, which return x itself."""
    assert standard_attacks(0.0)["pgd20"].keywords["alpha"] == pytest.approx(1 / 255)
    assert standard_attacks(0.0)["cw"].keywords["alpha"] == pytest.approx(1 / 255)


def test_evaluation_inputs_are_checked(trained):
    model, x, y = trained
    with pytest.raises(TypeError, match="attack names must be strings"):
        evaluate_suite(model, x, y, attacks=["clean", 3])
    with pytest.raises(TypeError, match="batch_size must be an int"):
        accuracy(model, x, y, batch_size=2.5)
    empty = torch.zeros(0, dtype=torch.bool)
    with pytest.raises(ValueError, match="two non-empty bool masks"):
        evaluate.check_search_precision(empty, empty)


def test_sanity_checks_attack_with_the_documented_pgd(trained, monkeypatch):
    """Every PGD of the sanity checks steps eps / 4, and the shared PGD-20 is 20 steps; each
    check's seconds is its own wall time."""
    import time

    model, x, y = trained
    x, y = x[:16], y[:16]
    calls = []

    def recording_pgd(m, xb, yb, *, eps, alpha, steps):
        calls.append((eps, alpha, steps))
        return xb.clone()

    monkeypatch.setattr(evaluate, "pgd", recording_pgd)
    start = time.perf_counter()
    result = sanity_checks(model, x, y, eps=EPS, n_queries=2, autoattack=0.5)
    wall = time.perf_counter() - start
    assert calls[0] == (EPS, EPS / 4, 20), "the shared PGD-20 comes first"
    assert all(alpha == pytest.approx(eps / 4) for eps, alpha, _ in calls)
    assert [steps for _, _, steps in calls[1:5]] == [1, 5, 20, 50]  # the more-steps check
    assert {steps for _, _, steps in calls[5:]} == {20}               # the eps sweep
    assert sum(r["seconds"] for r in result.values()) <= wall + 0.05


def test_sanity_check_arguments_are_checked(trained):
    model, x, y = trained
    x, y = x[:8], y[:8]
    for call, match in (
            (lambda: check_black_box_weaker(model, x, y, 0.0), "eps must be"),
            (lambda: sanity_checks(model, x, y, eps=0.0), "eps must be"),
            (lambda: check_autoattack_gap(0.5, 1.5), "aa_acc must be <= 1"),
            (lambda: check_autoattack_gap(0.5, 0.4, n=2.5), "n must be an int"),
            (lambda: check_zero_gradients(model, x, y, 0.0), "eps must be"),
            (lambda: check_zero_gradients(model, x, y, EPS, max_share=1.5),
             "max_share must be <= 1"),
            (lambda: check_gradient_signs(model, x, y, 0.0), "eps must be"),
            (lambda: check_gradient_signs(model, x, y, EPS, coordinates=0),
             "coordinates must be >= 1"),
            (lambda: check_gradient_signs(model, x, y, EPS, step=0.0), "step must be"),
            (lambda: check_gradient_signs(model, x, y, EPS, min_agreement=1.5),
             "min_agreement must be <= 1"),
            (lambda: check_more_steps(model, x, y, EPS, steps=(1, 2.5)), "steps must be an int"),
            (lambda: evaluate_suite(model, x, y, attacks="clean", n=2.5), "n must be an int")):
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    # Zero steps is PGD's random start alone: a valid first point of the curve.
    assert check_more_steps(model, x, y, EPS, steps=(0, 1))["steps"] == [0, 1]


def test_a_rise_between_the_first_two_points_fails_the_curves(trained, monkeypatch):
    """The more-steps and eps-sweep checks compare every point with the ones before it, the
    second with the first included."""
    model, x, y = trained
    x, y = x[:100], y[:100]
    curve = iter([0.3, 0.5, 0.2, 0.1])
    monkeypatch.setattr(evaluate, "_pgd_accuracy", lambda *a, **k: next(curve))
    steps = check_more_steps(model, x, y, EPS, steps=(1, 5, 20, 50))
    assert steps["passed"] is False and "from 1 to 5 steps" in steps["detail"]
    curve = iter([0.5, 0.7, 0.3, 0.0])
    sweep = check_eps_sweep(model, x, y, (0, 1 / 255, 2 / 255, 64 / 255))
    assert sweep["passed"] is False


def test_black_box_check_measures_pgd20_itself_when_not_given(trained, monkeypatch):
    model, x, y = trained
    seen = []
    monkeypatch.setattr(evaluate, "_pgd_accuracy",
                        lambda m, xb, yb, eps, steps, *a, **k: seen.append(steps) or 0.5)
    monkeypatch.setattr(evaluate, "robust_accuracy", lambda *a, **k: 0.6)
    assert check_black_box_weaker(model, x[:8], y[:8], EPS, n_queries=1)["pgd20"] == 0.5
    assert seen == [20]


def test_autoattack_gap_without_a_count_allows_half_a_point():
    assert check_autoattack_gap(0.50, 0.504)["passed"] is True
    assert check_autoattack_gap(0.50, 0.507)["passed"] is False


def test_precision_check_of_a_single_image():
    one = torch.tensor([True])
    result = evaluate.check_search_precision(one, one)
    assert result["passed"] is True and result["n"] == 1


def test_module_exports():
    for name in evaluate.__all__:
        assert hasattr(evaluate, name)


def test_default_batch_size_is_one_autoattack_subset_on_a_gpu():
    assert evaluate.default_batch_size("cpu") == evaluate.CPU_BATCH_SIZE == 500
    assert evaluate.default_batch_size(torch.device("cuda")) == evaluate.GPU_BATCH_SIZE == 1000
    assert evaluate.default_batch_size("cuda:1") == 1000


def test_autoattack_calls_per_batch_do_not_depend_on_its_size(fast_autoattack):
    """Why the GPU evaluates in one batch of 1,000: a point AutoAttack cannot break costs a fixed
    number of model calls per batch, so two batches cost twice one batch of the same images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():  # small weights, a margin of 1 for class 0: no eps-8/255 attack flips it
        model[1].weight.mul_(0.05)
        model[1].bias.zero_()
        model[1].bias[0] = 1.0
    x = torch.rand(600, 3, 8, 8)  # more than 500: no hidden batching below the caller's
    y = torch.zeros(600, dtype=torch.long)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def count(batch_size: int) -> tuple[int, float]:
        calls.clear()
        r = evaluate_suite(model, x, y, attacks=["autoattack"], batch_size=batch_size, eps=EPS)
        return len(calls), r["autoattack"]["value"]

    (one, acc_one), (two, acc_two) = count(600), count(300)
    assert acc_one == acc_two == 1.0  # every point survives every sub-attack: the full budget
    assert two == 2 * one
    # APGD-CE, APGD-T (9 targets) and FAB-T (9 targets) at 3 iterations, Square at 20 queries.
    assert one > 9 * 3 + 20


def test_evaluation_runs_in_ieee_fp32_and_restores_the_flags():
    """TF32 (cuDNN's default for fp32 convolutions on GPUs) is off while the protocol runs."""
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3 * 4 * 4, 10)

        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return self.linear(x.flatten(1))

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model, x = Spy(), torch.rand(6, 3, 4, 4)
        y = model(x).argmax(1)
        seen.clear()
        evaluate.accuracy(model, x, y)
        evaluate.robust_accuracy(model, x, y, partial(pgd, eps=EPS, alpha=EPS / 4, steps=2))
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True,
                                                                                            True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_evaluate_suite_is_seeded_and_leaves_the_callers_random_streams(trained):
    """The same call draws the same random starts (so every committed number can be rerun),
    whatever the global RNG's state, and does not move that state."""
    model, x, y = trained
    torch.manual_seed(1)
    first = evaluate_suite(model, x, y, attacks=("pgd20", "cw"), eps=EPS, per_image=True)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    again = evaluate_suite(model, x, y, attacks=("pgd20", "cw"), eps=EPS, per_image=True)
    assert torch.equal(torch.get_rng_state(), before)
    for name in ("pgd20", "cw"):
        assert (first[name]["correct"] == again[name]["correct"]).all()
    with pytest.raises(TypeError, match="seed must be an int, got 0.5"):
        evaluate_suite(model, x, y, attacks=("clean",), seed=0.5)


def test_evaluate_suite_refuses_images_outside_the_threat_model(trained, monkeypatch):
    """An attack whose output leaves the eps-ball would count breaks the threat model does not
    allow: an error naming the attack and the distance, never a number."""
    model, x, y = trained
    table = evaluate.standard_attacks(EPS)
    table["fgsm"] = lambda m, xb, yb: (xb + 2 * EPS).clamp(0, 1)
    monkeypatch.setattr(evaluate, "standard_attacks", lambda eps, seed: table)
    with pytest.raises(ValueError, match=r"attack 'fgsm' returned images 8\.000/255 from the "
                                         r"originals, outside the L-inf ball of 4\.000/255"):
        evaluate_suite(model, x, y, attacks=("fgsm",), eps=EPS)

    def one_pixel_out(m, xb, yb):  # the largest change counts, however few pixels make it
        out = xb.clone()
        out[0, 0, 0, 0] = (out[0, 0, 0, 0] + 2 * EPS) if out[0, 0, 0, 0] < 0.5 else (
            out[0, 0, 0, 0] - 2 * EPS)
        return out

    table["fgsm"] = one_pixel_out
    with pytest.raises(ValueError, match=r"returned images 8\.000/255 from the originals"):
        evaluate_suite(model, x, y, attacks=("fgsm",), eps=EPS)


def test_autoattack_runs_square_with_the_reference_schedule(trained, monkeypatch):
    """The reference AutoAttack builds Square with resc_schedule=False; torchattacks' default
    rescales the square sizes to the budget. The configured sub-attacks are inspected here, and
    autoattack_config (what metrics.json records) says the same."""
    import torchattacks

    model, x, y = trained
    seen = {}

    def forward(self, images, labels):  # record the configured sub-attacks, attack nothing
        seen.update({type(a).__name__: a for a in self._autoattack.attacks})
        return images

    monkeypatch.setattr(torchattacks.AutoAttack, "forward", forward)
    attacks.autoattack(model, x[:4], y[:4], eps=EPS)
    assert seen["Square"].rescale_schedule is False
    assert seen["Square"].n_queries == attacks.AUTOATTACK_SQUARE_QUERIES == 5000
    assert seen["APGD"].steps == seen["APGDT"].steps == seen["FAB"].steps == 100
    config = attacks.autoattack_config()
    assert config["square_rescale_schedule"] is False and config["iterations"] == 100
    assert config["implementation"] == f"torchattacks {torchattacks.__version__}"


def test_small_rises_within_the_slack_cannot_add_up(trained, monkeypatch):
    """Each rise stays within one example's slack, together they are three: more steps (or a
    larger eps) did raise accuracy, and both checks say so."""
    model, x, y = trained   # 200 images: the slack is 0.005
    creeping = iter([0.500, 0.504, 0.508, 0.512])
    monkeypatch.setattr(evaluate, "_pgd_accuracy", lambda *a, **k: next(creeping))
    result = check_more_steps(model, x, y, EPS)
    assert result["passed"] is False and "rises from 1 to 20 steps" in result["detail"]
    sweep = iter([0.9, 0.500, 0.504, 0.508, 0.0])
    monkeypatch.setattr(evaluate, "_pgd_accuracy", lambda *a, **k: next(sweep))
    result = check_eps_sweep(model, x, y, (0, 1 / 255, 2 / 255, 4 / 255, 64 / 255))
    assert result["passed"] is False and "rises with eps" in result["detail"]


# --------------------------------------------------------------------------------------------
# The TF32 search (DESIGN §4: reduced precision only where it agrees with fp32)
# --------------------------------------------------------------------------------------------

def _tf32_on() -> bool:
    return torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


class PrecisionDependent(nn.Module):
    """What TF32 could do to a model, made visible on a CPU (where the flags change nothing):
    with the flags on, ``flip`` moves every prediction to another class (a verdict that
    differs between precisions), or ``mask`` rounds the input to 8 bits (a zero gradient, so an
    attack searching in TF32 gets nowhere)."""

    def __init__(self, model: nn.Module, effect: str) -> None:
        super().__init__()
        self.model, self.effect, self.num_classes = model, effect, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tf32_on() and self.effect == "mask":
            x = torch.round(x * 255) / 255
        logits = self.model(x)
        if _tf32_on() and self.effect == "flip":
            logits = logits.roll(1, dims=1)
        return logits


def test_a_tf32_search_attacks_in_tf32_and_judges_in_fp32(trained):
    model, x, y = trained
    x, y = x[:40], y[:40]
    calls = []  # (who, TF32 on) for every model call

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.num_classes, self.inside = model, K, False

        def forward(self, xb):
            calls.append(("attack" if self.inside else "verdict", _tf32_on()))
            return self.model(xb)

    spy = Spy()

    def attack(m, xb, yb):
        spy.inside = True
        try:
            return pgd(m, xb, yb, eps=EPS, alpha=EPS / 4, steps=3)
        finally:
            spy.inside = False

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    mask = evaluate.correct(spy, x, y, attack, batch_size=20, search="tf32")
    assert {flag for who, flag in calls if who == "attack"} == {True}
    # fp32 verdicts, and one TF32 prediction per batch to find the images fp32 judges otherwise.
    verdicts = [flag for who, flag in calls if who == "verdict"]
    assert verdicts.count(True) == 2 and verdicts.count(False) == 4
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    # On a CPU TF32 changes no arithmetic: the same verdicts as the fp32 search.
    torch.manual_seed(0)
    plain = evaluate.correct(model, x, y, partial(pgd, eps=EPS, alpha=EPS / 4, steps=3), 20)
    torch.manual_seed(0)
    assert torch.equal(evaluate.correct(model, x, y, partial(pgd, eps=EPS, alpha=EPS / 4, steps=3),
                                        20, search="tf32"), plain)
    assert mask.dtype == torch.bool
    with pytest.raises(ValueError, match="search must be one of 'fp32', 'tf32', got 'bf16'"):
        evaluate.correct(model, x, y, attack, search="bf16")


class Coded(nn.Module):
    """Predicts the class written in pixel (0, 0, 0) as ``round(10 * value) % K``; with TF32 on,
    every prediction moves to the next class (a verdict fp32 does not share)."""

    num_classes = K

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # attacks read the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.round(x[:, 0, 0, 0] * 10).long() % K + int(_tf32_on())
        return F.one_hot(code % K, K).float() * self.scale


def test_images_broken_only_in_tf32_are_attacked_again_in_fp32():
    """A verdict only TF32 reaches never counts: those images are attacked again in fp32, and
    that attack's verdict is the one kept, image by image, across batches."""
    n, labels = 40, torch.arange(40) % K
    x = torch.rand(n, 3, 4, 4)
    x[:, 0, 0, 0] = labels / 10
    y = labels.clone()
    y[::7] = (y[::7] + 3) % K                  # clean-wrong images between the attacked ones
    breakable = x[:, 1, 0, 0] > 0.5            # what the fp32 attack can break
    calls = []

    def attack(m, xb, yb):
        """In TF32 it changes nothing (TF32 "breaks" every image by its verdict alone); in fp32
        it rewrites the code of the breakable images to another class."""
        calls.append((len(xb), _tf32_on()))
        out = xb.clone()
        if not _tf32_on():
            hit = xb[:, 1, 0, 0] > 0.5
            out[hit, 0, 0, 0] = ((yb[hit] + 1) % K) / 10
        return out

    clean = evaluate.correct(Coded(), x, y)
    assert 0 < clean.sum() < n
    mask, counts = evaluate._correct(Coded(), x, y, attack, 7, "tf32")
    assert torch.equal(mask, clean & ~breakable)
    assert counts == {"retried_in_fp32": int(clean.sum()),
                      "broken_on_retry": int((clean & breakable).sum())}
    assert [flag for _, flag in calls] == [True, False] * 6  # per batch: search, then retry
    # The plain fp32 search gives the same mask, attacking each image once.
    calls.clear()
    fp32, counts = evaluate._correct(Coded(), x, y, attack, 7, "fp32")
    assert torch.equal(fp32, mask) and counts == {"retried_in_fp32": 0, "broken_on_retry": 0}
    assert [flag for _, flag in calls] == [False] * 6


def test_a_retry_does_not_move_the_next_batches_random_starts():
    """Both arms of the PGD-20 check draw the same random starts for every batch, whether or not
    an earlier batch had images attacked again."""
    x = torch.rand(30, 3, 4, 4)
    y = torch.round(x[:, 0, 0, 0] * 10).long() % K
    for search in ("fp32", "tf32"):
        draws = []

        def attack(m, xb, yb, draws=draws):
            draws.append((_tf32_on(), torch.rand(1).item()))
            return xb.clone()

        torch.manual_seed(0)
        evaluate._correct(Coded(), x, y, attack, 10, search)
        first = [d for flag, d in draws if flag == (search == "tf32")]
        if search == "fp32":
            expected = first
    assert len(expected) == 3 and first == expected


@pytest.fixture
def tf32_gpu(monkeypatch):
    """Take the CPU for a GPU with TF32: the flags change nothing here, but the models of these
    tests read them (``PrecisionDependent``), which is how the TF32 path is exercised."""
    monkeypatch.setattr(evaluate, "tf32_available", lambda device: True)


def test_without_tf32_hardware_a_tf32_search_is_plain_fp32(trained, capsys):
    model, x, y = trained
    masked = PrecisionDependent(model, "mask")  # would fail the check if TF32 were switched on
    result = evaluate_suite(masked, x, y, ("pgd20", "cw"), eps=EPS, search="tf32", progress=True)
    assert [e["search"] for e in result.values()] == ["fp32", "fp32"]
    assert "tf32_check" not in result["pgd20"]
    assert "has no TF32: fp32 throughout" in capsys.readouterr().out
    assert evaluate.tf32_available("cpu") is False


def test_evaluate_suite_searches_in_tf32_only_after_pgd20_agrees(trained, fast_autoattack, capsys,
                                                                   tf32_gpu):
    model, x, y = trained
    names = ("clean", "fgsm", "pgd20", "cw", "autoattack")
    fp32 = evaluate_suite(model, x, y, names, n=80, autoattack_n=16, eps=EPS, per_image=True)
    tf32 = evaluate_suite(model, x, y, names, n=80, autoattack_n=16, eps=EPS, per_image=True,
                          search="tf32", progress=True)
    assert list(tf32) == list(names)  # the order asked, though PGD-20 ran first
    assert {n: e["search"] for n, e in tf32.items()} == {
        "clean": "fp32", "fgsm": "fp32", "pgd20": "fp32", "cw": "tf32", "autoattack": "tf32"}
    check = tf32["pgd20"]["tf32_check"]
    assert check["passed"] is True and check["images_changed"] == 0 and check["n"] == 80
    assert check["missed_by_tf32"] == check["missed_by_fp32"] == check["retried_in_fp32"] == 0
    assert check["seconds"] >= 0  # the TF32 arm's cost, on the record
    assert check["fp32"] == check["tf32"] == tf32["pgd20"]["value"]
    assert tf32["cw"]["retried_in_fp32"] == tf32["cw"]["broken_on_retry"] == 0
    assert "retried_in_fp32" not in tf32["pgd20"]
    for name in names:  # TF32 is a no-op on a CPU: the same answers
        assert (tf32[name]["correct"] == fp32[name]["correct"]).all(), name
    out = capsys.readouterr().out
    assert "TF32 search check" in out and "searched in TF32" in out
    json.dumps({n: {k: v for k, v in e.items() if k != "correct"} for n, e in tf32.items()})


def test_a_tf32_search_that_disagrees_leaves_every_attack_in_fp32(trained, tf32_gpu):
    model, x, y = trained
    masked = PrecisionDependent(model, "mask")  # PGD searching in TF32 sees a zero gradient
    result = evaluate_suite(masked, x, y, ("pgd20", "cw"), eps=EPS, search="tf32")
    check = result["pgd20"]["tf32_check"]
    assert check["passed"] is False and check["points"] > 0.2 and check["tf32"] > check["fp32"]
    assert "every attack searches in fp32" in check["detail"]
    assert result["cw"]["search"] == "fp32"
    assert result["pgd20"]["value"] == check["fp32"]


def test_tf32_search_refuses_what_it_cannot_check(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="needs 'pgd20' among the attacks"):
        evaluate_suite(model, x, y, ("clean", "cw"), search="tf32")
    with pytest.raises(ValueError, match="search must be one of"):
        evaluate_suite(model, x, y, ("clean",), search="TF32")
    with pytest.raises(ValueError, match="two non-empty bool masks"):
        evaluate.check_search_precision(torch.ones(3, dtype=torch.bool), torch.ones(4))
    close = evaluate.check_search_precision(torch.ones(1000, dtype=torch.bool),
                                            torch.arange(1000) >= 2)
    assert close["passed"] is True and close["points"] == -0.2 and close["images_changed"] == 2
    assert evaluate.check_search_precision(torch.ones(1000, dtype=torch.bool),
                                           torch.arange(1000) >= 3)["passed"] is False
    # Level on accuracy, but TF32 misses 3 images in 1,000 that fp32 breaks (0.3 points),
    # made up for by 3 it breaks that fp32 does not: the misses alone fail the check.
    fp32 = torch.arange(1000) >= 500
    tf32 = fp32.clone()
    tf32[:3], tf32[-3:] = True, False
    level = evaluate.check_search_precision(fp32, tf32)
    assert level["points"] == 0 and level["missed_by_tf32"] == 3 and level["passed"] is False
    tf32[2], tf32[-1] = False, True  # two each way: within the rule
    assert evaluate.check_search_precision(fp32, tf32)["passed"] is True


def test_the_record_says_which_attacks_searched_in_tf32():
    fp32 = {"clean": {"search": "fp32"}, "pgd20": {"search": "fp32"}}
    assert evaluate.describe_precision(fp32) == evaluate.EVAL_PRECISION
    mixed = {**fp32, "autoattack": {"search": "tf32"}}
    text = evaluate.describe_precision(mixed)
    assert "search of AutoAttack in TF32" in text and "CW" not in text and "fp32" in text


def test_the_suites_seed_reaches_autoattack(trained, monkeypatch):
    """``evaluate_suite(seed=...)`` seeds every attack, AutoAttack too: torchattacks reseeds the
    global RNG inside each of its attacks, so the seed must be passed to it, not set around it."""
    model, x, y = trained
    seeds = []
    monkeypatch.setattr(evaluate, "autoattack_attack",
                        lambda model, x, y, *, eps, seed: seeds.append(seed) or x.clone())
    for seed in (0, 5):
        evaluate.evaluate_suite(model, x[:20], y[:20], attacks="autoattack", seed=seed)
    assert seeds == [0, 5]
    assert evaluate.standard_attacks(seed=7)["autoattack"].keywords["seed"] == 7


@pytest.mark.bad_input(cases=4)
def test_sanity_checks_refuse_step_and_eps_lists_they_cannot_judge(trained):
    """An empty or one-element step list compares nothing (it used to pass), and an unsorted
    list compares the wrong pairs; the eps sweep reads its last value as the largest budget."""
    model, x, y = trained
    for steps in ((), (5,), (5, 1)):
        with pytest.raises(ValueError, match="at least two step counts in increasing order"):
            check_more_steps(model, x[:8], y[:8], EPS, steps=steps)
    with pytest.raises(ValueError, match="eps_values must be in increasing order"):
        check_eps_sweep(model, x[:8], y[:8], (0, 64 / 255, 2 / 255))


@pytest.mark.bad_input(cases=3)
def test_labels_on_another_device_are_named(trained):
    """Labels on another device than the images (a GPU batch with CPU labels) get a clear error
    before any attack runs; the meta device stands in for a second device on a CPU."""
    model, x, y = trained
    y_elsewhere = torch.zeros(len(x[:4]), dtype=torch.long, device="meta")
    for call in (lambda: evaluate.accuracy(model, x[:4], y_elsewhere),
                 lambda: evaluate.robust_accuracy(model, x[:4], y_elsewhere,
                                                  evaluate.standard_attacks()["fgsm"]),
                 lambda: evaluate.evaluate_suite(model, x[:4], y_elsewhere, attacks="clean")):
        with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
            call()


# --------------------------------------------------------------------------------------------
# Verdicts at exactly the allowed slack, the eps sweep near the box, attack lists, seeds, dtypes
# --------------------------------------------------------------------------------------------

#: (n, the slack of one example or half a point, in images): 1/150 > 0.005, 1/200 == 0.005.
SLACKS = ((150, 1), (200, 1), (1000, 5), (2000, 10))


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 3, 2, 2), torch.zeros(n, dtype=torch.long)


def test_autoattack_gap_of_exactly_max_gap_passes_for_every_accuracy():
    """Accuracies are counts / n; a gap of exactly ``max_gap`` worth of images must pass
    whatever the counts, though ``0.4 - 0.35`` is 0.05000000000000002 in floats."""
    assert check_autoattack_gap(0.400, 0.350, n=1000)["passed"] is True
    for n, max_gap, images in ((100, 0.05, 5), (1000, 0.05, 50), (2000, 0.05, 100),
                               (1000, 0.1, 100), (1000, 0.25, 250)):
        for k in range(images, n + 1):
            at = check_autoattack_gap(k / n, (k - images) / n, max_gap=max_gap, n=n)
            assert at["passed"] is True, (n, k, at)
            if k > images:
                over = check_autoattack_gap(k / n, (k - images - 1) / n, max_gap=max_gap, n=n)
                assert over["passed"] is False and "overestimates" in over["detail"], (n, k)
    # AutoAttack above PGD-20 by exactly the slack is noise; one image more is a fault.
    for n, slack in SLACKS:
        for k in range(0, n - slack):
            assert check_autoattack_gap(k / n, (k + slack) / n, n=n)["passed"] is True, (n, k)
            weak = check_autoattack_gap(k / n, (k + slack + 1) / n, n=n)
            assert weak["passed"] is False and "did not run as configured" in weak["detail"]
    for k in range(0, 995):  # without n: half a point, as on 1,000 images
        assert check_autoattack_gap(k / 1000, (k + 5) / 1000)["passed"] is True, k
        assert check_autoattack_gap(k / 1000, (k + 6) / 1000)["passed"] is False, k


def test_curves_rising_by_exactly_the_slack_pass(monkeypatch):
    """More steps or a larger eps may raise accuracy by one example or half a point of n,
    exactly that much included; one image more fails."""
    curve: dict[tuple[float, int], float] = {}  # (eps, steps): accuracy
    monkeypatch.setattr(evaluate, "_pgd_accuracy",
                        lambda m, xb, yb, eps, steps, *a, **k: curve[eps, steps])
    model = TinyCNN()
    for n, slack in SLACKS:
        x, y = _images(n)
        for k in range(0, n - slack):
            for rise, passed in ((slack, True), (slack + 1, False)):
                curve.clear()
                curve.update({(EPS, 1): k / n, (EPS, 5): (k + rise) / n})
                result = check_more_steps(model, x, y, EPS, steps=(1, 5))
                assert result["passed"] is passed, (n, k, rise, result)
                curve.clear()
                curve.update({(0, 20): k / n, (1 / 255, 20): (k + rise) / n, (64 / 255, 20): 0.0})
                result = check_eps_sweep(model, x, y, (0, 1 / 255, 64 / 255))
                assert result["passed"] is passed, (n, k, rise, result)
    # The sweep's last accuracy must stay below max_final: exactly max_final fails.
    x, y = _images(1000)
    for final, passed in ((0.099, True), (0.1, False)):
        curve.clear()
        curve.update({(0, 20): 0.9, (64 / 255, 20): final})
        assert check_eps_sweep(model, x, y, (0, 64 / 255))["passed"] is passed, final


def test_square_below_pgd20_by_exactly_the_slack_passes(monkeypatch):
    model = TinyCNN()
    for n, slack in SLACKS:
        x, y = _images(n)
        for k in range(slack + 1, n + 1):
            for below, passed in ((slack, True), (slack + 1, False)):
                monkeypatch.setattr(evaluate, "robust_accuracy",
                                    lambda *a, v=(k - below) / n, **kw: v)
                result = check_black_box_weaker(model, x, y, EPS, n_queries=1, pgd_acc=k / n)
                assert result["passed"] is passed, (n, k, below, result)


def test_tf32_missing_exactly_the_rule_passes_for_every_accuracy():
    """TF32 may lie exactly PRECISION_RULE_POINTS from fp32 (and miss that many images),
    whatever the accuracy; one image more fails."""
    for n, allowed in ((500, 1), (1000, 2), (5000, 10)):
        for k in range(allowed + 1, n - allowed - 1, max(1, n // 197)):
            fp32 = torch.arange(n) < k
            for missed, passed in ((allowed, True), (allowed + 1, False)):
                flattered = evaluate.check_search_precision(fp32, torch.arange(n) < k + missed)
                assert flattered["passed"] is passed, (n, k, missed, flattered)
                assert flattered["missed_by_tf32"] == missed
                stronger = evaluate.check_search_precision(fp32, torch.arange(n) < k - missed)
                assert stronger["passed"] is passed, (n, k, missed, stronger)


def test_eps_sweep_is_strictly_increasing_for_any_radius():
    """Capping at 1 must not repeat 1.0: check_eps_sweep refuses a list that is not increasing."""
    assert eps_sweep_of(0.3) == [0.0, 0.075, 0.15, 0.3, 0.6, 1.0]
    assert eps_sweep_of(1.0) == [0.0, 0.25, 0.5, 1.0]
    assert eps_sweep_of(0.125) == [0.0, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0]
    assert eps_sweep_of(EVAL_EPS) == [EVAL_EPS * f for f in (0, 0.25, 0.5, 1, 2, 4, 8)]
    for eps in [i / 1000 for i in range(1, 1001)] + [i / 255 for i in range(1, 256)]:
        sweep = eps_sweep_of(eps)
        assert sweep[0] == 0.0 and eps in sweep and sweep[-1] == min(8 * eps, 1.0), eps
        assert all(a < b for a, b in zip(sweep, sweep[1:], strict=False)), (eps, sweep)


def eps_sweep_of(eps: float) -> list[float]:
    return evaluate.eps_sweep(eps)


@pytest.mark.parametrize("eps", [0.3, 0.5, 1.0])
def test_sanity_checks_run_at_any_radius_up_to_the_box(trained, eps):
    """sanity_checks at eps up to 1 used to stop in check_eps_sweep on its own capped list."""
    model, x, y = trained
    result = sanity_checks(model, x[:8], y[:8], eps=eps, n_queries=2, autoattack=0.0)
    sweep = result["eps_sweep"]["eps"]
    assert sweep[-1] == 1.0 and len(set(sweep)) == len(sweep), sweep
    assert result["eps_sweep"]["passed"] is True, result["eps_sweep"]


def test_sanity_checks_at_a_large_radius_with_autoattack(trained, fast_autoattack):
    model, x, y = trained
    result = sanity_checks(model, x[:8], y[:8], eps=0.3, n_queries=2)
    assert result["eps_sweep"]["eps"] == [0.0, 0.075, 0.15, 0.3, 0.6, 1.0]
    assert result["autoattack_gap"]["autoattack"] == 0.0


def test_an_attack_listed_twice_is_refused_before_any_work(trained, monkeypatch):
    """Each attack runs once: a repeated name (AutoAttack takes hours) is a mistake, not a rerun."""
    model, x, y = trained

    def no_work(*a, **k):
        raise AssertionError("an attack ran before the attack list was checked")

    monkeypatch.setattr(evaluate, "_correct", no_work)
    for attacks_, name in (("pgd20,pgd20,pgd20", "pgd20"), (["clean", "fgsm", "clean"], "clean"),
                           (("autoattack", " autoattack"), "autoattack")):
        with pytest.raises(ValueError, match=f"attack '{name}' listed twice in"):
            evaluate_suite(model, x, y, attacks=attacks_)
    assert evaluate.parse_attacks("clean, pgd20") == ["clean", "pgd20"]
    assert evaluate.parse_attacks(("cw",)) == ["cw"]


SEED_CALLS = {
    "evaluate_suite": lambda m, x, y, s: evaluate_suite(m, x, y, attacks="pgd20", seed=s),
    "standard_attacks": lambda m, x, y, s: standard_attacks(seed=s),
    "sanity_checks": lambda m, x, y, s: sanity_checks(m, x, y, eps=EPS, seed=s, autoattack=0.0),
    "check_more_steps": lambda m, x, y, s: check_more_steps(m, x, y, EPS, seed=s),
    "check_eps_sweep": lambda m, x, y, s: check_eps_sweep(m, x, y, seed=s),
    "check_black_box_weaker": lambda m, x, y, s: check_black_box_weaker(m, x, y, EPS, seed=s),
    "check_zero_gradients": lambda m, x, y, s: check_zero_gradients(m, x, y, EPS, seed=s),
    "check_deterministic": lambda m, x, y, s: check_deterministic(m, x, y, seed=s),
    "check_gradient_signs": lambda m, x, y, s: check_gradient_signs(m, x, y, EPS, seed=s),
    "seeded": lambda m, x, y, s: evaluate.seeded(s, x.device).__enter__(),
}


@pytest.mark.parametrize("name", sorted(SEED_CALLS))
def test_seeds_beyond_63_bits_are_named(trained, name, monkeypatch):
    """torch.manual_seed refuses 2**64 with "Overflow when unpacking long long", naming no
    argument; every public function that takes a seed says which one, as TrainConfig does."""
    model, x, y = trained
    monkeypatch.setattr(evaluate, "_correct", lambda *a, **k: pytest.fail("work began"))
    for seed in (2**64, 2**63, -1):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got "
                                             + str(seed)):
            SEED_CALLS[name](model, x[:4], y[:4], seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        SEED_CALLS[name](model, x[:4], y[:4], 1.0)


def test_the_largest_seed_is_accepted(trained):
    model, x, y = trained
    result = evaluate_suite(model, x[:8], y[:8], attacks="pgd20", seed=2**63 - 1, eps=EPS)
    assert 0.0 <= result["pgd20"]["value"] <= 1.0


def test_autoattack_on_a_float64_model_says_it_runs_in_float32(trained, monkeypatch):
    """torchattacks' FAB works in float32 whatever it is given; a float64 model failed deep inside
    it with a message about float32 images the caller never passed."""
    import copy

    model, x, y = trained
    wide = copy.deepcopy(model).double()
    monkeypatch.setattr(evaluate, "_correct", lambda *a, **k: pytest.fail("work began"))
    for call in (lambda: evaluate_suite(wide, x[:8].double(), y[:8], attacks="clean,autoattack"),
                 lambda: evaluate_suite(wide, x[:8].double(), y[:8], attacks=("autoattack",)),
                 lambda: sanity_checks(wide, x[:8].double(), y[:8], eps=EPS, pgd20=0.5)):
        with pytest.raises(ValueError, match=r"AutoAttack \(torchattacks\) runs in float32.*"
                                             r"torch\.float64.*\.float\(\)"):
            call()


def test_a_float64_model_is_evaluated_without_autoattack(trained):
    import copy

    model, x, y = trained
    wide = copy.deepcopy(model).double()
    result = evaluate_suite(wide, x[:16].double(), y[:16], attacks="clean,fgsm,pgd20", eps=EPS)
    assert result["clean"]["value"] == pytest.approx(manual_accuracy(model, x[:16], y[:16]))


def test_the_suites_docstring_states_both_conditions_of_the_tf32_rule():
    """check_search_precision passes on two conditions; the suite's docstring names both."""
    doc = " ".join(evaluate.evaluate_suite.__doc__.split())
    assert "accuracies agree within :data:`PRECISION_RULE_POINTS` points" in doc
    assert ("the images TF32 misses (robust to its search, broken by fp32's), counted on their "
            "own, are at most :data:`PRECISION_RULE_POINTS` percent of the ``n`` images") in doc
