"""The trainer: standard, PGD-AT, TRADES, SupCon-AT and ANCHOR in one readable loop.

Every hyper-parameter is a field of :class:`TrainConfig`; ``train(config)`` returns the per-epoch
history and, with ``out_dir`` set, writes ``checkpoint.pt`` (everything needed to resume, every
epoch), ``best.pt`` (the weights with the best validation robust accuracy) and ``history.csv``.

One training step, by method (x is a uint8 batch on the device, a1 and a2 are two augmented views):

=========== ==========================================================================
standard    CE(f(a1), y)
pgd_at      CE(f(x_adv), y),  x_adv = PGD-10 on a1 (Madry et al.)
trades      CE(f(a1), y) + β_trades · KL(f(a1) ‖ f(x_adv)),  x_adv maximises the KL
supcon_at   CE(f(x_adv), y) + λ · SupCon(z[a1, a2, x_adv])  (ANCHOR with β = 0)
anchor      CE(f(x_adv), y) + λ · ANCHOR(z[a1, a2, x_adv]; τ, β)  (chapter 4)
=========== ==========================================================================

Speed without cleverness (after airbench): the data stays on the device as uint8, augmentation
is tensor ops, attack steps ask autograd for the input gradient only, there is no host sync inside
an epoch except the progress bar's every ``log_every`` steps, and on CUDA the model runs in bf16
autocast with channels_last and each step's attack, forward and backward are replayed from one
CUDA graph (``graphs.py``; the step's random draws are made outside it, by
:func:`draw_step_inputs`).

Determinism: epoch ``e`` seeds every random draw (data order, crops, flips, PGD's random start)
from ``(seed, e)``, so a run resumed from the checkpoint of epoch ``e - 1`` continues exactly as the
uninterrupted run would (bit for bit on CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import attacks, checkpoint, compile_cache, data, distributed, evaluate, graphs, losses, provenance
from .models import PreActResNet18

METHODS = ("standard", "pgd_at", "trades", "supcon_at", "anchor")
#: The methods with a contrastive term (and a second augmented view).
CONTRASTIVE_METHODS = ("supcon_at", "anchor")
#: Profiles a run can use. ``tutorial`` (width 16, the full protocol otherwise) makes the small
#: committed checkpoints that chapters load; it is never a reading profile (``ANCHOR_PROFILE``).
PROFILES = ("smoke", "demo", "full", "tutorial")
#: Profiles a reader picks with ``ANCHOR_PROFILE``.
BOOK_PROFILES = ("smoke", "demo", "full")


@dataclass
class TrainConfig:
    """Every knob of a training run (loss, schedule, profile). Defaults are the ``full`` profile.

    Construction validates every field (ValueError naming it, the range and the value given).
    Images are in [0, 1] units, so ``eps`` and ``alpha`` are too (8/255 = 0.031).

    Attributes:
        method: one of ``METHODS``: ``standard``, ``pgd_at``, ``trades``, ``supcon_at``, ``anchor``.
        data: ``"cifar10"`` or ``"synthetic"``.
        train_subset: None (all) or the first N training images after the validation split, an
            int >= ``batch_size``.
        val_size: training images held out for model selection, int >= 0 (1,000).
        width: the ResNet's base width, int >= 1 (64; the tutorial checkpoints use 16).
        proj_dim: the projection head's output dimension, int >= 1 (128).
        epochs: int >= 1 (30). batch_size: the global batch, int >= 1 (512).
        lr: SGD's peak learning rate, > 0 (0.2), reached after ``warmup_fraction`` in [0, 1]
            of the steps (0.2) and then decayed linearly to 0 (the two-stage variant: one such
            cycle per stage); momentum (Nesterov) >= 0 (0.9);
            weight_decay >= 0 (5e-4, on every parameter).
        eps: the L-inf radius of the training attack, >= 0 (8/255).
        alpha: PGD's step, > 0 (2/255). attack_steps: int >= 0 (10).
        temperature: the contrastive loss's tau, > 0 (0.1).
        beta: hard-positive mining strength, >= 0 (1.0; 0 is SupCon).
        lam: weight of the contrastive term, >= 0 (1.0).
        adv_in_contrastive: the adversarial view is one of the contrastive views (True).
        pretrain_fraction: share of the epochs of the two-stage variant's contrastive
            pre-training, in [0, 1); > 0 only for ``supcon_at`` and ``anchor`` (0: joint).
        trades_beta: TRADES' KL weight, >= 0 (6.0).
        attack_bn: BatchNorm's mode while training attacks are crafted, ``"eval"`` or
            ``"train"`` ("eval").
        val_attack_steps: PGD steps of the validation attack, int >= 0 (10).
        seed: int in [0, 2**63) (0).
        device: a torch device name, e.g. ``"cpu"`` or ``"cuda:0"``; ``"auto"``: CUDA when
            available, else the CPU.
        amp, channels_last, cuda_graphs, compile: None picks by device (see the comments in
            the source and :func:`default_amp`); a bool forces it.
        log_every: steps between progress updates and NaN checks, int >= 1 (20).
        progress: show a progress bar. out_dir: None, or the folder for checkpoints and
            ``history.csv``. profile: the profile the defaults came from.
        extra: free-form notes kept with the config.
    """

    method: str = "anchor"
    # data
    data: str = "cifar10"            # "cifar10" or "synthetic"
    train_subset: int | None = None  # use only the first N training images (after the val split)
    val_size: int = 1000             # held out from the training set for model selection
    # model
    width: int = 64
    proj_dim: int = 128
    # optimisation: SGD + Nesterov, one-cycle (linear up, linear down) per step
    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2
    # training attack: PGD, L-inf
    eps: float = 8 / 255
    alpha: float = 2 / 255
    attack_steps: int = 10
    # contrastive term
    temperature: float = 0.1
    beta: float = 1.0                # hard-positive mining strength; 0 = SupCon
    lam: float = 1.0                 # weight of the contrastive term
    adv_in_contrastive: bool = True  # include the adversarial view among the contrastive views
    # The two-stage variant: this share of the epochs trains the encoder on the
    # contrastive term alone, the rest a classifier on the frozen encoder; 0 = joint training.
    pretrain_fraction: float = 0.0
    trades_beta: float = 6.0
    attack_bn: str = "eval"          # BatchNorm mode while crafting training attacks (all methods)
    # validation and bookkeeping
    val_attack_steps: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None           # bf16 autocast; None = default_amp(device)
    channels_last: bool | None = None  # None = on for CUDA
    cuda_graphs: bool | None = None    # replay each step from a CUDA graph; None = on for CUDA
    # torch.compile the model's passes (inductor on CUDA; aot_eager, no code generation, on a
    # CPU; see CompiledPasses). None = on for CUDA at the full profile: there it cut the graphed
    # width-64 PGD-10 step from 71 to 47 ms on an H100 (data/results/bench/), for about 30 s of
    # compiling; the short demo and tutorial runs, often on a Colab CPU's two cores, leave it off.
    compile: bool | None = None
    log_every: int = 20
    progress: bool = True
    out_dir: str | None = None
    profile: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.data not in ("cifar10", "synthetic"):
            raise ValueError(f"data must be 'cifar10' or 'synthetic', got {self.data!r}")
        for name in ("epochs", "batch_size", "width", "proj_dim", "attack_steps",
                     "val_attack_steps", "val_size", "log_every"):
            value = getattr(self, name)
            low = 0 if name in ("val_size", "attack_steps", "val_attack_steps") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "eps", "alpha", "temperature", "beta", "lam", "trades_beta",
                     "momentum", "weight_decay", "warmup_fraction"):
            value = getattr(self, name)
            # alpha, PGD's step, must be > 0: every method runs the validation attack, even
            # "standard", and PGD refuses a zero step (after the first epoch, were it let through).
            low = "> 0" if name == "alpha" else ">= 0"
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (name == "alpha" and value == 0):
                raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
        if self.temperature == 0 or self.lr == 0:
            raise ValueError("temperature and lr must be > 0")
        if self.warmup_fraction > 1:
            raise ValueError(f"warmup_fraction must be in [0, 1] (the share of the steps spent "
                             f"warming up), got {self.warmup_fraction!r}")
        if isinstance(self.pretrain_fraction, bool) or not isinstance(
                self.pretrain_fraction, (int, float)) or not 0 <= self.pretrain_fraction < 1:
            raise ValueError(f"pretrain_fraction must be a number in [0, 1) (the share of the "
                             f"epochs spent pre-training), got {self.pretrain_fraction!r}")
        if self.pretrain_fraction > 0:
            if self.method not in CONTRASTIVE_METHODS:
                raise ValueError(f"pretrain_fraction > 0 (the two-stage variant) needs a "
                                 f"contrastive method ({', '.join(CONTRASTIVE_METHODS)}), got "
                                 f"{self.method!r}")
            if not 1 <= self.pretrain_epochs < self.epochs:
                raise ValueError(f"pretrain_fraction={self.pretrain_fraction} of {self.epochs} "
                                 f"epochs gives {self.pretrain_epochs} pre-training epochs; "
                                 "each stage needs at least one")
        if self.attack_bn not in ("eval", "train"):
            raise ValueError(f"attack_bn must be 'eval' or 'train', got {self.attack_bn!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2**63:
            # torch.manual_seed takes no more than 64 bits, and names no field when it refuses.
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.train_subset is not None and (isinstance(self.train_subset, bool)
                                              or not isinstance(self.train_subset, int)):
            raise ValueError(f"train_subset must be None or an int, got {self.train_subset!r}")
        for name in ("adv_in_contrastive", "progress", "amp", "channels_last", "cuda_graphs",
                     "compile"):
            value = getattr(self, name)
            optional = name in ("amp", "channels_last", "cuda_graphs", "compile")
            if not isinstance(value, bool) and not (optional and value is None):
                raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, "
                                 f"got {value!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        try:
            if not isinstance(self.device, str):
                raise RuntimeError
            if self.device != "auto":
                torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be 'auto' or a torch device string such as 'cpu' or "
                             f"'cuda:0', got {self.device!r}") from None
        if isinstance(self.out_dir, os.PathLike):
            # A Path in the config would make every checkpoint unloadable with weights_only=True.
            self.out_dir = os.fspath(self.out_dir)
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            raise ValueError(f"out_dir must be None or a folder path, got {self.out_dir!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {self.extra!r}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(f"train_subset ({self.train_subset}) must be >= batch_size "
                             f"({self.batch_size}) so that an epoch has at least one step")

    @property
    def pretrain_epochs(self) -> int:
        """Epochs of contrastive pre-training (stage 1 of the two-stage variant; 0 = joint)."""
        return math.floor(self.pretrain_fraction * self.epochs + 1e-9)  # 0.29 * 100 is 28.999...

    def stage(self, epoch: int) -> str:
        """What epoch ``epoch`` (0-based) trains: ``"joint"`` (every run but the two-stage
        variant), ``"pretrain"`` (encoder and projection on the contrastive term) or ``"probe"``
        (the classifier on the frozen encoder)."""
        if self.pretrain_fraction == 0:
            return "joint"
        return "pretrain" if epoch < self.pretrain_epochs else "probe"

    @classmethod
    def from_profile(cls, profile: str | None = None, **overrides: Any) -> TrainConfig:
        """A config for ``smoke`` (CPU, seconds), ``demo`` (a Colab GPU), ``full`` or ``tutorial``.

        ``tutorial`` is ``full`` at width 16 and 15 epochs: the protocol of the reproduction, small
        enough that its fp16 checkpoints (about 1.5 MB) can be committed for CPU readers.

        ``profile=None`` reads ``ANCHOR_PROFILE`` (default: ``demo`` with a GPU, else ``smoke``).
        """
        profile = profile or default_profile()
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
        settings: dict[str, Any] = {
            "smoke": dict(width=8, epochs=1, batch_size=128, lr=0.1, train_subset=1024,
                          val_size=256, attack_steps=5, val_attack_steps=5, log_every=4),
            "demo": dict(width=32, epochs=5, batch_size=256, lr=0.1, train_subset=20000,
                         val_size=1000),
            "full": {},
            "tutorial": dict(width=16, epochs=15),
        }[profile]
        return cls(**{**settings, "profile": profile, **overrides})


def default_profile() -> str:
    """``$ANCHOR_PROFILE``, else ``demo`` when a GPU is present, else ``smoke``."""
    profile = os.environ.get("ANCHOR_PROFILE") or ("demo" if torch.cuda.is_available() else "smoke")
    if profile not in BOOK_PROFILES:
        raise ValueError(f"ANCHOR_PROFILE must be one of {', '.join(BOOK_PROFILES)}, got {profile!r}")
    return profile


def default_amp(device: torch.device) -> bool:
    """bf16 autocast by default only on a GPU with native bf16 (Ampere and later).

    A Colab T4 (Turing) has none: PyTorch would emulate bf16 there, slower than fp32.
    """
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation (and no emulation)
        return torch.cuda.is_bf16_supported()


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether ``cfg`` trains with the model's passes compiled on ``device`` (``cfg.compile``;
    None: on for CUDA at the ``full`` profile, where 30 epochs repay the compiling)."""
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and cfg.profile == "full"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the epoch and step."""


# --- data for a run -----------------------------------------------------------------------------


@dataclass
class RunData:
    """Device-resident uint8 training and validation tensors for one run (the training split only
    this process's shard of it under torchrun); the number of classes, from the training subset
    and the test labels; the data's label and :attr:`anchor_lib.data.CIFAR10.fingerprint`."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    label: str
    fingerprint: str


def dataset_for(cfg: TrainConfig) -> data.CIFAR10:
    """The dataset ``cfg.data`` names (the same images for training and for later evaluation)."""
    if cfg.data == "synthetic":
        return data.synthetic(n_train=max(2 * cfg.val_size, 4000), n_test=1000)
    return data.load_cifar10()


def load_run_data(cfg: TrainConfig, device: torch.device, dataset: data.CIFAR10 | None = None,
                  ctx: distributed.Context | None = None) -> RunData:
    """Split the training set into train / validation (fixed seed 0) and move it to ``device``;
    under torchrun (``ctx``) only this process's shard of the training split goes there."""
    if dataset is None:
        dataset = dataset_for(cfg)
    # The split does not depend on cfg.seed: every run is selected on the same validation images.
    train_idx, val_idx = data.train_val_split(len(dataset.y_train), cfg.val_size, seed=0)
    if cfg.train_subset is not None:
        if cfg.train_subset > len(train_idx):
            raise ValueError(f"train_subset {cfg.train_subset} asks for more training images "
                             f"than the data leave after the {cfg.val_size} of val_size: "
                             f"expected at most {len(train_idx)}")
        train_idx = train_idx[: cfg.train_subset]
    if len(train_idx) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} needs at least that many training "
                         f"images, but the data leave only {len(train_idx)} after the "
                         f"{cfg.val_size} of val_size (lower batch_size or val_size)")
    d = dataset
    x_train, y_train = d.x_train[train_idx], d.y_train[train_idx]
    num_classes = int(max(y_train.max().item(), d.y_test.max().item())) + 1
    if ctx is not None:  # a copy of the share, not a strided view that keeps the whole alive
        x_train, y_train = (t.contiguous() for t in distributed.shard(x_train, y_train, ctx))
    return RunData(x_train.to(device), y_train.to(device), d.x_train[val_idx].to(device),
                   d.y_train[val_idx].to(device), num_classes, d.label, d.fingerprint)


# --- one step -----------------------------------------------------------------------------------


def _kl_to_clean(clean_probs: torch.Tensor):
    """TRADES' inner loss: KL(p_clean ‖ p(x')), summed, with the clean side held fixed."""
    def loss_fn(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="sum")
    return loss_fn


def draw_step_inputs(cfg: TrainConfig, x: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random draw of one training step, made before the step's arithmetic.

    Returns float32 tensors shaped like ``x`` (a uint8 batch ``(N, 3, H, W)``): ``a1`` (an
    augmented view, from ``generator``), for the robust methods ``start`` (PGD's random start
    around ``a1``, from the global generator) and for ``supcon_at`` / ``anchor`` ``a2`` (a second
    view). Drawn apart from :func:`step_loss` so that the step itself draws nothing and can be
    replayed from a CUDA graph; the draws are the ones the step always made, in the same order.
    """
    inputs = {"a1": data.augment(x, generator)}
    if cfg.method != "standard":
        inputs["start"] = attacks.random_point(inputs["a1"], cfg.eps)
    if cfg.method in CONTRASTIVE_METHODS:
        inputs["a2"] = data.augment(x, generator)
    return inputs


class CompiledPasses:
    """The model's three passes (``__call__``, ``forward_all``, ``project``) compiled with
    ``torch.compile``; everything else (``train()``, the parameters) is the model's own.

    Compiling fuses the memory-bound work around the convolutions (BatchNorm, ReLU, residual adds,
    casts), which takes most of a wide model's step on a GPU
    (``data/results/bench/kernels_w64-*.json``). ``backend``: ``"inductor"`` (generated kernels,
    the GPU default) or ``"aot_eager"`` (traced, no code generation: what the CPU tests use).
    ``mode``: inductor's ``torch.compile`` mode, None for its default; the trainer uses the
    default, and ``benchmarks/gpu_probe.py`` times ``"max-autotune-no-cudagraphs"`` (convolution
    templates autotuned against cuDNN, which lets inductor fuse the pointwise work around a
    convolution into it; the step's own CUDA graph replaces inductor's).
    """

    def __init__(self, model: PreActResNet18, backend: str, mode: str | None = None) -> None:
        if mode is not None and backend != "inductor":
            raise ValueError(f"a compile mode needs the inductor backend, got backend {backend!r} "
                             f"with mode {mode!r}")
        self.model = model
        self._forward = torch.compile(model, backend=backend, mode=mode)
        self.forward_all = torch.compile(model.forward_all, backend=backend, mode=mode)
        self.project = torch.compile(model.project, backend=backend, mode=mode)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def compiled_passes(model: PreActResNet18, device: torch.device,
                    mode: str | None = None) -> CompiledPasses:
    """:class:`CompiledPasses` with the backend for ``device``: inductor on CUDA, aot_eager
    elsewhere (inductor's CPU code generation needs a C++ toolchain, and the book's CPU models are
    too small for it to pay). ``mode`` (inductor's) applies on CUDA only."""
    cuda = device.type == "cuda"
    compile_cache.load()  # what an earlier machine compiled, when $ANCHOR_COMPILE_CACHE names it
    return CompiledPasses(model, "inductor" if cuda else "aot_eager", mode if cuda else None)


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Weights without ``requires_grad`` inside the block (an attack's steps), their flags
    restored afterwards. The arithmetic of the step is unchanged; what changes is which
    gradients a backward pass is asked for. Eagerly, ``autograd.grad`` skips the weights'
    gradients anyway, except in :class:`~anchor_lib.models.BatchNorm2d`'s eval-mode backward,
    which can only see which of its inputs require a gradient. A compiled backward returns the
    gradient of every input that requires one.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def step_loss(model: PreActResNet18, cfg: TrainConfig, amp: bool, y: torch.Tensor,
              a1: torch.Tensor, start: torch.Tensor | None = None,
              a2: torch.Tensor | None = None, *,
              gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
              stage: str = "joint", passes: CompiledPasses | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one step for ``cfg.method`` from the inputs :func:`draw_step_inputs` drew.

    Deterministic given its inputs, free of host syncs and of data-dependent shapes, so that
    :class:`anchor_lib.graphs.StepGraph` can capture it. Leaves the model in train mode (eval
    mode in the ``"probe"`` stage). ``gather`` (under torchrun,
    :func:`anchor_lib.distributed.gather_rows`) collects the contrastive term's embeddings and
    labels from every process, so that it is the whole global batch's term; None (one process)
    uses this batch's. ``stage`` is :meth:`TrainConfig.stage` of the epoch: the two-stage
    variant's ``"pretrain"`` step is the contrastive term alone, its adversarial view attacking
    that term (there is no trained classifier to attack yet); its ``"probe"`` step is PGD-AT of
    the classifier on the frozen encoder.

    ``passes`` (:class:`CompiledPasses`, ``cfg.compile``) runs every pass compiled. The attacks
    run with the weights frozen (``requires_grad`` off), compiled or not.

    Returns the scalar loss and a dict of detached per-step diagnostics (device tensors):
    ``ce``, ``con`` and ``correct``: an int64 scalar, how many of the N examples the classifier
    gets right on the adversarial view (on ``a1`` for ``standard``); a float 0 in the
    ``"pretrain"`` stage.
    """
    net = passes if passes is not None else model
    pgd = partial(attacks.pgd_core, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps,
                  amp=amp, start=start)

    def attack(*args: Any, **kwargs: Any) -> torch.Tensor:
        with _frozen(model):
            return pgd(*args, **kwargs)

    # No cast cache: a CUDA graph capture needs autocast's cache off.
    autocast = torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=amp,
                              cache_enabled=False)
    zero = torch.zeros((), device=y.device)
    n_views = 3 if cfg.adv_in_contrastive else 2
    beta = 0.0 if cfg.method == "supcon_at" else cfg.beta

    if stage == "pretrain":
        views = [a1, a2]
        if cfg.adv_in_contrastive:  # else plain SupCon / ANCHOR pre-training on clean views
            model.train(cfg.attack_bn == "train")
            with torch.no_grad(), autocast:
                z_clean = net.project(torch.cat(views)).float()  # held fixed by the attack
            y_clean = y.repeat(2)

            def contrastive_of(z_adv: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
                return losses.anchor_loss(torch.cat([z_clean, z_adv.float()]),
                                          torch.cat([y_clean, y]), temperature=cfg.temperature,
                                          beta=beta, validate=False)

            views.append(attack(net.project, a1, y, loss_fn=contrastive_of))
        model.train()
        with autocast:
            z = net.project(torch.cat(views))
        con = _contrastive_term(z, y, n_views, cfg, beta, gather)
        return con, {"ce": zero, "con": con.detach(), "correct": zero}

    if stage == "probe":
        # Frozen encoder: BatchNorm keeps the statistics pre-training left (eval mode), and only
        # the classifier requires gradients (train() sets that), so only it learns.
        model.eval()
        x_adv = attack(net, a1, y)
        with autocast:
            logits = net(x_adv)
        ce = F.cross_entropy(logits.float(), y)
        return ce, {"ce": ce.detach(), "con": zero, "correct": (logits.argmax(1) == y).sum()}

    if cfg.method == "standard":
        model.train()
        with autocast:
            logits = net(a1)
        ce = F.cross_entropy(logits.float(), y)
        return ce, {"ce": ce.detach(), "con": zero, "correct": (logits.argmax(1) == y).sum()}

    if cfg.method == "trades":
        model.train(cfg.attack_bn == "train")  # "eval", the default, as the official TRADES code
        with torch.no_grad(), autocast:
            clean_probs = F.softmax(net(a1).float(), dim=1)
        # The official code starts at x + 0.001·N(0, I) because the KL's gradient vanishes at x;
        # a uniform start in the ball does the same job and keeps one attack core for all methods.
        x_adv = attack(net, a1, y, loss_fn=_kl_to_clean(clean_probs))
        model.train()
        with autocast:
            logits_clean, logits_adv = net(a1), net(x_adv)
        loss = losses.trades_loss(logits_clean.float(), logits_adv.float(), y, beta=cfg.trades_beta,
                                  validate=False)
        ce = F.cross_entropy(logits_clean.float(), y)
        return loss, {"ce": ce.detach(), "con": (loss - ce).detach(),
                      "correct": (logits_adv.argmax(1) == y).sum()}

    model.train(cfg.attack_bn == "train")
    x_adv = attack(net, a1, y)
    model.train()
    if cfg.method == "pgd_at":
        with autocast:
            logits = net(x_adv)
        ce = F.cross_entropy(logits.float(), y)
        return ce, {"ce": ce.detach(), "con": zero, "correct": (logits.argmax(1) == y).sum()}

    # supcon_at / anchor: one backbone pass over all views, CE on the adversarial view only.
    views = torch.cat([a1, a2, x_adv])
    with autocast:
        logits, z = net.forward_all(views)
    n = y.shape[0]
    ce = F.cross_entropy(logits[2 * n:].float(), y)
    con = _contrastive_term(z, y, n_views, cfg, beta, gather)
    loss = ce + cfg.lam * con
    return loss, {"ce": ce.detach(), "con": con.detach(),
                  "correct": (logits[2 * n:].argmax(1) == y).sum()}


def _contrastive_term(z: torch.Tensor, y: torch.Tensor, n_views: int, cfg: TrainConfig,
                      beta: float, gather: Callable[[torch.Tensor], torch.Tensor] | None
                      ) -> torch.Tensor:
    """ANCHOR's term over the first ``n_views`` blocks of ``z`` (views ``a1, a2, x_adv``)."""
    z_con, y_con = z[: n_views * y.shape[0]].float(), y.repeat(n_views)
    if gather is not None:
        z_con, y_con = gather(z_con), gather(y_con)
    return losses.anchor_loss(z_con, y_con, temperature=cfg.temperature, beta=beta, validate=False)


def training_loss(model: PreActResNet18, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
                  generator: torch.Generator, amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one step for ``cfg.method`` on a uint8 batch ``x`` (N, 3, H, W).

    :func:`draw_step_inputs` then :func:`step_loss`. Returns the scalar loss and a dict of
    detached per-step diagnostics (device tensors, never synced here): ``ce``, ``con`` and
    ``correct``, as :func:`step_loss` says.
    """
    return step_loss(model, cfg, amp, y, **draw_step_inputs(cfg, x, generator))


# --- the loop -----------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, num_classes: int = 10) -> PreActResNet18:
    """The PreAct ResNet-18 a config describes (on the CPU, fp32)."""
    return PreActResNet18(num_classes=num_classes, width=cfg.width, proj_dim=cfg.proj_dim)


def _one_cycle(total_steps: int, warmup_fraction: float):
    warm = max(1, int(round(warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return factor


def _schedule(total_steps: int, warmup_fraction: float, restart: int = 0):
    """The learning-rate factor of each step: one cycle over the run, or, from step ``restart``
    on (the two-stage variant's second stage, a new problem), a second cycle of its own."""
    if restart == 0:
        return _one_cycle(total_steps, warmup_fraction)
    first = _one_cycle(restart, warmup_fraction)
    second = _one_cycle(total_steps - restart, warmup_fraction)
    return lambda step: first(step) if step < restart else second(step - restart)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def validate(model: PreActResNet18, cfg: TrainConfig, x: torch.Tensor,
             y: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Clean and PGD-``val_attack_steps`` accuracy on the validation split, in fp32 (NaN when
    the split is empty), and which images each got right.

    Returns ``(accuracies, masks)``: ``val_clean`` and ``val_pgd`` as floats in [0, 1], and the
    same keys as bool ``(n_val,)`` CPU tensors (absent where the accuracy is NaN). The masks let
    two runs, validated on the same images, be compared image by image (chapter 8).
    """
    if x.shape[0] == 0:
        return {"val_clean": float("nan"), "val_pgd": float("nan")}, {}
    xf = data.to_float(x)
    masks = {"val_clean": evaluate.correct(model, xf, y, batch_size=500).cpu()}
    if not (cfg.method == "standard" and cfg.val_attack_steps == 0):
        attack = partial(attacks.pgd, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.val_attack_steps)
        masks["val_pgd"] = evaluate.correct(model, xf, y, attack, batch_size=500).cpu()
    accuracy = {key: masks[key].sum().item() / len(x) if key in masks else float("nan")
                for key in ("val_clean", "val_pgd")}
    return accuracy, masks


HISTORY_FIELDS = ("epoch", "loss", "ce", "con", "train_acc", "val_clean", "val_pgd", "lr",
                  "seconds", "best")


def history_csv(history: list[dict[str, Any]]) -> str:
    """The history as CSV text, one row per epoch (``history.csv``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def train(config: TrainConfig, *, resume: bool = False, dataset: data.CIFAR10 | None = None,
          fail_at: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Train ``config.method``; return the history.

    Returns:
        One dict per epoch: ``epoch`` (int, from 1), ``loss``, ``ce`` and ``con`` (float means
        over the epoch's steps), ``train_acc`` (float in [0, 1]: on the adversarial view for the
        robust methods, 0 in pre-training epochs), ``val_clean`` and ``val_pgd`` (float in
        [0, 1], NaN where not measured), ``lr`` (the epoch's last step's rate), ``seconds`` and
        ``best`` (bool: the epoch ``best.pt`` holds, so far).

    Args:
        config: the run.
        resume: continue from ``out_dir/checkpoint.pt`` (verified) if it exists.
        dataset: use this dataset instead of loading one (tests, notebooks).
        fail_at: ``(epoch, step)`` at which to inject a NaN into the loss (fault-injection tests).

    With ``out_dir`` it writes ``checkpoint.pt`` (every epoch), ``best.pt`` (the epoch with the
    best validation PGD accuracy, clean accuracy for ``standard``; with ``val_size = 0`` there is
    nothing to select on, and it holds the last epoch) and ``history.csv``.

    Raises:
        NonFiniteLossError: the loss became NaN/Inf; the last good checkpoint is kept.
        ValueError: among others, ``out_dir`` cannot be written (a file, under a file, in a
            read-only folder), before any training.
    """
    cfg = config
    # Under torchrun each process trains on its shard with batch_size / world (distributed.py).
    ctx = distributed.setup(resolve_device(cfg.device))
    device = ctx.device
    if cfg.batch_size % ctx.world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of "
                         f"processes ({ctx.world})")
    local_batch = cfg.batch_size // ctx.world
    amp = cfg.amp if cfg.amp is not None else default_amp(device)
    if amp and device.type != "cuda":
        # The attack core autocasts on CUDA only; a bf16 training forward against an fp32
        # attack would be neither recipe.
        raise ValueError(f"amp=True (bf16 autocast) needs a CUDA device, got {device}; leave it "
                         "None to use it where the GPU supports it")
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    use_graph = cfg.cuda_graphs if cfg.cuda_graphs is not None else device.type == "cuda"
    # Under torchrun the contrastive methods gather embeddings across processes inside the step.
    # A collective inside a recorded graph is not something this trainer verifies (and a graph
    # dropped on one process but not another would leave the collectives out of step), so those
    # steps run eagerly.
    gather = None
    if ctx.world > 1 and cfg.method in CONTRASTIVE_METHODS:
        if cfg.cuda_graphs:
            raise ValueError(f"cuda_graphs=True cannot be combined with {ctx.world} processes "
                             f"and method {cfg.method!r}: its step gathers embeddings across "
                             "processes; leave cuda_graphs None (eager steps)")
        use_graph = False
        gather = partial(distributed.gather_rows, ctx=ctx)
    if use_graph and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}; leave it None to "
                         "use graphs wherever there is one")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out is not None and ctx.main:
        # Now, not when the first epoch's checkpoint is saved.
        checkpoint.check_writable(out, what="out_dir", folder=True)

    torch.manual_seed(cfg.seed)
    run = load_run_data(cfg, device, dataset, ctx)
    model = build_model(cfg, max(run.num_classes, 2)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    passes = compiled_passes(model, device) if use_compile(cfg, device) else None
    x_train, y_train = run.x_train, run.y_train
    steps_per_epoch = x_train.shape[0] // local_batch
    # The fused kernel updates all parameters in one launch on CUDA (same arithmetic).
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=True, weight_decay=cfg.weight_decay,
                                **({"fused": True} if device.type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(cfg.epochs * steps_per_epoch, cfg.warmup_fraction,
                             restart=cfg.pretrain_epochs * steps_per_epoch))

    def stepper(stage: str) -> graphs.StepGraph:
        """Forward + backward of every step of ``stage``; on CUDA recorded once and replayed
        (graphs.py). A stage trains its own parameters, so each gets its own recording."""
        for name, param in model.named_parameters():
            classifier = name.startswith("linear.")
            param.requires_grad_(stage == "joint" or classifier == (stage == "probe"))
            if not param.requires_grad:
                param.grad = None  # else the optimiser would keep applying the last stage's
        return graphs.StepGraph(model, partial(step_loss, model, cfg, amp, gather=gather,
                                               stage=stage, passes=passes),
                                graph=use_graph, log=tqdm.write)

    run_step: graphs.StepGraph | None = None
    history: list[dict[str, Any]] = []
    start_epoch, best = 0, -1.0
    # Which code, hardware and process count trained which epochs: a run resumed across GPU
    # slots lists each slot, and metrics.json carries the list.
    segments: list[dict[str, Any]] = []
    if out is not None and out.is_dir() and ctx.main:
        checkpoint.remove_stale_temporaries(out)  # what a kill -9 during a save left behind
    if resume and out is not None and (out / "checkpoint.pt").exists():
        # On the CPU: the saved RNG states must stay there (torch.set_rng_state takes a CPU
        # tensor), and load_state_dict moves the weights and optimiser state to the model anyway.
        state = checkpoint.load(out / "checkpoint.pt", map_location="cpu")
        diff = config_differences(state["config"], cfg)
        if diff:
            raise ValueError(f"cannot resume {out / 'checkpoint.pt'}: its config differs in "
                             f"{', '.join(diff)}")
        why = resume_differences(state, run, ctx.world)
        if why:
            raise ValueError(f"cannot resume {out / 'checkpoint.pt'}: {why}")
        segments = list(state.get("segments", []))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        history, start_epoch, best = list(state["history"]), state["epoch"] + 1, state["best"]
        # A kill between checkpoint.pt and history.csv of the last epoch leaves history.csv one
        # epoch behind, and best.pt too if that epoch was the best; no later epoch would rewrite
        # them: bring them up to date now.
        if ctx.main:
            _write_history_if_changed(out / "history.csv", history)
            if history and history[-1]["best"]:
                _write_best_if_behind(out / "best.pt", state)
    distributed.barrier(ctx)  # rank 0's clean-up and repairs are done before anyone trains

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        seed = _epoch_seed(cfg.seed, epoch) + 1000 * ctx.rank  # rank 0 draws as a single process
        torch.manual_seed(seed)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        stage = cfg.stage(epoch)
        if run_step is None or stage != cfg.stage(epoch - 1):
            run_step = stepper(stage)
        model.train()
        sums = torch.zeros(4, device=device)  # loss, ce, con, correct — summed on the device
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        bar = tqdm(total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and ctx.main), leave=False)
        # Training steps all have one shape, so cuDNN's search for the fastest kernels pays once;
        # validation attacks only the clean-correct images (a new shape each batch), where the
        # search would run again and again (the likely cause of the 2-10 s that validation took
        # per epoch on an H100, against 1 s of training), so it is off there.
        with cudnn_benchmark(device.type == "cuda"):
            for step, (xb, yb) in enumerate(data.batches(x_train, y_train, local_batch,
                                                         generator=gen)):
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                loss, parts = run_step(y=yb, **draw_step_inputs(cfg, xb, gen))
                if fail_at == (epoch, step):  # as if this step had blown up, gradients and all
                    loss = loss * float("nan")
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(float("nan"))
                bad = ~torch.isfinite(loss)
                first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                distributed.average_gradients(model, ctx)
                optimizer.step()
                lr_used = optimizer.param_groups[0]["lr"]  # history's lr: the last step's rate
                scheduler.step()
                sums += torch.stack([loss.detach(), parts["ce"], parts["con"],
                                     parts["correct"].float()])
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                    # The only host sync inside an epoch: progress and the NaN check.
                    _raise_if_nonfinite(distributed.all_max(first_bad.clone(), ctx), epoch, out)
                    done = (step + 1)
                    s = sums.tolist()
                    bar.set_postfix(loss=f"{s[0] / done:.3f}",
                                    acc=f"{s[3] / (done * local_batch):.3f}")
                bar.update(1)
        bar.close()
        _raise_if_nonfinite(distributed.all_max(first_bad.clone(), ctx), epoch, out)

        distributed.all_sum(sums, ctx)
        sums[:3] /= ctx.world  # mean of the per-process mean losses; correct counts add up
        if stage != "probe":  # the frozen encoder's statistics stay exactly as they were
            distributed.average_buffers(model, ctx)
        s = sums.tolist()
        # A pre-training epoch has no trained classifier to validate or select.
        metrics, val_correct = (validate(model, cfg, run.x_val, run.y_val) if stage != "pretrain"
                                else ({"val_clean": float("nan"), "val_pgd": float("nan")}, {}))
        score = metrics["val_clean"] if cfg.method == "standard" else metrics["val_pgd"]
        # Without a validation split every epoch is "best": best.pt is then the last epoch.
        is_best = stage != "pretrain" and (
            run.x_val.shape[0] == 0 or (not math.isnan(score) and score > best))
        best = max(best, score) if not math.isnan(score) else best
        row = {"epoch": epoch + 1, "loss": s[0] / steps_per_epoch, "ce": s[1] / steps_per_epoch,
               "con": s[2] / steps_per_epoch,
               "train_acc": s[3] / (steps_per_epoch * cfg.batch_size),
               **metrics, "lr": lr_used,
               "seconds": time.perf_counter() - t0, "best": bool(is_best)}
        history.append(row)
        if passes is not None and ctx.main and epoch == start_epoch:
            compile_cache.save()  # the first epoch compiled every pass: keep that for next time
        if cfg.progress and ctx.main:
            tqdm.write(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.3f} "
                       f"train acc {row['train_acc']:.3f} val clean {row['val_clean']:.3f} "
                       f"val PGD-{cfg.val_attack_steps} {row['val_pgd']:.3f} "
                       f"({row['seconds']:.1f} s, {run_step.mode} steps)")
        if out is not None and ctx.main:
            if epoch == start_epoch:
                segments.append({"first_epoch": epoch + 1, "processes": ctx.world,
                                  **provenance.describe(device)})
            segments[-1]["last_epoch"] = epoch + 1
            model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            how = {"train_step": run_step.mode, "train_step_fallback": run_step.fallback,
                   "compiled": passes is not None}
            state = {"model": model_state, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(),
                     "config": asdict(cfg), "epoch": epoch, "history": history,
                     "best": best, "data": run.label, "data_fingerprint": run.fingerprint,
                     "processes": ctx.world, "segments": segments,  # saved at once, below
                     "val_correct": val_correct, **how}
            # checkpoint.pt first: once it is written this epoch is never trained again, and it
            # holds the weights best.pt needs, so a kill before best.pt is repaired on resume.
            checkpoint.save(state, out / "checkpoint.pt")
            if is_best:
                checkpoint.save(_best_state(state), out / "best.pt")
            checkpoint.write_text(out / "history.csv", history_csv(history))
        distributed.barrier(ctx)  # nobody resumes from a checkpoint rank 0 is still writing
    if passes is not None and ctx.main:
        compile_cache.save()  # and whatever later epochs compiled (the two-stage probe's passes)
    return history


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` inside the block and restore it afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def resume_differences(state: dict[str, Any], run: RunData, processes: int) -> str:
    """Why a checkpoint's ``state`` cannot be continued on ``run``'s data by ``processes``
    processes ("" if it can). Another copy of the data would mix two datasets in one model
    under one label; another process count changes the computation (BatchNorm normalises each
    process's slice of the batch). Checkpoints written before these were recorded are trusted on
    what they lack (no fingerprint: the label alone; no count: one process)."""
    saved_label, saved_print = state.get("data"), state.get("data_fingerprint")
    if not data.same_data(saved_label, saved_print, run.label, run.fingerprint):
        return (f"it was trained on {saved_label} (fingerprint {str(saved_print)[:12]}), this "
                f"run's data is {run.label} (fingerprint {run.fingerprint[:12]}); point "
                f"ANCHOR_DATA_DIR at the copy it was trained on, or train in a new folder")
    saved_processes = int(state.get("processes") or 1)
    if saved_processes != processes:
        how = (f"resume with torchrun --nproc_per_node={saved_processes}" if saved_processes > 1
               else "resume it without torchrun")
        return (f"it was trained by {saved_processes} process(es), this run has {processes} "
                f"(BatchNorm normalises each process's slice of the batch, so the count changes "
                f"the computation); {how}")
    return ""


def _best_state(state: dict[str, Any]) -> dict[str, Any]:
    """``best.pt``'s content from a ``checkpoint.pt`` state: the weights and what selected them."""
    row = state["history"][-1]
    return {"model": state["model"], "config": state["config"], "epoch": state["epoch"],
            "val": {k: row[k] for k in ("val_clean", "val_pgd")},
            # which validation images the selected epoch got right (absent in older checkpoints)
            "val_correct": state.get("val_correct") or {}, "data": state["data"],
            "data_fingerprint": state.get("data_fingerprint"), "processes": state.get("processes"),
            "segments": state.get("segments"),
            "train_step": state.get("train_step"),
            "train_step_fallback": state.get("train_step_fallback"),
            "compiled": state.get("compiled")}


def _write_best_if_behind(path: Path, state: dict[str, Any]) -> None:
    try:
        if checkpoint.load(path, map_location="cpu")["epoch"] == state["epoch"]:
            return
    except checkpoint.CheckpointError:
        pass  # missing or damaged: written anew below
    checkpoint.save(_best_state(state), path)


def _write_history_if_changed(path: Path, history: list[dict[str, Any]]) -> None:
    text = history_csv(history)
    try:
        checkpoint.verify(path)
        if path.read_text() == text:
            return
    except (checkpoint.CheckpointError, OSError):
        pass
    checkpoint.write_text(path, text)


# Fields that may change between a run and its resumption without changing the computation.
_RESUME_FREE = {"progress", "log_every", "out_dir", "extra", "cuda_graphs", "compile"}


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Names of ``cfg``'s fields whose values differ from ``saved`` (a checkpoint's or a
    ``metrics.json``'s config), leaving out those that do not change the computation."""
    mine = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}
    # A field added after ``saved`` was written had its default value then (defaults keep the
    # old behaviour).
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    return sorted(k for k, v in mine.items() if saved.get(k, defaults[k]) != v)


def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int, out: Path | None) -> None:
    step = int(first_bad.item())
    if step >= 0:
        kept = (f"; the last good checkpoint is kept at {out / 'checkpoint.pt'}"
                if out is not None and (out / "checkpoint.pt").exists() else "")
        raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}, step {step + 1}"
                                 f"{kept}. Lower the learning rate or check the data.")


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a :class:`TrainConfig` from ``asdict`` output, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PreActResNet18, dict]:
    """Load a verified ``best.pt`` / ``checkpoint.pt``; returns (model in eval mode, checkpoint).

    Raises :class:`~anchor_lib.checkpoint.CheckpointError` naming ``path`` when the file is
    damaged or no checkpoint, has no valid ``config`` entry, or holds weights its config's model
    cannot take (another width, say).
    """
    state = checkpoint.load(path)
    config = state.get("config")
    if not isinstance(config, dict):
        came = "no 'config' entry" if config is None else f"a {type(config).__name__} as 'config'"
        raise checkpoint.CheckpointError(
            f"{path} has {came}; expected the dict of the TrainConfig its weights were trained "
            f"with, as in a run's best.pt or checkpoint.pt")
    try:
        cfg = config_from_dict(config)
    except (TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(f"{path} has an invalid config: {err}") from err
    model = model_from_weights(cfg, state["model"], source=str(path))
    return model.to(device).eval(), state


#: Wrappers whose state_dict keys carry a prefix: DistributedDataParallel / DataParallel
#: (``module.``) and ``torch.compile`` (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def model_from_weights(cfg: TrainConfig, weights: dict[str, torch.Tensor], *,
                       source: str | None = None) -> PreActResNet18:
    """The fp32 CPU model of ``cfg`` holding ``weights`` (a state_dict, fp32 or fp16).

    A state_dict saved from a wrapped model (every key prefixed ``module.`` or ``_orig_mod.``) is
    taken without the prefix. Weights that do not fit ``cfg``'s model raise
    :class:`~anchor_lib.checkpoint.CheckpointError` saying what differs (the width, the
    projection dimension, which keys), on one short line; ``source`` (a checkpoint's path) is
    named in it.
    """
    where = f"checkpoint {source}" if source else "the weights"
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise checkpoint.CheckpointError(f"{where}: expected the model's state_dict (a dict of "
                                         f"tensors by name), got {_describe(weights)}")
    for prefix in _WRAPPER_PREFIXES:
        wrapped = sum(k.startswith(prefix) for k in weights)
        if wrapped and wrapped == len(weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
        elif wrapped:
            raise checkpoint.CheckpointError(
                f"{where}: {wrapped} of its {len(weights)} weights' names start with {prefix!r} "
                f"(a wrapped model's state_dict) and the others do not; expected all or none")
    linear = weights.get("linear.weight")
    if linear is None or linear.dim() != 2:
        keys = list(weights)
        raise checkpoint.CheckpointError(
            f"{where}: expected a PreActResNet18 state_dict with 'linear.weight' (the "
            f"classifier), got {len(keys)} keys" + (f" such as {', '.join(keys[:3])}" if keys else ""))
    # The sizes that tell one config's model from another's (the first dimension of these
    # weights), named when they differ rather than as some hundred mismatched shapes.
    for name, key in (("width", "conv1.weight"), ("proj_dim", "head.2.weight")):
        tensor = weights.get(key)
        if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] != getattr(cfg, name):
            raise checkpoint.CheckpointError(
                f"{where}: its weights are {name} {tensor.shape[0]} but its config says "
                f"{name} {getattr(cfg, name)}")
    try:
        model = build_model(cfg, linear.shape[0])
    except ValueError as err:  # fewer than 2 classes, say
        raise checkpoint.CheckpointError(f"{where}: {err}") from err
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        k = reshaped[0] if reshaped else ""
        problems = ([f"missing {some(missing)}"] if missing else []) \
            + ([f"unexpected {some(unexpected)}"] if unexpected else []) \
            + ([f"other shapes for {some(reshaped)} ({k}: {tuple(weights[k].shape)} in the "
                f"weights, {tuple(expected[k].shape)} in the model)"] if reshaped else [])
        raise checkpoint.CheckpointError(
            f"{where}: its weights do not fit the model of its config (width {cfg.width}, "
            f"proj_dim {cfg.proj_dim}, {linear.shape[0]} classes): {'; '.join(problems)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return model


def _describe(value: Any) -> str:
    """A short account of what came instead of a state_dict, for error messages."""
    if isinstance(value, dict):
        bad = next(((k, v) for k, v in value.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            return f"a dict whose entry {bad[0]!r} is of type {type(bad[1]).__name__}"
    return f"an object of type {type(value).__name__}"
