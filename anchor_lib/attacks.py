"""Adversarial attacks: FGSM, PGD (L-inf and L2), CW-inf, Carlini-Wagner L2, AutoAttack, Square.

Every public attack has the shape ``attack(model, x, y, **hyper_parameters) -> x_adv``:

- ``x`` is a float tensor ``(N, C, H, W)`` with values in [0, 1] (the model normalises inside),
  N >= 1, in the dtype of the model's parameters; ``y`` holds integer class labels ``(N,)`` in
  ``[0, num_classes)``, on ``x``'s device. Hyper-parameters are Python ints and floats
  (``numpy.float64``, a float subclass, passes; other numpy scalars and tensors are refused)
  and flags are bools.
- ``x_adv`` has the shape and dtype of ``x``, is detached, lies in [0, 1] and in the eps-ball
  around ``x`` (fp32/fp64: up to float rounding of ``x +- eps``, i.e. about 1e-7; bf16/fp16:
  exactly for L-inf, since the ball's bounds are rounded towards ``x``, and for L2 up to fp32
  rounding). bf16/fp16 *images* make the L2 attacks weaker: their grid is coarser than a typical
  L2 step per pixel, and a step that would leave the ball is rounded towards ``x``. Evaluate
  with float32 images (autocast, ``amp=True``, keeps them float32).
- Under ``torch.no_grad()`` the gradient attacks still work; ``torch.inference_mode()`` switches
  autograd off for good, and they raise ``RuntimeError`` there.
- During the attack the model is in eval mode with parameter gradients switched off
  (``attack_mode``); the caller's training flags and ``requires_grad`` flags come back exactly,
  also when the attack raises.
- Bad input raises ``ValueError`` / ``TypeError`` saying what was expected (see ``checks.py``).

The public functions validate and then call the ``*_core`` functions, which do no validation,
no host-device synchronisation and no mode switching: ``pgd_core`` is what a training loop calls
on the GPU for every batch.

This module depends on torch only; ``torchattacks`` is imported lazily by ``autoattack`` and
``square``, the two attacks we take from that package rather than re-implementing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anchor_lib.checks import check_images, check_labels, check_logits, check_number, check_seed

__all__ = [
    "LossFn",
    "LogitsOnly",
    "attack_mode",
    "autoattack",
    "autoattack_config",
    "cross_entropy_per_example",
    "cw_l2",
    "cw_l2_core",
    "cw_linf",
    "fgsm",
    "logits_only",
    "margin_loss",
    "pgd",
    "pgd_core",
    "project",
    "square",
]

NORMS = ("Linf", "L2")

#: Iterations of APGD-CE, APGD-T and FAB-T inside ``autoattack`` (reference AutoAttack: 100;
#: torchattacks 3.5.1 would use 10). Lowered only by tests that exercise the call path on a CPU.
AUTOATTACK_ITERATIONS = 100
#: Queries of the Square attack inside ``autoattack`` (reference AutoAttack: 5,000).
AUTOATTACK_SQUARE_QUERIES = 5000

#: ``loss_fn(logits (N, K) float, y (N,) int64) -> (N,) or scalar``: the loss an attack maximises.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Model handling
# --------------------------------------------------------------------------------------------

@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter; restore after.

    The flags are saved per sub-module and per parameter and written back exactly, so a model
    whose BatchNorm layers were deliberately frozen in eval mode inside a training model, or whose
    backbone is frozen, comes back the way it was. Restoring happens in ``finally``: an
    exception raised inside the block does not leave the model in eval mode. Nesting is safe.

    Eval mode matters because BatchNorm in train mode would use batch statistics (the attack
    would target a different function) and update its running statistics with adversarial
    images. Switching parameter gradients off saves the memory and time of computing them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        # Assigning ``training`` directly (not ``train(flag)``, which recurses into children)
        # restores mixed modes exactly.
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


class LogitsOnly(nn.Module):
    """Wrap a model whose ``forward`` returns a tuple or list; forward returns element 0 (logits).

    A model that already returns a tensor passes through unchanged. The wrapped model's
    ``num_classes`` attribute, when it has one, is copied so that attacks can check the output.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        num_classes = getattr(model, "num_classes", None)
        if isinstance(num_classes, int):
            self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def logits_only(model: nn.Module) -> LogitsOnly:
    """Return ``model`` wrapped so that its forward gives the logits only (see ``LogitsOnly``)."""
    return LogitsOnly(model)


# --------------------------------------------------------------------------------------------
# Losses an attack maximises
# --------------------------------------------------------------------------------------------

def cross_entropy_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example: the default loss PGD maximises.

    Args:
        logits: float ``(N, K)``.
        y: int64 ``(N,)`` in ``[0, K)``.

    Returns:
        float ``(N,)``, >= 0, in the logits' dtype.
    """
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` per example, shape ``(N,)``.

    Positive when some other class's logit is strictly larger than the true one; 0 on an exact
    tie (where ``argmax`` may still pick another class). Maximising it (CW-inf) avoids the
    vanishing cross-entropy gradients of very confident models.

    Args:
        logits: ``(N, K)`` float, K >= 2.
        y: ``(N,)`` int64 labels in ``[0, K)``.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def _total(loss: torch.Tensor) -> torch.Tensor:
    # Sum, not mean: each example's input gradient must not shrink with the batch size.
    return loss.sum() if loss.dim() > 0 else loss


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shape ``(N, 1, 1, 1)`` for broadcasting against ``(N, C, H, W)``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _round_towards(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``v`` (computed in a wider float dtype) cast to ``x``'s dtype, rounded towards ``x``.

    Round-to-nearest may land just beyond ``v`` as seen from ``x``; there the result steps one
    ulp back towards ``x``, so ``|result - x| <= |v - x|`` holds exactly, per element. The
    comparisons are exact (both sides are in ``v``'s dtype, which holds x's values exactly).
    """
    rounded = v.to(x.dtype)
    wide = rounded.to(v.dtype)
    outside = torch.where(v >= x.to(v.dtype), wide > v, wide < v)
    return torch.where(outside, torch.nextafter(rounded, x), rounded)


def _linf_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners ``(lower, upper)`` of the intersection of the L-inf ball and [0, 1], in x's dtype.

    In bf16/fp16, ``x +- eps`` rounded to nearest lies up to half an ulp (about 0.5/255 near 1
    in bf16) outside the ball; the corners are computed in fp64 and rounded towards ``x``
    instead. fp32/fp64 keep the plain computation: no extra work on the training path.
    """
    if x.dtype in (torch.float32, torch.float64):
        return (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    wide = x.double()
    return (_round_towards((wide - eps).clamp(min=0), x),
            _round_towards((wide + eps).clamp(max=1), x))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` and then onto [0, 1].

    Both sets are convex and the clamp to [0, 1] moves every coordinate towards ``x``, so the
    result lies in both. In bf16/fp16 the L2 projection is computed in fp32 and both are rounded
    so that the cast to x's dtype cannot leave the ball (see ``_linf_box``). ``x``: float
    ``(N, C, H, W)`` in [0, 1]; ``x_adv``: the same shape; ``eps`` >= 0. Returns x's shape and
    dtype, in [0, 1] and in the eps-ball. No validation, no sync.
    """
    if norm == "Linf":
        lower, upper = _linf_box(x, eps)
        return torch.clamp(x_adv, min=lower, max=upper)
    low_precision = x.dtype not in (torch.float32, torch.float64)
    x_wide = x.float() if low_precision else x
    delta = x_adv.to(x_wide.dtype) - x_wide
    delta = delta * (eps / _per_example_norm(delta).clamp(min=1e-12)).clamp(max=1.0)
    x_adv = (x_wide + delta).clamp(0.0, 1.0)
    if not low_precision:
        return x_adv
    # Round to nearest where that stays in the ball; elsewhere towards x, which shrinks every
    # coordinate of the step and so cannot leave the ball, but shortens it by up to an ulp each.
    nearest = x_adv.to(x.dtype)
    inside = _per_example_norm(nearest.to(x_wide.dtype) - x_wide) <= eps
    return torch.where(inside, nearest, _round_towards(x_adv, x))


def random_point(x: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """A random point around ``x`` (N, C, H, W): PGD's random start, not yet clipped to [0, 1].

    L-inf: uniform in the ball. L2: a uniform direction, radius uniform in [0, eps]. Draws from
    the global generator of x's device. The noise is drawn in the logical (contiguous NCHW)
    order, so a channels_last ``x`` gets the same start as a contiguous one under the same seed.
    """
    # Not *_like: those follow x's memory format and would fill the same values in another order.
    if norm == "Linf":
        return x + torch.empty(x.shape, dtype=x.dtype, device=x.device).uniform_(-eps, eps)
    direction = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    direction = direction / _per_example_norm(direction).clamp(min=1e-12)
    radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    return x + direction * radius * eps


# --------------------------------------------------------------------------------------------
# Fast cores (no validation, no syncs, no mode switching)
# --------------------------------------------------------------------------------------------

def pgd_core(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
             steps: int, random_start: bool = True, loss_fn: LossFn | None = None,
             amp: bool = False, norm: str = "Linf",
             start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` inside the eps-ball; the hot loop of training.

    Nothing is validated and the model's mode is left alone: the caller decides whether the
    attack runs in eval or train mode (in train mode BatchNorm uses batch statistics and updates
    its running averages, as in the robust_overfitting and fast_adversarial reference code).
    Only the input gradient is computed (``torch.autograd.grad``), so parameter ``.grad``
    fields are never touched even when parameters require gradients. No ``.item()``: the loop
    never waits for the device.

    Args:
        model: maps ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: clean images ``(N, C, H, W)``, float, in [0, 1].
        y: labels ``(N,)``, int64.
        eps: radius of the ball (L-inf or L2 according to ``norm``), >= 0.
        alpha: step size: L-inf steps ``alpha * sign(grad)``; L2 steps ``alpha * grad / ||grad||``.
        steps: number of gradient steps, >= 0.
        random_start: start from a random point in the ball instead of ``x``.
        loss_fn: loss to maximise, ``(logits, y) -> (N,) or scalar``; default per-example
            cross-entropy. Per-example losses are summed.
        amp: run the forward pass under bf16 autocast (CUDA only; ignored on other devices).
        norm: ``"Linf"`` or ``"L2"``.
        start: the starting point, drawn beforehand (the trainer draws it outside its CUDA graph,
            whose replays must not draw random numbers); projected onto the ball. Overrides
            ``random_start``.

    Returns:
        ``x_adv``, detached, same shape and dtype as ``x``, in [0, 1] and in the eps-ball.
    """
    loss_fn = cross_entropy_per_example if loss_fn is None else loss_fn
    x = x.detach()
    use_amp = amp and x.is_cuda
    if norm == "Linf":  # the intersection of ball and box is a box: compute its corners once
        lower, upper = _linf_box(x, eps)
    if start is None and random_start:
        start = random_point(x, eps, norm)
    x_adv = project(start.detach(), x, eps, norm) if start is not None else x.clone()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            # No cast cache: each region uses each weight once, and a CUDA graph capture needs
            # autocast's cache off.
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp,
                                cache_enabled=False):
                logits = model(x_adv)
            if use_amp:
                logits = logits.float()
            (grad,) = torch.autograd.grad(_total(loss_fn(logits, y)), x_adv)
            if norm == "Linf":
                x_adv = torch.clamp(x_adv.detach() + alpha * grad.sign(), min=lower, max=upper)
            else:
                # One NaN or inf in the gradient (e.g. sqrt at a pixel equal to 0) would make the
                # norm, and so the whole image, NaN; L-inf is safe since sign(NaN) = 0.
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                step = alpha * grad / _per_example_norm(grad).clamp(min=1e-12)
                x_adv = project(x_adv.detach() + step, x, eps, norm)
    return x_adv.detach()


def cw_l2_core(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c_init: float, steps: int,
               search_steps: int, kappa: float = 0.0, lr: float = 0.01) -> torch.Tensor:
    """Carlini-Wagner L2 (untargeted) without validation; see ``cw_l2``."""
    x = x.detach()
    n = x.shape[0]
    c = torch.full((n,), float(c_init), device=x.device, dtype=x.dtype)
    lower = torch.zeros_like(c)
    upper = torch.full_like(c, 1e10)
    best_l2 = torch.full_like(c, math.inf)
    best_adv = x.clone()
    # tanh-space variable: x_adv = (tanh(w) + 1) / 2 is in [0, 1] for every w, so the box
    # constraint disappears from the optimisation. The 1 - 1e-6 keeps atanh finite at 0 and 1.
    w_init = torch.atanh((2 * x - 1) * (1 - 1e-6))

    def record(x_adv: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        nonlocal best_l2, best_adv
        success = margin_loss(logits, y) > kappa
        l2 = (x_adv - x).flatten(1).norm(dim=1)
        better = success & (l2 < best_l2)
        best_l2 = torch.where(better, l2, best_l2)
        best_adv = torch.where(better.view(-1, 1, 1, 1), x_adv, best_adv)
        return success

    with torch.enable_grad():
        for _ in range(search_steps):
            w = w_init.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(steps):
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv)
                succeeded |= record(x_adv.detach(), logits.detach())
                # f = max(z_y - max_{j != y} z_j, -kappa): zero gradient once the margin is kappa.
                f = (-margin_loss(logits, y)).clamp(min=-kappa)
                l2_sq = (x_adv - x).flatten(1).pow(2).sum(dim=1)
                (w.grad,) = torch.autograd.grad((l2_sq + c * f).sum(), w)
                optimizer.step()
            with torch.no_grad():
                x_adv = (torch.tanh(w) + 1) / 2
                succeeded |= record(x_adv, model(x_adv))
            # Binary search on c per example: shrink c after a success, grow it after a failure
            # (x10 until a first success gives an upper bound).
            upper = torch.where(succeeded, torch.minimum(upper, c), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, c))
            c = torch.where(upper < 1e9, (lower + upper) / 2, c * 10)
    return best_adv.clamp(0.0, 1.0).detach()


# --------------------------------------------------------------------------------------------
# Validation shared by the public attacks
# --------------------------------------------------------------------------------------------

def _check_batch(model: nn.Module, x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate images, labels and the model's output on them; return ``(clean logits, y)``.

    Must run inside ``attack_mode`` (the forward pass must not update BatchNorm statistics).
    The number of classes is read from the model's output and, when the model has an integer
    ``num_classes`` attribute, checked against it.
    """
    x = check_images(x)
    y = check_labels(y, x.shape[0], device=x.device)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype != x.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {param.dtype}; "
                         f"expected x in the model's dtype (x.to({param.dtype}))")
    with torch.no_grad():
        out = model(x)
    expected = getattr(model, "num_classes", None)
    try:
        logits = check_logits(out, x.shape[0], expected if isinstance(expected, int) else None)
    except TypeError as err:
        raise TypeError(f"{err}, or use anchor_lib.attacks.logits_only(model)") from None
    if logits.shape[1] < 2:
        raise ValueError(f"the model returned {logits.shape[1]} logit per image; expected >= 2")
    return logits, check_labels(y, x.shape[0], logits.shape[1])


def _check_norm(norm: object) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def _check_autograd(model: nn.Module, x: object, y: object) -> tuple[object, object]:
    """Refuse inference mode up front: autograd is off there for good (``enable_grad`` does not
    lift it), and the attack would fail deep inside with "element 0 of tensors does not require
    grad". Returns ``(x, y)``, copied out of inference mode when they were made in it (such a
    tensor cannot be saved for backward; a copy made outside can)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("this attack needs input gradients, which torch.inference_mode() "
                           "switches off; call it outside inference mode (torch.no_grad() is "
                           "fine: the attack switches gradients back on where it needs them)")
    if isinstance(model, nn.Module) and any(p.is_inference() for p in model.parameters()):
        raise RuntimeError("the model's parameters were created under torch.inference_mode() and "
                           "cannot take part in autograd, which the attack needs; build or load "
                           "the model outside inference mode")
    return tuple(t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t
                 for t in (x, y))


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_loss_fn(loss_fn: object, logits: torch.Tensor, y: torch.Tensor) -> LossFn:
    """Check ``loss_fn`` once on the clean logits: a float scalar or one value per example."""
    if loss_fn is None:
        return cross_entropy_per_example
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable (logits, y) -> loss, "
                        f"got {type(loss_fn).__name__}")
    out = loss_fn(logits, y)
    n = logits.shape[0]
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape not in (
            torch.Size([]), torch.Size([n])):
        got = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise ValueError(f"loss_fn must return a float scalar or a float tensor of shape ({n},), "
                         f"got {got}")
    return loss_fn


# --------------------------------------------------------------------------------------------
# Public attacks
# --------------------------------------------------------------------------------------------

def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al., 2015): one L-inf step of size eps.

    ``x_adv = clamp(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], N >= 1, in the dtype of the model's parameters.
        y: integer labels ``(N,)`` in ``[0, K)``, on x's device.
        eps: L-inf radius, >= 0 (8/255 for CIFAR-10).

    Returns:
        ``x_adv``: detached, shape and dtype of ``x``, in [0, 1], ``|x_adv - x|_inf <= eps``.
    """
    x, y = _check_autograd(model, x, y)
    eps = check_number(eps, "eps", low=0.0)
    with attack_mode(model):
        _, y = _check_batch(model, x, y)
        if eps == 0:
            return x.detach().clone()
        return pgd_core(model, x, y, eps, eps, 1, random_start=False)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
        steps: int, random_start: bool = True, norm: str = "Linf", restarts: int = 1,
        loss_fn: LossFn | None = None, amp: bool = False) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al., 2018), L-inf or L2, with restarts.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], N >= 1, in the dtype of the model's parameters.
        y: integer labels ``(N,)`` in ``[0, K)``, on x's device.
        eps: radius of the ball, >= 0 (L-inf: 8/255 for CIFAR-10; L2: e.g. 0.5).
        alpha: step size, > 0 (L-inf: 2/255; L2: about eps / 4).
        steps: number of steps, int >= 0 (0 returns ``x``, or the random start).
        random_start: start uniformly in the L-inf ball; for L2 from a random direction with a
            radius uniform in [0, eps].
        norm: ``"Linf"`` or ``"L2"``.
        restarts: number of runs, int >= 1; per example the worst case is kept: an adversarial
            (misclassified) result beats a non-adversarial one, ties go to the higher loss.
            Restart 1 draws the same random start as ``restarts=1`` after the same
            ``torch.manual_seed``, so more restarts never give a higher accuracy. Without a
            random start every run is identical and only one is made.
        loss_fn: ``(logits (N, K), y (N,)) -> (N,) or scalar`` loss to maximise; default
            cross-entropy per example. Per-example losses are summed, so a step does not depend
            on the batch size; a scalar loss is used as given (and restarts then compare
            examples by cross-entropy).
        amp: bf16 autocast for the forward passes on CUDA (ignored on CPU). Report results in
            fp32 unless shown to agree (the evaluation protocol, chapter 6).

    Returns:
        ``x_adv``: detached, shape and dtype of ``x``, in [0, 1] and in the eps-ball.
    """
    x, y = _check_autograd(model, x, y)
    eps = check_number(eps, "eps", low=0.0)
    alpha = check_number(alpha, "alpha", low=0.0, low_inclusive=False)
    steps = check_number(steps, "steps", low=0, integer=True)
    restarts = check_number(restarts, "restarts", low=1, integer=True)
    random_start = _check_flag(random_start, "random_start")
    amp = _check_flag(amp, "amp")
    norm = _check_norm(norm)
    with attack_mode(model):
        logits, y = _check_batch(model, x, y)
        loss_fn = _check_loss_fn(loss_fn, logits, y)
        if eps == 0:
            return x.detach().clone()
        best = pgd_core(model, x, y, eps, alpha, steps, random_start, loss_fn, amp, norm)
        if restarts == 1 or not random_start:
            return best
        best_wrong, best_loss = _score(model, best, y, loss_fn)
        for _ in range(restarts - 1):
            x_adv = pgd_core(model, x, y, eps, alpha, steps, random_start, loss_fn, amp, norm)
            wrong, loss = _score(model, x_adv, y, loss_fn)
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
            best_wrong, best_loss = best_wrong | wrong, torch.where(better, loss, best_loss)
        return best


def _score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
           loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(misclassified, per-example loss) of a restart, in fp32, for keeping the worst case."""
    with torch.no_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y)
        if loss.dim() == 0:
            loss = cross_entropy_per_example(logits, y)
    return logits.argmax(dim=1) != y, loss


def cw_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
            steps: int) -> torch.Tensor:
    """CW-inf: L-inf PGD with a random start on the margin loss ``max_{j != y} z_j - z_y``.

    The evaluation protocol (chapter 6) runs it with 30 steps at eps = 8/255. Arguments,
    return value and guarantees as for ``pgd`` with ``norm="Linf"``.
    """
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=True, norm="Linf",
               loss_fn=margin_loss)


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c_init: float, steps: int,
          search_steps: int, kappa: float = 0.0, lr: float = 0.01) -> torch.Tensor:
    """Carlini-Wagner L2 attack (Carlini and Wagner, 2017), untargeted.

    Minimises ``||x_adv - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` with Adam in tanh
    space, ``x_adv = (tanh(w) + 1) / 2``, and binary-searches ``c`` per example over
    ``search_steps`` rounds of ``steps`` Adam steps (c starts at ``c_init``; it is multiplied by
    10 until a first success, then bisected). Per example the smallest-L2 successful adversarial
    (margin ``max_{j != y} z_j - z_y > kappa``) seen during the whole search is returned; an
    example never attacked successfully comes back as the original image. The search is
    deterministic, so more ``search_steps`` never lower the success rate.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], N >= 1, in the dtype of the model's parameters.
        y: integer labels ``(N,)`` in ``[0, K)``, on x's device.
        c_init: initial trade-off constant, > 0 (1e-2 to 1 are common).
        steps: Adam steps per search round, int >= 0.
        search_steps: binary-search rounds, int >= 0 (0 returns ``x``).
        kappa: confidence margin, >= 0.
        lr: Adam learning rate, > 0.

    Returns:
        ``x_adv``: detached, shape and dtype of ``x``, in [0, 1]. No eps-ball: the attack
        minimises the L2 distance instead.
    """
    x, y = _check_autograd(model, x, y)
    c_init = check_number(c_init, "c_init", low=0.0, low_inclusive=False)
    steps = check_number(steps, "steps", low=0, integer=True)
    search_steps = check_number(search_steps, "search_steps", low=0, integer=True)
    kappa = check_number(kappa, "kappa", low=0.0)
    lr = check_number(lr, "lr", low=0.0, low_inclusive=False)
    with attack_mode(model):
        _, y = _check_batch(model, x, y)
        return cw_l2_core(model, x, y, c_init, steps, search_steps, kappa, lr)


@contextmanager
def _preserve_rng(device: torch.device) -> Iterator[None]:
    """torchattacks reseeds the global RNGs inside each attack; keep the caller's streams intact."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_autoattack_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """Raise ValueError unless the model's parameters and the images ``x`` are float32.

    torchattacks' FAB casts the images to float32 inside, so another dtype fails there, with an
    error about float32 images that the caller never passed. :func:`autoattack` checks this, and
    ``evaluate_suite`` before its cheaper attacks run."""
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if x.dtype != torch.float32 or params - {torch.float32}:
        found = ", ".join(sorted(map(str, params))) or "no float dtype"
        raise ValueError(f"AutoAttack (torchattacks) runs in float32, got the model's parameters "
                         f"in {found} and images in {x.dtype}; convert the model and images with "
                         f".float()")


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               norm: str = "Linf", batch_size: int | None = None, version: str = "standard",
               seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce and Hein, 2020) through ``torchattacks.AutoAttack``.

    ``version="standard"`` runs APGD-CE, APGD-T (all K-1 targets), FAB-T (K-1 targets) and
    Square (5,000 queries) one after the other, each on the examples still classified correctly.
    torchattacks 3.5.1 builds APGD, APGD-T and FAB with 10 iterations; we set them to the 100
    iterations of the reference implementation (fra31/auto-attack), which the published
    AutoAttack numbers use (``AUTOATTACK_ITERATIONS``, ``AUTOATTACK_SQUARE_QUERIES``). The number
    of classes comes from the model's output, since torchattacks otherwise assumes 10.
    APGD-T's DLR loss needs K >= 4 classes.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``,
            with at least one parameter (torchattacks reads the device from it).
        x: float32 ``(N, C, H, W)`` in [0, 1], N >= 1, like the model's parameters
            (torchattacks computes in float32; another dtype raises ValueError).
        y: integer labels ``(N,)`` in ``[0, K)``, on x's device.
        eps: radius, >= 0.
        norm: ``"Linf"`` or ``"L2"``.
        batch_size: images per torchattacks call, int >= 1; None (the default) attacks all of
            ``x`` in one call, so the caller's batching decides (``evaluate.robust_accuracy``).
        version: ``"standard"``, ``"plus"`` or ``"rand"``.
        seed: seed of the attacks' random starts, an int in [0, 2**63). The caller's global RNG
            state is preserved.

    Returns:
        ``x_adv``: detached, shape and dtype of ``x``, in [0, 1] and in the eps-ball.
    """
    x, y = _check_autograd(model, x, y)
    eps = check_number(eps, "eps", low=0.0)
    norm = _check_norm(norm)
    if batch_size is not None:
        batch_size = check_number(batch_size, "batch_size", low=1, integer=True)
    seed = check_seed(seed)
    if version not in ("standard", "plus", "rand"):
        raise ValueError(f"version must be 'standard', 'plus' or 'rand', got {version!r}")
    with attack_mode(model):
        logits, y = _check_batch(model, x, y)
        check_autoattack_inputs(model, x)
        num_classes = logits.shape[1]
        if num_classes < 4:
            raise ValueError(f"AutoAttack needs a model with at least 4 classes (APGD-T's DLR "
                             f"loss), got {num_classes}")
        if eps == 0:
            return x.detach().clone()
        with _preserve_rng(x.device):
            attack = _configured_autoattack(model, norm, eps, version, num_classes, seed)
            x_adv = torch.cat([attack(x[s].detach(), y[s])
                               for s in _batches(len(x), batch_size or len(x))])
        return project(x_adv.to(x.dtype), x.detach(), eps, norm).detach()


def _configured_autoattack(model: nn.Module, norm: str, eps: float, version: str,
                           num_classes: int, seed: int):
    """``torchattacks.AutoAttack`` with the reference budgets that :func:`autoattack_config`
    records (the attack ``autoattack`` runs)."""
    import torchattacks  # lazily: importing it is slow and only these attacks need it

    attack = torchattacks.AutoAttack(model, norm=norm, eps=eps, version=version,
                                     n_classes=num_classes, seed=seed)
    # torchattacks keeps the sub-attacks in a private MultiAttack; set their budgets.
    for sub in attack._autoattack.attacks:
        if isinstance(sub, torchattacks.Square):
            sub.n_queries = AUTOATTACK_SQUARE_QUERIES
            # The reference AutoAttack runs Square with a fixed schedule of square sizes
            # (resc_schedule=False); torchattacks' default rescales it to the budget.
            sub.rescale_schedule = False
        else:  # APGD, APGD-T, FAB
            sub.steps = AUTOATTACK_ITERATIONS
    return attack


def autoattack_config() -> dict[str, Any]:
    """What :func:`autoattack` runs, for the record (``metrics.json``'s ``autoattack_config``):
    the implementation and the budgets set on it, those of the reference AutoAttack's standard
    version (Croce and Hein, 2020)."""
    import torchattacks

    return {"implementation": f"torchattacks {torchattacks.__version__}", "version": "standard",
            "attacks": ["APGD-CE", "APGD-T", "FAB-T", "Square"], "restarts": 1,
            "iterations": AUTOATTACK_ITERATIONS, "target_classes": "every class but the true one",
            "square_queries": AUTOATTACK_SQUARE_QUERIES, "square_rescale_schedule": False}


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
           norm: str = "Linf", n_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """Square Attack (Andriushchenko et al., 2020), a black-box attack, via ``torchattacks``.

    It only queries the model's outputs, never its gradients, so it is not fooled by gradient
    masking: a model that resists PGD but not Square has obfuscated gradients.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], N >= 1, in the dtype of the model's parameters.
        y: integer labels ``(N,)`` in ``[0, K)``, on x's device.
        eps: radius, >= 0.
        norm: ``"Linf"`` or ``"L2"``.
        n_queries: model queries per example, int >= 1 (AutoAttack uses 5,000).
        seed: seed of the random search. The caller's global RNG state is preserved.

    Returns:
        ``x_adv``: detached, shape and dtype of ``x``, in [0, 1] and in the eps-ball.
    """
    eps = check_number(eps, "eps", low=0.0)
    norm = _check_norm(norm)
    n_queries = check_number(n_queries, "n_queries", low=1, integer=True)
    seed = check_seed(seed)
    import torchattacks  # lazily, as in autoattack

    with attack_mode(model):
        _, y = _check_batch(model, x, y)
        if eps == 0:
            return x.detach().clone()
        with _preserve_rng(x.device):
            attack = torchattacks.Square(model, norm=norm, eps=eps, n_queries=n_queries,
                                         n_restarts=1, seed=seed)
            x_adv = attack(x.detach(), y)
        return project(x_adv.to(x.dtype), x.detach(), eps, norm).detach()
