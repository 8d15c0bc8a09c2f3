"""The reproduction: train each method, evaluate it by DESIGN §4, write its artifacts.

``reproduce(profile)`` is restartable by design, because GPU time comes in short slots: a run whose
``metrics.json`` exists (and verifies) is skipped, an unfinished run resumes from its checkpoint,
and each run's ``metrics.json`` is written last and atomically, so a killed reproduction never
leaves a file that looks finished.

Per run, under ``<out>/<profile>-<method>/``: ``checkpoint.pt`` and ``best.pt`` (git-ignored),
``history.csv``, ``embeddings.npz`` and ``metrics.json`` (DESIGN §6).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import checkpoint, data, embeddings, evaluate, provenance
from .models import PreActResNet18
from .train import METHODS, TrainConfig, config_from_dict, dataset_for, load_model, resolve_device, train

# How much of the test set each profile evaluates on: clean/FGSM/PGD-20/CW on the first n,
# AutoAttack and the sanity checks on the first autoattack_n, embeddings of the first embed_n.
EVAL_SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"n": 200, "autoattack_n": 16, "sanity": True, "embed_n": 200},
    "demo": {"n": 2000, "autoattack_n": 200, "sanity": True, "embed_n": 500},
    "full": {"n": None, "autoattack_n": 1000, "sanity": True, "embed_n": 1000},
}


def evaluate_checkpoint(path: str | Path, *, attacks: tuple[str, ...] | None = None,
                        n: int | None = None, autoattack_n: int = 1000, sanity: bool = False,
                        dataset: data.CIFAR10 | None = None,
                        device: str = "auto") -> dict[str, Any]:
    """Evaluate a verified checkpoint on the test set; return a DESIGN §6 ``metrics.json`` dict.

    Args:
        path: ``best.pt`` or ``checkpoint.pt``.
        attacks: names from ``evaluate.ATTACKS`` (default: all).
        n: number of test images (first n; None = all 10,000).
        autoattack_n: AutoAttack on the first this-many images.
        sanity: run the §4 sanity checks, on the AutoAttack images so that the PGD-20 /
            AutoAttack gap compares the same examples.
    """
    dev = resolve_device(device)
    model, state = load_model(path, dev)
    return evaluate_model(model, state, attacks=attacks, n=n, autoattack_n=autoattack_n,
                          sanity=sanity, dataset=dataset)


def evaluate_model(model: PreActResNet18, state: dict[str, Any], *,
                   attacks: tuple[str, ...] | None = None, n: int | None = None,
                   autoattack_n: int = 1000, sanity: bool = False,
                   dataset: data.CIFAR10 | None = None) -> dict[str, Any]:
    """:func:`evaluate_checkpoint` for a model already loaded (with its checkpoint ``state``)."""
    dev = next(model.parameters()).device
    cfg_dict = state["config"]
    if dataset is None:
        dataset = dataset_for(config_from_dict(cfg_dict))
    x = data.to_float(dataset.x_test[:n] if n else dataset.x_test).to(dev)
    y = (dataset.y_test[:n] if n else dataset.y_test).to(dev)
    t0 = time.perf_counter()
    names = tuple(attacks) if attacks else evaluate.ATTACKS
    accuracy = evaluate.evaluate_suite(model, x, y, attacks=names, autoattack_n=autoattack_n)
    k = min(autoattack_n, len(y))
    checks = (evaluate.sanity_checks(model, x[:k], y[:k],
                                     autoattack=accuracy.get("autoattack", {}).get("value"))
              if sanity else {})
    history = state.get("history") or []
    return {
        "method": cfg_dict.get("method"), "data": dataset.label, **provenance.describe(dev),
        "seed": cfg_dict.get("seed"), "epochs": cfg_dict.get("epochs"),
        "selected_epoch": int(state.get("epoch", -1)) + 1,
        "train_seconds": round(sum(float(r.get("seconds", 0.0)) for r in history), 2) or None,
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "profile": cfg_dict.get("profile"), "config": cfg_dict,
        "validation": state.get("val"), "accuracy": accuracy, "sanity": checks,
    }


def run_one(cfg: TrainConfig, run_dir: Path, settings: dict[str, Any],
            dataset: data.CIFAR10 | None = None, attacks: tuple[str, ...] | None = None) -> dict:
    """Train (resuming), evaluate and write the artifacts of one run; skip it if finished."""
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        try:
            checkpoint.verify(metrics_path)
            return {"run": run_dir.name, "status": "skipped (finished)"}
        except checkpoint.CheckpointError:
            pass  # a damaged metrics.json is redone, never trusted
    cfg.out_dir = str(run_dir)
    t0 = time.perf_counter()
    dataset = dataset if dataset is not None else dataset_for(cfg)  # loaded once, used thrice
    history = train(cfg, resume=True, dataset=dataset)
    dev = resolve_device(cfg.device)
    model, state = load_model(run_dir / "best.pt", dev)
    metrics = evaluate_model(model, state, attacks=attacks, n=settings["n"],
                             autoattack_n=settings["autoattack_n"], sanity=settings["sanity"],
                             dataset=dataset)
    # train_seconds from the checkpoint covers all epochs, resumed ones included.
    metrics["train_seconds"] = round(sum(r["seconds"] for r in history), 2)
    k = settings["embed_n"]
    emb = embeddings.embed_views(model, dataset.x_test[:k].to(dev), dataset.y_test[:k].to(dev),
                                 eps=cfg.eps, alpha=cfg.alpha, steps=10, seed=0)
    embeddings.save_embeddings(run_dir / "embeddings.npz", emb,
                               {"method": cfg.method, "data": dataset.label, "n": k,
                                "profile": cfg.profile, **provenance.describe(dev)})
    metrics["cluster_metrics"] = embeddings.cluster_metrics(emb)
    checkpoint.write_json(metrics_path, metrics)  # last: its presence means "finished"
    return {"run": run_dir.name, "status": f"done in {time.perf_counter() - t0:.1f} s"}


def reproduce(profile: str = "full", methods: tuple[str, ...] = METHODS,
              out: str | Path = "data/results", *, dataset: data.CIFAR10 | None = None,
              attacks: tuple[str, ...] | None = None, log=print,
              **overrides: Any) -> list[dict[str, str]]:
    """Train and evaluate every method in ``methods`` at ``profile``; returns one status per run.

    The four robust methods share epochs, schedule, batch size, augmentation and the training
    attack, because they all come from the same profile; ``overrides`` apply to every run.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(METHODS)}")
    settings = EVAL_SETTINGS[profile] if profile in EVAL_SETTINGS else None
    if settings is None:
        raise ValueError(f"profile must be one of {', '.join(EVAL_SETTINGS)}, got {profile!r}")
    statuses = []
    for method in methods:
        cfg = TrainConfig.from_profile(profile, method=method, **overrides)
        if method == "trades":
            cfg.trades_beta = 6.0
        status = run_one(cfg, Path(out) / f"{profile}-{method}", settings, dataset, attacks)
        log(f"{status['run']}: {status['status']}")
        statuses.append(status)
    return statuses



# The ablation of DESIGN §3: ANCHOR with one TrainConfig field varied at a time.
ABLATION: dict[str, tuple[Any, ...]] = {
    "beta": (0.0, 0.5, 1.0, 2.0),
    "adv_in_contrastive": (True, False),
    "lam": (0.5, 1.0, 2.0),
    "temperature": (0.1, 0.2),
}


def ablation(profile: str = "full", params: tuple[str, ...] = tuple(ABLATION),
             out: str | Path = "data/results", *, epoch_fraction: float = 0.5,
             dataset: data.CIFAR10 | None = None, attacks: tuple[str, ...] | None = None,
             log=print, **overrides: Any) -> dict[str, Any]:
    """Train ANCHOR variants at a shorter schedule; choose each knob on the VALIDATION split.

    Run ``<out>/ablation_<param>/<param>-<value>/`` gets the usual artifacts (``metrics.json``
    with test accuracies for the report, and ``validation``: the selected epoch's validation
    accuracies). ``<out>/ablation_summary.json`` records, per parameter, the value with the best
    validation PGD accuracy — the test numbers play no part in that choice.
    """
    unknown = [p for p in params if p not in ABLATION]
    if unknown:
        raise ValueError(f"unknown ablation parameter(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(ABLATION)}")
    settings = EVAL_SETTINGS[profile]
    summary: dict[str, Any] = {"profile": profile, "epoch_fraction": epoch_fraction,
                               "selection": "best validation PGD accuracy", "params": {}}
    for param in params:
        values = {}
        for value in ABLATION[param]:
            cfg = TrainConfig.from_profile(profile, method="anchor", **overrides)
            cfg.epochs = max(1, round(cfg.epochs * epoch_fraction))
            setattr(cfg, param, value)
            run_dir = Path(out) / f"ablation_{param}" / f"{param}-{value}"
            status = run_one(cfg, run_dir, settings, dataset, attacks)
            log(f"ablation_{param}/{run_dir.name}: {status['status']}")
            with open(run_dir / "metrics.json") as f:
                values[str(value)] = json.load(f)["validation"]
        chosen = max(values, key=lambda v: values[v]["val_pgd"])
        summary["params"][param] = {"validation": values, "chosen": chosen}
    checkpoint.write_json(Path(out) / "ablation_summary.json", summary)
    return summary
