"""``python -m anchor_lib {train,evaluate,embed,reproduce,bench}`` (the README's "Command line" section).

Exit codes: 0 success, 2 usage error (argparse, options that make no valid configuration, or an
output path that cannot be written or is an input; caught before any work), 1 any other error
(including options that only the data or an earlier checkpoint rule out), reported as one line on
stderr with no traceback unless ``--debug`` is given (before or after the command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

from .embeddings import SPACES
from .evaluate import SEARCH_PRECISIONS
from .reproduce import ABLATION
from .reproduce import _check_search as check_search
from .train import CONTRASTIVE_METHODS, METHODS, PROFILES

SEARCH_HELP = ("where CW-inf and AutoAttack search: fp32 (default), or tf32 (PGD-20 ran 3.3x "
               "faster in TF32 on an H100) if PGD-20 searched both ways agrees within 0.2 points "
               "on the model; every verdict is fp32's either way")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _attack_list(text: str) -> tuple[str, ...]:
    from .evaluate import ATTACKS, parse_attacks

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in ATTACKS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown attack(s) {', '.join(bad) or '(none given)'}; choose from {','.join(ATTACKS)}")
    try:
        parse_attacks(",".join(names))  # the library's rule: each attack once
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return names


class UsageError(ValueError):
    """Arguments that parse but do not make a valid run (exit 2, like argparse's own errors)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anchor_lib",
                                     description="ANCHOR: adversarial training with hard-mined "
                                                 "supervised contrastive learning.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug is also accepted after the command; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = partial(sub.add_parser, parents=[common])

    p = add("train", help="train one method")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="smoke | demo | full | tutorial (default: $ANCHOR_PROFILE, else demo on a "
                        "GPU, smoke on a CPU)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--out", type=Path, help="folder for checkpoint.pt, best.pt, history.csv")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--seed", type=int)
    p.add_argument("--data", choices=("cifar10", "synthetic"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                   default=None, help="run every step eagerly on CUDA too (graphs are the default "
                   "there; results are the same, only slower)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model's passes (inductor on CUDA); the same "
                        "computation, faster on a GPU (data/results/bench/). Default: on for CUDA "
                        "at the full profile")
    p.add_argument("--pretrain-fraction", type=float,
                   help="the two-stage variant (supcon_at, anchor): this share of the epochs "
                        "pre-trains the encoder on the contrastive term, the rest trains the "
                        "classifier adversarially on the frozen encoder (default 0: joint)")
    small = p.add_argument_group("overrides of the profile (tiny runs for tests and tutorials)")
    small.add_argument("--width", type=_positive_int, help="channels of the first ResNet stage")
    small.add_argument("--proj-dim", type=_positive_int, help="dimension of the embedding z")
    small.add_argument("--batch-size", type=_positive_int)
    small.add_argument("--train-subset", type=_positive_int,
                       help="train on the first N training images (>= batch size)")
    small.add_argument("--val-size", type=int, help="validation images held out (>= 0)")
    small.add_argument("--attack-steps", type=int, help="PGD steps of the training attack")
    small.add_argument("--val-attack-steps", type=int, help="PGD steps of the validation attack")
    small.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")

    p = add("evaluate", help="evaluate a checkpoint by the book's evaluation protocol")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--attacks", type=_attack_list, default=None,
                   help="comma-separated subset of clean,fgsm,pgd20,cw,autoattack")
    p.add_argument("--n", type=_positive_int, help="first N test images (default: all)")
    p.add_argument("--autoattack-n", type=_positive_int, default=1000)
    p.add_argument("--sanity", action="store_true",
                   help="also run the sanity checks of chapter 6 (on the AutoAttack images)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="images per attack call (default: 1000 on a GPU, 500 on a CPU)")
    p.add_argument("--out", type=Path, help="write metrics.json here (default: print)")
    p.add_argument("--search-precision", dest="search", choices=SEARCH_PRECISIONS, default="fp32",
                   help=SEARCH_HELP)
    p.add_argument("--per-image", type=Path,
                   help="also write which test images each attack left correct (per_image.npz, "
                        "beside metrics.json for a paired results.compare)")

    p = add("embed", help="embeddings of clean / augmented / adversarial views")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=_positive_int, default=1000)
    p.add_argument("--space", choices=SPACES, default="features",
                   help="backbone features (every method trains them; the default) or the "
                        "contrastive projection z (trained only by supcon_at and anchor)")

    p = add("reproduce", help="train and evaluate every method; skips finished runs")
    p.add_argument("--profile", choices=PROFILES, default="full",
                   help="smoke | demo | full | tutorial (default: full; $ANCHOR_PROFILE, which "
                        "sizes the book's cells, does not apply here)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="default: all five")
    p.add_argument("--out", type=Path, default=Path("data/results"),
                   help="results folder, one sub-folder per run (default: data/results, from the "
                        "current directory)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--data", choices=("cifar10", "synthetic"))
    p.add_argument("--default-knobs", action="store_true",
                   help="at --profile full, do not first choose on validation (the ablation) "
                        "the knobs (tau, beta, lambda, ...) not chosen yet: those keep their "
                        "defaults; knobs already chosen are still used")
    p.add_argument("--search-precision", dest="search", choices=SEARCH_PRECISIONS, default="fp32",
                   help=SEARCH_HELP)
    p.add_argument("--time-budget", type=_positive_int, metavar="SECONDS",
                   help="start a run only if the finished runs on this hardware (on a GPU "
                        "without any: on other GPUs) say it will end within SECONDS of the "
                        "start, else go on to the next (GPU slots)")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the five methods, the ANCHOR ablation (beta, lambda, tau, "
                        "adversarial view, two-stage variant) at half the epochs, each knob's "
                        "best value on validation recorded")
    abl = p.add_argument_group("the ablation's slots (GPU time comes in short slots)")
    abl.add_argument("--params", nargs="+", choices=tuple(ABLATION), metavar="PARAM",
                     help=f"with --ablation: vary only these ({', '.join(ABLATION)}; default all); "
                          "ablation_summary.json keeps what earlier calls chose for the others")
    abl.add_argument("--attacks", type=_attack_list, default=None,
                     help="with --ablation: comma-separated subset of clean,fgsm,pgd20,cw,"
                          "autoattack for the test report (the knobs are chosen on validation "
                          "accuracy, whatever is tested; the reproduction's runs always get all)")
    abl.add_argument("--no-sanity", dest="sanity", action="store_const", const=False, default=None,
                     help="with --ablation: skip the sanity checks (they run AutoAttack on their "
                          "images when --attacks leaves it out)")
    p.add_argument("--export-checkpoints", type=Path, metavar="DIR",
                   help="afterwards, write fp16 copies of the standard / pgd_at / anchor runs "
                        "(those among --methods) and a manifest.json with their sha256 to DIR "
                        "(the book's tutorial checkpoints: use with --profile tutorial)")

    p = add("bench", help="training / evaluation speed benchmark")
    p.add_argument("--out", type=Path,
                   help="JSON file (default data/results/bench/<device>.json, or "
                        "tiny-<device>.json for the tiny configuration, from the current directory)")
    p.add_argument("--tiny", action="store_true", help="tiny configuration (the CPU default)")
    return parser


def _check_search(args: argparse.Namespace) -> None:
    """The library's rule (``reproduce._check_search``), before any work, as a usage error."""
    try:
        check_search(args.search, tuple(args.attacks) if args.attacks is not None else None)
    except ValueError as err:
        raise UsageError(f"--search-precision: {err}") from err


#: What each command writes, by option: (what the path must name, a file name to suggest in a
#: folder given instead); the file options' folders are made as the commands' own writes make them.
_OUTPUTS: dict[str, dict[str, tuple[str, str | None]]] = {
    "train": {"out": ("folder", None)},
    "evaluate": {"out": ("a JSON file", "metrics.json"),
                 "per_image": ("an npz file", "per_image.npz")},
    "embed": {"out": ("an npz file", "embeddings.npz")},
    "reproduce": {"out": ("folder", None), "export_checkpoints": ("folder", None)},
    "bench": {"out": ("a JSON file", "bench.json")},
}
#: What each command reads, by option: no output may be one of these (or its sha256 sidecar).
_INPUTS = {"evaluate": ("checkpoint",), "embed": ("checkpoint",)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (the same path, a link to it, a hard link)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop, say: then only the same text is the same
        return os.path.abspath(a) == os.path.abspath(b)


def _check_outputs(args: argparse.Namespace, *, keep_folders: bool = False) -> None:
    """The command's output paths, before any work, as usage errors naming the option: each must
    be writable (:func:`anchor_lib.checkpoint.check_writable`) and none may be an input, another
    output or one's sha256 sidecar (``embed --checkpoint best.pt --out best.pt`` would replace the
    checkpoint with embeddings). Else the error would come after all the work, naming a temporary
    file. ``keep_folders``: keep the folders made for the check (train's ``--out``, made anyway,
    where concurrent torchrun processes check it too)."""
    from .checkpoint import check_writable

    outputs = [(dest, path) for dest in _OUTPUTS.get(args.command, {})
               if (path := getattr(args, dest, None)) is not None]
    named = [(dest, path) for dest in _INPUTS.get(args.command, ())
             if (path := getattr(args, dest, None)) is not None] + outputs
    for dest, path in outputs:
        for other_dest, other in named:
            if other_dest == dest:
                continue
            for clash, how in ((other, ""), (other.with_name(other.name + ".sha256"),
                                             "the sha256 sidecar of ")):
                if _same_path(path, clash):
                    raise UsageError(f"{_flag(dest)} {path} is {how}{_flag(other_dest)} {other}; "
                                     f"expected a path of its own (writing it would replace "
                                     f"that file)")
        kind, example = _OUTPUTS[args.command][dest]
        try:
            check_writable(path, what=_flag(dest), kind=kind, example=example,
                           folder=kind == "folder", keep_folders=keep_folders)
        except ValueError as err:
            raise UsageError(str(err)) from err


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None: strict JSON (a run without validation
    images has NaN validation accuracies, and ``json.dumps`` would print a bare ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _overrides(args: argparse.Namespace, *names: str) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from . import distributed
        from .train import TrainConfig, train

        if args.resume and not args.out:
            raise UsageError("--resume needs --out, the folder that holds checkpoint.pt")
        try:
            cfg = TrainConfig.from_profile(
                args.profile, method=args.method, out_dir=str(args.out) if args.out else None,
                progress=not args.quiet,
                **_overrides(args, "epochs", "seed", "data", "width", "proj_dim", "batch_size",
                             "train_subset", "val_size", "attack_steps", "val_attack_steps", "lr",
                             "cuda_graphs", "pretrain_fraction", "compile"))
        except (ValueError, TypeError) as err:  # the arguments do not make a valid config
            raise UsageError(str(err)) from err
        _check_outputs(args, keep_folders=True)
        if args.resume and not (args.out / "checkpoint.pt").exists():
            print(f"note: {args.out} holds no checkpoint.pt to resume from; starting a new run",
                  file=sys.stderr)
        try:
            history = train(cfg, resume=args.resume)
        except BaseException:
            distributed.teardown(wait=False)  # others may be stuck in a collective: no barrier
            raise
        if distributed.is_main_process():  # under torchrun every rank has the same history
            last = history[-1] if history else {}
            print(json.dumps(_json_safe({"epochs": len(history), "last": last}), default=str))
        distributed.teardown()  # under torchrun: leave the process group before exiting
        return 0

    if args.command == "evaluate":
        from . import checkpoint
        from .reproduce import evaluate_checkpoint, save_masks

        _check_search(args)
        _check_outputs(args)
        metrics = evaluate_checkpoint(args.checkpoint, attacks=args.attacks, n=args.n,
                                      autoattack_n=args.autoattack_n, sanity=args.sanity,
                                      batch_size=args.batch_size,
                                      per_image=args.per_image is not None, search=args.search)
        if args.per_image:  # before metrics.json, whose presence means "finished"
            print(f"wrote {save_masks(metrics, args.per_image)}")
        if args.out:
            checkpoint.write_json(args.out, metrics)
            print(f"wrote {args.out}")
        else:
            print(json.dumps(metrics, indent=2, default=str))
        return 0

    if args.command == "embed":
        from . import embeddings, provenance
        from .train import config_from_dict, dataset_for, load_model

        _check_outputs(args)
        model, state = load_model(args.checkpoint)
        cfg = config_from_dict(state["config"])
        if args.space == "projection" and cfg.method not in CONTRASTIVE_METHODS:
            print(f"note: a {cfg.method} model never trains its projection head; its "
                  f"'projection' space is an untrained map of the features", file=sys.stderr)
        dataset = dataset_for(cfg)
        n = min(args.n, len(dataset.y_test))  # all of a smaller test set, and the record says so
        emb = embeddings.embed_views(model, dataset.x_test[:n], dataset.y_test[:n],
                                     space=args.space)
        embeddings.save_embeddings(args.out, emb, {"checkpoint": str(args.checkpoint),
                                                   "data": dataset.label, "n": n,
                                                   "space": args.space, **provenance.describe()})
        print(f"wrote {args.out} ({n} test images)")
        return 0

    if args.command == "reproduce":
        from .reproduce import ablation, export_tutorial_checkpoints, reproduce

        chosen = tuple(m for m in ("standard", "pgd_at", "anchor") if m in args.methods)
        if args.export_checkpoints is not None and (args.ablation or not chosen):
            raise UsageError("--export-checkpoints needs a run of standard, pgd_at or anchor "
                             "among --methods (and no --ablation)")
        ablation_only = [flag for flag, given in (("--params", args.params is not None),
                                                   ("--attacks", args.attacks is not None),
                                                   ("--no-sanity", args.sanity is False)) if given]
        if ablation_only and not args.ablation:
            why = [("it names the knobs the ablation varies" if flag == "--params" else
                    "the reproduction's runs get every attack and the sanity checks, the "
                    "evaluation protocol") for flag in ablation_only]
            raise UsageError(f"{', '.join(ablation_only)} "
                             f"{'applies' if len(ablation_only) == 1 else 'apply'} only with "
                             f"--ablation ({'; '.join(dict.fromkeys(why))})")
        _check_search(args)
        _check_outputs(args)
        if args.ablation:
            ablation(args.profile, tuple(args.params or ABLATION), out=args.out,
                     attacks=tuple(args.attacks) if args.attacks else None, sanity=args.sanity,
                     time_budget=args.time_budget, search=args.search,
                     **_overrides(args, "epochs", "data"))
        else:
            reproduce(args.profile, tuple(args.methods), args.out,
                      default_knobs=args.default_knobs, time_budget=args.time_budget,
                      search=args.search, **_overrides(args, "epochs", "data"))
        if args.export_checkpoints is not None:
            path = export_tutorial_checkpoints(args.out, args.export_checkpoints, chosen,
                                               args.profile)
            print(f"wrote {path}")
        return 0

    if args.command == "bench":
        from .bench import run_benchmark

        _check_outputs(args)
        command = " ".join(["python -m anchor_lib bench", *(["--out", str(args.out)] if args.out
                                                             else []), *(["--tiny"] * args.tiny)])
        path = run_benchmark(out=args.out, tiny=True if args.tiny else None, command=command)
        print(f"wrote {path}")
        return 0
    raise AssertionError(args.command)  # argparse guarantees a known command


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages, e.g. where data was looked for, are
    joined rather than cut, so the line still names the file or folder)."""
    items = []  # (text, whether it was a "- " list item)
    for line in str(err).splitlines():
        text = re.sub(r"^-\s+", "", line.strip())
        if text:
            items.append((text, text != line.strip()))
    parts = [text + (";" if is_item and i + 1 < len(items) and text[-1] not in ".;:" else "")
             for i, (text, is_item) in enumerate(items)]
    return " ".join(parts) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    try:
        return run(args)
    except UsageError as err:
        if args.debug:
            raise
        parser.error(f"{args.command}: {one_line(err)}")  # exits 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as err:  # the CLI's contract: one line, no traceback
        if args.debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
