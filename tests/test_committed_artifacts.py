"""The artifacts committed under data/: intact, consistent with each other, and quoted faithfully.

GPU results arrive as files copied in by hand from a device machine (scripts/gpu_job.sh); these
tests catch a file damaged or mixed up on the way (a sidecar that no longer matches, a checkpoint
exported from another run than the metrics it claims, masks that disagree with their accuracies)
and a README that quotes numbers its files no longer hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from anchor_lib import checkpoint, results
from anchor_lib.reproduce import TUTORIAL_MAX_BYTES

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
RESULTS = DATA / "results"
CHECKPOINTS = DATA / "checkpoints"


def committed_sidecars() -> list[Path]:
    return sorted(p for p in DATA.rglob("*.sha256") if "cache" not in p.relative_to(DATA).parts)


def test_every_committed_file_matches_its_sidecar():
    sidecars = committed_sidecars()
    assert sidecars, "no sha256 sidecars under data/: nothing is verified"
    for side in sidecars:
        checkpoint.verify(side.with_name(side.name.removesuffix(".sha256")))


def test_every_committed_run_folder_is_a_finished_run():
    """A run that a slot's end cut short leaves history.csv (and maybe embeddings) without
    metrics.json; nothing reads such a folder (results.load_results skips it), so committing one
    from a returned archive would go unnoticed."""
    for marker in ("history.csv", "embeddings.npz", "per_image.npz"):
        for path in RESULTS.rglob(marker):
            assert (path.parent / "metrics.json").is_file(), (
                f"{path.parent.relative_to(REPO)} holds {marker} but no metrics.json: an "
                "unfinished run; leave it out of the commit")


def test_committed_runs_load_and_their_masks_match_their_accuracies():
    runs = results.load_results(RESULTS)
    if not runs:
        pytest.skip("no runs are committed under data/results/")
    for run in runs:
        assert run.verified, f"{run.name}: metrics.json has no sha256 sidecar"
        if not run.per_image_path.is_file():
            continue  # runs written before per_image.npz existed
        masks = results.load_per_image(run.per_image_path)
        for attack, entry in run.metrics["accuracy"].items():
            mask = masks[attack]
            assert mask.shape == (entry["n"],), (run.name, attack)
            assert mask.mean() == pytest.approx(entry["value"], abs=1e-12), (run.name, attack)
        for key in results.VALIDATION_KEYS:  # runs since the validation masks were kept
            if key in masks:
                assert masks[key].mean() == pytest.approx(run.metrics["validation"][key],
                                                          abs=1e-12), (run.name, key)
        # AutoAttack runs on the first images of the same order as the other attacks.
        if {"autoattack", "clean"} <= set(masks):
            n = len(masks["autoattack"])
            assert not (masks["autoattack"] & ~masks["clean"][:n]).any(), run.name


def test_tutorial_checkpoints_are_small_and_come_from_their_runs():
    assert TUTORIAL_MAX_BYTES <= 2_000_000  # issue 5: at most 2 MB each
    manifest_path = CHECKPOINTS / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("no tutorial checkpoints are committed")
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["checkpoints"]:
        path = CHECKPOINTS / entry["file"]
        assert path.stat().st_size <= TUTORIAL_MAX_BYTES, path
        model, state, _ = results.load_tutorial_checkpoint(entry["method"], CHECKPOINTS)
        assert all(v.dtype == torch.float16 for v in state["model"].values()
                   if v.is_floating_point()), f"{path.name} is not an fp16 state_dict"
        # The manifest's accuracies are the run's own, from the same commit.
        run = results.load_run((REPO / entry["source"]).parent).metrics
        assert run["method"] == entry["method"] and run["commit"] == entry["commit"]
        assert {k: v["value"] for k, v in run["accuracy"].items()} == entry["accuracy"]
        assert run["config"]["width"] == entry["width"] == state["config"]["width"]
        logits = model(torch.rand(4, 3, 32, 32))
        assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def _readme_result_rows() -> dict[tuple[str, str], str]:
    """The README's results tables: ``{(profile, row label): line}``; a table's header names its
    profile (``| full profile | clean | ...``)."""
    rows, profile = {}, None
    for line in (REPO / "README.md").read_text().splitlines():
        header = re.match(r"\| (\w+) profile \|", line)
        if header:
            profile = header.group(1)
        elif line.startswith("| ") and line.count("%") == 5:
            assert profile is not None, f"a results row outside a profile's table: {line}"
            label = line.split("|")[1].strip()
            assert (profile, label) not in rows, f"two {profile} rows for {label}"
            rows[profile, label] = line
    return rows


def test_readme_quotes_the_committed_results():
    """The README's results tables (one per profile) hold the numbers of the files, rounded, and
    quote no run that is not committed."""
    rows = _readme_result_rows()
    runs = {(r.metrics["profile"], r.method): r for r in results.load_results(RESULTS)}
    quoted = 0
    for (profile, label), line in rows.items():
        method = next((m for m, name in results.METHOD_LABELS.items()
                       if label.split(" (")[0] == name or label.lower() == m), None)
        run = runs.get((profile, method))
        assert run is not None, f"the README quotes a {profile} {label} run that is not committed"
        numbers = [float(x) for x in re.findall(r"([\d.]+) %", line)]
        expected = [round(100 * run.metrics["accuracy"][a]["value"], 1)
                    for a in ("clean", "fgsm", "pgd20", "cw", "autoattack")]
        assert numbers == pytest.approx(expected, abs=0.051), (profile, label, numbers, expected)
        quoted += 1
    # Every committed tutorial and full run has its row.
    missing = [key for key in runs if key[0] in ("tutorial", "full") and not any(
        p == key[0] and (lab.split(" (")[0] == results.METHOD_LABELS[key[1]]
                         or lab.lower() == key[1]) for p, lab in rows)]
    assert not missing, f"committed runs the README's results tables leave out: {missing}"
    assert quoted == len(rows)


def test_committed_ablation_runs_embed_the_documented_sample():
    """Chapter 8 says the ablation's runs embed 200 test images each (ABLATION_EMBED_N), and
    uses their cluster metrics with that sample's noise: the committed files must agree."""
    from anchor_lib.embeddings import load_embeddings
    from anchor_lib.reproduce import ABLATION_EMBED_N

    files = sorted(RESULTS.glob("ablation_*/*/embeddings.npz"))
    if not files:
        pytest.skip("no ablation runs are committed")
    assert ABLATION_EMBED_N == 200
    for path in files:
        emb = load_embeddings(path)
        assert len(emb["labels"]) == ABLATION_EMBED_N, path
        metrics = json.loads((path.parent / "metrics.json").read_text())
        assert metrics["cluster_metrics"]["n"] == ABLATION_EMBED_N, path


def test_committed_ablations_ran_the_grid_of_the_code():
    """Every committed ablation run's value is one ABLATION lists, and a knob the summary chose
    was chosen among all of ABLATION's values (chapter 8 reads 'missing' values against it)."""
    from anchor_lib.reproduce import ABLATION

    folders = sorted(p for p in RESULTS.glob("ablation_*") if p.is_dir())
    if not folders:
        pytest.skip("no ablation runs are committed")
    summary = json.loads((RESULTS / "ablation_summary.json").read_text())
    for folder in folders:
        param = folder.name.removeprefix("ablation_")
        assert param in ABLATION, f"{folder.name}: {param} is not a knob of reproduce.ABLATION"
        values = {json.loads((m.parent / "metrics.json").read_text())["config"][param]
                  for m in folder.glob("*/metrics.json")}
        assert values <= set(ABLATION[param]), (param, values, ABLATION[param])
        if param in summary["params"]:
            assert values == set(ABLATION[param]), (param, values, ABLATION[param])
            assert set(summary["params"][param]["validation"]) == {str(v) for v in values}


def test_readme_quotes_the_budget_estimates_of_the_committed_runs():
    """The README's "GPU slots" paragraph quotes what ``budget.estimate`` expects from the committed
    H100 runs, for a full ``anchor`` run and for an ablation run: the same seconds, rounded."""
    from anchor_lib import budget, evaluate
    from anchor_lib.reproduce import ABLATION_ATTACKS
    from anchor_lib.train import TrainConfig

    hardware = "NVIDIA H100 80GB HBM3"
    readme = " ".join((REPO / "README.md").read_text().split())
    cases = {"the full `anchor` run": (TrainConfig.from_profile("full", method="anchor",
                                                                device="cuda"),
                                       tuple(evaluate.ATTACKS), True),
             "an ablation run": (TrainConfig.from_profile("full", method="anchor", epochs=15,
                                                          device="cuda"),
                                 tuple(ABLATION_ATTACKS), False)}
    for what, (cfg, attacks, sanity) in cases.items():
        guess = budget.estimate(REPO / "data" / "results", cfg, attacks=attacks, sanity=sanity,
                                hardware=hardware)
        assert guess is not None, f"no committed run times {what} on the {hardware}"
        quoted = f"{round(guess.seconds)} s for {what}"
        assert quoted in readme, f"the README should say {quoted!r} (budget.estimate)"
        # the H200, lent since, has no committed run: the H100's time it
        h200 = budget.estimate(REPO / "data" / "results", cfg, attacks=attacks, sanity=sanity,
                               hardware="NVIDIA H200")
        assert h200.seconds == guess.seconds and hardware in h200.basis
    # No committed run times a full TRADES run, and the README says the PGD-AT run, which records
    # no compiling, bounds none; an uncompiled PGD-AT epoch would "bound" ANCHOR above its own
    # estimate (670 s against 619 s).
    assert "The committed full PGD-AT run bounds none" in readme
    for method in ("trades", "anchor"):
        cfg = TrainConfig.from_profile("full", method=method, device="cuda")
        assert budget.lower_bound(REPO / "data" / "results", cfg, attacks=tuple(evaluate.ATTACKS),
                                  sanity=True, hardware=hardware) is None


def test_committed_runs_trained_what_their_profile_trains_today():
    """A run's numbers describe today's code only while today's profile still gives its config: a
    changed default (the validation split, the schedule, eps, the width) would leave the book
    quoting runs of another protocol. A reproduction run may differ only in the knobs its
    ``metrics.json`` says were chosen (``knobs``); an ablation run in its own knob and the
    shortened schedule its summary records."""
    from anchor_lib.reproduce import ablation_config
    from anchor_lib.train import TrainConfig, config_differences

    paths = sorted(RESULTS.glob("*/metrics.json")) + sorted(RESULTS.glob("ablation_*/*/metrics.json"))
    if not paths:
        pytest.skip("no runs are committed under data/results/")
    summary_path = RESULTS / "ablation_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    for path in paths:
        metrics = json.loads(path.read_text())
        saved = metrics["config"]
        group = path.parent.parent.name
        if group.startswith("ablation_"):
            assert summary is not None, f"{path}: an ablation run without ablation_summary.json"
            param = group.removeprefix("ablation_")
            base = TrainConfig.from_profile(summary["profile"], method="anchor", **summary["overrides"])
            today = ablation_config(base, param, saved[param], summary["epoch_fraction"])
        else:
            today = TrainConfig.from_profile(saved["profile"], method=saved["method"], **{
                k: v["value"] for k, v in (metrics.get("knobs") or {}).items()})
        assert config_differences(saved, today) == [], path.relative_to(REPO)


def scores(accuracies: dict) -> str:
    """How the README words a model's scores from zero_gradients.json and later_checks.json."""
    return (f"{accuracies['pgd20']:.0%} under PGD-20, {accuracies['cw']:.0%} under CW∞ and "
            f"{accuracies['autoattack']:.0%} under AutoAttack (worst case per image "
            f"{accuracies['worst_case']:.0%})").replace("%", " %")


def _ran_on_todays_checkpoints(name: str) -> dict:
    """The file ``data/results/cpu-checks/<name>``, after checking that its rows of the tutorial
    checkpoints ran on the ones the manifest lists today (their sha256s)."""
    found = checkpoint.read_json(REPO / "data" / "results" / "cpu-checks" / name)
    manifest = json.loads((REPO / "data" / "checkpoints" / "manifest.json").read_text())
    for entry in manifest["checkpoints"]:
        assert found["results"][entry["method"]]["sha256"] == entry["sha256"], \
            f"{name} ran on another {entry['method']} checkpoint: run it again"
    return found


def test_readme_quotes_check_5_on_the_committed_checkpoints():
    """data/results/cpu-checks/zero_gradients.json ran the fifth sanity check on today's tutorial
    checkpoints (the manifest's sha256s) and measured what the green rounding hides, and the
    README says what it found."""
    found = _ran_on_todays_checkpoints("zero_gradients.json")
    rows = found["results"]
    readme = " ".join((REPO / "README.md").read_text().split())
    honest = [row for row in rows.values() if not row.get("control")]
    assert all(v == 0 for row in honest for v in row["zero_share"].values()), \
        "a committed checkpoint has zero gradients: the README must say so"
    assert "checkpoints have no coordinate with a zero gradient under either loss" in readme
    green = rows["pgd_at, green channel rounded (control)"]
    scaled = rows["standard, logits x 10,000 (control)"]
    assert not green["passed"] and not scaled["passed"], "a control passed check 5"
    assert f"{min(green['zero_share'].values()) * 100:.1f} % of its coordinates" in readme
    assert f"{scaled['zero_share']['ce'] * 100:.1f} % under the cross-entropy" in readme
    masked = found["partial_masking"]
    assert masked["n"] == 100 and "first 100 test images" in readme
    checks = masked["sanity_as_it_is"]
    first_four = ("more_steps", "eps_sweep", "black_box_weaker", "autoattack_gap")
    if all(checks[name]["passed"] for name in first_four):
        assert "passes the first four checks" in readme
    assert not checks["zero_gradients"]["passed"]
    assert f"as it is it scores {scores(masked['as it is'])}" in readme
    assert f"through BPDA (the same function, the rounding's gradient taken as the identity) " \
           f"{scores(masked['through BPDA'])}" in readme



def test_readme_quotes_checks_6_and_7_on_the_committed_checkpoints():
    """data/results/cpu-checks/later_checks.json ran checks 6 and 7 on today's tutorial
    checkpoints and on controls that break them, and measured what two controls hide; the README
    says what it found."""
    found = _ran_on_todays_checkpoints("later_checks.json")
    rows = found["results"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert found["n"] == 1000 and "the first 1,000 test images" in readme
    honest = [row for row in rows.values() if not row.get("control")]
    assert all(row[c]["passed"] for row in honest for c in ("gradient_signs", "deterministic"))
    assert all(v == 0 for row in honest for v in row["deterministic"]["max_change"].values())
    assert "no logit changes in any of the four comparisons" in readme
    shares = [v for row in honest for v in row["gradient_signs"]["agreement"].values()]
    quoted = f"{min(shares):.1%} to {max(shares):.1%}".replace("%", " %")
    assert f"agrees with the loss's change on {quoted}" in readme
    # and MIN_SIGN_AGREEMENT's doc comment, which gives the threshold's margins
    source = " ".join((REPO / "anchor_lib" / "evaluate.py").read_text().replace("#:", "").split())

    def control(start: str) -> dict:
        (row,) = [row for name, row in rows.items() if name.startswith(start)]
        return row

    for row in (r for r in rows.values() if r.get("control")):
        assert row["gradient_signs"]["passed"] is False or not row["deterministic"]["passed"]

    def signs(row: dict) -> str:
        return f"{row['gradient_signs']['agreement']['ce']:.1%}".replace("%", " %")

    def change(row: dict, comparison: str) -> str:
        return f"{row['deterministic']['max_change'][comparison]:.1e}"

    shattered = control("pgd_at, green rounded, gradient of random sign")
    noisy = control("pgd_at, input noise")
    assert f"checkpoints agree on {quoted} and such a control on {signs(shattered)}" in source
    assert f"the shattered model's signs agree on {signs(shattered)} (the rounded green's on " \
           f"{signs(control('pgd_at, green channel rounded'))})" in readme
    assert f"the noisy model's on {signs(noisy)} and its logits change by up to " \
           f"{change(noisy, 'autograd')}" in readme
    assert max(noisy["deterministic"]["max_change"].values()) == \
        noisy["deterministic"]["max_change"]["autograd"]
    assert f"the batch-centred model's by {change(control('pgd_at, images centred'), 'batch')}" \
        in readme
    assert f"the decoy's by {change(control('decoy'), 'autograd')} while autograd records" \
        in readme
    assert f"the memory's by {change(control('pgd_at, remembers'), 'history')} after" in readme

    hidden = found["hidden"]
    assert hidden["n"] == 100 and "On the first 100 test images the shattered model" in readme
    green = hidden["shattered_green"]
    assert [c for c, r in green["sanity"].items() if not r["passed"]] == ["gradient_signs"]
    assert "the shattered model passes the other six checks" in readme
    assert f"as it is it scores {scores(green['as it is'])}, through BPDA " \
           f"{scores(green['through BPDA'])}" in readme
    decoy = hidden["decoy"]
    assert f"The decoy scores {scores(decoy['decoy'])} where the PGD-AT model it answers with, " \
           f"attacked itself, scores {scores(decoy['pgd_at itself'])}" in readme
    # chapter 6 says so in words: the decoy scores higher than the model that answers for it,
    # and fails checks 3, 6 and 7
    assert all(decoy["decoy"][a] > decoy["pgd_at itself"][a]
               for a in ("pgd20", "cw", "autoattack", "worst_case"))
    assert not any(decoy["sanity"][c]["passed"]
                   for c in ("black_box_weaker", "gradient_signs", "deterministic"))
    assert "so check 3 fails it too" in readme


def test_figure_text_was_measured_on_every_figure_and_the_readme_quotes_it():
    """data/results/cpu-checks/figure_text.json measured every figure cell of today's chapters
    (a cell added since is missing from it), none below the floor, as the README says."""
    import nbformat

    found = checkpoint.read_json(DATA / "results" / "cpu-checks" / "figure_text.json")
    cells = set()
    for path in sorted((REPO / "book").glob("0*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cells |= {(path.stem, c.get("id")) for c in nb.cells
                  if c.cell_type == "code" and "plt.show()" in c.source}
    measured = {(f["chapter"], f["cell"]) for f in found["figures"]}
    assert cells <= measured, f"figure cells not measured: {sorted(cells - measured)}"
    sizes = [f["smallest_text_px"] for f in found["figures"]]
    below = [f for f in found["figures"] if f["smallest_text_px"] < found["min_text_px"]]
    assert found["below_min_text_px"] == len(below) == 0, below
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (f"the smallest of the {len(sizes)} figures reads at {min(sizes):.1f} px, none below "
            f"the book's floor of {found['min_text_px']:g} px, and "
            f"{sum(v < 11 for v in sizes)} of them below 11 px") in readme
    assert f"scaled to the {found['column_px']}-px text column" in readme

