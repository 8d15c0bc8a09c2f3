"""Where the time goes on a GPU: a probe for the next speed-up, run once on the device machine.

The first H100 benchmark (``data/results/bench/``) found the trainer bound by the host, not by the
GPU: a PGD-10 step of a width-16 model (1/16 of the arithmetic) took nearly as long as one of a
width-64 model. This script measures, in one run and on one device:

1. ``pgd_at`` steps through ``anchor_lib.train.training_loss`` (eager, as the trainer runs), and the
   same step with the attack and the forward/backward captured in one CUDA graph (replayed each
   step; augmentation, the random start and the optimiser step stay outside), at widths 64 and 16.
   The graphed loss is compared with the eager loss from the same weights and inputs.
2. The pieces of the evaluation (each attack, each sanity check) on a small sample, so that the
   full evaluation's wall time can be attributed.
3. How long an atomic checkpoint save (with fsync) takes on the machine's disk.

Usage (device machine): ``python benchmarks/gpu_probe.py OUT.json [best.pt [test.npz]]``. Writes the JSON
after every stage. On a CPU it runs a tiny version and skips the CUDA graph (for the tests).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from anchor_lib import attacks, checkpoint, data, evaluate, provenance
from anchor_lib.bench import median_step_seconds, sync
from anchor_lib.train import TrainConfig, build_model, cudnn_benchmark, load_model, training_loss


def _setup(width: int, batch: int, dev: torch.device):
    cfg = TrainConfig(method="pgd_at", width=width, batch_size=batch, device=str(dev), progress=False)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4, **({"fused": True} if dev.type == "cuda" else {}))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch * 4, 3, 32, 32), dtype=torch.uint8, generator=g).to(dev)
    y = torch.randint(0, 10, (batch * 4,), generator=g).to(dev)
    return cfg, model, opt, x, y


def eager_step_seconds(width: int, batch: int, dev: torch.device) -> float:
    cfg, model, opt, x, y = _setup(width, batch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    amp = dev.type == "cuda"

    def step():
        xb, yb = x[:batch], y[:batch]
        if amp:
            xb = xb.contiguous(memory_format=torch.channels_last)
        model.train()
        loss, _ = training_loss(model, cfg, xb, yb, gen, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    reps = (5, 5, 3) if dev.type == "cuda" else (2, 2, 1)
    return median_step_seconds(step, dev, windows=reps[0], window_steps=reps[1],
                               warmup_steps=reps[2])


class GraphedPGDStep:
    """PGD-10 attack (BatchNorm in eval mode) + training forward/backward in one CUDA graph."""

    def __init__(self, model, cfg: TrainConfig, batch: int, dev: torch.device) -> None:
        self.model, self.cfg = model, cfg
        self.x = torch.zeros(batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
        self.delta0 = torch.zeros_like(self.x)
        self.y = torch.zeros(batch, dtype=torch.long, device=dev)
        self.graph = None

    def body(self) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        lower, upper = (self.x - cfg.eps).clamp(min=0), (self.x + cfg.eps).clamp(max=1)
        x_adv = torch.clamp(self.x + self.delta0, min=lower, max=upper)
        model.eval()
        for _ in range(cfg.attack_steps):
            x_adv.requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                logits = model(x_adv)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), self.y, reduction="sum"),
                                          x_adv)
            x_adv = torch.clamp(x_adv.detach() + cfg.alpha * grad.sign(), min=lower, max=upper)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            logits = model(x_adv.detach())
        return F.cross_entropy(logits.float(), self.y)

    def capture(self, opt) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph requires
                opt.zero_grad(set_to_none=True)
                self.body().backward()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)  # .grad is then allocated (and reused) by the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.body()
            self.loss.backward()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, delta0: torch.Tensor) -> torch.Tensor:
        self.x.copy_(xb)
        self.y.copy_(yb)
        self.delta0.copy_(delta0)
        self.graph.replay()
        return self.loss


def graphed_step_seconds(width: int, batch: int, dev: torch.device) -> dict:
    cfg, model, opt, x, y = _setup(width, batch, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    step = GraphedPGDStep(model, cfg, batch, dev)
    # Same weights and inputs: eager loss (the graph's body run eagerly) vs one replay.
    xb = data.augment(x[:batch], gen)
    d0 = torch.empty_like(xb).uniform_(-cfg.eps, cfg.eps)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step.x.copy_(xb), step.y.copy_(y[:batch]), step.delta0.copy_(d0)
    eager_loss = step.body().item()
    model.load_state_dict(state)
    t0 = time.perf_counter()
    step.capture(opt)
    capture_s = time.perf_counter() - t0
    model.load_state_dict(state)
    graph_loss = step(xb, y[:batch], d0).item()

    def one():
        a1 = data.augment(x[:batch], gen)
        delta0 = torch.empty_like(a1).uniform_(-cfg.eps, cfg.eps)
        step(a1, y[:batch], delta0)
        opt.step()
    return {"step_seconds": median_step_seconds(one, dev, windows=5, window_steps=5,
                                                warmup_steps=3), "capture_seconds": round(capture_s, 2),
            "eager_loss": eager_loss, "graph_loss": graph_loss}


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
            model, x[:n_aa], y[:n_aa], [eps * f for f in (0, 0.25, 0.5, 1, 2, 4, 8)]),
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
        stages.append((f"pgd_at_eager_w{width}", partial(eager_step_seconds, width, b, dev)))
        if cuda:
            stages.append((f"pgd_at_graphed_w{width}", partial(graphed_step_seconds, width, b, dev)))
    stages.append(("eval_pieces", partial(eval_pieces, best, dev, 2000 if cuda else 16,
                                          200 if cuda else 4, test_npz)))
    for name, fn in stages:
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
