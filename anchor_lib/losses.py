"""Losses: supervised contrastive (SupCon), ANCHOR's hard-positive-mined SupCon, and TRADES.

One idea, top to bottom: every contrastive loss here is the same sum over an anchor's positives::

    loss_i = -(1/|P(i)|) * sum_{p in P(i)} w_ip
                 * log( exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau) ),

averaged over the anchors i that have at least one positive. ``s_ip = z_i . z_p`` is the cosine
similarity of L2-normalised embeddings and ``P(i)`` is every *other* row with the same label.
SupCon (Khosla et al., 2020, "Supervised Contrastive Learning", the L_out form) is the special case
``w_ip = 1``; ANCHOR (arXiv 2510.27599, as this book reads it, chapter 4) mines hard positives with::

    w_ip = |P(i)| * softmax_{p in P(i)}( -beta * s_ip / tau ),   detached,

so the least similar positives weigh most, each row's weights sum to ``|P(i)|`` (mean weight 1;
the loss value still grows with beta, so values at different beta do not compare, see chapter 4)
and ``beta = 0`` gives ``w_ip = 1``, i.e. SupCon exactly.

TRADES (Zhang et al., 2019) is here too because it is the other loss the trainer composes:
``CE(clean) + beta * KL(softmax(clean) || softmax(adv))``.

Conventions: ``z`` is ``(N, d)`` and already L2-normalised (several views of one
image are rows with the same label); bad input raises ``ValueError`` saying what was expected
(``TypeError`` when an argument is not a tensor or not a number).
Similarities are computed in float32 (float64 stays float64) with autocast switched off, so the
losses behave the same in fp32 and under bf16 autocast, on CPU and CUDA.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

__all__ = ["supcon_loss", "hard_positive_weights", "anchor_loss", "trades_kl", "trades_loss"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --------------------------------------------------------------------------------------------
# Validation. Shape / dtype / hyper-parameter checks read only metadata and always run. Checks
# that read tensor values (finite, unit norm, label range) need one device-to-host copy, so they
# are combined into a single sync and can be skipped with ``validate=False`` in a hot loop.
# --------------------------------------------------------------------------------------------


def _check_hyper(value: object, name: str, *, positive: bool, hint: str = "") -> float:
    """A finite Python number that is > 0 (``positive``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        op = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {op}, got {value!r}{hint}")
    return value


def _check_scale(temperature: float, beta: float, z: torch.Tensor) -> None:
    """1/tau and beta/tau small enough that the scaled similarities stay finite in z's dtype.

    Far beyond any useful value (1.8e19 in float32), the bound leaves room for the sums over N
    rows; past it the loss would come back NaN rather than fail.
    """
    limit = torch.finfo(torch.promote_types(z.dtype, torch.float32)).max ** 0.5
    for name, scale in (("1 / temperature", 1.0 / temperature), ("beta / temperature",
                                                                   beta / temperature)):
        if scale > limit:
            raise ValueError(f"{name} must be at most {limit:.3g} for {z.dtype} embeddings, got "
                             f"{scale:.3g} (temperature={temperature!r}, beta={beta!r}); "
                             "expected values of moderate size, e.g. temperature 0.1, beta <= 10")


def _check_embeddings(z: object, labels: object, *, validate: bool) -> None:
    """z: float (N, d), N >= 1, finite, rows of unit L2 norm; labels: integer (N,) on z's device."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (N, d), got {type(z).__name__}")
    if not z.is_floating_point():
        raise ValueError("z must be a float tensor of L2-normalised embeddings, "
                         f"got dtype {z.dtype}")
    if z.dim() != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"z must have shape (N, d) with N >= 1 and d >= 1, got {tuple(z.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError("labels must be a torch.Tensor of class indices, "
                        f"got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise ValueError("labels must be an integer tensor of class indices, "
                         f"got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"labels must have shape ({z.shape[0]},) to match z's {z.shape[0]} rows, "
                         f"got {tuple(labels.shape)}")
    if labels.device != z.device:
        raise ValueError(f"labels must be on z's device ({z.device}), got {labels.device}")
    if not validate:
        return
    with torch.no_grad():
        z32 = z.detach().to(torch.promote_types(z.dtype, torch.float32))
        norm_error = (torch.linalg.vector_norm(z32, dim=1) - 1.0).abs().max()
        finite, norm_error = torch.stack([torch.isfinite(z32).all().to(z32.dtype),
                                          norm_error]).tolist()  # the one host sync
    if not finite:
        raise ValueError("z contains NaN or Inf values; expected finite L2-normalised embeddings")
    # 1e-3 in float32; a low-precision z (bf16 under autocast) can only be unit-norm up to its
    # rounding, so the tolerance grows to that dtype's machine epsilon.
    tol = max(1e-3, torch.finfo(z.dtype).eps)
    if norm_error > tol:
        raise ValueError(f"z must have L2-normalised rows (|norm - 1| <= {tol:g}), but a row is "
                         f"off by {norm_error:.4g}; pass F.normalize(z, dim=1) (the losses never "
                         "renormalise silently)")


def _check_logits(logits_clean: object, logits_adv: object, y: object | None,
                  *, validate: bool) -> None:
    """Both logits float (N, C) of one shape; y integer (N,) in [0, C)."""
    for name, t in (("logits_clean", logits_clean), ("logits_adv", logits_adv)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, C), "
                            f"got {type(t).__name__}")
        if not t.is_floating_point() or t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must be a float tensor of shape (N, C) with N, C >= 1, got "
                             f"dtype {t.dtype} and shape {tuple(t.shape)}")
    assert isinstance(logits_clean, torch.Tensor) and isinstance(logits_adv, torch.Tensor)
    if logits_adv.device != logits_clean.device:
        raise ValueError(f"logits_adv must be on logits_clean's device ({logits_clean.device}), "
                         f"got {logits_adv.device}")
    if logits_adv.shape != logits_clean.shape:
        raise ValueError(f"logits_adv must have logits_clean's shape {tuple(logits_clean.shape)}, "
                         f"got {tuple(logits_adv.shape)}")
    n, c = logits_clean.shape
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
        if y.dtype not in _INT_DTYPES:
            raise ValueError(f"y must be an integer tensor of class indices, got dtype {y.dtype}")
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},) to match the logits, got {tuple(y.shape)}")
        if y.device != logits_clean.device:
            raise ValueError(f"y must be on the logits' device ({logits_clean.device}), "
                             f"got {y.device}")
    if not validate:
        return
    with torch.no_grad():
        flags = [torch.isfinite(logits_clean).all(), torch.isfinite(logits_adv).all()]
        if y is not None:
            flags += [(y >= 0).all() & (y < c).all()]
        ok = torch.stack(flags).tolist()  # the one host sync
    if not (ok[0] and ok[1]):
        raise ValueError("logits contain NaN or Inf values; expected finite logits")
    if y is not None and not ok[2]:
        raise ValueError(f"y must hold class indices in [0, {c - 1}] for {c} logits per example")


# --------------------------------------------------------------------------------------------
# Contrastive losses.
# --------------------------------------------------------------------------------------------


def _logits_and_positives(z: torch.Tensor, labels: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity logits ``s_ij / tau`` (N, N) in >= float32, and the positive mask (N, N) bool.

    Call with autocast disabled: under bf16 autocast a float32 matmul would run in bf16 again.
    """
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    logits = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    # P(i): every other row with i's label (its own other views included).
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    return logits, pos_mask


def _mining_weights(logits: torch.Tensor, pos_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """w_ip = |P(i)| * softmax_{p in P(i)}(-beta * logits_ip), zero off P(i); no gradient.

    Written as ``e_ip * |P(i)| / sum_p e_ip`` with ``e = exp(x - rowmax)`` so that beta = 0 gives
    e = 1 and weights of exactly 1.0 (hence anchor_loss(beta=0) == supcon_loss bit for bit).
    """
    logits = logits.detach()  # mining chooses the weights; it is not trained through
    x = (-beta * logits).masked_fill(~pos_mask, -math.inf)
    has_pos = pos_mask.any(dim=1, keepdim=True)
    # Rows without positives are all -inf: use max 0 there so exp gives 0, not NaN.
    row_max = torch.where(has_pos, x.amax(dim=1, keepdim=True), torch.zeros_like(x[:, :1]))
    e = torch.exp(x - row_max)  # in [0, 1] on P(i) (1 at the hardest), exactly 0 elsewhere
    n_pos = pos_mask.sum(dim=1, keepdim=True).to(e.dtype)
    # The row max contributes exp(0) = 1, so sum >= 1 wherever there is a positive; the clamp
    # only turns 0/0 into 0 for rows without positives.
    return e * (n_pos / e.sum(dim=1, keepdim=True).clamp_min(1.0))


def _weighted_supcon(logits: torch.Tensor, pos_mask: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """mean_{i: |P(i)|>0} -(1/|P(i)|) sum_p w_ip log softmax_{a != i}(logits_i)_p."""
    n = logits.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=logits.device)
    # Denominator over all a != i: drop the diagonal with -inf (exact in any dtype, unlike a
    # large negative constant). With N >= 2 each row keeps a finite entry, so no NaN.
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1, keepdim=True)
    log_prob = logits - log_denominator  # finite everywhere, diagonal included
    n_pos = pos_mask.sum(dim=1).to(logits.dtype)
    # weights are zero outside P(i), so this sums over positives only.
    per_anchor = -(weights * log_prob).sum(dim=1) / n_pos.clamp_min(1.0)
    # Average over anchors with a positive. No host sync: with none, this is 0 * graph / 1 = 0.
    has_pos = (n_pos > 0).to(logits.dtype)
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1.0)


def hard_positive_weights(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                          beta: float = 1.0, *, validate: bool = True) -> torch.Tensor:
    """ANCHOR's hard-positive weights (chapter 4), detached.

    ``w_ip = |P(i)| * softmax_{p in P(i)}(-beta * s_ip / tau)`` for ``p in P(i)``, else 0, where
    ``s_ip = z_i . z_p`` and ``P(i) = {p != i : labels[p] == labels[i]}``.

    Args:
        z: ``(N, d)`` float, L2-normalised rows (checked, never renormalised), N >= 1.
        labels: ``(N,)`` integer; rows with equal labels are positives of each other.
        temperature: tau > 0.
        beta: hardness >= 0. 0 gives weight 1 on every positive; larger beta puts more of the
            row's weight on its least similar positives. (A negative beta would mine *easy*
            positives and is rejected.)
        validate: when False, skip the checks that read z's values (finite, unit norm), which
            cost a host sync; shape/dtype/hyper-parameter checks always run.

    Returns:
        ``(N, N)`` float32 (float64 for float64 z), ``requires_grad=False``; nonnegative, zero
        outside P(i) (diagonal included), each row sums to ``|P(i)|`` (0 for anchors without a
        positive).
    """
    temperature = _check_hyper(temperature, "temperature", positive=True)
    beta = _check_hyper(beta, "beta", positive=False,
                        hint=" (a negative beta would up-weight easy positives)")
    _check_embeddings(z, labels, validate=validate)
    _check_scale(temperature, beta, z)
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        logits, pos_mask = _logits_and_positives(z, labels, temperature)
        weights = _mining_weights(logits, pos_mask, beta)
    if validate and not torch.isfinite(weights).all():
        raise ValueError(f"the mining weights overflowed for temperature={temperature} and "
                         f"beta={beta}; expected beta / temperature of moderate size "
                         "(e.g. temperature 0.1 and beta <= 10)")
    return weights


def anchor_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                beta: float = 1.0, *, validate: bool = True) -> torch.Tensor:
    """ANCHOR's hard-positive-weighted supervised contrastive loss (chapter 4).

    ``loss_i = -(1/|P(i)|) sum_{p in P(i)} w_ip * log(exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau))``
    with ``w`` from :func:`hard_positive_weights` (detached: gradients treat the weights as
    constants), averaged over the anchors with ``|P(i)| >= 1``. Anchors without a positive add no
    term (they still serve as negatives in other anchors' denominators); if no anchor has a
    positive the result is a zero that is still attached to ``z``'s graph.

    Args:
        z: ``(N, d)`` float, L2-normalised rows, N >= 1 (e.g. the 3B views of a batch).
        labels: ``(N,)`` integer class labels; views of one image share its label.
        temperature: tau > 0.
        beta: hardness >= 0; ``beta = 0`` is :func:`supcon_loss` exactly.
        validate: when False, skip the value checks (finite, unit norm) and their host sync.

    Returns:
        A scalar, float32 (float64 for float64 z) even under bf16 autocast; >= 0, because each
        denominator contains its numerator, so every log-ratio is <= 0.
    """
    temperature = _check_hyper(temperature, "temperature", positive=True)
    beta = _check_hyper(beta, "beta", positive=False,
                        hint=" (a negative beta would up-weight easy positives)")
    _check_embeddings(z, labels, validate=validate)
    _check_scale(temperature, beta, z)
    if z.shape[0] == 1:  # a single row has no positive and no denominator
        return z.sum().to(torch.promote_types(z.dtype, torch.float32)) * 0.0
    with torch.autocast(device_type=z.device.type, enabled=False):
        logits, pos_mask = _logits_and_positives(z, labels, temperature)
        weights = _mining_weights(logits, pos_mask, beta)
        return _weighted_supcon(logits, pos_mask, weights)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                *, validate: bool = True) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, L_out): ANCHOR with uniform weights.

    ``loss_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau) )``,
    averaged over anchors with a positive. Literally ``anchor_loss(..., beta=0)``: at beta = 0
    every mining weight is exactly 1. Same arguments and return as :func:`anchor_loss`.

    Differences from SupContrast's reference code: no ``temperature / base_temperature`` factor,
    and the mean runs over anchors *with* a positive rather than over all anchors.
    """
    return anchor_loss(z, labels, temperature, beta=0.0, validate=validate)


# --------------------------------------------------------------------------------------------
# TRADES.
# --------------------------------------------------------------------------------------------


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor, *,
              reduction: str = "sum", validate: bool = True) -> torch.Tensor:
    """KL(softmax(logits_clean) || softmax(logits_adv)) per example, summed, or batch-averaged.

    Args:
        logits_clean, logits_adv: ``(N, C)`` float logits of the clean and adversarial inputs.
        reduction: ``"sum"`` (default) sums over the batch, as the official TRADES code's inner
            maximisation does (``KLDivLoss(size_average=False)``); ``"none"`` returns the ``(N,)``
            per-example KLs; ``"batchmean"`` divides the sum by N (the outer loss).
        validate: when False, skip the finiteness check and its host sync.

    Gradients flow into both arguments. For the inner maximisation (PGD on x_adv) pass
    ``logits_clean.detach()``; the outer TRADES loss keeps both attached.

    Returns:
        float32 (float64 when ``logits_clean`` is float64; ``logits_adv`` is cast to it); each
        per-example KL is >= 0 up to rounding.
    """
    if reduction not in ("sum", "none", "batchmean"):
        raise ValueError(f"reduction must be 'sum', 'none' or 'batchmean', got {reduction!r}")
    _check_logits(logits_clean, logits_adv, None, validate=validate)
    dtype = torch.promote_types(logits_clean.dtype, torch.float32)
    with torch.autocast(device_type=logits_clean.device.type, enabled=False):
        log_p_clean = F.log_softmax(logits_clean.to(dtype), dim=1)
        log_p_adv = F.log_softmax(logits_adv.to(dtype), dim=1)
        # sum_c p_c (log p_c - log q_c); log_target avoids log(softmax) underflow to -inf.
        kl = F.kl_div(log_p_adv, log_p_clean, reduction="none", log_target=True).sum(dim=1)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" else kl.sum() / kl.shape[0]


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float = 6.0, *, validate: bool = True) -> torch.Tensor:
    """TRADES (Zhang et al., 2019): ``CE(logits_clean, y) + beta * KL(p_clean || p_adv)``.

    The KL uses batchmean reduction, exactly as the official code:
    ``KLDivLoss(reduction='sum')(log_softmax(adv), softmax(clean)) / batch_size``; CE is the batch
    mean. Gradients flow through both logits.

    Args:
        logits_clean, logits_adv: ``(N, C)`` float logits.
        y: ``(N,)`` integer labels in ``[0, C)``.
        beta: robustness/accuracy trade-off >= 0 (the paper's 1/lambda; 6.0 for CIFAR-10).
        validate: when False, skip the finiteness and label-range checks and their host sync.

    Returns:
        A scalar, float32 (float64 when ``logits_clean`` is float64); equals CE when
        logits_adv == logits_clean.
    """
    beta = _check_hyper(beta, "beta", positive=False)
    _check_logits(logits_clean, logits_adv, y, validate=validate)
    dtype = torch.promote_types(logits_clean.dtype, torch.float32)
    with torch.autocast(device_type=logits_clean.device.type, enabled=False):
        ce = F.cross_entropy(logits_clean.to(dtype), y.long())
    kl = trades_kl(logits_clean, logits_adv, reduction="batchmean", validate=False)
    return ce + beta * kl
