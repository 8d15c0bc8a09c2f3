"""Reading committed results artifacts into tables, for chapter 8.

Layout under the results root (default: the repository's ``data/results/``, or
``$ANCHOR_RESULTS_DIR``)::

    <run>/metrics.json          one training run, evaluated by the protocol
                                (e.g. full-anchor/)
    <run>/history.csv           its per-epoch history
    <run>/embeddings.npz        its clean / aug / adv embeddings (chapter 7)
    <run>/per_image.npz         which test images each attack left correct (paired
                                comparisons), and which validation images the
                                selected epoch did (val_clean, val_pgd; runs since
                                those were kept)
    ablation_<param>/<run>/...  runs of an ablation that vary TrainConfig field
                                <param> (e.g. ablation_beta/beta-0.5/metrics.json)
    bench/                      speed results (not read here)

Every number these functions return comes from a file, with the file's provenance beside it;
nothing is filled in. ``metrics.json`` files are checked against their ``.sha256`` sidecar when
one is present, and malformed files raise ``ValueError`` naming the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import checkpoint

if TYPE_CHECKING:  # imported where used: the library's import stays light
    import pandas as pd

ATTACKS = ("clean", "fgsm", "pgd20", "cw", "autoattack")
ATTACK_LABELS = {"clean": "Clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW∞",
                 "autoattack": "AutoAttack"}
METHOD_LABELS = {"standard": "Standard", "pgd_at": "PGD-AT", "trades": "TRADES",
                 "supcon_at": "SupCon-AT", "anchor": "ANCHOR"}
METHOD_ORDER = ("standard", "pgd_at", "trades", "supcon_at", "anchor")
# "sanity" may be empty (an evaluation run without --sanity), "train_seconds" null.
REQUIRED = ("method", "data", "hardware", "torch", "commit", "seed", "epochs", "train_seconds",
            "config", "accuracy", "sanity")
PROVENANCE = ("method", "profile", "data", "hardware", "torch", "commit", "seed", "epochs",
              "selected_epoch", "train_seconds", "eval_seconds", "eval_batch_size")

_REPO_RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"

__all__ = ["ATTACKS", "ATTACK_LABELS", "COMPARE_COLUMNS", "METHOD_LABELS", "ablation_choice",
           "ablation_param", "ablation_table", "attack_gap", "attack_search", "best_value",
           "compare", "compare_runs", "default_root", "describe_difference", "find_embeddings",
           "format_results_table", "holm", "knobs_table", "load_ablation_summary",
           "load_ablations", "load_history", "load_per_image", "load_results", "load_run",
           "load_tutorial_checkpoint", "not_found", "paired_difference", "provenance_table",
           "results_table", "sanity_table", "save_per_image", "seed_noise", "split_shared",
           "unpaired_noise", "validate_metrics", "validation_difference", "verdicts_by_attack",
           "RunResult", "VALIDATION_KEYS"]


def default_root() -> Path:
    """``$ANCHOR_RESULTS_DIR`` if set, else the repository's ``data/results``.

    The chapters' set-up cell installs ``anchor_lib`` from a clone of the repository (Colab), so
    its ``data/results`` is there. An ``anchor_lib`` installed otherwise has none beside it; then
    ``../data/results`` or ``data/results`` under the working directory is used if it exists (a
    notebook run from a clone's ``book/`` folder). If nothing exists, the returned
    folder does not exist and every loader returns nothing.
    """
    env = os.environ.get("ANCHOR_RESULTS_DIR")
    if env:
        return Path(env).expanduser()
    if _REPO_RESULTS.is_dir():
        return _REPO_RESULTS
    for candidate in (Path("..") / "data" / "results", Path("data") / "results"):
        if candidate.is_dir():
            return candidate.resolve()
    return _REPO_RESULTS


def not_found(what: str, where: str | Path | None = None) -> str:
    """The sentence a chapter prints when it finds no committed ``what`` (e.g. "tutorial runs")
    under ``where`` (default :func:`default_root`): where such files live and how the library
    finds them. It claims nothing about whether they exist.
    """
    return (f"No {what} under {where if where is not None else default_root()}. The book's "
            "repository commits its results under data/results/ and its tutorial checkpoints "
            "under data/checkpoints/; a chapter's set-up cell clones the repository where "
            "anchor_lib is missing (as on Colab), and elsewhere ANCHOR_RESULTS_DIR can point at "
            "a clone's data/results.")


@dataclass
class RunResult:
    """One run's artifacts: ``metrics`` (the parsed metrics.json) and its folder."""

    name: str
    path: Path
    metrics: dict[str, Any]
    verified: bool  # True: matched its .sha256 sidecar; False: no sidecar was there

    @property
    def method(self) -> str:
        return str(self.metrics["method"])

    @property
    def profile(self) -> str:
        return str(self.metrics.get("profile") or self.metrics["config"].get("profile", "?"))

    @property
    def history_path(self) -> Path:
        return self.path / "history.csv"

    @property
    def embeddings_path(self) -> Path:
        return self.path / "embeddings.npz"

    @property
    def per_image_path(self) -> Path:
        return self.path / "per_image.npz"


def validate_metrics(d: Any, where: str = "metrics") -> dict[str, Any]:
    """Check a parsed ``metrics.json`` has the required fields; raise ``ValueError`` if not.

    Each ``accuracy`` entry must be ``{"value": float in [0, 1], "n": int >= 1}``.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (a run's metrics.json)")
    if not isinstance(d["config"], dict):
        raise ValueError(f"{where}: 'config' must be an object of TrainConfig fields")
    acc = d["accuracy"]
    if not isinstance(acc, dict) or not acc:
        raise ValueError(f"{where}: 'accuracy' must be a non-empty object of "
                         '{"value": ..., "n": ...} entries')
    for name, entry in acc.items():
        if not isinstance(entry, dict) or "value" not in entry or "n" not in entry:
            raise ValueError(f"{where}: accuracy[{name!r}] must be {{'value': v, 'n': n}}, "
                             f"got {entry!r}")
        v, n = entry["value"], entry["n"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{where}: accuracy[{name!r}].value must be a number in [0, 1], "
                             f"got {v!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: accuracy[{name!r}].n must be an int >= 1, got {n!r}")
    return d


def load_run(folder: str | Path) -> RunResult:
    """Load ``folder/metrics.json`` (verifying its sidecar when present)."""
    folder = Path(folder)
    path = folder / "metrics.json"
    verified = path.with_name("metrics.json.sha256").is_file()
    if verified:
        checkpoint.verify(path)  # raises CheckpointError (a ValueError) naming the file
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return RunResult(folder.name, folder, validate_metrics(d, str(path)), verified)


def _sort_key(run: RunResult) -> tuple:
    order = METHOD_ORDER.index(run.method) if run.method in METHOD_ORDER else len(METHOD_ORDER)
    return (run.profile, order, run.name)


def load_results(root: str | Path | None = None) -> list[RunResult]:
    """Every ``<root>/<run>/metrics.json`` (ablation and bench folders excluded), sorted."""
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        return []
    runs = [load_run(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(("ablation_", "bench", "."))
            and (p / "metrics.json").is_file()]
    return sorted(runs, key=_sort_key)


def load_ablations(root: str | Path | None = None) -> dict[str, list[RunResult]]:
    """``{"ablation_beta": [runs...], ...}`` from ``<root>/ablation_*/<run>/metrics.json``."""
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        return {}
    out: dict[str, list[RunResult]] = {}
    for folder in sorted(p for p in root.glob("ablation_*") if p.is_dir()):
        runs = [load_run(p) for p in sorted(folder.iterdir())
                if p.is_dir() and (p / "metrics.json").is_file()]
        if runs:
            out[folder.name] = runs
    return out


def load_history(path: str | Path):
    """``history.csv`` as a pandas DataFrame (verifying its sidecar when present)."""
    import pandas as pd

    path = Path(path)
    if path.with_name(path.name + ".sha256").is_file():
        checkpoint.verify(path)
    return pd.read_csv(path)


PER_IMAGE_FORMAT = "anchor-per-image-v1"


def save_per_image(path: str | Path, masks: dict[str, Any], meta: dict[str, Any] | None = None
                   ) -> Path:
    """Write ``per_image.npz`` atomically, with a ``.sha256`` sidecar.

    ``masks`` maps attack names to bool ``(n,)`` arrays: entry i says whether the model got the
    i-th evaluated test image right under that attack (the first ``n`` test images, as
    ``evaluate.evaluate_suite`` takes them); ``reproduce`` also stores the selected epoch's
    validation masks, ``"val_clean"`` and ``"val_pgd"``, bool ``(n_val,)`` over the validation
    split. ``meta`` (method, data copy, commit) is stored as
    a JSON string. Returns the path. Raises ValueError when a mask is not a non-empty 1-d bool
    array.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, mask in masks.items():
        a = np.asarray(mask)
        if a.dtype != np.bool_ or a.ndim != 1 or a.size == 0:
            raise ValueError(f"masks[{name!r}] must be a non-empty 1-d bool array, got dtype "
                             f"{a.dtype} and shape {a.shape}")
        arrays[name] = a
    arrays["meta"] = np.array(json.dumps({"format": PER_IMAGE_FORMAT, **(meta or {})},
                                         default=str))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return checkpoint.atomic_write_bytes(path, buf.getvalue())


def load_per_image(path: str | Path) -> dict[str, Any]:
    """Read a :func:`save_per_image` file (verifying its sidecar when present): attack names
    (and the validation keys) to bool 1-d arrays, and ``meta`` (a dict). Raises
    ``CheckpointError`` (a ValueError) when the file does not match its sidecar, ValueError when
    it is not an ``anchor-per-image-v1`` file."""
    path = Path(path)
    if path.with_name(path.name + ".sha256").is_file():
        checkpoint.verify(path)
    with np.load(path, allow_pickle=False) as f:
        out: dict[str, Any] = {k: f[k] for k in f.files}
    meta = json.loads(str(out.pop("meta", "{}")))
    if meta.get("format") != PER_IMAGE_FORMAT:
        raise ValueError(f"{path}: expected a per_image.npz of format {PER_IMAGE_FORMAT}, got "
                         f"{meta.get('format')!r}")
    return {**out, "meta": meta}


def _mask(run: RunResult, attack: str, loaded: dict[Path, dict[str, Any]]) -> np.ndarray | None:
    """``run``'s per-image mask for ``attack``, checked against its metrics.json; None if absent
    or out of date."""
    if not run.per_image_path.is_file():
        return None
    if run.path not in loaded:  # one read (and hash check) per run, not per attack
        loaded[run.path] = load_per_image(run.per_image_path)
    mask = loaded[run.path].get(attack)
    entry = run.metrics["accuracy"].get(attack)
    if mask is None or entry is None:
        return None
    if mask.shape != (entry["n"],) or abs(mask.mean() - entry["value"]) > 1e-9:
        warnings.warn(f"{run.per_image_path}: the {attack} mask ({mask.size} images, "
                      f"{mask.mean():.4f} correct) does not match metrics.json ({entry['n']} "
                      f"images, {entry['value']:.4f}), so it is not used: {attack} is compared "
                      "unpaired", stacklevel=3)
        return None
    return mask


def _mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(a Binomial(b + c, 1/2) at least as far from the middle
    as b)."""
    m, k = b + c, min(b, c)
    if m == 0:
        return 1.0
    log_half = m * math.log(0.5)
    tail = sum(math.exp(math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + log_half)
               for i in range(k + 1))
    return min(1.0, 2 * tail)


def _as_metrics(item: RunResult | dict[str, Any], i: int) -> tuple[str, dict[str, Any]]:
    if isinstance(item, RunResult):
        return item.name, item.metrics
    validate_metrics(item, f"metrics_list[{i}]")
    name = f"{item.get('profile') or item['config'].get('profile', '?')}-{item['method']}"
    return name, item


def _runs(items: Iterable[RunResult | dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = [_as_metrics(item, i) for i, item in enumerate(items)]
    names = [n for n, _ in out]
    # Make row names unique (two dicts for the same method and profile, e.g. two seeds).
    return [(f"{n}#{names[:i].count(n) + 1}" if names.count(n) > 1 else n, m)
            for i, (n, m) in enumerate(out)]


def results_table(metrics_list: Iterable[RunResult | dict[str, Any]],
                  attacks: Sequence[str] = ATTACKS):
    """The results table: one row per run, accuracies as fractions and their sample sizes.

    Args:
        metrics_list: :class:`anchor_lib.results.RunResult` objects or parsed ``metrics.json`` dicts.
        attacks: accuracy columns, in order; a run without one gets NaN (never a guess).

    Returns:
        DataFrame indexed by run name with columns ``method``, ``profile``, ``data``, one column
        per attack (fraction in [0, 1]) and ``n_<attack>`` (number of test images).
    """
    import pandas as pd

    rows = []
    for name, m in _runs(metrics_list):
        row: dict[str, Any] = {"run": name, "method": m["method"],
                               "profile": m.get("profile") or m["config"].get("profile"),
                               "data": m["data"]}
        for a in attacks:
            entry = m["accuracy"].get(a)
            row[a] = float(entry["value"]) if entry else math.nan
            row[f"n_{a}"] = int(entry["n"]) if entry else pd.NA
        rows.append(row)
    columns = ["method", "profile", "data", *attacks, *(f"n_{a}" for a in attacks)]
    df = pd.DataFrame(rows, columns=["run", *columns]).set_index("run")
    for a in attacks:
        df[f"n_{a}"] = df[f"n_{a}"].astype("Int64")
    return df


def format_results_table(df, attacks: Sequence[str] = ATTACKS):
    """A display copy of :func:`anchor_lib.results.results_table`: ``"xx.x %"`` cells.

    An attack's sample size goes in its header (``"PGD-20 (n=10,000)"``) when every row that ran
    it shares it, and in each cell (``"xx.x % (n=1,000)"``) when not; a run without the attack
    shows ``"—"``.
    """
    import pandas as pd

    attacks = [a for a in attacks if a in df.columns]
    out = pd.DataFrame(index=df.index)
    out["method"] = [METHOD_LABELS.get(m, m) for m in df["method"]]
    for col in ("profile", "data"):
        out[col] = df[col]
    for a in attacks:
        cells = list(zip(df[a], df[f"n_{a}"], strict=True))
        sizes = {int(n) for v, n in cells if not pd.isna(v)}
        shared = len(sizes) == 1
        label = ATTACK_LABELS.get(a, a) + (f" (n={min(sizes):,})" if shared else "")
        out[label] = ["—" if pd.isna(v) else f"{100 * v:.1f} %"
                      + ("" if shared else f" (n={int(n):,})") for v, n in cells]
    return out


def split_shared(df, columns: Sequence[str] = ("method", "profile", "data")):
    """Move the ``columns`` on which every row of ``df`` agrees out of the table, so that a
    display can name them once above it (one data copy, one profile) instead of in every row.

    Returns:
        ``(table, shared)``: a copy of ``df`` without those columns, and ``{column: value}`` for
        each of them, in the order of ``columns``. An empty ``df`` shares nothing.
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"split_shared: no column(s) {', '.join(map(repr, missing))} in the "
                         f"table; it has {', '.join(map(repr, df.columns))}")
    shared = {c: df[c].iloc[0] for c in columns if len(df) and df[c].nunique(dropna=False) == 1}
    return df.drop(columns=list(shared)), shared


def provenance_table(runs: Iterable[RunResult | dict[str, Any]]):
    """Where each run's numbers come from: data copy, hardware, torch, commit, seed, epochs,
    selected epoch, train / eval seconds, evaluation batch size (None in runs older than the
    field), profile, where the slow attacks searched (:func:`anchor_lib.results.attack_search`)
    and whether the file matched its sha256."""
    import pandas as pd

    items = list(runs)
    rows = []
    for (name, m), item in zip(_runs(items), items, strict=True):
        row = {"run": name, **{k: m.get(k) for k in PROVENANCE}}
        row["profile"] = m.get("profile") or m["config"].get("profile")
        row["attack_search"] = attack_search(m)
        if isinstance(item, RunResult):
            row["file"] = str(item.path / "metrics.json")
            row["sha256"] = "verified" if item.verified else "no sidecar"
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def attack_search(metrics: dict[str, Any]) -> str:
    """Where a run's slow attacks (CW-inf, AutoAttack, the sanity checks') searched, in words:
    ``"fp32"`` (also runs from before ``eval_search`` was recorded), ``"TF32 (PGD-20 check
    +0.02 points)"``, ``"fp32 (TF32 check failed: +0.35 points)"``, or ``"fp32 (TF32 asked;
    none on this hardware)"``. Verdicts are fp32's in every case
    (``evaluate.evaluate_suite``)."""
    if metrics.get("eval_search", "fp32") == "fp32":
        return "fp32"
    check = ((metrics.get("accuracy") or {}).get("pgd20") or {}).get("tf32_check") or {}
    if "passed" not in check:
        return "fp32 (TF32 asked; none on this hardware)"
    points = f"{check['points']:+.2f} points"
    return f"TF32 (PGD-20 check {points})" if check["passed"] else \
        f"fp32 (TF32 check failed: {points})"


def knobs_table(runs: Iterable[RunResult | dict[str, Any]]):
    """The contrastive runs' τ, β and λ and where each value came from: one row per ``anchor`` /
    ``supcon_at`` run, one column per knob of ``reproduce.CHOSEN_KNOBS``, cells like ``"0.5
    (validation)"``: ``validation`` (the ablation's choice), ``default`` (not chosen yet),
    ``override``, or ``not recorded`` (a run written before ``metrics.json`` kept ``knobs``; its
    value is the config's). supcon_at's β is 0 by definition, shown as such."""
    import pandas as pd

    from .reproduce import CHOSEN_KNOBS  # the reproduction's rule; reproduce imports this module

    columns = dict.fromkeys(k for names in CHOSEN_KNOBS.values() for k in names)
    rows = []
    for name, m in _runs(runs):
        if m.get("method") not in CHOSEN_KNOBS:
            continue
        recorded = m.get("knobs") or {}
        row = {"run": name}
        for knob in columns:
            if knob not in CHOSEN_KNOBS[m["method"]]:
                row[knob] = "0 (by definition)"
                continue
            source = (recorded.get(knob) or {}).get("source", "not recorded")
            row[knob] = f"{m['config'].get(knob)} ({source})"
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", *columns]).set_index("run")


def sanity_table(runs: Iterable[RunResult | dict[str, Any]]):
    """The sanity checks of chapter 6 per run: ``passed`` flags as True / False (None if absent)."""
    import pandas as pd

    rows = []
    for name, m in _runs(runs):
        row: dict[str, Any] = {"run": name}
        for check, result in (m.get("sanity") or {}).items():
            if isinstance(result, dict) and "passed" in result:
                row[check] = bool(result["passed"])
            elif isinstance(result, bool):
                row[check] = result
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


#: The columns of :func:`compare` and :func:`compare_runs`.
COMPARE_COLUMNS = ["method", "baseline", "n_method", "n_baseline", "runs_method", "runs_baseline",
                   "difference", "noise_2se", "test", "only_method", "only_baseline", "p_value",
                   "verdict"]


def compare(runs: Iterable[RunResult | dict[str, Any]], method: str = "anchor",
            baseline: str = "pgd_at", *, profile: str | None = "full",
            attacks: Sequence[str] = ATTACKS):
    """Does ``method`` beat ``baseline``? One row per attack, computed from the files only.

    **Paired** when it can be: if each method has one run and both runs' ``per_image.npz`` hold
    the attack's masks on the same test images (same data copy, same n), the difference is
    ``(b - c) / n``, where ``b`` counts the images only ``method`` gets right and ``c`` those only
    ``baseline`` gets right. Only those ``b + c`` images carry information: with no real
    difference each is a fair coin flip, so the difference's standard error is
    ``sqrt(b + c) / n``, usually far smaller than the unpaired one (both models get most images
    alike), and ``p_value`` is McNemar's exact two-sided test, which decides the verdict:
    "within noise" unless ``p_value < 0.05``. **Unpaired** otherwise (several seeds, which are
    averaged, or no masks): the standard error is ``sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)``,
    ``p_value`` is NaN, and a difference within two standard errors is "within noise". Both
    measure only the sampling of test images; a second training seed can move a result by more.
    So where a side has several runs (seeds), their spread enters the noise too: the test
    ``"unpaired, seeds"`` adds two standard errors of the difference of the two seed means,
    from the per-seed accuracies' variance (pooled over the sides with two runs or more, and
    used for a side of one run as well), to the sampling noise in quadrature.
    A mask that disagrees with its ``metrics.json`` (e.g. one rewritten by ``evaluate --out``)
    is not used: a warning says so and that attack is compared unpaired.

    Returns:
        DataFrame indexed by the attack's display label (``ATTACK_LABELS``: ``"PGD-20"``, not
        ``"pgd20"``) with columns ``method``, ``baseline`` (accuracies),
        ``n_method``, ``n_baseline``, ``runs_method``, ``runs_baseline``, ``difference``
        (method - baseline, in accuracy points, i.e. percent), ``noise_2se`` (points),
        ``test`` ("paired", "unpaired" or "unpaired, seeds"), ``only_method`` and
        ``only_baseline`` (b and c;
        NaN unpaired), ``p_value`` and ``verdict``. Empty when either method has no run at
        ``profile`` (None = any profile).

    Raises:
        ValueError: the runs compared span several profiles, widths or data copies (with
            ``profile=None``), which would average different experiments as if they were seeds.
    """
    import pandas as pd

    items = list(runs)
    chosen = [(item, m) for item, (_, m) in zip(items, _runs(items), strict=True)
              if profile is None or (m.get("profile") or m["config"].get("profile")) == profile]
    groups = {k: [(item, m) for item, m in chosen if m["method"] == k] for k in (method, baseline)}
    if not groups[method] or not groups[baseline]:
        return pd.DataFrame(columns=COMPARE_COLUMNS).rename_axis("attack")
    # Several runs of a method are averaged as seeds: that is only right within one experiment.
    kinds = {(m.get("profile") or m["config"].get("profile"), m["config"].get("width"),
              m.get("data")) for g in groups.values() for _, m in g}
    if len(kinds) > 1:
        raise ValueError(f"compare needs runs of one profile, width and data copy, got "
                         f"{sorted(kinds, key=str)}; choose one with profile=")
    rows, loaded = [], {}
    labels = (METHOD_LABELS.get(method, method), METHOD_LABELS.get(baseline, baseline))
    for a in attacks:
        have = [[(item, m) for item, m in groups[k] if a in m["accuracy"]]
                for k in (method, baseline)]
        if have[0] and have[1]:
            rows.append(_difference(*have, a, loaded, labels))
    return pd.DataFrame(rows, columns=["attack", *COMPARE_COLUMNS]).set_index("attack")


def compare_runs(run: RunResult, other: RunResult, attacks: Sequence[str] = ATTACKS):
    """``run`` against ``other``, two single runs (two values of an ablation, say), per attack
    both were evaluated with: :func:`compare`'s rows and test (paired on the same test images
    when both have masks for them, else unpaired), the verdict naming the higher run."""
    import pandas as pd

    loaded: dict[Path, dict[str, Any]] = {}
    rows = [_difference([(run, run.metrics)], [(other, other.metrics)], a, loaded,
                        (run.name, other.name))
            for a in attacks if a in run.metrics["accuracy"] and a in other.metrics["accuracy"]]
    return pd.DataFrame(rows, columns=["attack", *COMPARE_COLUMNS]).set_index("attack")


#: The validation masks ``per_image.npz`` holds beside the attacks' (runs since they were kept).
VALIDATION_KEYS = ("val_clean", "val_pgd")


def validation_difference(run: RunResult, other: RunResult, key: str = "val_pgd"
                          ) -> dict[str, Any] | None:
    """``run`` against ``other`` on the validation split, paired image by image: the selected
    epochs' ``key`` (``"val_clean"`` or ``"val_pgd"``) masks from both runs' ``per_image.npz``.

    Every run is validated on the same held-out images (the split depends on the data and
    ``val_size`` only), so the paired test applies, and it is tighter than the unpaired error of
    two accuracies. Returns a row like :func:`compare_runs`'s (for :func:`describe_difference`),
    or None when either run has no such mask (runs written before the masks were kept) or its
    mask disagrees with its ``metrics.json`` (with a warning). Raises ValueError for an unknown
    ``key`` or for runs validated on different images (another data copy or ``val_size``).
    """
    if key not in VALIDATION_KEYS:
        raise ValueError(f"key must be one of {', '.join(VALIDATION_KEYS)}, got {key!r}")
    split = [(r.metrics.get("train_data") or r.metrics.get("data"), r.metrics["config"].get("val_size"))
             for r in (run, other)]
    if split[0] != split[1]:
        raise ValueError(f"{run.name} and {other.name} were validated on different images "
                         f"(data, val_size: {split[0]} and {split[1]}); a paired comparison "
                         "needs the same validation split")
    masks = []
    for r in (run, other):
        if not r.per_image_path.is_file():
            return None
        mask = load_per_image(r.per_image_path).get(key)
        value = (r.metrics.get("validation") or {}).get(key)
        if mask is None or value is None:
            return None
        if abs(mask.mean() - value) > 1e-9:
            warnings.warn(f"{r.per_image_path}: the {key} mask ({mask.mean():.4f} correct) does "
                          f"not match metrics.json's validation ({value:.4f}), so it is not used",
                          stacklevel=2)
            return None
        masks.append(mask)
    paired = paired_difference(*masks)
    tie = paired["p_value"] >= 0.05
    verdict = "within noise" if tie else f"{run.name if paired['difference'] > 0 else other.name} higher"
    return {"attack": key, "method": float(masks[0].mean()), "baseline": float(masks[1].mean()),
            "n_method": masks[0].size, "n_baseline": masks[1].size, "runs_method": 1,
            "runs_baseline": 1, "test": "paired", **paired, "verdict": verdict}


def unpaired_noise(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two standard errors, in points, of the difference of two independent accuracies (``p1``
    in [0, 1] on ``n1`` images, ``p2`` on ``n2``): ``200 sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) /
    n2)``. For two accuracies measured on the same images it is an upper bound (their outcomes
    go together); :func:`paired_difference` is the test for those when the masks are kept."""
    return 200 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def seed_noise(sides: Sequence[Sequence[float]]) -> float | None:
    """Two standard errors, in points, of the difference of two means of per-seed accuracies
    (``sides``: the two lists of accuracies in [0, 1], one per training seed), or None when
    neither side has two seeds. The seeds' variance is pooled over the sides with two or more,
    and a side of one seed is taken to vary as much: ``200 sqrt(s^2 (1/k1 + 1/k2))``."""
    spread = [(len(v) - 1, statistics.variance(v)) for v in sides if len(v) >= 2]
    if not spread:
        return None
    pooled = sum(dof * var for dof, var in spread) / sum(dof for dof, _ in spread)
    return 200 * math.sqrt(pooled * sum(1 / len(v) for v in sides))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of the p-values of a family of tests, in their order: the
    i-th smallest p times (m - i + 1), made non-decreasing, capped at 1. Testing each adjusted p
    at 0.05 keeps the chance of any false "beyond noise" in the family at 0.05 or below, where
    m tests at 0.05 each would make one likely among many (five tests: 23 %).

    Raises:
        ValueError: a p-value that is not a number in [0, 1] (an unpaired row's NaN, say)."""
    ps = [float(v) for v in p_values]
    if any(not 0.0 <= v <= 1.0 for v in ps):  # NaN fails both comparisons
        raise ValueError(f"p_values must be numbers in [0, 1], got {list(p_values)}")
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(len(ps)), key=ps.__getitem__)):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def verdicts_by_attack(frame: pd.DataFrame) -> dict[str, list[str]]:
    """The attacks (the frame's index: display labels, as :func:`compare` and
    :func:`compare_runs` write them) where the method is ``"ahead"`` or ``"behind"`` beyond noise,
    and ``"within noise"``, in the frame's order."""
    groups: dict[str, list[str]] = {"ahead": [], "behind": [], "within noise": []}
    for attack, row in frame.iterrows():
        key = ("within noise" if row["verdict"] == "within noise"
               else "ahead" if row["difference"] > 0 else "behind")
        groups[key].append(str(attack))
    return groups


def describe_difference(row) -> str:
    """One row of :func:`compare` or :func:`compare_runs` in words, e.g. ``+0.74 points (noise
    ±0.55, paired, p = 0.007) -> ANCHOR higher`` (an unpaired row has no p-value).

    A paired verdict follows McNemar's exact p; where the ±2 s.e. printed beside it (a normal
    approximation) would say otherwise, the words say which one decided: "within noise" for a
    difference beyond the band (few disagreeing images, where the band understates the noise),
    or a winner for a difference inside it (p just under 0.05, where the band is a little
    wider than the exact test's)."""
    p = row["p_value"]
    test = row["test"] if math.isnan(p) else \
        f"{row['test']}, {'p < 0.001' if p < 0.001 else f'p = {p:.3f}'}"
    decided = ""
    if not math.isnan(p) and (row["verdict"] == "within noise") == (
            abs(row["difference"]) > row["noise_2se"]):
        decided = (" (by the exact p: with this few disagreeing images the ±2 s.e. "
                   "understates the noise)" if row["verdict"] == "within noise" else
                   " (by the exact p, just under 0.05: the ±2 s.e. band, an approximation, "
                   "is a little wider)")
    return (f"{row['difference']:+.2f} points (noise ±{row['noise_2se']:.2f}, {test}) -> "
            f"{row['verdict']}{decided}")


def paired_difference(right: np.ndarray, right_other: np.ndarray) -> dict[str, Any]:
    """Two outcomes on the same images compared image by image: ``right`` and ``right_other``
    are ``(N,)`` bool arrays (which images each model got right, under an attack or by kNN).

    Only the images the two disagree on carry information: ``only_method`` = b (right only in
    ``right``), ``only_baseline`` = c. Returns those, ``difference`` = 100 (b - c) / N in points,
    ``noise_2se`` = 200 sqrt(b + c) / N, and ``p_value``, McNemar's exact two-sided test; a
    p-value of 0.05 or more is within noise (with few disagreements the normal approximation
    would call too much a win)."""
    if right.shape != right_other.shape or right.ndim != 1 or right.size == 0:
        raise ValueError(f"expected two (N,) outcome arrays of one length N >= 1, got "
                         f"{right.shape} and {right_other.shape}")
    b, c = int((right & ~right_other).sum()), int((~right & right_other).sum())
    n = right.size
    return {"difference": 100 * (b - c) / n, "noise_2se": 200 * math.sqrt(b + c) / n,
            "only_method": b, "only_baseline": c, "p_value": _mcnemar_p(b, c)}


def _difference(mine: list, theirs: list, attack: str, loaded: dict[Path, dict[str, Any]],
                labels: tuple[str, str]) -> dict[str, Any]:
    """One row of :func:`compare`: ``mine`` against ``theirs`` (lists of (run, metrics), several
    runs averaged as seeds) under ``attack``; ``labels`` name the two sides in the verdict."""
    entries = [[m["accuracy"][attack] for _, m in side] for side in (mine, theirs)]
    p = [sum(e["value"] for e in v) / len(v) for v in entries]
    n = [min(e["n"] for e in v) for v in entries]
    row = {"attack": ATTACK_LABELS.get(attack, attack), "method": p[0], "baseline": p[1],
           "n_method": n[0], "n_baseline": n[1], "runs_method": len(mine),
           "runs_baseline": len(theirs), "test": "unpaired", "only_method": math.nan,
           "only_baseline": math.nan, "p_value": math.nan}
    masks = _paired_masks(mine, theirs, attack, loaded)
    if masks is not None:
        paired = paired_difference(*masks)
        diff, noise = paired["difference"], paired["noise_2se"]
        row.update(test="paired", only_method=paired["only_method"],
                   only_baseline=paired["only_baseline"], p_value=paired["p_value"])
        tie = paired["p_value"] >= 0.05
    else:
        diff = 100 * (p[0] - p[1])
        noise = unpaired_noise(p[0], n[0], p[1], n[1])
        seeds = seed_noise([[e["value"] for e in v] for v in entries])
        if seeds is not None:
            noise = math.hypot(noise, seeds)
            row["test"] = "unpaired, seeds"
        tie = abs(diff) <= noise
    verdict = "within noise" if tie else f"{labels[0] if diff > 0 else labels[1]} higher"
    return {**row, "difference": diff, "noise_2se": noise, "verdict": verdict}


def attack_gap(run: RunResult, weak: str = "pgd20", strong: str = "autoattack",
               others: Sequence[str] = ("cw",)) -> dict[str, Any]:
    """Where ``strong`` beats ``weak`` on ``run``'s own test images, from its ``per_image.npz``.

    The sanity check "AutoAttack within 5 points of PGD-20" fails either because the model masks
    its gradients in a way every loss meets (non-differentiable or randomised components: then
    gradient attacks with any loss stall, and only black-box or adaptive attacks get through) or
    because PGD-20's cross-entropy loss is simply a weaker objective than
    AutoAttack's margin-based ones. Per image this tells the two apart: the images ``strong``
    breaks and ``weak`` does not, and how many of those another white-box attack (CW's margin
    loss by default) breaks too. Masks are compared on the first ``n`` images, where ``n`` is
    the smallest attack's count (AutoAttack runs on the first images of the same test order).

    Returns:
        A dict: ``run`` (its name); ``n`` (images compared); ``weak`` and ``strong`` (accuracies
        in [0, 1] on those images); ``gap`` (points, weak - strong); ``strong_only`` (images
        ``weak`` left right and ``strong`` broke); ``weak_only`` (the reverse); ``also_broken``
        (for each of ``others``, how many of the ``strong_only`` images it broke too); and
        ``ensemble``, a dict with ``attacks`` (``weak`` and ``others``), ``accuracy`` (right
        under all of them) and ``gap`` (its points above ``strong``).

    Raises:
        ValueError: an attack that ``run`` has no mask for (no ``per_image.npz``, a mask that
            disagrees with ``metrics.json``, or an attack it was not evaluated with).
    """
    names = [weak, strong, *others]
    loaded: dict[Path, dict[str, Any]] = {}
    masks = {}
    for a in names:
        m = _mask(run, a, loaded)
        if m is None:
            raise ValueError(f"{run.name}: no usable per-image mask for {a!r} (expected "
                             f"{run.per_image_path} with the attacks of metrics.json, "
                             f"which lists {sorted(run.metrics['accuracy'])})")
        masks[a] = m
    n = min(m.size for m in masks.values())
    masks = {a: m[:n] for a, m in masks.items()}
    w, s = masks[weak], masks[strong]
    strong_only = w & ~s
    together = np.logical_and.reduce([masks[a] for a in (weak, *others)])
    return {"run": run.name, "n": n, "weak": float(w.mean()), "strong": float(s.mean()),
            "gap": 100 * float(w.mean() - s.mean()),
            "strong_only": int(strong_only.sum()), "weak_only": int((s & ~w).sum()),
            "also_broken": {a: int((strong_only & ~masks[a]).sum()) for a in others},
            "ensemble": {"attacks": [weak, *others], "accuracy": float(together.mean()),
                         "gap": 100 * float(together.mean() - s.mean())}}


def _paired_masks(mine: list, theirs: list, attack: str, loaded: dict[Path, dict[str, Any]]
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """The two runs' masks for ``attack`` when a paired comparison is possible, else None."""
    if len(mine) != 1 or len(theirs) != 1:
        return None
    (run_a, m_a), (run_b, m_b) = mine[0], theirs[0]
    if not (isinstance(run_a, RunResult) and isinstance(run_b, RunResult)):
        return None
    if m_a.get("data") != m_b.get("data") or m_a["accuracy"][attack]["n"] != m_b["accuracy"][attack]["n"]:
        return None
    a, b = _mask(run_a, attack, loaded), _mask(run_b, attack, loaded)
    return None if a is None or b is None else (a, b)


def ablation_param(name: str, runs: Sequence[RunResult | dict[str, Any]]) -> str | None:
    """The TrainConfig field an ablation varies: ``ablation_<field>`` if every run's config has
    that key (also while only one of its values has run), else the single config key whose value
    differs between the runs (None if unclear)."""
    configs = [m["config"] for _, m in _runs(runs)]
    field = name.removeprefix("ablation_")
    if configs and all(field in c for c in configs):
        return field
    keys = set().union(*configs) if configs else set()
    varying = sorted(k for k in keys if k not in ("out_dir", "extra", "progress")
                     and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)
    return varying[0] if len(varying) == 1 else None


def ablation_table(runs: Sequence[RunResult | dict[str, Any]], param: str,
                   attacks: Sequence[str] = ATTACKS):
    """One row per run of an ablation, sorted by the varied ``param`` (a TrainConfig field).

    Besides :func:`results_table`'s test columns, ``val_clean`` and ``val_pgd``: the selected
    epoch's validation accuracies (fractions; NaN for a run without them), on which the ablation
    chooses, never on the test columns.
    """
    df = results_table(runs, attacks)
    metrics = [m for _, m in _runs(runs)]
    df.insert(0, param, [m["config"].get(param) for m in metrics])
    for i, key in enumerate(("val_clean", "val_pgd"), start=1):
        df.insert(i, key, [float((m.get("validation") or {}).get(key, math.nan)) for m in metrics])
    return df.sort_values(param, kind="stable")


def load_ablation_summary(root: str | Path | None = None) -> dict[str, Any] | None:
    """``<root>/ablation_summary.json`` (what the ablation chose per knob; verified against its
    sha256 sidecar when there is one), or None when no ablation has finished a knob yet."""
    path = (Path(root) if root is not None else default_root()) / "ablation_summary.json"
    if not path.is_file():
        return None
    return read_ablation_summary(path, verify_hash=path.with_name(path.name + ".sha256").is_file())


def read_ablation_summary(path: str | Path, *, verify_hash: bool = True) -> dict[str, Any]:
    """An ``ablation_summary.json`` (``reproduce.ablation`` writes it), checked against its sha256
    sidecar and for the shape its readers rely on. Raises ``checkpoint.CheckpointError`` naming
    the file, what was expected and what came: a summary edited by hand into another shape must
    not be half-read (a missing ``params`` would read as "nothing chosen yet")."""
    summary = checkpoint.read_json(path, verify_hash=verify_hash)

    def bad(what: str, expected: str, got: Any) -> checkpoint.CheckpointError:
        return checkpoint.CheckpointError(f"{path}: {what} must be {expected}, got {got!r:.80}")

    # (read_json has refused anything but a JSON object.) params is read always; the others only
    # when present (a summary written before base_config was recorded is one of another
    # configuration, not a damaged one; reproduce.chosen_knobs then keeps the defaults, saying so).
    kinds = {"params": (dict, "an object mapping knob names to their results"),
             "profile": (str, "a profile name"), "selection": (str, "a string"),
             "epoch_fraction": ((int, float), "a number"), "base_config": (dict, "an object")}
    for key, (kind, expected) in kinds.items():
        if key not in summary:
            if key == "params":
                raise bad(f"{key!r}", f"present ({expected})", "nothing")
            continue
        if not isinstance(summary[key], kind) or isinstance(summary[key], bool):
            raise bad(f"{key!r}", expected, summary[key])
    for name, entry in summary["params"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("validation", {}), dict):
            raise bad(f"params[{name!r}]", "an object (its 'validation' an object too)", entry)
        if entry.get("chosen") is not None and not isinstance(entry["chosen"], str):
            raise bad(f"params[{name!r}]['chosen']", "a value as a string, or null",
                      entry["chosen"])
    return summary


def ablation_choice(runs: Sequence[RunResult | dict[str, Any]], param: str,
                    planned: Sequence[Any], summary: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Where the choice of ``param`` stands: which of the ``planned`` values have a finished run
    (``finished``) and which not (``missing``), the value with the best validation PGD accuracy
    among the finished (``leading``, None if none has validation accuracies; on a tie the
    default, as :func:`best_value` rules), and the value
    ``summary`` (:func:`load_ablation_summary`) records as chosen (``chosen``: None until the
    ablation has run every value of ``param`` and written its summary)."""
    done = {str(m["config"].get(param)): (m.get("validation") or {}) for _, m in _runs(runs)}
    scored = {v: val["val_pgd"] for v, val in done.items() if "val_pgd" in val}
    entry = ((summary or {}).get("params") or {}).get(param) or {}
    return {"param": param,
            "finished": [v for v in map(str, planned) if v in done],
            "missing": [v for v in map(str, planned) if v not in done],
            "leading": best_value(scored, param) if scored else None,
            "chosen": entry.get("chosen")}


def best_value(scores: dict[str, float], param: str) -> str:
    """The value (a key of ``scores``, e.g. ``"0.5"``) with the highest score, the ablation's
    choice of a knob by validation PGD accuracy; on a tie, the default value of ``param``
    (:class:`~anchor_lib.train.TrainConfig`'s) when it is among the tied, else the first listed.
    Validation accuracies move in steps of one image, so ties happen, and the first listed value
    of β is 0, which would turn ANCHOR into SupCon-AT on a tie it has no evidence for. A NaN
    score is never chosen (ValueError when every score is NaN)."""
    from .train import TrainConfig

    default = getattr(TrainConfig(), param, None)

    def is_default(value: str) -> bool:   # "1" and "1.0" name one beta
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return value == str(default)

    finite = {v: score for v, score in scores.items() if not math.isnan(score)}
    if not finite:
        raise ValueError(f"no finite score to choose {param} by, got {scores}")
    return max(finite, key=lambda v: (finite[v], is_default(v)))


# --- committed artifacts the chapters can use instead of training live --------------------------


def find_embeddings(method: str, root: str | Path | None = None, *, profile: str = "full"
                    ) -> RunResult | None:
    """The run of ``method`` at ``profile`` that has a committed ``embeddings.npz``, or None.

    When several runs qualify (seeds), the first by name is returned.
    """
    for run in load_results(root):
        if run.method == method and run.profile == profile and run.embeddings_path.is_file():
            return run
    return None


def _manifest_entries(manifest: Any) -> list[dict[str, Any]]:
    """Entries of ``{"checkpoints": [...]}``, ``{"checkpoints": {method: {...}}}`` or
    ``{method: {...}}``."""
    items = manifest.get("checkpoints", manifest) if isinstance(manifest, dict) else manifest
    if isinstance(items, dict):
        items = [{"method": k, **v} for k, v in items.items() if isinstance(v, dict)]
    return [e for e in items or [] if isinstance(e, dict)]


def load_tutorial_checkpoint(method: str, root: str | Path | None = None,
                             device: str = "cpu"):
    """Load the committed tutorial checkpoint of ``method`` listed in ``manifest.json``.

    ``root`` (default: ``checkpoints/`` beside :func:`default_root`'s results folder, so the
    repository's ``data/checkpoints``, or a clone's when ``ANCHOR_RESULTS_DIR`` points at its
    ``data/results``) holds ``manifest.json`` whose entries name ``method``, ``file`` (or
    ``path``, relative to ``root``) and ``sha256``. The file must match that sha256.

    Returns:
        ``(model in eval mode, checkpoint dict, manifest entry)``, or None when no manifest or no
        entry for ``method`` exists.

    Raises:
        anchor_lib.checkpoint.CheckpointError: the listed file is missing or does not match.
    """
    from . import train

    if root is None:  # beside the results folder, wherever that is (see default_root)
        root = default_root().parent / "checkpoints"
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        entries = _manifest_entries(json.loads(manifest_path.read_text()))
    except json.JSONDecodeError as err:
        raise checkpoint.CheckpointError(f"{manifest_path} is not valid JSON: {err}") from err
    entry = next((e for e in entries if e.get("method") == method), None)
    if entry is None:
        return None
    path = root / str(entry.get("file") or entry.get("path") or "")
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{manifest_path} lists {path}, which does not exist")
    expected = str(entry.get("sha256", ""))
    actual = checkpoint.sha256_file(path)
    if actual != expected:
        raise checkpoint.CheckpointError(f"{path} does not match the sha256 in {manifest_path} "
                                         f"({actual[:12]}... != {expected[:12]}...)")
    state = checkpoint.load(path, verify_hash=False)  # verified against the manifest above
    model = train.model_from_weights(train.config_from_dict(state["config"]), state["model"])
    return model.to(device).eval(), state, entry
