"""Fitting runs into a slot of GPU time, by what the finished runs took.

GPU time here comes in slots of about ten minutes, and a full-profile run that the slot's end cuts
short is lost whole: its resume checkpoint (~90 MB) cannot be brought back. So
``reproduce(time_budget=...)`` starts a run only when it is expected to finish in what is left of
the budget, and goes on to the next run that fits. The expectation comes from the runs already
finished under the same results folder, on the same hardware:

- training: of the finished runs with the same training cost (method, data, width, batch size,
  attack steps, views), the slowest first epoch (which compiles) plus, for each further epoch,
  the median over those runs of their median later epoch, from their ``history.csv``;
- evaluation: the longest ``eval_seconds`` of the finished runs evaluated alike (profile, width,
  attacks, sanity checks), the same method's when there is one (AutoAttack on a robust model
  takes far longer than on a standard one), searched as this run will be (fp32 or TF32) where
  such a run exists; a TF32 search timed by an fp32 run adds that run's PGD-20 (TF32 runs PGD-20
  twice, and searches in fp32 throughout when its check fails), and an fp32 search is never
  timed by a TF32 run;

the sum times :data:`MARGIN`. A GPU with no such runs of its own is timed by the runs on other
GPUs, by the slowest estimate they give: the lent GPU can change between slots (an H100, then an
H200), and a run started on an estimate that is too short is lost, while one skipped on an
estimate that is too long costs only idle time. A CPU is never timed by a GPU, nor the reverse.
A run with no precedent of its own may still be bounded from below: a TRADES, SupCon-AT or ANCHOR
run trained jointly makes the same PGD-10 attack as PGD-AT and more forward and backward passes
besides (:data:`COSTS_AT_LEAST`), so it is not started where a like PGD-AT run, compiled as it
would be, would not fit. A run with no precedent and no bound is started if any time is left (no
estimate is no reason to skip it); a finished run is always "admitted", since skipping it costs
nothing.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint, provenance, results
from .train import TrainConfig, resolve_device, use_compile

#: Headroom on an estimate, for loading, embeddings and the spread between runs (the parts it
#: sums are each the slowest seen already).
MARGIN = 1.05

#: The config fields that decide how long an epoch takes (the rest, like the knobs' values, do
#: not change the arithmetic).
COST_KEYS = ("method", "data", "train_subset", "val_size", "width", "batch_size",
             "attack_steps", "val_attack_steps", "adv_in_contrastive", "pretrain_fraction")

#: Methods whose epochs cost the same as another's (supcon_at is anchor with beta = 0).
SAME_COST = {"supcon_at": "anchor"}

#: Methods whose joint training costs at least another's per epoch. Each makes PGD-AT's attack
#: (TRADES on its KL term) and then more passes (TRADES a clean one; SupCon-AT and ANCHOR two
#: augmented views). Not the two-stage variant, whose pre-training may make no attack at all.
COSTS_AT_LEAST = {"trades": "pgd_at", "supcon_at": "pgd_at", "anchor": "pgd_at"}


@dataclass
class Estimate:
    """Expected seconds of one run (``seconds``: training, evaluation and the margin) and the
    finished runs it comes from (``basis``, for the log)."""

    seconds: float
    basis: str


def finished_runs(out: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every finished run under ``out`` (``<run>/`` and ``ablation_*/<run>/``) with its parsed
    ``metrics.json``; a damaged or unreadable one is left out, never trusted."""
    out = Path(out)
    found = []
    for path in sorted([*out.glob("*/metrics.json"), *out.glob("ablation_*/*/metrics.json")]):
        try:
            metrics = checkpoint.read_json(path)
        except (ValueError, OSError):  # CheckpointError is a ValueError
            continue
        if isinstance(metrics.get("config"), dict):
            found.append((path.parent, metrics))
    return found


def _epoch_seconds(run_dir: Path) -> list[float] | None:
    """Each epoch's seconds from the run's ``history.csv``, or None (missing, damaged)."""
    try:
        seconds = [float(s) for s in results.load_history(run_dir / "history.csv")["seconds"]]
    except (ValueError, OSError, KeyError):  # CheckpointError is a ValueError
        return None
    return seconds or None


def _cost(config: dict[str, Any]) -> tuple:
    """What decides an epoch's time, of a config dict; fields an older run's config lacks take
    :class:`~anchor_lib.train.TrainConfig`'s defaults (what that run trained with)."""
    config = {**_DEFAULTS, **config}
    return (SAME_COST.get(config["method"], config["method"]),
            *(config[k] for k in COST_KEYS[1:]))


_DEFAULTS = dataclasses.asdict(TrainConfig())


def estimate(out: str | Path, cfg: TrainConfig, *, attacks: tuple[str, ...],
             sanity: bool, hardware: str, search: str = "fp32",
             exact_compile: bool = False) -> Estimate | None:
    """How long a run of ``cfg`` evaluated with ``attacks`` (and the sanity checks if
    ``sanity``) is expected to take on ``hardware``, from the finished runs under ``out``; None
    when no finished run there trained or evaluated alike on that hardware, nor, for a GPU, on
    another GPU (then the slowest of the other GPUs' estimates, its basis naming the GPU).

    Training: the slowest first epoch (it compiles) of the runs that train alike, plus, for each
    further epoch, the median over those runs of their median later epoch (runs of one epoch
    have none). A run records whether it compiled; one that did not time a compiled run (or the
    reverse) only where the older record says neither (never, with ``exact_compile``).
    Evaluation: the longest of the runs evaluated alike that ``_eval_precedents`` picks (the
    module's docstring says which). Plus what a finished run took beyond training and
    evaluation (loading, embeddings; ``run_seconds``, where recorded), then :data:`MARGIN`."""
    compiled = use_compile(cfg, resolve_device(cfg.device))
    by_hardware: dict[Any, list[tuple[Path, dict[str, Any]]]] = {}
    for d, m in finished_runs(out):
        by_hardware.setdefault(m.get("hardware"), []).append((d, m))
    guess = _estimate_from(by_hardware.get(hardware, []), out, cfg, attacks, sanity, search,
                           compiled, exact_compile)
    if guess is not None or not _is_gpu(hardware):
        return guess
    guesses = [(g, other) for other in sorted(h for h in by_hardware if _is_gpu(h) and h != hardware)
               if (g := _estimate_from(by_hardware[other], out, cfg, attacks, sanity, search,
                                       compiled, exact_compile)) is not None]
    if not guesses:
        return None
    slowest, other = max(guesses, key=lambda item: item[0].seconds)
    return Estimate(slowest.seconds, f"{slowest.basis}; on {other}, since no finished run on "
                                     f"{hardware} times it")


def lower_bound(out: str | Path, cfg: TrainConfig, *, attacks: tuple[str, ...],
                sanity: bool, hardware: str, search: str = "fp32") -> Estimate | None:
    """:func:`estimate` of the run that ``cfg``'s costs at least as much as
    (:data:`COSTS_AT_LEAST`: the same config, trained by the cheaper method), or None (no such
    method, the two-stage variant, or no precedent for that run either). Its epochs are timed
    only by runs that record compiling as this run would (an uncompiled PGD-AT epoch takes longer
    than a compiled ANCHOR one); its evaluation as the cheaper method's: both are robust models
    under the same attacks."""
    if cfg.method not in COSTS_AT_LEAST or cfg.pretrain_fraction > 0:
        return None
    cheaper = dataclasses.replace(cfg, method=COSTS_AT_LEAST[cfg.method],
                                  adv_in_contrastive=_DEFAULTS["adv_in_contrastive"])
    return estimate(out, cheaper, attacks=attacks, sanity=sanity, hardware=hardware, search=search,
                    exact_compile=True)


def _is_gpu(hardware: Any) -> bool:
    """Whether a recorded ``hardware`` names a GPU (:func:`anchor_lib.provenance.hardware` calls
    every other device "CPU (...)")."""
    return isinstance(hardware, str) and bool(hardware) and not hardware.startswith("CPU (")


def _estimate_from(runs: list[tuple[Path, dict[str, Any]]], out: str | Path, cfg: TrainConfig,
                   attacks: tuple[str, ...], sanity: bool, search: str,
                   compiled: bool, exact_compile: bool = False) -> Estimate | None:
    """:func:`estimate` from these finished runs (all of one hardware)."""
    mine = _cost(dataclasses.asdict(cfg))
    train = [(d, m, _epoch_seconds(d)) for d, m in runs if _cost(m["config"]) == mine
             and m.get("compiled") in ((compiled,) if exact_compile else (None, compiled))]
    train = [(d, m, e) for d, m, e in train if e is not None]
    alike = [(d, m) for d, m in runs if m["config"].get("width") == cfg.width
             and (m.get("profile") or m["config"].get("profile")) == cfg.profile
             and sorted(m.get("accuracy") or {}) == sorted(attacks)
             and bool(m.get("sanity")) == sanity and m.get("eval_seconds") is not None]
    evals = _eval_precedents(alike, cfg.method, search)
    if not train or not evals:
        return None
    first = max(e[0] for _, _, e in train)
    laters = [statistics.median(e[1:]) for _, _, e in train if len(e) > 1]
    later = statistics.median(laters) if laters else first
    eval_seconds, eval_dir = max((_eval_cost(m, search), d) for d, m in evals)
    rest = max([m["run_seconds"] - (m.get("train_seconds") or 0) - m["eval_seconds"]
                for _, m in [*alike, *((d, m) for d, m, _ in train)]
                if m.get("run_seconds") is not None and m.get("eval_seconds") is not None],
               default=0.0)
    seconds = (first + (cfg.epochs - 1) * later + eval_seconds + max(rest, 0.0)) * MARGIN
    names = sorted(_name(out, d) for d, _, _ in train)
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    basis = (f"epochs timed by {', '.join(names[:2])}{more}; "
             f"evaluation by {_name(out, eval_dir)}")
    return Estimate(seconds, basis)


def _searched(metrics: dict[str, Any]) -> str:
    return metrics.get("eval_search", "fp32")  # runs from before it was recorded: fp32


def _eval_precedents(alike: list[tuple[Path, dict[str, Any]]], method: str,
                     search: str) -> list[tuple[Path, dict[str, Any]]]:
    """The runs whose evaluation times one of ``method`` searched in ``search``, of the runs
    evaluated alike. The same method's (supcon_at's and anchor's count as one) searched the same
    way, else searched in fp32; without a run of the method, a TF32 search takes every run (the
    longest of them, however it searched: a standard model's quick AutoAttack must not time a
    robust one's), an fp32 search every fp32 run (never a TF32 one)."""
    def same(m: dict[str, Any]) -> bool:
        return SAME_COST.get(m.get("method"), m.get("method")) == SAME_COST.get(method, method)

    fp32 = [(d, m) for d, m in alike if _searched(m) == "fp32"]
    if search == "fp32":
        return [(d, m) for d, m in fp32 if same(m)] or fp32
    return ([(d, m) for d, m in alike if same(m) and _searched(m) == "tf32"]
            or [(d, m) for d, m in fp32 if same(m)] or alike)


def _eval_cost(metrics: dict[str, Any], search: str) -> float:
    """A precedent's evaluation seconds, plus its PGD-20 when it searched in fp32 and times a TF32
    search (which runs PGD-20 a second time)."""
    seconds = float(metrics["eval_seconds"])
    if search == "tf32" and _searched(metrics) == "fp32":
        seconds += float(((metrics.get("accuracy") or {}).get("pgd20") or {}).get("seconds", 0))
    return seconds


def _name(out: str | Path, run_dir: Path) -> str:
    return str(run_dir.relative_to(out)) if run_dir.is_relative_to(out) else str(run_dir)


class Budget:
    """What is left of a time budget (``seconds``; None = no budget), and whether a run is
    expected to fit in it. ``log`` says why a run is not started."""

    def __init__(self, seconds: float | None, out: str | Path, log: Callable[[str], Any] = print):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"time_budget must be a number of seconds > 0, got {seconds!r}")
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.out, self.log = Path(out), log

    def left(self) -> float:
        """Seconds left (infinite without a budget)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def judge(self, cfg: TrainConfig, run_dir: Path, attacks: tuple[str, ...],
              sanity: bool, search: str = "fp32") -> str:
        """``"finished"`` (skipping it costs nothing), ``"fits"`` (no budget, or expected to end
        in what is left), ``"unknown"`` (no finished run to time it by) or ``"too long"``
        (expected to take more than is left, or bounded from below by a run that would; the log
        says which)."""
        if self.deadline is None:
            return "fits"
        try:
            checkpoint.verify(run_dir / "metrics.json")
            return "finished"
        except checkpoint.CheckpointError:
            pass  # missing, or damaged: then it trains again, and is timed like any other
        hardware = provenance.hardware(resolve_device(cfg.device))
        guess = estimate(self.out, cfg, attacks=attacks, sanity=sanity, hardware=hardware,
                         search=search)
        left = self.left()
        if guess is None:
            bound = lower_bound(self.out, cfg, attacks=attacks, sanity=sanity, hardware=hardware,
                                search=search)
            if bound is None or bound.seconds <= left:
                return "unknown"
            self.log(f"{_name(self.out, run_dir)}: not started: no finished run times it, but it "
                     f"trains at least as much as a {COSTS_AT_LEAST[cfg.method]} run, which needs "
                     f"about {bound.seconds:.0f} s ({bound.basis}), and {max(left, 0):.0f} s of "
                     f"the time budget are left")
            return "too long"
        if guess.seconds > left:
            self.log(f"{_name(self.out, run_dir)}: not started: it needs about "
                     f"{guess.seconds:.0f} s ({guess.basis}), and {max(left, 0):.0f} s of the "
                     f"time budget are left")
            return "too long"
        return "fits"

    def admits(self, cfg: TrainConfig, run_dir: Path, attacks: tuple[str, ...],
               sanity: bool, search: str = "fp32") -> bool:
        """Whether to start the run of ``cfg`` in ``run_dir`` now: finished already, expected to
        fit in what is left, or without an estimate while time is left (no estimate is no reason
        to skip it; :func:`~anchor_lib.reproduce.reproduce` starts such runs last)."""
        verdict = self.judge(cfg, run_dir, attacks, sanity, search)
        if verdict != "unknown":
            return verdict != "too long"
        left = self.left()
        hardware = provenance.hardware(resolve_device(cfg.device))
        if left > 0:
            self.log(f"{_name(self.out, run_dir)}: no finished run on {hardware} to time it by; "
                     f"starting it with {left:.0f} s of the time budget left")
        else:
            self.log(f"{_name(self.out, run_dir)}: not started: the time budget is spent (and no "
                     f"finished run on {hardware} times it)")
        return left > 0
