"""The ANCHOR ablation trains variants and chooses each knob on the validation split only."""

from __future__ import annotations

import json

import pytest

from anchor_lib import checkpoint, data, reproduce, results


def test_ablation_layout_and_choice_by_validation(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": False, "embed_n": 20})
    monkeypatch.setitem(reproduce.ABLATION, "beta", (0.0, 2.0))
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    summary = reproduce.ablation("smoke", ("beta",), out=tmp_path, dataset=ds, data="synthetic",
                                 width=4, proj_dim=16, train_subset=256, val_size=64,
                                 batch_size=64, attack_steps=2, val_attack_steps=2,
                                 progress=False, attacks=("clean", "pgd20"), log=lambda *_: None)
    val = summary["params"]["beta"]["validation"]
    assert set(val) == {"0.0", "2.0"}
    assert val[summary["params"]["beta"]["chosen"]]["val_pgd"] == max(v["val_pgd"]
                                                                     for v in val.values())
    for value in ("0.0", "2.0"):
        metrics = json.loads((tmp_path / "ablation_beta" / f"beta-{value}" / "metrics.json")
                             .read_text())
        assert metrics["config"]["beta"] == float(value) and metrics["method"] == "anchor"
        assert set(metrics["accuracy"]) == {"clean", "pgd20"}
    checkpoint.verify(tmp_path / "ablation_summary.json")
    # Chapter 8 reads the same folders.
    loaded = results.load_ablations(tmp_path)
    assert list(loaded) == ["ablation_beta"] and len(loaded["ablation_beta"]) == 2
    assert results.ablation_param("ablation_beta", loaded["ablation_beta"]) == "beta"


def test_unknown_parameter():
    with pytest.raises(ValueError, match="unknown ablation parameter"):
        reproduce.ablation("smoke", ("gamma",))


def test_cli_ablation_flag_reaches_the_ablation(monkeypatch):
    from anchor_lib import cli

    calls = []
    monkeypatch.setattr(reproduce, "ablation", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["reproduce", "--profile", "smoke", "--ablation", "--data", "synthetic"]) == 0
    assert calls and calls[0][0] == ("smoke",) and calls[0][1]["data"] == "synthetic"
