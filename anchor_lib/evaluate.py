"""Measuring robustness honestly: accuracies under attack and the gradient-masking sanity checks.

``evaluate_suite`` runs the evaluation protocol of chapter 6 (clean, FGSM, PGD-20, CW-inf,
AutoAttack at L-inf eps = 8/255) and returns the ``accuracy`` section of ``metrics.json``;
``sanity_checks`` returns its ``sanity`` section. Every accuracy is a Python float in [0, 1].

An example counts as robust only when the model classifies it correctly both clean and under
attack, so robust accuracy never exceeds clean accuracy. Only the clean-correct examples are
attacked: attacking the others could not change the result and would only cost time.

Every verdict (is this image classified correctly?) is taken with TF32 off, in the model's own
dtype: IEEE fp32 for a float32 model, as the protocol evaluates. The *search* of CW-inf
and AutoAttack may run in TF32 instead (``search="tf32"``; PGD-20 ran 3.3 times faster in TF32
on an H100), under the protocol's rule applied to PGD-20 on the model at hand: searched
both ways from the same random starts, PGD-20 must agree within 0.2 points, and TF32 may miss at
most 0.2 points' worth of the images fp32 breaks. An image the TF32 search broke but the fp32
model still classifies correctly is attacked again in fp32, so a verdict only TF32 reaches never
counts for the model. That CW-inf and AutoAttack lose no more in TF32 than PGD-20 does is an
extrapolation, not a measurement; the sanity checks' attacks, the detectors of gradient masking,
always search in fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anchor_lib.attacks import (
    attack_mode,
    check_autoattack_inputs,
    cw_linf,
    fgsm,
    margin_loss,
    pgd,
    random_point,
    square,
)
from anchor_lib.attacks import autoattack as autoattack_attack
from anchor_lib.checks import check_images, check_labels, check_logits, check_number, check_seed

__all__ = [
    "ATTACKS",
    "EVAL_EPS",
    "EVAL_PRECISION",
    "MAX_LOGIT_CHANGE",
    "MAX_ZERO_GRADIENT_SHARE",
    "MIN_SIGN_AGREEMENT",
    "SIGN_STEP",
    "PRECISION_RULE_POINTS",
    "SEARCH_PRECISIONS",
    "TF32_SEARCH_ATTACKS",
    "Attack",
    "accuracy",
    "check_autoattack_gap",
    "check_black_box_weaker",
    "check_deterministic",
    "check_eps_sweep",
    "check_gradient_signs",
    "check_more_steps",
    "check_search_precision",
    "check_zero_gradients",
    "correct",
    "default_batch_size",
    "describe_precision",
    "eps_sweep",
    "evaluate_suite",
    "full_precision",
    "parse_attacks",
    "robust_accuracy",
    "sanity_checks",
    "seeded",
    "standard_attacks",
    "tf32",
    "tf32_available",
]

#: L-inf radius of the evaluation protocol (CIFAR-10).
EVAL_EPS = 8 / 255

#: Names ``evaluate_suite`` understands, in the order of the results table.
ATTACKS = ("clean", "fgsm", "pgd20", "cw", "autoattack")

#: How the protocol's arithmetic runs, as metrics.json records it.
EVAL_PRECISION = "fp32 (IEEE; TF32 off on GPUs)"

#: The precisions an attack's search may run in, ``"fp32"`` (IEEE, the protocol's default) or
#: ``"tf32"`` (cuDNN's and matmul's TF32, on GPUs that have it; on a CPU it changes nothing).
#: Verdicts are taken with TF32 off either way (IEEE fp32 for a float32 model).
SEARCH_PRECISIONS = ("fp32", "tf32")

#: The attacks whose search runs in TF32 under ``search="tf32"`` once PGD-20 passed the check:
#: the slow ones (CW-inf's 30 steps on 10,000 images; AutoAttack's ~7,900 model calls per batch).
#: Clean, FGSM and PGD-20, the headline numbers, stay in fp32, as do the sanity checks.
TF32_SEARCH_ATTACKS = ("cw", "autoattack")

#: How many points a reduced-precision result may lie from fp32 on the same model and still
#: count (the evaluation protocol's rule).
PRECISION_RULE_POINTS = 0.2

#: Images per attack call: one batch of 1,000 on a GPU (the protocol's whole AutoAttack subset),
#: 500 on a CPU. A robust image costs AutoAttack about 7,900 model calls per batch, however big the
#: batch (APGD-CE 100, APGD-T 9 x 100, FAB-T about 1,800, Square up to 5,000 queries; counted by
#: benchmarks/autoattack_calls.py into data/results/cpu-checks/autoattack_calls.json), and a
#: narrow model on a GPU spends those calls waiting on the host: fewer, bigger batches do the same
#: arithmetic in fewer calls. A CPU is bound by arithmetic, not calls, so it keeps the smaller
#: batch and its smaller memory (a width-64 backward pass holds megabytes of activations per image).
GPU_BATCH_SIZE, CPU_BATCH_SIZE = 1000, 500

#: ``attack(model, x, y) -> x_adv``, e.g. ``partial(pgd, eps=8/255, alpha=2/255, steps=20)``.
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Accuracies
# --------------------------------------------------------------------------------------------

def _check_data(x: object, y: object, batch_size: object) -> tuple[torch.Tensor, torch.Tensor]:
    x = check_images(x)
    y = check_labels(y, x.shape[0], device=x.device)
    check_number(batch_size, "batch_size", low=1, integer=True)
    return x, y


def _checked(model: nn.Module, out: object, yb: torch.Tensor) -> torch.Tensor:
    """``out``, the model's output on one batch, as checked logits ``(n, K)``: the shape and
    class count the model declares, labels ``yb`` in ``[0, K)``, every value finite."""
    expected = getattr(model, "num_classes", None)
    logits = check_logits(out, yb.shape[0], expected if isinstance(expected, int) else None)
    check_labels(yb, yb.shape[0], logits.shape[1])
    if not torch.isfinite(logits).all():
        raise ValueError("the model returned NaN or Inf logits; expected finite logits "
                         "(check the weights, e.g. a diverged checkpoint)")
    return logits


def _predict(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Predicted classes ``(n,)`` of one batch, checking the model's output and the labels."""
    with torch.no_grad():
        out = model(xb)
    return _checked(model, out, yb).argmax(dim=1)


def default_batch_size(device: torch.device | str) -> int:
    """Images per attack call on ``device``: ``GPU_BATCH_SIZE`` on CUDA, else ``CPU_BATCH_SIZE``."""
    return GPU_BATCH_SIZE if torch.device(device).type == "cuda" else CPU_BATCH_SIZE


@contextmanager
def full_precision() -> Iterator[None]:
    """Run the block in IEEE fp32 on CUDA, as the evaluation protocol requires.

    PyTorch lets cuDNN run fp32 convolutions in TF32 (a 10-bit mantissa) on Ampere and later
    GPUs by default; inside the block both cuDNN and matmul TF32 are off. The flags are
    restored afterwards; on a CPU they change nothing.
    """
    with tf32(False):
        yield


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """cuDNN's and matmul's TF32 on or off inside the block; the flags are restored afterwards.

    ``tf32(True)`` is what ``benchmarks/eval_precision.py`` compares with the protocol's fp32.
    """
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def tf32_available(device: torch.device | str) -> bool:
    """Whether TF32 changes any arithmetic on ``device``: a CUDA GPU of compute capability 8.0
    (Ampere) or later. Elsewhere a "TF32" search would be fp32 under another name."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _check_search(search: object) -> str:
    if search not in SEARCH_PRECISIONS:
        raise ValueError(f"search must be one of {', '.join(map(repr, SEARCH_PRECISIONS))}, "
                         f"got {search!r}")
    return str(search)


def _attacked(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``attack(model, x, y)``, its output checked: the shape of ``x``, finite, in [0, 1]."""
    x_adv = attack(model, x, y)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv)
        raise ValueError(f"attack must return x_adv of shape {tuple(x.shape)}, got {got}")
    check_images(x_adv, "x_adv")  # finite and in [0, 1], else the score means nothing
    return x_adv


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None,
            batch_size: int = 500, *, search: str = "fp32") -> torch.Tensor:
    """Which examples ``model`` gets right: bool ``(N,)`` on ``x``'s device.

    Without ``attack``: classified correctly. With one: classified correctly both clean and
    after ``attack`` (only the clean-correct examples are attacked). In eval mode without
    parameter gradients; the model's mode is restored. Every verdict is taken with TF32 off
    (:func:`full_precision`), in the model's dtype: IEEE fp32 for a float32 model. Two models'
    masks on the same images give a paired comparison (:func:`anchor_lib.results.compare`).

    Args:
        model: maps float ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], on the model's device.
        y: integer labels ``(N,)`` in ``[0, K)``.
        attack: ``attack(model, xb, yb) -> x_adv`` with ``x_adv`` shaped like ``xb``, or None.
        batch_size: images per forward pass or attack call.
        search: ``"fp32"`` or ``"tf32"``: the precision the attack runs in. With ``"tf32"``,
            the images the attack broke in TF32 that fp32 still classifies correctly are
            attacked again in fp32 (the verdict is fp32's either way), with random draws of
            their own, so the other images' random starts are those of an fp32 search.

    Raises:
        ValueError: x is not a finite float ``(N, C, H, W)`` batch in [0, 1] with N >= 1; y is
            not integer ``(N,)`` on x's device with labels in ``[0, K)``; batch_size < 1;
            ``search`` is neither ``"fp32"`` nor ``"tf32"``; the model's logits are not
            ``(N, K)`` or not finite; the attack returns images of another shape or outside
            [0, 1].
        TypeError: ``attack`` is neither callable nor None.
    """
    return _correct(model, x, y, attack, batch_size, search)[0]


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None,
             batch_size: int, search: str) -> tuple[torch.Tensor, dict[str, int]]:
    """:func:`correct`, and of a TF32 search: how many images were attacked again in fp32
    (``"retried_in_fp32"``) and how many of those that attack broke (``"broken_on_retry"``)."""
    x, y = _check_data(x, y, batch_size)
    search = _check_search(search)
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be callable as attack(model, x, y) -> x_adv, "
                        f"got {type(attack).__name__}")
    mask = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    retried = {"retried_in_fp32": 0, "broken_on_retry": 0}
    with attack_mode(model), full_precision():
        for s in _batches(len(x), batch_size):
            xb, yb = x[s], y[s]
            right = _predict(model, xb, yb) == yb
            if attack is None:
                mask[s] = right
                continue
            keep = right.nonzero().squeeze(1)
            if keep.numel() == 0:
                continue
            xk, yk = xb[keep], yb[keep]
            with tf32(search == "tf32"):
                x_adv = _attacked(attack, model, xk, yk)
            held = _predict(model, x_adv, yk) == yk
            if search == "tf32":
                # Broken in TF32 but not in fp32: the image sits on the decision boundary, where
                # the two round differently. Attacked again in fp32, it cannot count as robust
                # only because the search ran in lower precision.
                with tf32(True):
                    held_in_search = _predict(model, x_adv, yk) == yk
                again = (held & ~held_in_search).nonzero().squeeze(1)
                if again.numel():
                    # Its own random draws: the next batches start where an fp32 search would.
                    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda"
                                               else []):
                        x_again = _attacked(attack, model, xk[again], yk[again])
                    held_again = _predict(model, x_again, yk[again]) == yk[again]
                    held[again] = held_again
                    retried["retried_in_fp32"] += again.numel()
                    retried["broken_on_retry"] += int((~held_again).sum().item())
            mask[s.start + keep] = held
    return mask, retried


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Clean accuracy in [0, 1]: the mean of :func:`correct` without an attack.

    Args:
        model: maps float ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], on the model's device.
        y: integer labels ``(N,)`` in ``[0, K)``.
        batch_size: images per forward pass.

    Raises what :func:`correct` raises.
    """
    return correct(model, x, y, None, batch_size).sum().item() / len(x)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                    batch_size: int = 500, *, search: str = "fp32") -> float:
    """Fraction of examples classified correctly both clean and after ``attack``, in [0, 1]:
    the mean of :func:`correct` with ``attack`` (verdicts with TF32 off, in the model's dtype).

    Args:
        model: maps float ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], on the model's device.
        y: integer labels ``(N,)`` in ``[0, K)``.
        attack: ``attack(model, xb, yb) -> x_adv`` with ``x_adv`` shaped like ``xb``.
        batch_size: images per attack call.
        search: the precision the attack runs in, ``"fp32"`` or ``"tf32"`` (:func:`correct`).

    Raises what :func:`correct` raises, and TypeError for ``attack=None`` (clean accuracy is
    :func:`accuracy`).
    """
    if attack is None:  # correct() checks the rest; None there means "no attack"
        raise TypeError("attack must be callable as attack(model, x, y) -> x_adv, got None "
                        "(clean accuracy is accuracy())")
    return correct(model, x, y, attack, batch_size, search=search).sum().item() / len(x)


# --------------------------------------------------------------------------------------------
# The evaluation protocol
# --------------------------------------------------------------------------------------------

def standard_attacks(eps: float = EVAL_EPS, seed: int = 0) -> dict[str, Attack]:
    """The attacks of the evaluation protocol (chapter 6) at L-inf radius ``eps``, as ``attack(model, x, y)``.

    - ``"fgsm"``: one step of size eps.
    - ``"pgd20"``: 20 steps of ``eps / 4`` (2/255 at 8/255) from a uniform random start,
      cross-entropy. 20 steps of eps/4 travel 5 eps, enough to reach any corner of the ball.
    - ``"cw"``: CW-inf, 30 steps of ``eps / 4`` on the margin loss from a random start. The
      same step as PGD-20 keeps the two comparable; the margin loss is the only change.
    - ``"autoattack"``: standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), seeded with
      ``seed`` (torchattacks reseeds the global RNG inside each of its attacks, so the caller's
      seeding does not reach it; the others draw from the caller's RNG).

    ``seed`` is an int in [0, 2**63) (ValueError otherwise).
    """
    eps = check_number(eps, "eps", low=0.0)
    seed = check_seed(seed)
    # alpha must be > 0 even when eps == 0 (then the attacks return x unchanged).
    alpha = eps / 4 if eps > 0 else 1 / 255
    return {
        "fgsm": partial(fgsm, eps=eps),
        "pgd20": partial(pgd, eps=eps, alpha=alpha, steps=20, random_start=True),
        "cw": partial(cw_linf, eps=eps, alpha=alpha, steps=30),
        "autoattack": partial(autoattack_attack, eps=eps, seed=seed),
    }


def _within_ball(attack: Attack, eps: float, name: str) -> Attack:
    """``attack`` with its output checked to lie in the L-inf ball of radius ``eps``: an
    adversarial image from outside the threat model would count as a break it is not."""
    def checked(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack(model, x, y)
        if isinstance(x_adv, torch.Tensor) and x_adv.shape == x.shape:
            dist = (x_adv.detach() - x).abs().amax().item()
            if dist > eps + 1e-6:  # float rounding of x +- eps is ~1e-8
                raise ValueError(f"attack {name!r} returned images {dist * 255:.3f}/255 from the "
                                 f"originals, outside the L-inf ball of {eps * 255:.3f}/255")
        return x_adv
    return checked


def _check_count(value: object, name: str) -> int | None:
    return None if value is None else check_number(value, name, low=1, integer=True)


def parse_attacks(attacks: Sequence[str] | str) -> list[str]:
    """The attack names of ``attacks``, checked: at least one, each from :data:`ATTACKS`, none
    twice. ``evaluate_suite`` and the command line's ``--attacks`` read their lists with it.

    Args:
        attacks: a list or tuple of names, or one comma-separated string (``"clean,pgd20"``);
            spaces around a name are ignored.

    Returns:
        The names, stripped, in the order given.

    Raises:
        TypeError: ``attacks`` is neither a string, a list nor a tuple, or holds a non-string.
        ValueError: a name is not in :data:`ATTACKS`, no name is given, or a name is listed
            twice.
    """
    if not isinstance(attacks, (str, list, tuple)):
        raise TypeError(f"attacks must be a sequence of attack names from {list(ATTACKS)} or one "
                        f"comma-separated string, got {type(attacks).__name__}")
    names = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"attack names must be strings from {list(ATTACKS)}, got {names!r}")
    names = [name.strip() for name in names]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise ValueError(f"unknown attack name(s) {unknown}; expected a non-empty selection of "
                         f"{list(ATTACKS)}")
    for i, name in enumerate(names):
        if name in names[:i]:
            # A second run would only repeat the first (same seed, same images) at its full cost,
            # hours for AutoAttack; the results, keyed by name, would keep one of them anyway.
            raise ValueError(f"attack {name!r} listed twice in {attacks!r}; list each attack once")
    return names


def evaluate_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   attacks: Sequence[str] | str = ATTACKS, n: int | None = None,
                   autoattack_n: int = 1000, batch_size: int = 500, progress: bool = False,
                   eps: float = EVAL_EPS, per_image: bool = False,
                   seed: int = 0, search: str = "fp32") -> dict[str, dict[str, Any]]:
    """Accuracies of ``model`` under the protocol's attacks, as in ``metrics.json``.

    Args:
        model: maps float ``(N, C, H, W)`` images in [0, 1] to logits ``(N, K)``.
        x: float ``(N, C, H, W)`` in [0, 1], on the model's device.
        y: integer labels ``(N,)`` in ``[0, K)``.
        attacks: names from ``ATTACKS`` (a sequence, or one comma-separated string), each
            at most once (:func:`parse_attacks`).
        n: evaluate on the first ``n`` examples (default: all).
        autoattack_n: AutoAttack runs on the first ``min(n, autoattack_n)`` examples only (it
            is by far the slowest; the protocol asks for at least 1,000).
        batch_size: images per attack call.
        progress: print one line per attack with its accuracy and wall time.
        eps: L-inf radius (default 8/255).
        per_image: also return each attack's :func:`correct` mask.
        seed: every attack starts from this seed (:func:`seeded`), so a rerun draws the same
            random starts and the caller's random streams are left as they were. An int in
            [0, 2**63).
        search: ``"fp32"`` (every attack searches in IEEE fp32) or ``"tf32"``: PGD-20 (which
            must be among ``attacks``) runs first, searched in fp32 (the number reported) and in
            TF32 from the same random starts; if the two accuracies agree within
            :data:`PRECISION_RULE_POINTS` points, and the images TF32 misses (robust to its
            search, broken by fp32's), counted on their own, are at most
            :data:`PRECISION_RULE_POINTS` percent of the ``n`` images
            (:func:`check_search_precision`), the attacks of :data:`TF32_SEARCH_ATTACKS` search
            in TF32. Verdicts are fp32's either way (:func:`correct`). Where TF32 does not
            exist (:func:`tf32_available`: a CPU, an older GPU), everything runs as with
            ``"fp32"``.

    Returns:
        ``{name: {"value": accuracy in [0, 1], "n": number of examples, "seconds": wall
        time, "search": "fp32" or "tf32"}}`` in the order asked. An attack searched in TF32
        also has ``"retried_in_fp32"`` (images broken in TF32 but not in fp32, attacked again
        in fp32) and ``"broken_on_retry"`` (how many of those the fp32 retry broke; see
        :func:`correct`), and with ``search="tf32"`` the PGD-20 entry has ``"tf32_check"``
        (:func:`check_search_precision`, with the TF32 run's ``seconds``, ``retried_in_fp32``
        and ``broken_on_retry``). With ``per_image``, each entry also has
        ``"correct"``, a bool numpy array as long as the entry's ``"n"`` (the first
        ``min(n, autoattack_n)`` images for AutoAttack): entry i for the i-th evaluated image.

    Raises:
        ValueError: as :func:`correct` and :func:`parse_attacks`; ``seed`` outside [0, 2**63);
            ``"autoattack"`` asked for with a model or images not in float32 (torchattacks runs
            in float32). Checked before any attack runs.
    """
    names = parse_attacks(attacks)
    n = _check_count(n, "n")
    autoattack_n = _check_count(autoattack_n, "autoattack_n")
    seed = check_seed(seed)
    search = _check_search(search)
    if search == "tf32" and "pgd20" not in names:
        raise ValueError(f"search='tf32' needs 'pgd20' among the attacks (PGD-20 searched in fp32 "
                         f"and in TF32 is the check that allows TF32), got {names}")
    x, y = _check_data(x, y, batch_size)
    if "autoattack" in names:
        check_autoattack_inputs(model, x)
    if n is not None:
        x, y = x[:n], y[:n]
    if search == "tf32" and not tf32_available(x.device):
        search = "fp32"  # the same arithmetic; no second PGD-20, no label that promises TF32
        if progress:
            print(f"[evaluate] TF32 search asked for, but {x.device} has no TF32: fp32 throughout",
                  flush=True)
    table = standard_attacks(eps, seed)

    def measure(name: str, precision: str) -> tuple[dict[str, Any], torch.Tensor]:
        start = time.perf_counter()
        xs, ys = (x[:autoattack_n], y[:autoattack_n]) if name == "autoattack" else (x, y)
        attack = None if name == "clean" else _within_ball(table[name], eps, name)
        with seeded(seed, x.device):
            mask, retried = _correct(model, xs, ys, attack, batch_size, precision)
        value = mask.sum().item() / len(xs)  # a host sync: the time below is the attack's
        seconds = time.perf_counter() - start
        entry = {"value": value, "n": len(xs), "seconds": round(seconds, 2), "search": precision,
                 **(retried if precision == "tf32" else {})}
        if progress:
            print(f"[evaluate] {name:>10}: {value:.4f} on {len(xs)} images ({seconds:.1f} s"
                  f"{', searched in TF32' if precision == 'tf32' else ''})", flush=True)
        return entry, mask

    measured: dict[str, tuple[dict[str, Any], torch.Tensor]] = {}
    tf32_allowed = False
    if search == "tf32":
        measured["pgd20"] = measure("pgd20", "fp32")
        in_tf32, tf32_mask = measure("pgd20", "tf32")
        check = check_search_precision(measured["pgd20"][1], tf32_mask)
        check.update({k: in_tf32[k] for k in ("seconds", "retried_in_fp32", "broken_on_retry")})
        measured["pgd20"][0]["tf32_check"] = check
        tf32_allowed = check["passed"]
        if progress:
            print(f"[evaluate] TF32 search check: {check['detail']}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        entry, mask = measured.get(name) or measure(
            name, "tf32" if tf32_allowed and name in TF32_SEARCH_ATTACKS else "fp32")
        results[name] = entry
        if per_image:
            entry["correct"] = mask.cpu().numpy()
    return results


def check_search_precision(fp32: torch.Tensor, tf32: torch.Tensor) -> dict[str, Any]:
    """Whether an attack searched in TF32 is as strong as in fp32 on the same images (the
    evaluation protocol's rule).

    Two conditions, each at :data:`PRECISION_RULE_POINTS`: the accuracies agree (the
    protocol's rule), and the images fp32 breaks that TF32 does not, counted on their own, stay within the
    same share of the images. The second keeps images TF32 breaks and fp32 does not from
    cancelling out images TF32 misses: a search that misses is what would flatter the model.

    Args:
        fp32, tf32: :func:`correct` masks, bool ``(N,)``, of one attack on the same images from
            the same random starts, searched in IEEE fp32 and in TF32.

    Returns:
        ``{"attack": "pgd20", "n", "fp32", "tf32"`` (accuracies in [0, 1]), ``"points"``
        (TF32 minus fp32, in percentage points), ``"images_changed"``, ``"missed_by_tf32"``
        (robust by TF32's search, broken by fp32's), ``"missed_by_fp32"``, ``"rule"``,
        ``"passed"``, ``"detail"}``.
    """
    if not (isinstance(fp32, torch.Tensor) and isinstance(tf32, torch.Tensor)
            and fp32.dtype == tf32.dtype == torch.bool and fp32.shape == tf32.shape
            and fp32.dim() == 1 and len(fp32) > 0):
        raise ValueError(f"expected two non-empty bool masks (N,) of the same images, got "
                         f"{_describe(fp32)} and {_describe(tf32)}")
    n = len(fp32)
    acc_fp32, acc_tf32 = fp32.sum().item() / n, tf32.sum().item() / n
    points = (acc_tf32 - acc_fp32) * 100
    missed_by_tf32 = int((tf32 & ~fp32).sum().item())
    missed_by_fp32 = int((fp32 & ~tf32).sum().item())
    passed = not (_exceeds(abs(points), PRECISION_RULE_POINTS)
                  or _exceeds(100 * missed_by_tf32 / n, PRECISION_RULE_POINTS))
    detail = (f"PGD-20 searched in TF32 {acc_tf32:.4f}, in fp32 {acc_fp32:.4f} on {n} images "
              f"({points:+.2f} points; {missed_by_tf32} images broken only by fp32, "
              f"{missed_by_fp32} only by TF32): "
              + ("TF32 searches CW-inf and AutoAttack" if passed else
                 f"over the {PRECISION_RULE_POINTS} points allowed, every attack searches in fp32"))
    return {"attack": "pgd20", "n": n, "fp32": acc_fp32, "tf32": acc_tf32,
            "points": round(points, 3), "images_changed": missed_by_tf32 + missed_by_fp32,
            "missed_by_tf32": missed_by_tf32, "missed_by_fp32": missed_by_fp32,
            "rule": f"|TF32 - fp32| <= {PRECISION_RULE_POINTS} points, and at most "
                    f"{PRECISION_RULE_POINTS} points of images broken by fp32 only",
            "passed": passed, "detail": detail}


def _describe(mask: object) -> str:
    if isinstance(mask, torch.Tensor):
        return f"{mask.dtype} {tuple(mask.shape)}"
    return type(mask).__name__


def describe_precision(accuracy: dict[str, dict[str, Any]]) -> str:
    """How an evaluation's arithmetic ran, for ``metrics.json``'s ``eval_precision``, from
    :func:`evaluate_suite`'s result: :data:`EVAL_PRECISION`, or which attacks searched in TF32."""
    in_tf32 = [name for name, entry in accuracy.items() if entry.get("search") == "tf32"]
    if not in_tf32:
        return EVAL_PRECISION
    labels = {"cw": "CW-inf", "autoattack": "AutoAttack"}
    return (f"verdicts in fp32 (IEEE; TF32 off on GPUs); the search of "
            f"{' and '.join(labels.get(n, n) for n in in_tf32)} in TF32, after PGD-20 searched "
            f"both ways agreed within {PRECISION_RULE_POINTS} points; images broken in TF32 but "
            f"not in fp32 attacked again in fp32")


# --------------------------------------------------------------------------------------------
# Sanity checks against gradient masking (chapter 6)
# --------------------------------------------------------------------------------------------

def _tolerance(n: int) -> float:
    """Slack for comparing two accuracies on ``n`` examples: one example or half a point."""
    return max(1.0 / n, 0.005)


#: Float rounding in a difference of accuracies, or of percentage points, is about 1e-16
#: (0.40 - 0.35 is 0.050000000000000044, a gap of 50 images in 1,000 that read as more than 5
#: points). Accuracies are counts / n, so differences of whole images lie at least 1 / n apart:
#: a difference within this slack of its limit counts as equal to it, which settles the ties as
#: exact arithmetic would and never merges two image counts for any n below 10^8.
_ROUNDING = 1e-9


def _exceeds(value: float, limit: float) -> bool:
    """``value > limit`` as exact arithmetic has it, for a difference of accuracies (or points)
    and its allowed margin: a difference of exactly the margin does not exceed it. Every
    comparison of the checks goes through here, so all of them treat their boundary alike."""
    return value > limit + _ROUNDING


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with a fixed seed without disturbing the caller's RNG streams.

    Re-seeding before each run gives every run the same random start, so runs that differ in
    one setting (steps, eps) differ in nothing else. ``seed`` is an int in [0, 2**63).
    """
    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                  batch_size: int, seed: int, alpha: float | None = None) -> float:
    if eps == 0:
        return accuracy(model, x, y, batch_size)
    attack = partial(pgd, eps=eps, alpha=eps / 4 if alpha is None else alpha, steps=steps)
    with seeded(seed, x.device):
        return robust_accuracy(model, x, y, attack, batch_size)


def _increasing(values: Sequence[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))


def check_more_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                     steps: Sequence[int] = (1, 5, 20, 50), *, alpha: float | None = None,
                     batch_size: int = 500, seed: int = 0) -> dict:
    """More PGD steps must not raise robust accuracy.

    Runs L-inf PGD with step ``alpha`` (default eps / 4) for each step count, all from the same
    random start, and passes when each accuracy is at most the previous one plus one example or
    half a point (compared with the lowest accuracy of fewer steps, so that rises within the
    slack cannot add up). Accuracy that rises with more steps means the attack is not
    converging, a classic symptom of a noisy gradient. A gradient that is exactly zero (rounded inputs, a
    saturated softmax) leaves the attack where it started, so accuracy stays flat and this check
    passes: :func:`check_eps_sweep`, :func:`check_black_box_weaker` and
    :func:`check_zero_gradients` are the ones that catch it.

    Args:
        model, x, y, batch_size: as in :func:`correct` (float ``(N, C, H, W)`` images in [0, 1]
            and integer labels ``(N,)`` on the model's device).
        eps: the L-inf radius, > 0.
        steps: at least two step counts (ints >= 0), strictly increasing.
        alpha: the step size (default eps / 4).
        seed: every run starts from this seed (the same random start), an int in [0, 2**63).

    Returns:
        ``{"steps": [...], "accuracy": [...], "passed": bool, "detail": str}``.
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    seed = check_seed(seed)
    steps = [check_number(s, "steps", low=0, integer=True) for s in steps]
    # Fewer than two counts compare nothing (an empty list would "pass"); out of order, the
    # check would compare the wrong pairs.
    if len(steps) < 2 or not _increasing(steps):
        raise ValueError(f"steps must hold at least two step counts in increasing order, got "
                         f"{steps}")
    accs = [_pgd_accuracy(model, x, y, eps, s, batch_size, seed, alpha) for s in steps]
    tol = _tolerance(len(x))
    # Against the lowest accuracy so far, not just the previous one: small rises that each stay
    # within the slack must not add up to a large one.
    rises = [(steps[min(range(j), key=accs.__getitem__)], steps[j]) for j in range(1, len(accs))
             if _exceeds(accs[j] - min(accs[:j]), tol)]
    passed = not rises
    detail = ("accuracy does not rise with more steps" if passed else
              f"accuracy rises from {rises[0][0]} to {rises[0][1]} steps: the attack is not "
              "converging (possible gradient masking)")
    return {"steps": steps, "accuracy": accs, "passed": passed, "detail": detail}


def eps_sweep(eps: float) -> list[float]:
    """The radii of the eps-sweep check, strictly increasing: ``eps * (0, 1/4, 1/2, 1, 2, 4, 8)``
    (up to 64/255 at 8/255), capped at 1 (a larger radius allows no other images in [0, 1]),
    which appears once: ``eps_sweep(0.3) == [0.0, 0.075, 0.15, 0.3, 0.6, 1.0]``.

    Args:
        eps: the L-inf radius, > 0.
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    sweep: list[float] = []
    for factor in (0, 0.25, 0.5, 1, 2, 4, 8):
        value = min(eps * factor, 1.0)
        # The cap repeats 1.0 for eps > 1/8; check_eps_sweep refuses a list that does not increase.
        if not sweep or value > sweep[-1]:
            sweep.append(value)
    return sweep


def check_eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    eps_values: Sequence[float] = (0, 2 / 255, 4 / 255, 8 / 255, 16 / 255,
                                                   32 / 255, 64 / 255),
                    *, steps: int = 20, max_final: float = 0.10, batch_size: int = 500,
                    seed: int = 0) -> dict:
    """Robust accuracy must fall as eps grows, to near 0 at the largest eps.

    PGD-``steps`` (step eps / 4) at each eps. Passes when no accuracy rises above the lowest
    one at a smaller eps by more than one example or half a point, and the accuracy at the
    largest eps is below ``max_final``. An attack that cannot push accuracy to ~0 with a huge
    budget (64/255 lets it paint over the image) is not finding the model's weaknesses.

    Args:
        model, x, y, batch_size: as in :func:`correct` (float ``(N, C, H, W)`` images in [0, 1]
            and integer labels ``(N,)`` on the model's device).
        eps_values: radii >= 0, strictly increasing; the last is the huge budget.
        steps: PGD steps at each radius, an int >= 0.
        max_final: the accuracy the largest radius must stay below, in [0, 1].
        seed: every run starts from this seed, an int in [0, 2**63).

    Returns:
        ``{"eps": [...], "accuracy": [...], "passed": bool, "detail": str}``.
    """
    seed = check_seed(seed)
    eps_values = [check_number(e, "eps", low=0.0) for e in eps_values]
    if not eps_values:
        raise ValueError("eps_values must hold at least one eps")
    if not _increasing(eps_values):
        # The verdict reads the last value as the largest budget.
        raise ValueError(f"eps_values must be in increasing order, got {eps_values}")
    accs = [_pgd_accuracy(model, x, y, e, steps, batch_size, seed) for e in eps_values]
    tol = _tolerance(len(x))
    monotone = not any(_exceeds(accs[j] - min(accs[:j]), tol) for j in range(1, len(accs)))
    final_ok = _exceeds(max_final - accs[-1], 0.0)  # strictly below: max_final itself fails
    passed = monotone and final_ok
    if passed:
        detail = f"accuracy falls to {accs[-1]:.3f} at eps = {eps_values[-1] * 255:.0f}/255"
    elif not final_ok:
        detail = (f"accuracy is still {accs[-1]:.3f} at eps = {eps_values[-1] * 255:.0f}/255 "
                  f"(expected < {max_final}): the attack fails even with a huge budget")
    else:
        detail = "accuracy rises with eps: the attack is unreliable"
    return {"eps": eps_values, "accuracy": accs, "passed": passed, "detail": detail}


def check_black_box_weaker(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                           n_queries: int = 1000, pgd_acc: float | None = None,
                           batch_size: int = 500, seed: int = 0) -> dict:
    """The black-box Square attack must not beat white-box PGD-20.

    Square only queries outputs. If it finds adversarial examples that PGD misses, the
    gradients PGD follows are misleading: the classic signature of gradient masking.
    Passes when ``square >= pgd20 - tolerance`` (one example or half a point).

    Args:
        model, x, y, batch_size: as in :func:`correct` (float ``(N, C, H, W)`` images in [0, 1]
            and integer labels ``(N,)`` on the model's device).
        eps: the L-inf radius, > 0.
        n_queries: Square's queries per image, an int >= 1.
        pgd_acc: PGD-20 accuracy on the same ``x`` if already measured (else it is measured).
        seed: seeds PGD's random start and Square's random search, an int in [0, 2**63).

    Returns:
        ``{"square": float, "pgd20": float, "n_queries": int, "passed": bool, "detail": str}``.
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    seed = check_seed(seed)
    if pgd_acc is None:
        pgd_acc = _pgd_accuracy(model, x, y, eps, 20, batch_size, seed)
    attack = partial(square, eps=eps, n_queries=n_queries, seed=seed)
    square_acc = robust_accuracy(model, x, y, attack, batch_size)
    passed = not _exceeds(pgd_acc - square_acc, _tolerance(len(x)))
    detail = (f"Square {square_acc:.3f} >= PGD-20 {pgd_acc:.3f}" if passed else
              f"Square {square_acc:.3f} < PGD-20 {pgd_acc:.3f}: a black-box attack beats the "
              "white-box one, a sign of gradient masking")
    return {"square": square_acc, "pgd20": pgd_acc, "n_queries": n_queries, "passed": passed,
            "detail": detail}


#: The two losses whose input gradients the white-box attacks follow, per image ``(n,)``: the
#: cross-entropy (FGSM, PGD, APGD-CE) and the margin (CW-inf; APGD-DLR's is a ratio of margins).
_ATTACK_LOSSES = {"ce": lambda z, t: F.cross_entropy(z, t, reduction="none"),
                  "margin": margin_loss}


def _input_gradients(model: nn.Module, point: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The input gradient of each attack loss at ``point`` ``(n, C, H, W)``, flattened to
    ``(n, C * H * W)``; the logits checked as :func:`correct` checks them."""
    xi = point.detach().clone().requires_grad_(True)
    logits = _checked(model, model(xi), y)
    out = {}
    for k, (name, loss) in enumerate(_ATTACK_LOSSES.items()):
        (grad,) = torch.autograd.grad(loss(logits, y).sum(), xi,
                                      retain_graph=k + 1 < len(_ATTACK_LOSSES))
        out[name] = grad.flatten(1)
    return out


def _points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int,
            seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Where the gradient checks look, batch by batch: each batch of images and then PGD's
    random start in its eps-ball, with their labels, while the model is in eval mode, in IEEE
    fp32 and under ``seed`` (draws the caller makes between points are seeded too)."""
    with attack_mode(model), full_precision(), seeded(seed, x.device):
        for s in _batches(len(x), batch_size):
            xb, yb = x[s], y[s]
            start = random_point(xb, eps).clamp(0, 1)   # PGD's random start
            for point in (xb, start):
                yield point, yb


#: The share of input coordinates (pixels x colour channels) whose attack gradient may be exactly
#: zero in :func:`check_zero_gradients`. The input gradient of a network that reads every pixel
#: is exactly zero almost nowhere, since every pixel reaches the loss through many paths;
#: rounding one colour channel inside the model zeroes a third of them.
MAX_ZERO_GRADIENT_SHARE = 0.01


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                         max_share: float = MAX_ZERO_GRADIENT_SHARE, batch_size: int = 500,
                         seed: int = 0) -> dict:
    """The gradients the white-box attacks follow must not vanish on part of the input.

    FGSM and PGD follow the input gradient of the cross-entropy, CW-inf that of the margin (the
    best other logit minus the true one; AutoAttack's APGD stages follow the cross-entropy and a
    ratio of such margins). A coordinate (one colour channel of one pixel) whose gradient is
    exactly zero is one these attacks never move: an input rounded or quantised inside the
    model (shattered gradients), a softmax saturated to exactly 0 and 1 (vanishing gradients).
    Masking only *part* of the input weakens the gradient attacks without stopping them, and
    can leave them about as strong as the black-box Square attack: then
    :func:`check_black_box_weaker`, :func:`check_eps_sweep` and the AutoAttack gap all pass
    while every gradient attack overstates robustness (chapter 6 builds such a model). This
    check looks at the gradient itself. What it cannot see is a gradient that is wrong without
    being zero: the same rounding plus a term too small to change any prediction, whose
    derivative has a pseudo-random sign, passes every check while the attacks, which follow
    the gradient's sign, move those coordinates at random (a red-team review built it; chapter
    6's exercise 4 does too). Only an attack adapted to the defence (BPDA) exposes that one:
    the checks are necessary, not sufficient. A model that never reads part of its input (a
    crop inside the model) fails this check too, without overstating anything.

    At every image and at one random start in its eps-ball (where PGD begins), it counts the
    coordinates whose input gradient is exactly zero (or not finite: no direction either),
    under each loss, with the model in eval mode and in IEEE fp32. Passes when, under both
    losses, at most ``max_share`` of the coordinates are. It also counts the images whose whole
    gradient is zero (the case the reference AutoAttack warns about). The logits and labels are
    checked as :func:`correct` checks them (NaN logits raise ValueError).

    Args:
        model, x, y, batch_size: as in :func:`correct` (float ``(N, C, H, W)`` images in [0, 1]
            and integer labels ``(N,)`` on the model's device).
        eps: the L-inf radius of the random start, > 0.
        max_share: the allowed share of zero coordinates, in [0, 1].
        seed: seeds the random starts, an int in [0, 2**63).

    Returns:
        ``{"zero_share": {"ce": float, "margin": float}, "zero_images": {"ce": int, "margin":
        int}, "max_share": float, "passed": bool, "detail": str}``; the shares are over the
        ``2 * x.numel()`` coordinates (each image and its random start), the image counts over
        the ``2 * N`` points.
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    max_share = check_number(max_share, "max_share", low=0.0, high=1.0)
    seed = check_seed(seed)
    x, y = _check_data(x, y, batch_size)
    losses = _ATTACK_LOSSES
    # Counted on the device and read once at the end, not per batch.
    zeros = {name: torch.zeros((), dtype=torch.int64, device=x.device) for name in losses}
    whole = {name: torch.zeros((), dtype=torch.int64, device=x.device) for name in losses}
    for point, yb in _points(model, x, y, eps, batch_size, seed):
        for name, grad in _input_gradients(model, point, yb).items():
            zero = (grad == 0) | ~torch.isfinite(grad)   # no direction to follow
            zeros[name] += zero.sum()
            whole[name] += zero.all(1).sum()
    share = {name: int(zeros[name]) / (2 * x.numel()) for name in losses}
    whole = {name: int(count) for name, count in whole.items()}
    passed = all(v <= max_share for v in share.values())
    found = (f"the input gradient is exactly zero on {share['ce']:.1%} of the coordinates under "
             f"the cross-entropy ({whole['ce']} of {2 * len(x)} points wholly) and on "
             f"{share['margin']:.1%} under the margin ({whole['margin']} wholly)")
    detail = (found if passed else
              f"{found}, more than {max_share:.0%}: the gradient attacks cannot move those "
              "coordinates, so their numbers may overstate robustness (shattered or vanishing "
              "gradients: attack through a differentiable stand-in, BPDA), unless the model "
              "never reads those inputs")
    return {"zero_share": share, "zero_images": whole, "max_share": max_share,
            "passed": passed, "detail": detail}


#: The share of sampled coordinates, among those where a one-grey-level step moved the loss, on
#: which :func:`check_gradient_signs` asks the gradient's sign to agree with the loss's change.
#: A gradient of random sign on one colour channel of three brings it to about 5/6. On the first
#: 1,000 test images the three tutorial checkpoints agree on 98.4 % to 98.9 % and such a control
#: on 82.8 % (data/results/cpu-checks/later_checks.json, written by benchmarks/later_checks.py).
MIN_SIGN_AGREEMENT = 0.9
#: The finite-difference step of :func:`check_gradient_signs`, one grey level of an 8-bit image:
#: a model that rounds its input to the 8-bit grid still sees it.
SIGN_STEP = 1 / 255


def check_gradient_signs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                         coordinates: int = 16, step: float = SIGN_STEP,
                         min_agreement: float = MIN_SIGN_AGREEMENT, batch_size: int = 500,
                         seed: int = 0) -> dict:
    """The gradient the white-box attacks follow must point where the loss rises.

    PGD, FGSM and CW-inf step along the *sign* of the input gradient, so a gradient that is
    wrong without being zero misleads them as much as a zero one, and
    :func:`check_zero_gradients` cannot see it: an input rounded inside the model plus a term
    too small to change any prediction, whose derivative has a pseudo-random sign (shattered
    gradients, Athalye et al. 2018), leaves every coordinate a nonzero gradient and the attacks
    moving those coordinates at random. This check asks the loss itself: at every image and at
    one random start in its eps-ball, for ``coordinates`` coordinates drawn at random, it
    moves the coordinate ``step`` up and ``step`` down (within [0, 1]) and compares the sign
    of the loss's change with the sign of its gradient there, under the cross-entropy and
    under the margin, in eval mode and IEEE fp32. A step of one grey level is one the model
    sees even when it rounds its input to the 8-bit grid.

    Passes when, under both losses, the signs agree on at least ``min_agreement`` of the
    coordinates where the loss moved at all (a loss that did not move, e.g. the
    cross-entropy of an image classified with certainty, says nothing about the sign; a
    gradient of exactly zero where the loss moved counts as disagreeing). A model whose loss
    moved on no sampled coordinate fails: nothing shows its gradient to be right.

    Args:
        model, x, y, batch_size: as in :func:`correct` (float ``(N, C, H, W)`` images in [0, 1]
            and integer labels ``(N,)`` on the model's device).
        eps: the L-inf radius of the random start, > 0.
        coordinates: coordinates sampled per point (each image and its random start), >= 1;
            each costs two forward passes.
        step: the finite-difference step, in (0, 1].
        min_agreement: the share of agreeing signs required, in [0, 1].
        seed: seeds the random starts and the coordinates, an int in [0, 2**63).

    Returns:
        ``{"agreement": {"ce": float | None, "margin": float | None}, "measured": {"ce": int,
        "margin": int}, "sampled": int, "step": float, "min_agreement": float,
        "passed": bool, "detail": str}``: per loss, the share of agreeing signs among the
        ``measured`` coordinates where the loss moved (None when it moved nowhere), of the
        ``sampled`` ones (``2 * N * coordinates``).
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    coordinates = int(check_number(coordinates, "coordinates", low=1, integer=True))
    step = check_number(step, "step", low=0.0, high=1.0, low_inclusive=False)
    min_agreement = check_number(min_agreement, "min_agreement", low=0.0, high=1.0)
    seed = check_seed(seed)
    x, y = _check_data(x, y, batch_size)
    losses = _ATTACK_LOSSES
    # Counted on the device and read once at the end, not per batch.
    agree = {name: torch.zeros((), dtype=torch.int64, device=x.device) for name in losses}
    measured = {name: torch.zeros((), dtype=torch.int64, device=x.device) for name in losses}
    for point, yb in _points(model, x, y, eps, batch_size, seed):
        grads = _input_gradients(model, point, yb)
        flat = point.detach().flatten(1)
        rows = torch.arange(len(flat), device=x.device)
        picks = torch.randint(flat.shape[1], (len(flat), coordinates), device=x.device)
        for j in range(coordinates):
            col = picks[:, j]
            ends = []
            for direction in (1.0, -1.0):
                moved = flat.clone()
                moved[rows, col] = (moved[rows, col] + direction * step).clamp(0, 1)
                with torch.no_grad():
                    ends.append(_checked(model, model(moved.view_as(point)), yb))
            for name, loss in losses.items():
                change = loss(ends[0], yb) - loss(ends[1], yb)
                moved_loss = change != 0
                same = torch.sign(grads[name][rows, col]) == torch.sign(change)
                agree[name] += (moved_loss & same).sum()
                measured[name] += moved_loss.sum()
    measured = {name: int(count) for name, count in measured.items()}
    share = {name: int(agree[name]) / measured[name] if measured[name] else None
             for name in losses}
    sampled = 2 * len(x) * coordinates
    passed = all(v is not None and v >= min_agreement for v in share.values())

    def said(name: str) -> str:
        if share[name] is None:
            return "the loss moved on none of them"
        return f"they agree on {share[name]:.1%} of the {measured[name]:,} where the loss moved"

    found = (f"the gradient's sign and the loss's change over +-{step * 255:g}/255, on "
             f"{sampled:,} sampled coordinates: under the cross-entropy {said('ce')}, "
             f"under the margin {said('margin')}")
    detail = (found if passed else
              f"{found}; at least {min_agreement:.0%} required: the gradient the attacks "
              "follow points the wrong way on part of the input, so their numbers may "
              "overstate robustness (shattered gradients: attack through a differentiable "
              "stand-in, BPDA)")
    return {"agreement": share, "measured": measured, "sampled": sampled, "step": step,
            "min_agreement": min_agreement, "passed": passed, "detail": detail}


#: The largest change of an image's logits, as a share of their largest magnitude (at least 1),
#: that :func:`check_deterministic` lets pass in float32. About a thousand fp32 epsilons, room
#: for kernels that sum in another order for another batch size (on a CPU the committed
#: checkpoints' logits come out the same bit for bit); for a float16 or bfloat16 model or its
#: logits, 16 of that dtype's epsilons (1.6e-2 and 0.125).
MAX_LOGIT_CHANGE = 1e-4


def _logit_tolerance(dtype: torch.dtype) -> float:
    return max(MAX_LOGIT_CHANGE, 16 * torch.finfo(dtype).eps)


def check_deterministic(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        eps: float = EVAL_EPS, batch_size: int = 500, seed: int = 0) -> dict:
    """The model must give an image the same logits every time it sees it.

    Every other check, and every accuracy, assumes that the function the attacks search is the
    function the verdict classifies with. Three ways to break that, each measured here with the
    model in eval mode and in IEEE fp32 (the dtype of the model), against the logits of ``x`` in
    its own order in batches of ``batch_size``, without autograd:

    - ``"repeat"``: the same batches again. A randomized model (noise, random resizing or
      dropout at inference: Athalye et al. 2018's stochastic gradients) answers differently,
      and an attack that follows one draw's gradient and is judged on another's overstates its
      robustness; it needs attacks that average over the randomness (EOT), which this protocol
      does not run.
    - ``"autograd"``: the same batches with the input requiring gradients, as the attacks see
      it. A model that computes other logits while autograd records is attacked in place of
      another one.
    - ``"batch"``: the images in a shuffled order, in batches of about half the size. An
      image's logits that depend on the other images of its batch (batch statistics, a batch
      size) are not the ones attacked: ``correct`` attacks only the clean-correct images, in
      other batches than it classified them in.
    - ``"history"``: points the model has not seen, near images it has not been shown (each
      image mirrored, and a random point of its eps-ball), before and after it is shown those
      images. A model that remembers what it saw can answer the attacks from memory, since
      ``correct`` classifies every clean image before attacking it (a second red-team review
      built one that scored its clean accuracy under every attack and passed the other
      comparisons: its memory returns the model's own logits).

    Passes when, in each of the four, no logit of an image changes by more than the tolerance
    times the largest magnitude of that image's logits (at least 1); the images whose
    predicted class changed are counted too. The tolerance is :data:`MAX_LOGIT_CHANGE` for
    float32, 16 epsilons of the dtype for a less precise model or logits.

    Args:
        model, x, y, batch_size: as in :func:`correct` (float ``(N, C, H, W)`` images in [0, 1]
            and integer labels ``(N,)`` on the model's device); ``y`` only checks the logits'
            class count.
        eps: the L-inf radius of the history comparison's points, > 0.
        seed: seeds the shuffled order and the points, an int in [0, 2**63). The model's own
            random draws are not re-seeded between the calls.

    Returns:
        ``{"max_change": {"repeat": float, "autograd": float, "batch": float, "history": float},
        "changed_predictions": {same keys: int}, "tolerance": float, "passed": bool,
        "detail": str}``; a change is relative to the image's largest logit magnitude (at
        least 1), the counts over the ``N`` images.
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    seed = check_seed(seed)
    x, y = _check_data(x, y, batch_size)
    half = min(batch_size, len(x)) // 2 + 1
    dtypes = {p.dtype for p in model.parameters()}

    def logits(order: torch.Tensor | None, size: int, grad: bool,
               images: torch.Tensor = x) -> torch.Tensor:
        """Every image's logits ``(N, K)`` in float32, in ``images``' order."""
        images, labels = (images, y) if order is None else (images[order], y[order])
        out = []
        for s in _batches(len(images), size):
            xb = images[s].detach().clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                z = _checked(model, model(xb), labels[s]).detach()
            dtypes.add(z.dtype)
            out.append(z.float())
        out = torch.cat(out)
        return out if order is None else out[torch.argsort(order)]

    with attack_mode(model), full_precision(), seeded(seed, x.device):
        first = logits(None, batch_size, grad=False)
        order = torch.randperm(len(x), device=x.device)
        others = {"repeat": logits(None, batch_size, grad=False),
                  "autograd": logits(None, batch_size, grad=True),
                  "batch": logits(order, half, grad=False)}
        unseen = x.flip(-1)   # mirrored: images this evaluation has not shown the model
        near = random_point(unseen, eps).clamp(0, 1)
        before = logits(None, batch_size, grad=False, images=near)
        logits(None, batch_size, grad=False, images=unseen)   # shown to the model
        after = logits(None, batch_size, grad=False, images=near)
    # Each image's change relative to its own logits, so one image's large logits do not
    # loosen the limit for the others.
    pairs = {**{k: (first, v) for k, v in others.items()}, "history": (before, after)}
    change, flipped = {}, {}
    for k, (a, b) in pairs.items():
        scale = a.abs().amax(1, keepdim=True).clamp(min=1.0)
        change[k] = float(((b - a).abs() / scale).max())
        flipped[k] = int((b.argmax(1) != a.argmax(1)).sum())
    # The least precise of the parameters' and the logits' dtypes sets the limit.
    tolerance = max(_logit_tolerance(d) for d in dtypes | {x.dtype})
    passed = all(v <= tolerance for v in change.values())
    found = ", ".join(f"{k} {v:.1e} ({flipped[k]} predictions changed)" for k, v in change.items())
    why = {"repeat": "it answers differently from one call to the next: a randomized model, "
                     "whose accuracy needs attacks that average over its randomness (EOT)",
           "autograd": "it computes other logits while autograd records, as when attacked: "
                       "the attacks aim at another model than the one judged",
           "batch": "an image's logits depend on the other images of its batch, and the "
                    "attacks see other batches than the clean verdict did",
           "history": "it answers differently after it has seen nearby images: a model with "
                      "a memory, which can answer the attacks from what it saw"}
    failed = next((k for k, v in change.items() if v > tolerance), None)
    detail = (f"the largest logit change is, relative to the logits' scale: {found}; allowed "
              f"{tolerance:.0e}")
    if failed is not None:
        detail += f": {why[failed]}, so the accuracies measured on it are not to be trusted"
    return {"max_change": change, "changed_predictions": flipped, "tolerance": tolerance,
            "passed": passed, "detail": detail}


def check_autoattack_gap(pgd20_acc: float, aa_acc: float, max_gap: float = 0.05,
                         n: int | None = None) -> dict:
    """AutoAttack accuracy must be within ``max_gap`` below PGD-20 accuracy, and not above it
    (same examples).

    A gap larger than ``max_gap`` means PGD-20 overestimates robustness, typically because of
    gradient masking. AutoAttack *above* PGD-20 (by more than one example or half a point of
    ``n``) means AutoAttack is weaker than a 20-step PGD, which its first stage alone (APGD-CE,
    100 iterations) should not be: it did not run as configured. The gap itself has no slack
    for the number of images: on fewer than 20 one image is more than 5 points (6.25 on the
    smoke profile's 16), so there a failure can be one image, a test of the plumbing rather
    than a verdict on the model.

    Args:
        pgd20_acc: PGD-20 accuracy in [0, 1].
        aa_acc: AutoAttack accuracy in [0, 1], on the same images.
        max_gap: the allowed gap as a fraction, >= 0 (0.05 is 5 points).
        n: the number of images compared, int >= 1, or None (then half a point is the slack).

    Returns:
        ``{"pgd20": float, "autoattack": float, "gap": float, "max_gap": float,
        "passed": bool, "detail": str}``.
    """
    pgd20_acc = check_number(pgd20_acc, "pgd20_acc", low=0.0, high=1.0)
    aa_acc = check_number(aa_acc, "aa_acc", low=0.0, high=1.0)
    max_gap = check_number(max_gap, "max_gap", low=0.0)
    n = _check_count(n, "n")
    gap = pgd20_acc - aa_acc
    too_strong = _exceeds(gap, max_gap)
    too_weak = _exceeds(-gap, _tolerance(n) if n else 0.005)  # one example is noise, not a fault
    passed = not too_strong and not too_weak
    detail = f"AutoAttack is {gap * 100:.1f} points below PGD-20 (allowed {max_gap * 100:.1f})"
    if too_strong:
        detail += ": PGD-20 overestimates robustness (gradient masking?)"
    elif too_weak:
        detail = (f"AutoAttack is {-gap * 100:.1f} points above PGD-20: weaker than a 20-step "
                  "PGD, so it did not run as configured")
    return {"pgd20": float(pgd20_acc), "autoattack": float(aa_acc), "gap": float(gap),
            "max_gap": float(max_gap), "passed": passed, "detail": detail}


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EVAL_EPS, *,
                  pgd20: float | None = None, autoattack: float | None = None,
                  n_queries: int = 1000, batch_size: int = 500, seed: int = 0) -> dict[str, dict]:
    """All seven sanity checks of the evaluation protocol (chapter 6) on ``(x, y)``; the
    ``sanity`` part of metrics.json. The first four look for the symptoms of gradient masking
    in what the attacks achieve; the fifth and sixth look at the gradient itself, which can
    be masked on part of the input while the other four pass: :func:`check_zero_gradients`
    (no exactly zero gradient) and :func:`check_gradient_signs` (its sign agrees with the
    loss's change); the seventh, :func:`check_deterministic`, checks that the model the attacks
    search is the one judged (no randomness, no other logits under autograd or in other
    batches).

    The eps sweep uses ``eps * (0, 1/4, 1/2, 1, 2, 4, 8)`` (up to 64/255 at 8/255), capped at 1
    (:func:`eps_sweep`), so any eps in (0, 1] works. PGD-20 is measured once and shared by the
    black-box and AutoAttack checks.

    Args:
        pgd20: PGD-20 accuracy already measured (e.g. by ``evaluate_suite``); None measures it
            on ``x``. The comparisons are fairest when both numbers come from the same images.
        autoattack: AutoAttack accuracy already measured; None runs AutoAttack on ``x`` here,
            so keep ``x`` small (about 1,000 images on a GPU).
        n_queries: queries of the Square attack in the black-box check.
        seed: seeds every check's attacks, an int in [0, 2**63).

    Running AutoAttack here (``autoattack=None``) needs a float32 model and images
    (torchattacks runs in float32); that, like the arguments, is checked before any attack.

    The checks' own attacks always search in IEEE fp32, whatever an evaluation's ``search``: a
    weaker search would make these detectors of gradient masking easier to pass. A given
    ``autoattack`` is used as it was measured, TF32 search or not.

    Returns:
        ``{"more_steps": ..., "eps_sweep": ..., "black_box_weaker": ..., "autoattack_gap": ...,
        "zero_gradients": ..., "gradient_signs": ..., "deterministic": ...}``,
        each a dict with the measured numbers, ``"passed"``, ``"detail"``, ``"n"`` (the images
        checked, as in an accuracy entry) and ``"seconds"`` (wall time, so that a GPU run's
        metrics.json shows where evaluation time goes).
    """
    eps = check_number(eps, "eps", low=0.0, low_inclusive=False)
    seed = check_seed(seed)
    x, y = _check_data(x, y, batch_size)
    if autoattack is None:
        check_autoattack_inputs(model, x)
    if pgd20 is None:
        pgd20 = _pgd_accuracy(model, x, y, eps, 20, batch_size, seed)
    if autoattack is None:
        autoattack = robust_accuracy(model, x, y, partial(autoattack_attack, eps=eps, seed=seed),
                                     batch_size)
    checks = {
        "more_steps": lambda: check_more_steps(model, x, y, eps, batch_size=batch_size, seed=seed),
        "eps_sweep": lambda: check_eps_sweep(model, x, y, eps_sweep(eps), batch_size=batch_size,
                                             seed=seed),
        "black_box_weaker": lambda: check_black_box_weaker(model, x, y, eps, n_queries=n_queries,
                                                           pgd_acc=pgd20, batch_size=batch_size,
                                                           seed=seed),
        "autoattack_gap": lambda: check_autoattack_gap(pgd20, autoattack, n=len(x)),
        "zero_gradients": lambda: check_zero_gradients(model, x, y, eps, batch_size=batch_size,
                                                       seed=seed),
        "gradient_signs": lambda: check_gradient_signs(model, x, y, eps, batch_size=batch_size,
                                                       seed=seed),
        "deterministic": lambda: check_deterministic(model, x, y, eps=eps,
                                                     batch_size=batch_size, seed=seed),
    }
    out = {}
    for name, check in checks.items():
        start = time.perf_counter()
        result = check()
        sync(x.device)
        out[name] = {**result, "n": len(x), "seconds": round(time.perf_counter() - start, 2)}
    return out

