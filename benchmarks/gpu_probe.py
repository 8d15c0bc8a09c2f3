"""Where the time goes on a GPU: a probe for the next speed-up, run once on the device machine.

The first H100 benchmark (``data/results/bench/``) found the trainer bound by the host, not by the
GPU: a PGD-10 step of a width-16 model (1/16 of the arithmetic) took nearly as long as one of a
width-64 model. This script measures, in one run and on one device:

1. ``pgd_at`` steps as the trainer runs them (``anchor_lib.bench.fast_train_step``), eager and
   replayed from a CUDA graph (``anchor_lib.graphs``: the attack and the forward/backward in one
   graph; augmentation, the random start and the optimiser step outside it), at widths 64 and 16.
   The graph's first replay is compared with the eager step from the same weights and inputs by
   ``StepGraph`` itself, which falls back to eager (``train_step``) if they differ. The graphed
   step once more with PyTorch's ``nn.BatchNorm2d`` (``*_torch_bn``): the ratio is what
   ``anchor_lib.models.BatchNorm2d``'s layout-keeping eval-mode backward buys.
2. The pieces of the evaluation (each attack, each sanity check) on a small sample, so that the
   full evaluation's wall time can be attributed.
3. Which kernels an eager width-64 step spends its device time in (``torch.profiler``), and
   which calls make its activation-sized copies; the same for the compiled step.
4. How long an atomic checkpoint save (with fsync) takes on the machine's disk.
5. The width-64 step with ``TrainConfig.compile`` (the model's passes compiled, the attack's
   weights frozen), eager and graphed; like every step stage it records its first step's time
   (compiling included) and gradient norm, which should match the trainer's uncompiled step.
6. The same graphed step and its kernel profile with inductor's ``max-autotune-no-cudagraphs``
   mode (``*_autotuned_*``): convolutions autotuned between cuDNN and inductor's templates, which
   can take the BatchNorm and ReLU around them into the convolution's kernel. Its first step's
   time is the price: every convolution shape is benchmarked while compiling.

Usage (device machine): ``python benchmarks/gpu_probe.py OUT.json [best.pt [test.npz]]``. Writes
the JSON after every stage; ``PROBE_ONLY="kernels_w64 ..."`` runs the named stages alone. On a
CPU it runs a tiny version, with the graph's rehearsal in place of the graph (for the tests).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from anchor_lib import attacks, checkpoint, data, evaluate, provenance
from anchor_lib.bench import fast_train_step, median_step_seconds
from anchor_lib.evaluate import sync
from anchor_lib.models import use_torch_batchnorm
from anchor_lib.train import TrainConfig, build_model, cudnn_benchmark, load_model


def _setup(width: int, batch: int, dev: torch.device, torch_bn: bool = False):
    cfg = TrainConfig(method="pgd_at", width=width, batch_size=batch, device=str(dev), progress=False)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    if torch_bn:  # PyTorch's own BatchNorm2d, to time what models.BatchNorm2d's backward buys
        use_torch_batchnorm(model)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4, **({"fused": True} if dev.type == "cuda" else {}))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch * 4, 3, 32, 32), dtype=torch.uint8, generator=g).to(dev)
    y = torch.randint(0, 10, (batch * 4,), generator=g).to(dev)
    return cfg, model, opt, x, y


def step_seconds(width: int, batch: int, dev: torch.device, graph: bool,
                 compiled: bool = False, torch_bn: bool = False,
                 compile_mode: str | None = None) -> dict:
    """Median seconds of one PGD-10 training step as the trainer runs it, eager or graphed;
    ``compiled``: with ``TrainConfig.compile`` (the model's passes compiled, the attack's weights
    frozen; ``aot_eager`` on a CPU). ``first_step_seconds`` includes compiling and recording;
    ``first_grad_norm`` fingerprints the step, the same for every variant from the same weights,
    data and draws (up to bf16 rounding on a GPU). ``torch_bn``: with ``nn.BatchNorm2d`` in place
    of :class:`anchor_lib.models.BatchNorm2d`. ``compile_mode``: inductor's mode when compiled."""
    cfg, model, opt, x, y = _setup(width, batch, dev, torch_bn)
    cfg.compile = compiled
    step = fast_train_step(model, opt, cfg, x, y, torch.Generator(device=dev).manual_seed(0),
                           graph=graph, compile_mode=compile_mode)
    first_seconds, grad_norm = _first_step(step, model, dev)
    modes: list[str] = []
    reps = (5, 5, 3) if dev.type == "cuda" else (2, 2, 1)
    seconds = median_step_seconds(lambda: modes.append(step()), dev, windows=reps[0],
                                  window_steps=reps[1], warmup_steps=reps[2])
    return {"step_seconds": seconds, "train_step": modes[-1], "compiled": compiled,
            "compile_mode": compile_mode,
            "batchnorm": "torch" if torch_bn else "anchor_lib",
            "first_step_seconds": first_seconds, "first_grad_norm": grad_norm}


def _first_step(step, model: torch.nn.Module, dev: torch.device) -> tuple[float, float]:
    """Run the first step (compiling and recording happen here): its seconds, and the norm of
    the gradient it left, a fingerprint of the step to compare across variants (one host sync)."""
    with cudnn_benchmark(dev.type == "cuda"):
        t0 = time.perf_counter()
        step()
        grads = [p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None]
        norm = torch.cat(grads).norm().item()  # waits for the step
    return round(time.perf_counter() - t0, 2), round(norm, 6)


def kernel_profile(width: int, batch: int, dev: torch.device, top: int = 20,
                   compiled: bool = False, compile_mode: str | None = None) -> dict:
    """Where a PGD-10 step's device time goes (``torch.profiler``), eager or ``compiled`` (with
    inductor's ``compile_mode``).

    Not replayed from a graph, because a replay shows as one launch; the kernels are the same
    ones. On CUDA, ``top`` lists kernels only (device time counted once, so ``ms_per_step`` is the
    step's device time), ``operators`` the aten operators by the device time of the kernels each
    launched itself, and ``copies`` the ``aten::copy_`` calls grouped by the shape copied, the
    operators that called them and the Python frames that made them (a copy made by the backward
    pass has none; stacks are recorded on CUDA only). On a CPU the operators' self CPU time stands
    in for kernels (for the tests).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cfg, model, opt, x, y = _setup(width, batch, dev)
    cfg.compile = compiled
    step = fast_train_step(model, opt, cfg, x, y, torch.Generator(device=dev).manual_seed(0),
                           graph=False, compile_mode=compile_mode)
    cuda = dev.type == "cuda"
    for _ in range(3):  # cuDNN's search, compiling, the allocator's first requests: untraced
        step()
    sync(dev)
    steps = 3
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=True, with_stack=cuda) as prof:  # stacks cost seconds on a CPU
        for _ in range(steps):
            step()
        sync(dev)
    field = "self_device_time_total" if cuda else "self_cpu_time_total"

    def ranked(events, n: int, keep=lambda e: True) -> tuple[float, list[dict]]:
        rows = sorted((e for e in events if getattr(e, field, 0.0) > 0 and keep(e)),
                      key=lambda e: getattr(e, field), reverse=True)
        total = sum(getattr(e, field) for e in rows)
        return total, [{"name": e.key[:200], "ms_per_step": round(getattr(e, field) / 1000 / steps, 3),
                        "share": round(getattr(e, field) / total, 4),
                        "calls_per_step": e.count / steps} for e in rows[:n]]

    # Inductor's "## Call CompiledFxGraph <hash> ##" ranges show on the device's timeline,
    # spanning a compiled graph's kernels: counting them would count those kernels twice.
    averages = [e for e in prof.key_averages() if not e.key.startswith("## ")]
    is_kernel = (lambda e: e.device_type == DeviceType.CUDA) if cuda else (lambda e: True)
    total, kernels = ranked(averages, top, is_kernel)
    report = {"steps": steps, "compiled": compiled, "compile_mode": compile_mode,
              "time": "device (kernels)" if cuda else "CPU (operators)",
              "ms_per_step": round(total / 1000 / steps, 3), "top": kernels}
    if cuda:
        report["operators"] = ranked(averages, top, lambda e: not is_kernel(e))[1]

    def callers(e, n: int = 3) -> str:  # the operators that asked for the copy, innermost first
        names, parent = [], e.cpu_parent
        while parent is not None and len(names) < n:
            names.append(parent.name)
            parent = parent.cpu_parent
        return " < ".join(names)

    groups: dict[tuple[str, str, str], list] = {}
    for e in prof.events():
        if e.name == "aten::copy_":
            frames = " < ".join(f for f in e.stack if "anchor_lib" in f or "torch/nn" in f)
            groups.setdefault((str(e.input_shapes[:1]), callers(e), frames[:400]), []).append(e)
    us = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    rows = sorted(groups.items(), key=lambda kv: sum(map(us, kv[1])), reverse=True)
    report["copies"] = [{"shape": shape, "callers": made_by, "stack": frames,
                         "calls_per_step": len(v) / steps,
                         "ms_per_step": round(sum(map(us, v)) / 1000 / steps, 3)}
                        for (shape, made_by, frames), v in rows[:12]]
    return report


def eval_pieces(path: str | None, dev: torch.device, n: int, n_aa: int,
                test_npz: str | None = None) -> dict:
    if path:
        model, _ = load_model(path, dev)
        if test_npz:  # the first test images, extracted beforehand (saves decoding on the device)
            import numpy as np

            with np.load(test_npz) as npz:
                xs, ys, label = torch.from_numpy(npz["x"]), torch.from_numpy(npz["y"]), str(npz["label"])
        else:
            ds = data.load_cifar10(download=False)
            xs, ys, label = ds.x_test, ds.y_test, ds.label
        x, y = data.to_float(xs[:n]).to(dev), ys[:n].to(dev)
        n = len(y)
        source = f"{Path(path).name} on {label}"
    else:
        model = build_model(TrainConfig(width=8)).to(dev).eval()
        x = torch.rand(n, 3, 32, 32, device=dev)
        with torch.no_grad():
            y = model(x).argmax(1)
        source = "untrained width-8 model, labels = its predictions"
    out = {"source": source, "n": n, "n_autoattack": n_aa}
    eps = evaluate.EVAL_EPS
    table = evaluate.standard_attacks(eps)
    pieces = {
        "clean": lambda: evaluate.accuracy(model, x, y),
        "fgsm": lambda: evaluate.robust_accuracy(model, x, y, table["fgsm"]),
        "pgd20": lambda: evaluate.robust_accuracy(model, x, y, table["pgd20"]),
        "cw": lambda: evaluate.robust_accuracy(model, x, y, table["cw"]),
        "autoattack": lambda: evaluate.robust_accuracy(model, x[:n_aa], y[:n_aa],
                                                       partial(attacks.autoattack, eps=eps)),
        "sanity_more_steps": lambda: evaluate.check_more_steps(model, x[:n_aa], y[:n_aa], eps),
        "sanity_eps_sweep": lambda: evaluate.check_eps_sweep(
            model, x[:n_aa], y[:n_aa], evaluate.eps_sweep(eps)),
        "sanity_black_box": lambda: evaluate.check_black_box_weaker(model, x[:n_aa], y[:n_aa],
                                                                     eps, pgd_acc=0.0),
    }
    for name, fn in pieces.items():
        sync(dev)
        t0 = time.perf_counter()
        value = fn()
        sync(dev)
        out[name] = {"seconds": round(time.perf_counter() - t0, 3),
                     "result": value if isinstance(value, float) else value.get("passed")}
    return out


def save_seconds() -> dict:
    state = {"w": torch.randn(1_500_000)}  # 6 MB, the size of a width-16 checkpoint.pt
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            checkpoint.save(state, Path(tmp) / f"c{i}.pt")
            times.append(time.perf_counter() - t0)
    return {"bytes": 6_000_000, "seconds": [round(t, 3) for t in times]}


def main(out: str, best: str | None = None, test_npz: str | None = None) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    report: dict = {"device": provenance.hardware(dev), "torch": torch.__version__,
                    "commit": provenance.git_commit(), "data": "random uint8 CIFAR-sized tensors "
                    "for the steps", "batch_size": 512 if cuda else 16}
    stages = [("checkpoint_save", save_seconds)]
    for width in ((64, 16) if cuda else (4,)):
        b = report["batch_size"]
        for graph in (False, True):  # on a CPU the graphed step is the rehearsal (graphs.py)
            stages.append((f"pgd_at_{'graphed' if graph else 'eager'}_w{width}",
                           partial(step_seconds, width, b, dev, graph)))
        # The same graphed step with PyTorch's BatchNorm2d: the ratio of the two is what the
        # layout-keeping eval-mode backward buys, measured in one run.
        stages.append((f"pgd_at_graphed_w{width}_torch_bn",
                       partial(step_seconds, width, b, dev, True, torch_bn=True)))
    stages.append(("kernels_w64" if cuda else "kernels_w4",
                   partial(kernel_profile, 64 if cuda else 4, report["batch_size"], dev)))
    stages.append(("eval_pieces", partial(eval_pieces, best, dev, 2000 if cuda else 16,
                                          200 if cuda else 4, test_npz)))
    # Last, because compiling takes minutes: the width-64 step with the model's passes compiled,
    # eager and graphed, and its kernel profile (CUDA only; the tests run the compiled step at
    # width 4 on a CPU directly).
    if cuda:
        for graph in (False, True):
            stages.append((f"pgd_at_compiled_{'graphed' if graph else 'eager'}_w64",
                           partial(step_seconds, 64, 512, dev, graph, True)))
        stages.append(("kernels_compiled_w64", partial(kernel_profile, 64, 512, dev,
                                                        compiled=True)))
        autotune = "max-autotune-no-cudagraphs"  # the step is graphed already
        stages.append(("pgd_at_autotuned_graphed_w64",
                       partial(step_seconds, 64, 512, dev, True, True, compile_mode=autotune)))
        stages.append(("kernels_autotuned_w64", partial(kernel_profile, 64, 512, dev,
                                                         compiled=True, compile_mode=autotune)))
    only = os.environ.get("PROBE_ONLY", "").split()  # e.g. "kernels_w64": those stages alone
    for name, fn in stages:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            # cuDNN's kernel search: on for the fixed-shape training steps, as the trainer runs
            # them; off for evaluation, whose batch shapes vary.
            with cudnn_benchmark(cuda and name != "eval_pieces"):
                report[name] = fn()
        except Exception as err:  # a probe records what failed and goes on
            report[name] = {"error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc()[-1500:]}
        print(f"{name}: {time.perf_counter() - t0:.1f} s -> {report[name]}", flush=True)
        Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
