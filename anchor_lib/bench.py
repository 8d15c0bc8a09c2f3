"""Training and evaluation speed, measured against a plain reference loop in the same run.

``run_benchmark()`` times (written to ``data/results/bench/<device>.json``):

- ``reference_pgd_at``: the way most public code trains — a ``torchvision.transforms`` pipeline in
  a ``DataLoader``, fp32, and ``loss.backward()`` inside every attack step (which also computes
  parameter gradients nobody uses);
- ``standard``, ``pgd_at`` and ``anchor`` as :func:`anchor_lib.train.train` runs them (on CUDA
  replayed from a CUDA graph, ``graphs.py``), and on CUDA ``pgd_at_eager``, the same step without
  the graph, and ``pgd_at_compiled`` and ``anchor_compiled``, the graphed steps with
  ``TrainConfig.compile`` (what the ``full`` profile trains with on a GPU; their warm-up steps
  include the compiling);
- ``eval_pgd20_10k``: PGD-20 over 10,000 images (fp32; on CUDA also in the channels_last layout,
  ``eval_pgd20_10k_channels_last``, and with bf16 passes, ``eval_pgd20_10k_bf16``, which counts
  for a model only where ``benchmarks/eval_precision.py`` shows it agrees with fp32 there);
  ``autoattack_1k``: AutoAttack on 1,000.

Each training method is timed as the median of several windows of steps after a warm-up, with the
device synchronised at window edges; an epoch is ``steps_per_epoch × median step time``. Random
CIFAR-sized data is used: speed does not depend on pixel values (AutoAttack's does, so its time is
reported with the clean accuracy of the model it ran on). On a CPU the configuration is tiny and the
JSON says so: its absolute times mean nothing, only the ratios measured in one run do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import attacks, checkpoint, data, graphs, provenance
from .checkpoint import check_writable  # the one check of an output path (the CLI's too)
from .evaluate import EVAL_PRECISION, default_batch_size, full_precision, sync
from .train import (
    TrainConfig,
    build_model,
    compiled_passes,
    cudnn_benchmark,
    draw_step_inputs,
    step_loss,
)

FULL = {"n_images": 50_000, "batch_size": 512, "width": 64, "windows": 5, "window_steps": 10,
        "warmup_steps": 5, "eval_n": 10_000, "autoattack_n": 1_000, "workers": 8,
        "answers_steps": 200, "answers_width": 32, "compile": True}
TINY = {"n_images": 2_048, "batch_size": 64, "width": 8, "windows": 3, "window_steps": 2,
        "warmup_steps": 1, "eval_n": 256, "autoattack_n": 8, "workers": 0,
        "answers_steps": 0, "answers_width": 8}


def median_step_seconds(step: Callable[[], None], device: torch.device, *, windows: int,
                        window_steps: int, warmup_steps: int) -> float:
    """Median over ``windows`` of the mean time of ``window_steps`` calls, after a warm-up.

    cuDNN's kernel search is on (CUDA) while timing: the steps timed are fixed-shape training
    steps, run that way by the trainer too.
    """
    with cudnn_benchmark(device.type == "cuda"):
        for _ in range(warmup_steps):
            step()
        times = []
        for _ in range(windows):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(window_steps):
                step()
            sync(device)
            times.append((time.perf_counter() - t0) / window_steps)
    return statistics.median(times)


# --- the reference loop -------------------------------------------------------------------------


class ReferenceDataset(torch.utils.data.Dataset):
    """The reference input pipeline, as most public code writes it: each image through PIL.

    ``x``: uint8 ``(N, H, W, 3)``; ``y``: integer ``(N,)``. Item ``i`` is a random crop (4-pixel
    reflect padding) and horizontal flip of image ``i`` as a float ``(3, H, W)`` tensor in [0, 1],
    and its label.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        import torchvision.transforms as T

        self.x, self.y = x, y
        self.transform = T.Compose([T.RandomCrop(x.shape[1], padding=4, padding_mode="reflect"),
                                    T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_pgd(model, x, y, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """PGD as commonly written: model in train mode, ``loss.backward()`` for the input gradient."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        delta.data = (delta + alpha * delta.grad.sign()).clamp(-eps, eps)
        delta.data = (x + delta.data).clamp(0, 1) - x
        delta.grad.zero_()
    return (x + delta).detach()


def reference_loader(x_hwc: np.ndarray, y: np.ndarray, batch_size: int, workers: int,
                     seed: int = 0) -> torch.utils.data.DataLoader:
    """The reference input pipeline over HWC uint8 images."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ReferenceDataset(x_hwc, y), batch_size=batch_size,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), generator=g,
                                       persistent_workers=workers > 0)


def reference_train_steps(model, loader, optimizer, device, cfg: TrainConfig):
    """Yield after each reference PGD-AT step (fp32, backward inside the attack)."""
    while True:
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            model.train()
            x_adv = reference_pgd(model, xb, yb, cfg.eps, cfg.alpha, cfg.attack_steps)
            optimizer.zero_grad()
            F.cross_entropy(model(x_adv), yb).backward()
            optimizer.step()
            yield


def fast_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
                    graph: bool, body: graphs.StepBody | None = None,
                    compile_mode: str | None = None) -> Callable[[], str]:
    """A callable making one anchor_lib training step, as :func:`anchor_lib.train.train` does.

    Cycles through the device-resident uint8 ``x`` (N, 3, H, W) and ``y`` (N,) in shuffled
    batches of ``cfg.batch_size``; bf16 autocast and channels_last on CUDA; ``graph`` replays the
    step from a CUDA graph. ``body`` replaces the trainer's ``step_loss`` (a variant to time, see
    ``benchmarks/gpu_probe.py``); ``compile_mode`` is inductor's mode when ``cfg.compile``
    (:func:`anchor_lib.train.compiled_passes`). Each call returns how the step ran
    (``StepGraph.mode``).
    """
    cuda = x.is_cuda
    if body is None:
        passes = compiled_passes(model, x.device, compile_mode) if cfg.compile else None
        body = partial(step_loss, model, cfg, cuda, passes=passes)
    run_step = graphs.StepGraph(model, body, graph=graph)
    it = iter(())

    def step() -> str:
        nonlocal it
        batch = next(it, None)
        if batch is None:
            it = data.batches(x, y, cfg.batch_size, generator=generator)
            batch = next(it)
        xb, yb = batch
        if cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        run_step(y=yb, **draw_step_inputs(cfg, xb, generator))
        opt.step()
        return run_step.mode
    return step


def same_answers(dataset: data.CIFAR10, cfg: TrainConfig, steps: int,
                 device: str | torch.device = "cpu", workers: int = 0) -> dict[str, Any]:
    """Train PGD-AT for ``steps`` steps by the reference loop and by anchor_lib's fast path.

    Both start from the same weights and see the same number of images with the same optimiser;
    only the input pipeline, precision (bf16 on CUDA for the fast path) and the attack's gradient
    plumbing differ. Returns each path's clean and PGD-10 test accuracy, and the differences.
    """
    from . import evaluate

    dev = torch.device(device)
    amp = dev.type == "cuda"
    torch.manual_seed(cfg.seed)
    init = build_model(cfg).state_dict()
    x_test, y_test = data.to_float(dataset.x_test).to(dev), dataset.y_test.to(dev)
    pgd10 = partial(attacks.pgd, eps=cfg.eps, alpha=cfg.alpha, steps=10)
    out: dict[str, Any] = {"steps": steps, "batch_size": cfg.batch_size}
    for path in ("reference", "fast"):
        model = build_model(cfg)
        model.load_state_dict(init)
        model = model.to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
        torch.manual_seed(cfg.seed + 1)
        if path == "reference":
            loader = reference_loader(dataset.x_train.permute(0, 2, 3, 1).numpy(),
                                      dataset.y_train.numpy(), cfg.batch_size, workers, cfg.seed)
            it = reference_train_steps(model, loader, opt, dev, cfg)
            for _ in range(steps):
                next(it)
        else:
            if amp:
                model = model.to(memory_format=torch.channels_last)
            step = fast_train_step(model, opt, cfg, dataset.x_train.to(dev),
                                   dataset.y_train.to(dev),
                                   torch.Generator(device=dev).manual_seed(cfg.seed), graph=amp)
            with cudnn_benchmark(amp):
                for _ in range(steps):
                    out["fast_train_step"] = step()
        out[path] = {"clean": evaluate.accuracy(model, x_test, y_test),
                     "pgd10": evaluate.robust_accuracy(model, x_test, y_test, pgd10)}
    out["difference"] = {k: round(out["fast"][k] - out["reference"][k], 4) for k in ("clean", "pgd10")}
    return out


# --- the benchmark ------------------------------------------------------------------------------

#: Where the JSON goes without ``out`` (its name, from the device, is known only at the end).
DEFAULT_DIR = Path("data/results/bench")


def run_benchmark(out: str | Path | None = None, *, tiny: bool | None = None,
                  device: str | None = None,
                  methods: tuple[str, ...] = ("standard", "pgd_at", "anchor"),
                  settings: dict[str, int] | None = None) -> Path:
    """Run the benchmark and write its JSON; returns the path.

    Args:
        out: JSON path (default ``data/results/bench/<device>.json``).
        tiny: the tiny configuration (default: on when there is no GPU).
        device: ``cuda`` / ``cpu`` (default: CUDA when available).
        settings: overrides of the ``FULL`` / ``TINY`` sizes (tests shrink them further).
            ``answers_steps > 0`` adds :func:`same_answers` on CIFAR-10 (skipped, and said so in
            the JSON, when the data cannot be loaded) at width ``answers_width``.

    The JSON is rewritten after every stage, so a run cut short still leaves what it measured.
    An ``out`` that cannot be written (a folder, under a regular file, on a read-only file system)
    raises ``ValueError`` naming it before anything is timed, not after the whole benchmark.
    """
    check_writable(DEFAULT_DIR / "x.json" if out is None else Path(out), what="bench output",
                   kind="a JSON file", example="bench.json")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = dev.type != "cuda" if tiny is None else tiny
    s = {**(TINY if tiny else FULL), **(settings or {})}
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (s["n_images"], 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (s["n_images"],), generator=g)
    steps_per_epoch = s["n_images"] // s["batch_size"]
    # Training steps (fixed shapes) are timed with cuDNN's kernel search on, as the trainer runs
    # them; evaluation (shapes vary with the clean-correct subset) with it off, as evaluate runs.
    timing = partial(median_step_seconds, device=dev, windows=s["windows"],
                     window_steps=s["window_steps"], warmup_steps=s["warmup_steps"])
    results: dict[str, Any] = {}

    extra: dict[str, Any] = {}

    def save() -> Path:
        return _write(out, dev, tiny, s, steps_per_epoch, results, extra)

    def record(name: str, step_seconds: float) -> None:
        results[name] = {"epoch_seconds": round(step_seconds * steps_per_epoch, 3),
                         "images_per_second": round(s["batch_size"] / step_seconds, 1),
                         "step_seconds": round(step_seconds, 5)}
        save()

    # Reference: fp32, DataLoader + torchvision transforms, backward() inside the attack.
    cfg = TrainConfig(method="pgd_at", width=s["width"], batch_size=s["batch_size"],
                      device=str(dev), progress=False)
    model = build_model(cfg).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    loader = reference_loader(x_u8.permute(0, 2, 3, 1).numpy(), y.numpy(), s["batch_size"],
                              s["workers"] if dev.type == "cuda" else 0)
    steps = reference_train_steps(model, loader, opt, dev, cfg)
    record("reference_pgd_at", timing(lambda: next(steps)))

    # anchor_lib: data on the device, tensor-op augmentation, bf16 + channels_last and a CUDA
    # graph per step on CUDA; on CUDA also the eager PGD-AT step, to show what the graph buys.
    x_dev, y_dev = x_u8.to(dev), y.to(dev)
    cuda = dev.type == "cuda"
    runs = [(m, m, cuda, False) for m in methods]  # (name, method, graph, compile)
    if cuda and "pgd_at" in methods:
        runs.insert(methods.index("pgd_at") + 1, ("pgd_at_eager", "pgd_at", False, False))
    if cuda and s.get("compile"):  # last: compiling takes minutes, and a stage limit may cut it
        # The graphed steps with TrainConfig.compile, as the full profile trains on a GPU.
        runs += [(f"{m}_compiled", m, True, True) for m in ("pgd_at", "anchor") if m in methods]
    for name, method, graph, compile_passes in runs:
        cfg = TrainConfig(method=method, width=s["width"], batch_size=s["batch_size"],
                          device=str(dev), progress=False, compile=compile_passes)
        model = build_model(cfg).to(dev)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                              weight_decay=5e-4, **({"fused": True} if cuda else {}))
        step = fast_train_step(model, opt, cfg, x_dev, y_dev,
                               torch.Generator(device=dev).manual_seed(0), graph=graph)
        modes: list[str] = []
        record(name, timing(lambda step=step, modes=modes: modes.append(step())))
        results[name]["train_step"] = modes[-1]
        save()

    # Evaluation: PGD-20 (fp32, as the evaluation protocol requires) over eval_n images, and AutoAttack.
    model = build_model(TrainConfig(width=s["width"])).to(dev).eval()
    xe, ye = data.to_float(x_dev[: s["eval_n"]]), y_dev[: s["eval_n"]]
    pgd20 = partial(attacks.pgd, eps=8 / 255, alpha=2 / 255, steps=20)

    def pgd20_seconds(net, amp: bool = False) -> float:
        with full_precision():  # as the evaluation runs: IEEE fp32, no TF32 (amp: bf16 passes)
            pgd20(net, xe[:1000], ye[:1000], amp=amp)  # warm-up: the first call's set-up
            sync(dev)
            t0 = time.perf_counter()
            for i in range(0, len(ye), 1000):
                pgd20(net, xe[i:i + 1000], ye[i:i + 1000], amp=amp)
            sync(dev)
        return round(time.perf_counter() - t0, 3)

    results["eval_pgd20_10k"] = {"seconds": pgd20_seconds(model), "n": len(ye),
                                 "precision": EVAL_PRECISION, "memory_format": "contiguous (NCHW)",
                                 "note": "batches of 1,000 after one warm-up batch"}
    save()
    if dev.type == "cuda":  # the same fp32 arithmetic in the layout training uses: faster?
        results["eval_pgd20_10k_channels_last"] = {
            "seconds": pgd20_seconds(model.to(memory_format=torch.channels_last)), "n": len(ye),
            "precision": EVAL_PRECISION, "memory_format": "channels_last"}
        # The trainer's arithmetic. It counts for a model only where it agrees with fp32 there
        # within 0.2 points (the evaluation protocol): benchmarks/eval_precision.py checks that per model.
        results["eval_pgd20_10k_bf16"] = {
            "seconds": pgd20_seconds(model, amp=True), "n": len(ye),
            "precision": "bf16 autocast (the attack's passes)", "memory_format": "channels_last"}
        model = model.to(memory_format=torch.contiguous_format)
        save()
    xa = xe[: s["autoattack_n"]]
    if len(xa) > 0:  # autoattack_n = 0 skips it
        _time_autoattack(model, xa, dev, results)
        save()
    if s["answers_steps"] > 0:
        extra["same_answers"] = _same_answers_on_cifar(s, dev)
    return save()


def _time_autoattack(model, xa: torch.Tensor, dev: torch.device, results: dict) -> None:
    with torch.no_grad():
        # AutoAttack skips misclassified points; labelling each image with the model's own
        # prediction makes every point one it must attack, as on a well-trained model.
        ya = model(xa).argmax(1)
    batch_size = default_batch_size(dev)  # as the evaluation protocol runs it
    t0 = time.perf_counter()
    with full_precision():
        attacks.autoattack(model, xa, ya, eps=8 / 255, batch_size=batch_size)
        sync(dev)
    results["autoattack_1k"] = {"seconds": round(time.perf_counter() - t0, 3), "n": len(ya),
                                "batch_size": batch_size, "precision": EVAL_PRECISION,
                                "note": "untrained model, labels = its own predictions, so every "
                                        "point is attacked; most fall to APGD-CE, so this is a "
                                        "lower bound on a robust model's time"}


def _same_answers_on_cifar(s: dict[str, int], dev: torch.device) -> dict[str, Any]:
    """:func:`same_answers` at the benchmark's batch size, or why it was skipped."""
    try:
        dataset = data.load_cifar10(download=False)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        return {"skipped": f"no CIFAR-10 copy could be loaded: {err}"}
    cfg = TrainConfig(method="pgd_at", width=s["answers_width"], batch_size=s["batch_size"],
                      lr=0.1, device=str(dev), progress=False)
    t0 = time.perf_counter()
    result = same_answers(dataset, cfg, s["answers_steps"], dev, workers=s["workers"])
    return {**result, "data": dataset.label, "width": cfg.width, "lr": cfg.lr,
            "seconds": round(time.perf_counter() - t0, 1),
            "note": "both paths start from the same weights and see the same number of images "
                    "with a constant learning rate; accuracies on all test images"}


def _write(out, dev, tiny, s, steps_per_epoch, results, extra=None) -> Path:
    ref = results["reference_pgd_at"]["epoch_seconds"]
    report = {
        "device": provenance.hardware(dev), "torch": torch.__version__,
        "commit": provenance.git_commit(), "configuration": "tiny (CPU smoke: absolute times "
        "are meaningless; compare ratios only)" if tiny else "full",
        "data": "random uint8 CIFAR-sized tensors", **{k: v for k, v in s.items()},
        "steps_per_epoch": steps_per_epoch, "results": results,
        "speedup_vs_reference": {name: round(ref / r["epoch_seconds"], 2)
                                 for name, r in results.items()
                                 if "epoch_seconds" in r and name != "reference_pgd_at"},
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        if dev.type == "cuda" else None,
        "precision": {"anchor_lib": "bf16 autocast + channels_last on CUDA (fp32 on CPU); "
                                    "results[*].train_step says whether a CUDA graph ran",
                      "reference": "fp32",
                      # the training paths' fp32 convolutions run in TF32 where this is true;
                      # the evaluation timings turn it off (see their own "precision")
                      "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        **(extra or {}),
    }
    if out is None:
        name = provenance.hardware(dev).replace(" ", "_").replace("(", "").replace(")", "")
        name = "".join(c for c in name if c.isalnum() or c in "_-.,")
        out = DEFAULT_DIR / f"{'tiny-' if tiny else ''}{name}.json"
    checkpoint.write_json(out, report)
    return Path(out)
