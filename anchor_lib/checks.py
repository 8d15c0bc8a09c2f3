"""Input validation shared by the public API.

A leaf module (it imports only torch): every public function checks its arguments here and
raises ``ValueError`` / ``TypeError`` naming what was expected and what came, instead of
returning a silently wrong answer.
"""

from __future__ import annotations

import math

import torch


def check_images(x: object, name: str = "x") -> torch.Tensor:
    """Check a batch of images: float tensor, shape ``(N, C, H, W)``, N >= 1, finite, in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}"
                         " (convert uint8 images with x.float() / 255)")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0); expected at least one image")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values; expected finite values in [0, 1]")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
                         " (normalisation is done inside the model)")
    return x


def check_labels(y: object, n: int, num_classes: int | None = None, name: str = "y", *,
                 device: torch.device | None = None) -> torch.Tensor:
    """Check integer class labels of shape ``(n,)`` in ``[0, num_classes)``, on ``device`` (the
    images' device) when it is given."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(y.shape)}")
    if device is not None and y.device != device:
        # else a raw device-mismatch error deep inside an attack or a comparison with predictions
        raise ValueError(f"{name} is on {y.device} but x is on {device}; expected the same device")
    if n and y.min().item() < 0:
        raise ValueError(f"{name} holds a negative label ({y.min().item()}); expected >= 0")
    if n and num_classes is not None and y.max().item() >= num_classes:
        raise ValueError(f"{name} holds label {y.max().item()} but the model has "
                         f"{num_classes} classes; expected labels in [0, {num_classes - 1}]")
    return y.long()


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, integer: bool = False) -> float:
    """Check a finite scalar hyper-parameter lies in a range; returns it."""
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed as ``train.TrainConfig`` takes it: an int in [0, 2**63)."""
    seed = check_number(seed, name, integer=True)
    if not 0 <= seed < 2**63:
        # torch.manual_seed takes no more than 64 bits, and names no argument when it refuses.
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def check_logits(out: object, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Check a model's output is a logits tensor of shape ``(n, num_classes)``."""
    if isinstance(out, (tuple, list)):
        raise TypeError(f"the model returned a {type(out).__name__}; attacks need a model whose "
                        "forward returns logits only (wrap it: lambda x: model(x)[0])")
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape ({n}, num_classes), got {shape}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"the model returned {out.shape[1]} logits per image, expected {num_classes}")
    return out
