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
- ``eval_pgd20_10k``: PGD-20 over 10,000 images (fp32; on CUDA also with bf16 passes,
  ``eval_pgd20_10k_bf16``, which counts for a model only where ``benchmarks/eval_precision.py``
  shows it agrees with fp32 there); ``autoattack_1k``: AutoAttack on 1,000, with how many model
  calls it made and how many images survived (its time depends on both);
- ``same_answers`` (with a CIFAR-10 copy): the reference loop and the fast path trained alike
  from the same weights, and their test accuracies.

Each training method is timed as the median of several windows of steps after a warm-up, with the
device synchronised at window edges; an epoch is ``steps_per_epoch × median step time``; each row
also records its warm-up's seconds (compiling and graph capture happen there) and, on CUDA, its
peak memory (while it ran). Random CIFAR-sized data is used: speed does not depend on pixel values
(AutoAttack's does). On a CPU the configuration is tiny and the JSON says so: its absolute times
mean nothing, only the ratios measured in one run do.

The stages run in order of need, so that a run cut short (a GPU slot's time limit) keeps what the
speed goals are judged on: the reference, the trainer's own steps (compiled on CUDA), the
evaluation, AutoAttack, the same-answers check, then the other rows. A stage that fails is
recorded as ``{"error": ...}`` and the next one runs.
"""

from __future__ import annotations

import datetime
import statistics
import sys
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
                        window_steps: int, warmup_steps: int,
                        stats: dict[str, float] | None = None) -> float:
    """Median over ``windows`` of the mean time of ``window_steps`` calls, after a warm-up.

    cuDNN's kernel search is on (CUDA) while timing: the steps timed are fixed-shape training
    steps, run that way by the trainer too. ``stats``, if given, receives ``warmup_seconds``:
    the untimed warm-up's length (compiling and CUDA-graph capture happen there).
    """
    with cudnn_benchmark(device.type == "cuda"):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(warmup_steps):
            step()
        sync(device)
        if stats is not None:
            stats["warmup_seconds"] = round(time.perf_counter() - t0, 3)
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
    batches of ``cfg.batch_size``; bf16 autocast and channels_last on every CUDA device (the
    trainer's default, ``train.default_amp``, uses bf16 only where it is native, which the
    benchmark's H100 and H200 are); ``graph`` replays the
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

    Both start from the same weights and see the same number of images with the same optimiser.
    They differ in the input pipeline (PIL transforms in a DataLoader against tensor ops on the
    device), the precision (bf16 on CUDA for the fast path, compiled when ``cfg.compile``), the
    attack's gradient plumbing, and BatchNorm during the attack: the reference crafts it in
    train mode, as public code does, the fast path in eval mode (``cfg.attack_bn``, the
    trainer's default). Returns each path's clean and PGD-10 test accuracy, the differences, and
    ``test_noise_2se``: two standard errors of a difference between two independent accuracies on
    this many test images. That is the test set's sampling noise only; how far two training runs
    of different seeds land apart is not measured here, and on short schedules it is larger.
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
    n = len(y_test)
    out["test_noise_2se"] = {k: round(2 * (sum(p * (1 - p) for p in (
        out["fast"][k], out["reference"][k])) / n) ** 0.5, 4) for k in ("clean", "pgd10")}
    out["n_test"] = n
    return out


# --- the benchmark ------------------------------------------------------------------------------

#: Where the JSON goes without ``out`` (its name, from the device, is known only at the end).
DEFAULT_DIR = Path("data/results/bench")


def run_benchmark(out: str | Path | None = None, *, tiny: bool | None = None,
                  device: str | None = None,
                  methods: tuple[str, ...] = ("standard", "pgd_at", "anchor"),
                  settings: dict[str, int] | None = None, command: str | None = None,
                  log: Callable[[str], None] = print) -> Path:
    """Run the benchmark and write its JSON; returns the path.

    Args:
        out: JSON path (default ``data/results/bench/<device>.json``).
        tiny: the tiny configuration (default: on when there is no GPU).
        device: ``cuda`` / ``cpu`` (default: CUDA when available).
        settings: overrides of the ``FULL`` / ``TINY`` sizes (tests shrink them further).
            ``answers_steps > 0`` adds :func:`same_answers` on CIFAR-10 (skipped, and said so in
            the JSON, when the data cannot be loaded) at width ``answers_width``.
        command: how the benchmark was started, for the JSON (default: this process's argv).
        log: where each stage's result is printed as it is measured.

    The JSON (with ``when`` and ``command``) is rewritten after every stage, so a run cut short
    still leaves what it measured; a stage that raises is recorded as ``{"error": ...}`` and the
    next one runs. An ``out`` that cannot be written (a folder, under a regular file, on a
    read-only file system) raises ``ValueError`` naming it before anything is timed.
    """
    check_writable(DEFAULT_DIR / "x.json" if out is None else Path(out), what="bench output",
                   kind="a JSON file", example="bench.json")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = dev.type != "cuda" if tiny is None else tiny
    s = {**(TINY if tiny else FULL), **(settings or {})}
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (s["n_images"], 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (s["n_images"],), generator=g)
    x_dev, y_dev = x_u8.to(dev), y.to(dev)
    steps_per_epoch = s["n_images"] // s["batch_size"]
    # Training steps (fixed shapes) are timed with cuDNN's kernel search on, as the trainer runs
    # them; evaluation (shapes vary with the clean-correct subset) with it off, as evaluate runs.
    timing = partial(median_step_seconds, device=dev, windows=s["windows"],
                     window_steps=s["window_steps"], warmup_steps=s["warmup_steps"])
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if command is None:
        command = " ".join([Path(sys.executable).name, *sys.argv])
    peak = {"run": 0}  # bytes: the run's peak, over the stages' own (each stage resets CUDA's)

    def save() -> Path:
        if cuda:
            peak["run"] = max(peak["run"], torch.cuda.max_memory_allocated(dev))
        return _write(out, dev, tiny, s, steps_per_epoch, results, extra, command,
                      round(peak["run"] / 2**30, 2) if cuda else None)

    def record(name: str, step_seconds: float, stats: dict[str, Any]) -> None:
        results[name] = {"epoch_seconds": round(step_seconds * steps_per_epoch, 3),
                         "images_per_second": round(s["batch_size"] / step_seconds, 1),
                         "step_seconds": round(step_seconds, 5), **stats}
        if cuda:  # the peak while this row ran, what earlier stages still hold included
            # (the run's is peak_memory_gb)
            results[name]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        log(f"bench: {name}: {results[name]['epoch_seconds']} s per epoch of {steps_per_epoch} "
            f"steps (warm-up {stats.get('warmup_seconds')} s)")

    def reference() -> None:
        # fp32, DataLoader + torchvision transforms, backward() inside the attack.
        cfg = TrainConfig(method="pgd_at", width=s["width"], batch_size=s["batch_size"],
                          device=str(dev), progress=False)
        model = build_model(cfg).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)
        loader = reference_loader(x_u8.permute(0, 2, 3, 1).numpy(), y.numpy(), s["batch_size"],
                                  s["workers"] if cuda else 0)
        steps = reference_train_steps(model, loader, opt, dev, cfg)
        stats: dict[str, Any] = {}
        record("reference_pgd_at", timing(lambda: next(steps), stats=stats), stats)

    def fast(name: str, method: str, graph: bool, compile_passes: bool) -> None:
        # anchor_lib: data on the device, tensor-op augmentation, bf16 + channels_last and a
        # CUDA graph per step on CUDA (graph=False: the same step eager, to show what it buys).
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
        stats: dict[str, Any] = {}
        seconds = timing(lambda: modes.append(step()), stats=stats)
        record(name, seconds, {**stats, "train_step": modes[-1]})

    # Evaluation: an untrained model (speed does not depend on what it learned, except
    # AutoAttack's, which says how much of its budget ran).
    eval_model = build_model(TrainConfig(width=s["width"])).to(dev).eval()
    xe, ye = data.to_float(x_dev[: s["eval_n"]]), y_dev[: s["eval_n"]]
    pgd20 = partial(attacks.pgd, eps=8 / 255, alpha=2 / 255, steps=20)

    def pgd20_seconds(amp: bool = False) -> float:
        with full_precision():  # as the evaluation runs: IEEE fp32, no TF32 (amp: bf16 passes)
            pgd20(eval_model, xe[:1000], ye[:1000], amp=amp)  # warm-up: the first call's set-up
            sync(dev)
            t0 = time.perf_counter()
            for i in range(0, len(ye), 1000):
                pgd20(eval_model, xe[i:i + 1000], ye[i:i + 1000], amp=amp)
            sync(dev)
        return round(time.perf_counter() - t0, 3)

    def eval_fp32() -> None:
        # PGD-20 in fp32, as the evaluation protocol requires.
        results["eval_pgd20_10k"] = {"seconds": pgd20_seconds(), "n": len(ye),
                                     "precision": EVAL_PRECISION,
                                     "memory_format": "contiguous (NCHW)",
                                     "note": "batches of 1,000 after one warm-up batch"}
        log(f"bench: eval_pgd20_10k: {results['eval_pgd20_10k']['seconds']} s for {len(ye)} images")

    def eval_bf16() -> None:
        # The trainer's arithmetic and layout. It counts for a model only where it agrees with
        # fp32 there within 0.2 points (the evaluation protocol): benchmarks/eval_precision.py
        # checks that.
        eval_model.to(memory_format=torch.channels_last)
        try:
            seconds = pgd20_seconds(amp=True)
        finally:
            eval_model.to(memory_format=torch.contiguous_format)
        results["eval_pgd20_10k_bf16"] = {
            "seconds": seconds, "n": len(ye),
            "precision": "bf16 autocast (the attack's passes)", "memory_format": "channels_last"}
        log(f"bench: eval_pgd20_10k_bf16: {results['eval_pgd20_10k_bf16']['seconds']} s")

    def autoattack_stage() -> None:
        _time_autoattack(eval_model, xe[: s["autoattack_n"]], dev, results)
        r = results["autoattack_1k"]
        log(f"bench: autoattack_1k: {r['seconds']} s, {r['model_calls']} model calls, "
            f"{r['robust']} of {r['n']} images survived")

    def answers() -> None:
        extra["same_answers"] = _same_answers_on_cifar(s, dev)
        a = extra["same_answers"]
        if "skipped" in a:
            log(f"bench: same_answers skipped: {a['skipped'].splitlines()[0]}")
            return
        for path in ("reference", "fast"):
            log(f"bench: same_answers: {path}: clean {a[path]['clean']:.4f}, "
                f"PGD-10 {a[path]['pgd10']:.4f}")
        log(f"bench: same_answers: fast - reference: clean {a['difference']['clean']:+.4f}, "
            f"PGD-10 {a['difference']['pgd10']:+.4f} (the test set's noise alone, 2 s.e.: "
            f"{a['test_noise_2se']['clean']:.4f}, {a['test_noise_2se']['pgd10']:.4f})")

    stages = [(name, partial(fast, name, *how)) if how else (name, fn)
              for name, fn, how in _stage_plan(methods, cuda, bool(s.get("compile")),
                                               len(xe[: s["autoattack_n"]]) > 0,
                                               s["answers_steps"] > 0,
                                               {"reference_pgd_at": reference,
                                                "eval_pgd20_10k": eval_fp32,
                                                "eval_pgd20_10k_bf16": eval_bf16,
                                                "autoattack_1k": autoattack_stage,
                                                "same_answers": answers})]
    for name, fn in stages:
        if cuda:  # save() after each stage has taken its peak into the run's
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - recorded, and the next stage runs
            first = (str(err).strip().splitlines() or [""])[0][:300]
            where = extra if name == "same_answers" else results
            where[name] = {"error": f"{type(err).__name__}: {first}"}
            log(f"bench: {name} failed: {where[name]['error']}")
        save()
    return save()


def _stage_plan(methods: tuple[str, ...], cuda: bool, compile_: bool, autoattack: bool,
                answers: bool, named: dict[str, Callable[[], None]]
                ) -> list[tuple[str, Callable[[], None] | None, tuple | None]]:
    """The stages in the order they run: ``(name, function, None)`` for a named stage, or
    ``(name, None, (method, graph, compile))`` for a training row.

    What the speed goals are judged on comes first: the reference, then the trainer's own steps
    (compiled and graphed on CUDA when ``compile_``, as the full profile trains), the evaluation,
    AutoAttack and the same-answers check; then the rows that only explain (the uncompiled
    graphed steps, the eager PGD-AT step). On a CPU (no graphs, no compiling) the trainer's steps
    are the ``methods`` rows themselves.
    """
    plan: list[tuple[str, Callable[[], None] | None, tuple | None]] = [
        ("reference_pgd_at", named["reference_pgd_at"], None)]
    main = [(m, m, cuda, False) for m in methods]
    explaining: list[tuple[str, str, bool, bool]] = []
    if cuda and compile_:
        compiled = [(f"{m}_compiled", m, True, True) for m in ("pgd_at", "anchor") if m in methods]
        main, explaining = compiled, main
    if cuda and "pgd_at" in methods:
        explaining.append(("pgd_at_eager", "pgd_at", False, False))
    plan += [(name, None, (m, graph, comp)) for name, m, graph, comp in main]
    plan.append(("eval_pgd20_10k", named["eval_pgd20_10k"], None))
    if cuda:
        plan.append(("eval_pgd20_10k_bf16", named["eval_pgd20_10k_bf16"], None))
    if autoattack:
        plan.append(("autoattack_1k", named["autoattack_1k"], None))
    if answers:
        plan.append(("same_answers", named["same_answers"], None))
    plan += [(name, None, (m, graph, comp)) for name, m, graph, comp in explaining]
    return plan


def _time_autoattack(model, xa: torch.Tensor, dev: torch.device, results: dict) -> None:
    with torch.no_grad():
        # AutoAttack skips misclassified points; labelling each image with the model's own
        # prediction makes every point one it must attack, as on a well-trained model.
        ya = model(xa).argmax(1)
    batch_size = default_batch_size(dev)  # as the evaluation protocol runs it
    calls = {"n": 0}
    with full_precision():  # the attack and the verdict on what it returns
        hook = model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        try:
            sync(dev)
            t0 = time.perf_counter()
            x_adv = attacks.autoattack(model, xa, ya, eps=8 / 255, batch_size=batch_size)
            sync(dev)
            seconds = time.perf_counter() - t0
        finally:
            hook.remove()
        with torch.no_grad():
            robust = (int((model(x_adv).argmax(1) == ya).sum()) if torch.is_tensor(x_adv)
                      else None)
    results["autoattack_1k"] = {
        "seconds": round(seconds, 3), "n": len(ya), "batch_size": batch_size,
        "precision": EVAL_PRECISION, "model_calls": calls["n"], "robust": robust,
        "note": "untrained model, labels = its own predictions, so every image is attacked; "
                "the time grows with the images that survive the early stages (each survivor "
                "runs every stage: about 7,900 model calls in all), so it is not a robust "
                "model's time: see model_calls and robust, and a robust run's metrics.json"}


def _same_answers_on_cifar(s: dict[str, int], dev: torch.device) -> dict[str, Any]:
    """:func:`same_answers` at the benchmark's batch size, or why it was skipped. On CUDA the
    fast path compiles when the configuration does, as the full profile trains."""
    try:
        dataset = data.load_cifar10(download=False)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        return {"skipped": f"no CIFAR-10 copy could be loaded: {err}"}
    cfg = TrainConfig(method="pgd_at", width=s["answers_width"], batch_size=s["batch_size"],
                      lr=0.1, device=str(dev), progress=False,
                      compile=bool(s.get("compile")) and dev.type == "cuda")
    t0 = time.perf_counter()
    result = same_answers(dataset, cfg, s["answers_steps"], dev, workers=s["workers"])
    return {**result, "data": dataset.label, "width": cfg.width, "lr": cfg.lr,
            "compiled": bool(cfg.compile), "seconds": round(time.perf_counter() - t0, 1),
            "note": "both paths start from the same weights and see the same number of images "
                    "with a constant learning rate; accuracies on all test images"}


def _write(out, dev, tiny, s, steps_per_epoch, results, extra=None, command=None,
           peak_memory_gb=None) -> Path:
    ref = results.get("reference_pgd_at", {}).get("epoch_seconds")
    report = {
        "device": provenance.hardware(dev), "torch": str(torch.__version__),
        "commit": provenance.git_commit(), "configuration": "tiny (CPU smoke: absolute times "
        "are meaningless; compare ratios only)" if tiny else "full",
        "data": "random uint8 CIFAR-sized tensors", **{k: v for k, v in s.items()},
        "steps_per_epoch": steps_per_epoch, "results": results,
        "speedup_vs_reference": {name: round(ref / r["epoch_seconds"], 2)
                                 for name, r in results.items()
                                 if ref and "epoch_seconds" in r and name != "reference_pgd_at"},
        "peak_memory_gb": peak_memory_gb,  # CUDA's allocator statistics only
        "precision": {"anchor_lib": "bf16 autocast + channels_last on CUDA (fp32 on CPU); "
                                    "results[*].train_step says whether a CUDA graph ran",
                      "reference": "fp32",
                      # the training paths' fp32 convolutions run in TF32 where this is true;
                      # the evaluation timings turn it off (see their own "precision")
                      "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        **(extra or {}),
        # When this file was last written (UTC), and how the run was started.
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    if out is None:
        name = provenance.hardware(dev).replace(" ", "_").replace("(", "").replace(")", "")
        name = "".join(c for c in name if c.isalnum() or c in "_-.,")
        out = DEFAULT_DIR / f"{'tiny-' if tiny else ''}{name}.json"
    checkpoint.write_json(out, report)
    return Path(out)
