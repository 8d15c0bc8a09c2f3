"""Tests for anchor_lib.losses: SupCon, ANCHOR's hard-positive weights and loss, TRADES.

Expected values come from arithmetic written out here (math.exp / math.log) or from a
pure-Python loop over the DESIGN §3 formula, never from the implementation under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor_lib.losses import (
    _logits_and_positives,
    _weighted_supcon,
    anchor_loss,
    hard_positive_weights,
    supcon_loss,
    trades_kl,
    trades_loss,
)


def unit_vectors(degrees: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 2) unit vectors at the given angles."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).to(dtype)


def random_z(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def reference_loss(z: torch.Tensor, labels: torch.Tensor, tau: float, beta: float) -> float:
    """DESIGN §3 in plain Python: loops over anchors and positives, no torch arithmetic."""
    rows, lab = z.tolist(), labels.tolist()
    n = len(rows)
    s = [[sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) for j in range(n)]
         for i in range(n)]
    terms = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and lab[p] == lab[i]]
        if not pos:
            continue
        log_den = math.log(sum(math.exp(s[i][a] / tau) for a in range(n) if a != i))
        e = [math.exp(-beta * s[i][p] / tau) for p in pos]
        w = [len(pos) * x / sum(e) for x in e]
        terms.append(-sum(wp * (s[i][p] / tau - log_den) for wp, p in zip(w, pos, strict=True))
                     / len(pos))
    return sum(terms) / len(terms) if terms else 0.0


# ----------------------------------------------------------------------------------------------
# Hand-computed values.
# ----------------------------------------------------------------------------------------------

# Four unit vectors at 0, 60, 120 and 270 degrees; labels [0, 0, 0, 1]. Anchors 0-2 have two
# positives each, anchor 3 has none (skipped). Similarities s_ij = cos(angle_i - angle_j):
#   s01 = 0.5, s02 = -0.5, s03 = 0, s12 = 0.5, s13 = -sqrt(3)/2, s23 = -sqrt(3)/2.
HAND_Z = unit_vectors([0.0, 60.0, 120.0, 270.0])
HAND_LABELS = torch.tensor([0, 0, 0, 1])
TAU, BETA = 0.5, 1.0
R3 = math.sqrt(3) / 2


def test_supcon_hand_computed() -> None:
    # Denominators sum_{a != i} exp(s_ia / tau), tau = 0.5:
    d0 = math.exp(0.5 / TAU) + math.exp(-0.5 / TAU) + math.exp(0.0 / TAU)
    d1 = math.exp(0.5 / TAU) + math.exp(0.5 / TAU) + math.exp(-R3 / TAU)
    d2 = math.exp(-0.5 / TAU) + math.exp(0.5 / TAU) + math.exp(-R3 / TAU)
    # loss_i = -(1/2) * sum_p (s_ip / tau - log d_i)
    l0 = -0.5 * ((0.5 / TAU - math.log(d0)) + (-0.5 / TAU - math.log(d0)))
    l1 = -0.5 * ((0.5 / TAU - math.log(d1)) + (0.5 / TAU - math.log(d1)))
    l2 = -0.5 * ((-0.5 / TAU - math.log(d2)) + (0.5 / TAU - math.log(d2)))
    expected = (l0 + l1 + l2) / 3  # anchor 3 has no positive
    got = supcon_loss(HAND_Z, HAND_LABELS, temperature=TAU)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(reference_loss(HAND_Z, HAND_LABELS, TAU, 0.0), rel=1e-6)


def test_anchor_hand_computed() -> None:
    d0 = math.exp(0.5 / TAU) + math.exp(-0.5 / TAU) + math.exp(0.0 / TAU)
    d1 = math.exp(0.5 / TAU) + math.exp(0.5 / TAU) + math.exp(-R3 / TAU)
    d2 = math.exp(-0.5 / TAU) + math.exp(0.5 / TAU) + math.exp(-R3 / TAU)
    # w_ip = |P(i)| * exp(-beta s_ip / tau) / sum_q exp(-beta s_iq / tau)
    e_near, e_far = math.exp(-BETA * 0.5 / TAU), math.exp(-BETA * -0.5 / TAU)  # s = 0.5, -0.5
    w01 = 2 * e_near / (e_near + e_far)
    w02 = 2 - w01  # the less similar positive (s02 = -0.5) gets the larger weight
    w10 = w12 = 1.0  # s10 == s12: equally hard
    w20, w21 = w02, w01
    l0 = -0.5 * (w01 * (0.5 / TAU - math.log(d0)) + w02 * (-0.5 / TAU - math.log(d0)))
    l1 = -0.5 * (w10 * (0.5 / TAU - math.log(d1)) + w12 * (0.5 / TAU - math.log(d1)))
    l2 = -0.5 * (w20 * (-0.5 / TAU - math.log(d2)) + w21 * (0.5 / TAU - math.log(d2)))
    expected = (l0 + l1 + l2) / 3
    got = anchor_loss(HAND_Z, HAND_LABELS, temperature=TAU, beta=BETA)
    assert got.item() == pytest.approx(expected, rel=1e-6)

    w = hard_positive_weights(HAND_Z, HAND_LABELS, temperature=TAU, beta=BETA)
    expected_w = torch.tensor([[0, w01, w02, 0], [w10, 0, w12, 0], [w20, w21, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(w, expected_w)
    # Mining moves weight onto the s = -0.5 pairs, whose log-ratio is lowest: the loss grows.
    assert got.item() > supcon_loss(HAND_Z, HAND_LABELS, temperature=TAU).item()


def test_pairs_of_views_weights_are_one() -> None:
    # Labels [0, 0, 1, 1]: each anchor has a single positive, so its weight is 1 for any beta.
    z, labels = unit_vectors([0.0, 30.0, 150.0, 200.0]), torch.tensor([0, 0, 1, 1])
    for beta in (0.0, 0.5, 2.0):
        w = hard_positive_weights(z, labels, beta=beta)
        pairs = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
        assert torch.equal(w, pairs)
        torch.testing.assert_close(anchor_loss(z, labels, beta=beta), supcon_loss(z, labels))


# ----------------------------------------------------------------------------------------------
# Properties of the losses.
# ----------------------------------------------------------------------------------------------


def test_beta_zero_is_supcon_exactly() -> None:
    z, labels = random_z(24, 8), torch.arange(24) % 5
    assert torch.equal(anchor_loss(z, labels, 0.2, beta=0.0), supcon_loss(z, labels, 0.2))
    # Uniform weights are exactly 1 on P(i), not merely close to it.
    w = hard_positive_weights(z, labels, 0.2, beta=0.0)
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(24, dtype=torch.bool)
    assert torch.equal(w, pos.float())
    assert supcon_loss(z, labels, 0.2).item() == pytest.approx(
        reference_loss(z, labels, 0.2, 0.0), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_permutation_invariance(beta: float) -> None:
    z, labels = random_z(12, 4, seed=1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 3, 1, 1, 2])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(anchor_loss(z[perm], labels[perm], beta=beta),
                               anchor_loss(z, labels, beta=beta))
    # The weights permute with the rows and columns.
    w = hard_positive_weights(z, labels, beta=beta)
    torch.testing.assert_close(hard_positive_weights(z[perm], labels[perm], beta=beta),
                               w[perm][:, perm])


def test_anchor_without_positive_is_skipped_and_finite() -> None:
    z = random_z(5, 3, seed=3).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2])  # anchor 4 has no positive
    for fn in (lambda: supcon_loss(z, labels), lambda: anchor_loss(z, labels, beta=1.0)):
        loss = fn()
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grad).all()
    # Skipped means "not averaged in", not "counted as 0": equals the mean over anchors 0-3.
    assert anchor_loss(z, labels).item() == pytest.approx(
        reference_loss(z.detach(), labels, 0.1, 1.0), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_all_singletons_give_zero_with_a_graph(n: int) -> None:
    z = random_z(n, 4, seed=4).requires_grad_()
    labels = torch.arange(n)
    for loss in (supcon_loss(z, labels), anchor_loss(z, labels, beta=2.0)):
        assert loss.item() == 0.0
        assert loss.requires_grad
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grad).all() and torch.all(grad == 0)
    assert torch.equal(hard_positive_weights(z, labels), torch.zeros(n, n))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype,expected", [(torch.float16, torch.float32),
                                            (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float32),
                                            (torch.float64, torch.float64)])
def test_the_loss_is_float32_or_float64_for_every_batch_size(n, dtype, expected) -> None:
    """A half-precision z gives a float32 loss, a single row included (its zero too)."""
    z, labels = random_z(n, 4, seed=6).to(dtype), torch.tensor([0, 0, 1][:n])
    assert supcon_loss(z, labels).dtype == expected
    assert anchor_loss(z, labels, beta=1.0).dtype == expected


def test_least_similar_positive_gets_largest_weight() -> None:
    z, labels = random_z(30, 6, seed=5), torch.arange(30) % 3
    w = hard_positive_weights(z, labels, temperature=0.1, beta=1.0)
    sim = z @ z.T
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(30, dtype=torch.bool)
    hardest = sim.masked_fill(~pos, math.inf).argmin(dim=1)
    assert torch.equal(w.argmax(dim=1), hardest)
    # and weights fall as similarity rises, within each row's positives
    for i in range(30):
        order = sim[i][pos[i]].argsort()
        assert torch.all(w[i][pos[i]][order].diff() < 0)


def test_weights_detached_nonnegative_and_rows_sum_to_positive_count() -> None:
    z = random_z(20, 5, seed=6).requires_grad_()
    labels = torch.tensor([0] * 7 + [1] * 6 + [2] * 4 + [3, 4, 4])
    w = hard_positive_weights(z, labels, beta=1.5)
    assert not w.requires_grad and w.grad_fn is None
    assert w.shape == (20, 20) and w.dtype == torch.float32
    assert torch.all(w >= 0) and torch.all(w.diagonal() == 0)
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(20, dtype=torch.bool)
    assert torch.all(w[~pos] == 0)
    torch.testing.assert_close(w.sum(dim=1), pos.sum(dim=1).float())


def test_larger_beta_concentrates_weight_on_hardest_positive() -> None:
    # tau = 1 keeps float32 weights away from saturation (max weight == |P(i)|) over this range.
    z, labels = random_z(16, 4, seed=7), torch.arange(16) % 2
    betas = (0.0, 0.5, 1.0, 2.0, 4.0)
    top = [hard_positive_weights(z, labels, 1.0, beta=b).max(dim=1).values for b in betas]
    for lower, higher in zip(top, top[1:], strict=False):
        assert torch.all(higher > lower)
    n_pos = 7.0
    assert torch.all(top[0] == 1.0) and torch.all(top[-1] < n_pos)
    # At tau = 0.1, beta = 8 the hardest positive takes most of each row's weight.
    hard = hard_positive_weights(z, labels, 0.1, beta=8.0).max(dim=1).values
    assert torch.all(hard > 0.5 * n_pos) and torch.all(hard <= n_pos)


def test_gradcheck_supcon_float64() -> None:
    raw = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda x: supcon_loss(F.normalize(x, dim=1), labels, 0.5),
                                    (raw.requires_grad_(),))


def test_gradcheck_anchor_treats_weights_as_constants() -> None:
    z0 = random_z(6, 3, seed=9, dtype=torch.float64)
    labels, tau = torch.tensor([0, 0, 0, 1, 1, 2]), 0.5
    weights = hard_positive_weights(z0, labels, tau, beta=1.0)
    assert weights.dtype == torch.float64  # float64 input is not demoted to float32

    def with_frozen_weights(z: torch.Tensor) -> torch.Tensor:
        logits, pos = _logits_and_positives(z, labels, tau)
        return _weighted_supcon(logits, pos, weights)

    z = z0.clone().requires_grad_()
    assert torch.autograd.gradcheck(with_frozen_weights, (z,))
    # anchor_loss's gradient is exactly that: no gradient flows through the mining weights.
    (g_anchor,) = torch.autograd.grad(anchor_loss(z, labels, tau, beta=1.0), z)
    (g_frozen,) = torch.autograd.grad(with_frozen_weights(z), z)
    torch.testing.assert_close(g_anchor, g_frozen)


def test_bf16_autocast_computes_in_float32() -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(10))
    head = torch.nn.Linear(8, 4)
    labels = torch.arange(16) % 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.normalize(head(x), dim=1)
        assert z.dtype == torch.bfloat16
        loss = anchor_loss(z, labels, beta=1.0)  # a bf16-rounded z passes the norm check
        w = hard_positive_weights(z, labels)
    assert loss.dtype == torch.float32 and w.dtype == torch.float32
    expected = anchor_loss(z.float(), labels, beta=1.0, validate=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 4), n_classes=st.integers(1, 4),
       beta=st.sampled_from([0.0, 0.5, 1.0, 3.0]), tau=st.sampled_from([0.07, 0.1, 0.5, 1.0]),
       seed=st.integers(0, 2**16))
def test_property_matches_reference_nonnegative_and_permutation_invariant(
        n: int, d: int, n_classes: int, beta: float, tau: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    loss = anchor_loss(z, labels, tau, beta=beta)
    assert torch.isfinite(loss) and loss.item() >= 0.0
    assert loss.item() == pytest.approx(reference_loss(z, labels, tau, beta), rel=1e-9, abs=1e-12)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(anchor_loss(z[perm], labels[perm], tau, beta=beta), loss)


# ----------------------------------------------------------------------------------------------
# TRADES.
# ----------------------------------------------------------------------------------------------


def test_trades_equals_ce_when_adv_equals_clean() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(11))
    y = torch.arange(8)
    assert torch.equal(trades_loss(logits, logits.clone(), y), F.cross_entropy(logits, y))


def test_trades_is_at_least_ce_and_matches_official_formula() -> None:
    g = torch.Generator().manual_seed(12)
    clean, adv = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(clean, y)
    loss = trades_loss(clean, adv, y, beta=6.0)
    assert loss.item() > ce.item()
    # Official TRADES: KLDivLoss(size_average=False)(log_softmax(adv), softmax(clean)) / batch_size
    official_kl = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(adv, dim=1),
                                                      F.softmax(clean, dim=1)) / 8
    torch.testing.assert_close(loss, ce + 6.0 * official_kl)
    per_example = trades_kl(clean, adv, reduction="none")
    assert per_example.shape == (8,) and torch.all(per_example >= 0)
    torch.testing.assert_close(trades_kl(clean, adv), per_example.sum())  # default: summed
    torch.testing.assert_close(trades_kl(clean, adv, reduction="batchmean"), official_kl)


def test_trades_kl_inner_max_gradient_reaches_adv_only() -> None:
    g = torch.Generator().manual_seed(13)
    clean = torch.randn(4, 5, generator=g).requires_grad_()
    adv = torch.randn(4, 5, generator=g).requires_grad_()
    trades_kl(clean.detach(), adv).backward()
    assert clean.grad is None and torch.isfinite(adv.grad).all() and adv.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------

LossFn = Callable[..., torch.Tensor]
GOOD_Z, GOOD_LABELS = random_z(4, 3), torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("fn", [supcon_loss, anchor_loss, hard_positive_weights])
@pytest.mark.parametrize(("z", "labels", "kwargs", "match"), [
    (GOOD_Z[0], GOOD_LABELS, {}, r"shape \(N, d\)"),
    (GOOD_Z[None], GOOD_LABELS, {}, r"shape \(N, d\)"),
    (GOOD_Z[:0], GOOD_LABELS[:0], {}, r"N >= 1"),
    (GOOD_Z.double().long(), GOOD_LABELS, {}, r"float tensor"),
    (torch.full((4, 3), math.nan), GOOD_LABELS, {}, r"NaN or Inf"),
    (GOOD_Z, GOOD_LABELS[:3], {}, r"labels must have shape \(4,\)"),
    (GOOD_Z, GOOD_LABELS.float(), {}, r"integer tensor"),
    (GOOD_Z, GOOD_LABELS, {"temperature": 0.0}, r"temperature must be a finite number > 0"),
    (GOOD_Z, GOOD_LABELS, {"temperature": -0.1}, r"temperature must be a finite number > 0"),
    (GOOD_Z, GOOD_LABELS, {"temperature": math.inf}, r"temperature must be a finite number > 0"),
    (2 * GOOD_Z, GOOD_LABELS, {}, r"L2-normalised rows.*F\.normalize"),
])
def test_bad_contrastive_input_raises(fn: LossFn, z: torch.Tensor, labels: torch.Tensor,
                                      kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(z, labels, **kwargs)


@pytest.mark.parametrize("fn", [anchor_loss, hard_positive_weights])
def test_negative_beta_rejected(fn: LossFn) -> None:
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0.*easy positives"):
        fn(GOOD_Z, GOOD_LABELS, beta=-0.5)


def test_non_tensor_and_non_number_raise_type_error() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        anchor_loss(GOOD_Z.tolist(), GOOD_LABELS)
    with pytest.raises(TypeError, match="temperature must be a number"):
        anchor_loss(GOOD_Z, GOOD_LABELS, temperature="0.1")


def test_validate_false_skips_value_checks_only() -> None:
    # The value checks (finite, unit norm) cost a host sync and can be skipped ...
    assert torch.isfinite(anchor_loss(2 * GOOD_Z, GOOD_LABELS, validate=False))
    # ... but the free shape / hyper-parameter checks always run.
    with pytest.raises(ValueError, match="labels must have shape"):
        anchor_loss(GOOD_Z, GOOD_LABELS[:3], validate=False)
    with pytest.raises(ValueError, match="beta"):
        anchor_loss(GOOD_Z, GOOD_LABELS, beta=-1.0, validate=False)


@pytest.mark.parametrize(("clean", "adv", "y", "kwargs", "match"), [
    (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), {}, r"\[0, 2\]"),
    (torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), {}, "shape"),
    (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), {}, r"shape \(4,\)"),
    (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4), {}, "integer tensor"),
    (torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.long), {}, r"\(N, C\)"),
    (torch.full((4, 3), math.nan), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {}, "NaN"),
    (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {"beta": -1.0},
     "beta must be a finite number >= 0"),
])
def test_bad_trades_input_raises(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor,
                                 kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        trades_loss(clean, adv, y, **kwargs)


def test_bad_trades_kl_reduction_raises() -> None:
    with pytest.raises(ValueError, match="reduction"):
        trades_kl(torch.zeros(2, 3), torch.zeros(2, 3), reduction="mean")


# ----------------------------------------------------------------------------------------------
# Gaps a mutation run found (2026-11-27): each test below fails for a changed line of losses.py
# that every other test let through.
# ----------------------------------------------------------------------------------------------


def test_one_unnormalised_row_among_normalised_ones_is_refused() -> None:
    """The check looks at the worst row, not a typical one; its tolerance is 1e-3 in float32."""
    z = random_z(6, 3).clone()
    z[4] *= 1.0015   # off by 1.5e-3: over the tolerance
    with pytest.raises(ValueError, match=r"a row is off by 0\.0015"):
        anchor_loss(z, torch.tensor([0, 0, 1, 1, 2, 2]))
    z = random_z(6, 3).clone()
    z[4] *= 1.0005   # off by 5e-4: float32 rounding of a normalised row is far smaller, but passes
    assert torch.isfinite(anchor_loss(z, torch.tensor([0, 0, 1, 1, 2, 2])))


def test_the_functions_defaults_are_the_trainers() -> None:
    """Called without knobs, the losses compute what TrainConfig trains with (DESIGN §3)."""
    from anchor_lib.train import TrainConfig
    cfg = TrainConfig()
    z, labels = random_z(12, 4, seed=3), torch.arange(12) % 3
    torch.testing.assert_close(
        anchor_loss(z, labels), anchor_loss(z, labels, cfg.temperature, beta=cfg.beta))
    torch.testing.assert_close(hard_positive_weights(z, labels),
                               hard_positive_weights(z, labels, cfg.temperature, beta=cfg.beta))
    torch.testing.assert_close(supcon_loss(z, labels), supcon_loss(z, labels, cfg.temperature))
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    y = torch.tensor([0, 3, 9, 1, 1])
    torch.testing.assert_close(trades_loss(clean, adv, y),
                               trades_loss(clean, adv, y, beta=cfg.trades_beta))
    assert cfg.trades_beta == 6.0   # the TRADES paper's CIFAR-10 value (the baseline)


def test_trades_kl_validates_by_default() -> None:
    with pytest.raises(ValueError, match="NaN"):
        trades_kl(torch.full((2, 3), math.nan), torch.zeros(2, 3))


def test_a_batch_of_one_is_a_batch() -> None:
    """N = 1 and C = 1 are shapes like any other (only N = 0 or C = 0 is refused)."""
    clean, adv = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0.0, 1.0, 0.5]])
    expected = F.cross_entropy(clean, torch.tensor([2])) + 6.0 * F.kl_div(
        F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="sum")
    torch.testing.assert_close(trades_loss(clean, adv, torch.tensor([2])), expected)
    assert trades_kl(torch.zeros(3, 1), torch.ones(3, 1)).item() == 0.0   # one class: no KL
    for shape in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match=r"N, C >= 1"):
            trades_kl(torch.zeros(shape), torch.zeros(shape))


@pytest.mark.parametrize("fn", [anchor_loss, hard_positive_weights])
def test_scales_that_would_overflow_are_refused_not_nan(fn):
    z = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match=r"beta / temperature must be at most .* got 1e\+39"):
        fn(z, labels, beta=1e38, validate=False)
    with pytest.raises(ValueError, match=r"1 / temperature must be at most"):
        fn(z, labels, temperature=1e-39)
    # float64 has room for what float32 has not
    assert torch.isfinite(fn(z.double(), labels, beta=1e38)).all()
    # large but representable: a finite answer
    assert torch.isfinite(fn(z, labels, beta=1e17)).all()


def test_supcon_refuses_a_temperature_whose_inverse_overflows():
    z = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    with pytest.raises(ValueError, match="1 / temperature"):
        supcon_loss(z, torch.tensor([0, 0, 1, 1]), temperature=1e-39)
