"""The ANCHOR ablation trains variants and chooses each knob on the validation split only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from anchor_lib import checkpoint, data, reproduce, results


def test_ablation_layout_and_choice_by_validation(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": False, "embed_n": 20})
    monkeypatch.setitem(reproduce.ABLATION, "beta", (0.0, 2.0))
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    ruled = []   # the choice is results.best_value's (a tie goes to the default)
    monkeypatch.setattr(results, "best_value",
                        lambda scores, param, _rule=results.best_value:
                        ruled.append((dict(scores), param)) or _rule(scores, param))
    summary = reproduce.ablation("smoke", ("beta",), out=tmp_path, dataset=ds, data="synthetic",
                                 width=4, proj_dim=16, train_subset=256, val_size=64,
                                 batch_size=64, attack_steps=2, val_attack_steps=2,
                                 progress=False, attacks=("clean", "pgd20"), log=lambda *_: None)
    val = summary["params"]["beta"]["validation"]
    assert set(val) == {"0.0", "2.0"}
    assert val[summary["params"]["beta"]["chosen"]]["val_pgd"] == max(v["val_pgd"]
                                                                     for v in val.values())
    assert ruled == [({v: val[v]["val_pgd"] for v in val}, "beta")]
    for value in ("0.0", "2.0"):
        metrics = json.loads((tmp_path / "ablation_beta" / f"beta-{value}" / "metrics.json")
                             .read_text())
        assert metrics["config"]["beta"] == float(value) and metrics["method"] == "anchor"
        assert set(metrics["accuracy"]) == {"clean", "pgd20"}
        # The choice reads what training measured on the validation split (best.pt's record of
        # its selected epoch), never the test columns.
        best = checkpoint.load(tmp_path / "ablation_beta" / f"beta-{value}" / "best.pt")
        assert val[value] == metrics["validation"]
        assert {k: val[value][k] for k in ("val_clean", "val_pgd")} == {
            k: best["val"][k] for k in ("val_clean", "val_pgd")}
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
    assert calls and calls[0][0] == ("smoke", tuple(reproduce.ABLATION))
    assert calls[0][1]["data"] == "synthetic"


def test_two_stage_ablation_runs_where_the_schedule_allows_and_says_why_not(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": False, "embed_n": 20})
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    tiny = dict(dataset=ds, data="synthetic", width=4, proj_dim=16, train_subset=128, val_size=64,
                batch_size=64, attack_steps=1, val_attack_steps=1, progress=False,
                attacks=("clean",), log=lambda *_: None)
    # Half of smoke's one epoch: no room for two stages, which the summary says.
    one = reproduce.ablation("smoke", ("pretrain_fraction",), out=tmp_path / "one", **tiny)
    entry = one["params"]["pretrain_fraction"]
    assert entry["chosen"] == "0.0" and set(entry["validation"]) == {"0.0"}
    assert "each stage needs at least one" in entry["skipped"]["0.5"]
    assert not (tmp_path / "one" / "ablation_pretrain_fraction" / "pretrain_fraction-0.5").exists()
    # Four epochs, halved: one epoch of pre-training, one of probing.
    two = reproduce.ablation("smoke", ("pretrain_fraction",), out=tmp_path / "two", epochs=4,
                             **tiny)
    assert set(two["params"]["pretrain_fraction"]["validation"]) == {"0.0", "0.5"}
    run = tmp_path / "two" / "ablation_pretrain_fraction" / "pretrain_fraction-0.5"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["pretrain_fraction"] == 0.5 and metrics["selected_epoch"] == 2
    rows = (run / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[2] == "0.0"  # epoch 1: no cross-entropy


def test_values_that_name_the_same_run_train_it_once(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": False, "embed_n": 20})
    monkeypatch.setattr(reproduce, "ABLATION", {"beta": (0.0, 1.0), "lam": (1.0, 2.0)})
    trained = []
    real = reproduce.run_one
    monkeypatch.setattr(reproduce, "run_one",
                        lambda cfg, run_dir, *a: trained.append(run_dir.name) or real(cfg, run_dir, *a))
    log: list[str] = []
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    kw = dict(out=tmp_path, dataset=ds, data="synthetic", width=4, proj_dim=16, train_subset=64,
              val_size=32, batch_size=64, attack_steps=1, val_attack_steps=1, progress=False,
              attacks=("clean",), log=log.append)
    summary = reproduce.ablation("smoke", ("beta", "lam"), **kw)
    # lam = 1.0 is beta = 1.0's run (both defaults): trained once, its artifacts copied.
    assert trained == ["beta-0.0", "beta-1.0", "lam-2.0"]
    assert "ablation_lam/lam-1.0: same config as ablation_beta/beta-1.0, copied" in log
    original, copy = tmp_path / "ablation_beta" / "beta-1.0", tmp_path / "ablation_lam" / "lam-1.0"
    for name in ("metrics.json", "history.csv", "embeddings.npz", "per_image.npz"):
        checkpoint.verify(copy / name)
        assert (copy / name).read_bytes() == (original / name).read_bytes()
    assert summary["params"]["lam"]["validation"]["1.0"] == summary["params"]["beta"]["validation"]["1.0"]
    # A rerun skips everything, copies included.
    trained.clear()
    reproduce.ablation("smoke", ("beta", "lam"), **kw)
    assert len(trained) == 4 and log[-1].endswith("skipped (finished)")
    # A copy made for a call that asks for more than its twin was evaluated with says so.
    for name in ("metrics.json", "history.csv", "embeddings.npz", "per_image.npz"):
        for f in (copy / name, copy / f"{name}.sha256"):
            f.unlink()
    log.clear()
    reproduce.ablation("smoke", ("lam",), **{**kw, "attacks": ("clean", "pgd20")})
    assert trained[4:] == ["lam-2.0"]  # lam-1.0 is copied again, not trained
    assert (
        "ablation_lam/lam-1.0: same config as ablation_beta/beta-1.0, copied but evaluated "
        "without pgd20 (evaluate its best.pt with `python -m anchor_lib evaluate`, or move its "
        "folder away to run it again)") in log
    # A twin trained on other images is not copied: the run trains on this call's data (and the
    # next value, finished on the other images under the same label, is skipped and says so).
    for name in ("metrics.json", "history.csv", "embeddings.npz", "per_image.npz"):
        for f in (copy / name, copy / f"{name}.sha256"):
            f.unlink()
    other = data.synthetic(n_train=1024, n_test=64, size=16, seed=1)
    log.clear()
    reproduce.ablation("smoke", ("lam",), **{**kw, "dataset": other})
    assert trained[5:] == ["lam-1.0", "lam-2.0"]
    assert log[-1].startswith("ablation_lam/lam-2.0: skipped (finished); trained on other images")
    assert json.loads((copy / "metrics.json").read_text())["train_data_fingerprint"] \
        == other.fingerprint


def test_only_a_schedule_too_short_for_two_stages_is_skipped(monkeypatch):
    monkeypatch.setattr(reproduce, "ABLATION", {"temperature": (0.0,)})
    with pytest.raises(ValueError, match="temperature and lr must be > 0"):
        reproduce.ablation("smoke", ("temperature",), log=lambda *_: None)


def test_ablation_in_slots_keeps_earlier_choices_and_obeys_its_eval_settings(tmp_path, monkeypatch):
    """A GPU slot runs a few knobs at a time: the summary keeps the knobs of earlier calls (same
    profile, schedule and overrides), and --no-sanity / --attacks shape the test report only."""
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": True, "embed_n": 20})
    monkeypatch.setattr(reproduce, "ABLATION", {"beta": (0.0,), "lam": (2.0,)})
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    log: list[str] = []
    kw = dict(out=tmp_path, dataset=ds, data="synthetic", width=4, proj_dim=16, train_subset=64,
              val_size=32, batch_size=64, attack_steps=1, val_attack_steps=1, progress=False,
              attacks=("clean", "pgd20"), sanity=False, log=log.append)
    first = reproduce.ablation("smoke", ("beta",), **kw)
    second = reproduce.ablation("smoke", ("lam",), **kw)
    assert set(first["params"]) == {"beta"} and set(second["params"]) == {"beta", "lam"}
    assert second["params"]["beta"] == first["params"]["beta"]
    saved = json.loads((tmp_path / "ablation_summary.json").read_text())
    assert saved["params"] == second["params"] and saved["overrides"]["width"] == 4
    metrics = json.loads((tmp_path / "ablation_lam" / "lam-2.0" / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"clean", "pgd20"} and not metrics["sanity"]
    # Another schedule's summary is replaced, and the log says so.
    third = reproduce.ablation("smoke", ("lam",), **{**kw, "out": tmp_path}, epoch_fraction=1.0)
    assert set(third["params"]) == {"lam"}
    assert any("replaced" in line for line in log)


def test_cli_ablation_slot_options(monkeypatch, capsys):
    from anchor_lib import cli

    calls = []
    monkeypatch.setattr(reproduce, "ablation", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["reproduce", "--profile", "smoke", "--ablation", "--params", "beta",
                     "adv_in_contrastive", "--attacks", "clean,pgd20", "--no-sanity"]) == 0
    args, kwargs = calls[-1]
    assert args == ("smoke", ("beta", "adv_in_contrastive"))
    assert kwargs["attacks"] == ("clean", "pgd20") and kwargs["sanity"] is False
    assert cli.main(["reproduce", "--profile", "smoke", "--ablation"]) == 0
    assert calls[-1][0][1] == tuple(reproduce.ABLATION) and calls[-1][1]["sanity"] is None
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "--profile", "smoke", "--no-sanity"])
    assert exit_info.value.code == 2
    assert "--no-sanity applies only with --ablation" in capsys.readouterr().err


def _summary(out, profile="full", overrides=None, **chosen):
    import dataclasses

    from anchor_lib.train import TrainConfig

    params = {name: {"validation": {str(v): {"val_clean": 0.5, "val_pgd": 0.3}}, "chosen": str(v)}
              for name, v in chosen.items()}
    base = TrainConfig.from_profile(profile, method="anchor", **(overrides or {}))
    checkpoint.write_json(out / "ablation_summary.json",
                          {"profile": profile, "epoch_fraction": 0.5, "overrides": overrides or {},
                           "base_config": dataclasses.asdict(base),
                           "selection": "best validation PGD accuracy", "params": params})


def test_chosen_knobs_name_their_source(tmp_path):
    """The reproduction's ANCHOR run takes tau, beta and lambda from the ablation's validation
    choice where it has one, and says which knob is still a default; supcon_at (beta = 0 by
    definition) takes tau and lambda; the other methods have no knobs to choose."""
    assert {k: v["source"] for k, v in reproduce.chosen_knobs(tmp_path, "full", "anchor").items()} \
        == {"temperature": "default", "beta": "default", "lam": "default"}
    _summary(tmp_path, beta=0.5, adv_in_contrastive=False)
    knobs = reproduce.chosen_knobs(tmp_path, "full", "anchor")
    assert knobs["beta"]["value"] == 0.5 and isinstance(knobs["beta"]["value"], float)
    assert knobs["beta"]["source"] == "validation" and "0.5" in knobs["beta"]["validation"]
    assert knobs["lam"] == {"value": 1.0, "source": "default",
                            "note": "not chosen yet in ablation_summary.json"}
    assert set(knobs) == {"temperature", "beta", "lam"}  # the adversarial view is ablated only
    assert set(reproduce.chosen_knobs(tmp_path, "full", "supcon_at")) == {"temperature", "lam"}
    assert reproduce.chosen_knobs(tmp_path, "full", "pgd_at") == {}
    assert reproduce.chosen_knobs(tmp_path, "full", "anchor", {"beta": 2.0})["beta"] == \
        {"value": 2.0, "source": "override"}
    # Chosen at another profile or for another configuration: not this run's choice, and the
    # note says why; another seed is a replicate and shares the choice.
    other = reproduce.chosen_knobs(tmp_path, "smoke", "anchor")["beta"]
    assert other["source"] == "default" and "chosen at the full profile" in other["note"]
    other = reproduce.chosen_knobs(tmp_path, "full", "anchor", {"epochs": 3})["beta"]
    assert other["source"] == "default" and "another configuration (epochs)" in other["note"]
    assert reproduce.chosen_knobs(tmp_path, "full", "anchor",
                                  {"seed": 1})["beta"]["source"] == "validation"
    # A code default changed since the ablation ran: its runs were another configuration.
    saved = json.loads((tmp_path / "ablation_summary.json").read_text())
    saved["base_config"]["lr"] = 0.05
    checkpoint.write_json(tmp_path / "ablation_summary.json", saved)
    assert "another configuration (lr)" in reproduce.chosen_knobs(tmp_path, "full",
                                                                  "anchor")["beta"]["note"]
    (tmp_path / "ablation_summary.json").write_text('{"params": {}}')
    with pytest.raises(checkpoint.CheckpointError, match="is corrupted or truncated: sha256"):
        reproduce.chosen_knobs(tmp_path, "full", "anchor")
    # Verified but of the wrong kind: named, not an AttributeError from deep inside.
    checkpoint.write_json(tmp_path / "ablation_summary.json", [saved])
    with pytest.raises(checkpoint.CheckpointError, match="should hold a JSON object, not a list"):
        reproduce.chosen_knobs(tmp_path, "full", "anchor")


@pytest.mark.bad_input(cases=7)
def test_a_summary_of_another_shape_is_named_not_half_read(tmp_path):
    """A summary edited by hand into another shape, its sidecar rewritten: an error naming the
    file, the field, what was expected and what came, not "nothing chosen yet" or an
    AttributeError from deep inside."""
    _summary(tmp_path, beta=0.5)
    good = json.loads((tmp_path / "ablation_summary.json").read_text())
    cases = [
        (lambda s: s.pop("params"), r"'params' must be present"),
        (lambda s: s.update(params=[]), r"'params' must be an object mapping knob names"),
        (lambda s: s["params"].update(beta="0.5"), r"params\['beta'\] must be an object"),
        (lambda s: s.update(profile=["full"]), r"'profile' must be a profile name, got \['full'\]"),
        (lambda s: s.update(base_config=[1]), r"'base_config' must be an object, got \[1\]"),
        (lambda s: s.update(selection=3), r"'selection' must be a string, got 3"),
        (lambda s: s["params"]["beta"].update(chosen="abc"),
         r"params\['beta'\]\['chosen'\] must be a float value like '1.0', got 'abc'"),
    ]
    # Without base_config (summaries before it was recorded): another configuration, not damage.
    older = json.loads(json.dumps(good))
    del older["base_config"]
    checkpoint.write_json(tmp_path / "ablation_summary.json", older)
    assert "another configuration (not recorded)" in reproduce.chosen_knobs(
        tmp_path, "full", "anchor")["beta"]["note"]
    del older["profile"]
    checkpoint.write_json(tmp_path / "ablation_summary.json", older)
    assert reproduce.chosen_knobs(tmp_path, "full", "anchor")["beta"]["note"] == (
        "ablation_summary.json records no profile")
    for damage, match in cases:
        summary = json.loads(json.dumps(good))
        damage(summary)
        checkpoint.write_json(tmp_path / "ablation_summary.json", summary)
        with pytest.raises(checkpoint.CheckpointError, match=match):
            reproduce.chosen_knobs(tmp_path, "full", "anchor")
        if "chosen" not in match:  # (that one is read only where a knob takes it)
            with pytest.raises(checkpoint.CheckpointError, match=match):
                results.load_ablation_summary(tmp_path)


def test_reproduction_trains_anchor_with_the_knob_chosen_on_validation(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": False, "embed_n": 20})
    monkeypatch.setitem(reproduce.ABLATION, "beta", (0.0, 2.0))
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    log: list[str] = []
    tiny = dict(data="synthetic", width=4, proj_dim=16, train_subset=128, val_size=64,
                batch_size=64, attack_steps=1, val_attack_steps=1, progress=False)
    summary = reproduce.ablation("smoke", ("beta",), out=tmp_path, dataset=ds, attacks=("clean",),
                                 log=log.append, **tiny)
    chosen = float(summary["params"]["beta"]["chosen"])
    reproduce.reproduce("smoke", ("anchor",), tmp_path, dataset=ds, attacks=("clean",),
                        log=log.append, **tiny)
    metrics = json.loads((tmp_path / "smoke-anchor" / "metrics.json").read_text())
    assert metrics["config"]["beta"] == chosen
    assert metrics["knobs"]["beta"]["source"] == "validation"
    assert metrics["knobs"]["temperature"] == {"value": 0.1, "source": "default",
                                               "note": "not chosen yet in ablation_summary.json"}
    assert f"smoke-anchor: temperature = 0.1 (default), beta = {chosen} (validation), lam = 1.0 " \
           "(default); not chosen yet in ablation_summary.json" in log
    # A knob passed explicitly wins over the choice, and says so.
    reproduce.reproduce("smoke", ("anchor",), tmp_path / "other", dataset=ds, attacks=("clean",),
                        log=log.append, beta=0.5, **tiny)
    metrics = json.loads((tmp_path / "other" / "smoke-anchor" / "metrics.json").read_text())
    assert metrics["config"]["beta"] == 0.5 and metrics["knobs"]["beta"]["source"] == "override"
    # A later choice makes the finished run stale: an error naming the knob, never a skip.
    other = 2.0 if chosen == 0.0 else 0.0
    summary["params"]["beta"]["chosen"] = str(other)
    checkpoint.write_json(tmp_path / "ablation_summary.json", summary)
    with pytest.raises(ValueError, match=rf"beta = {other} now chosen on validation"):
        reproduce.reproduce("smoke", ("anchor",), tmp_path, dataset=ds, attacks=("clean",),
                            log=log.append, **tiny)


@pytest.mark.fault
def test_a_slot_that_ends_mid_ablation_keeps_the_knobs_it_finished(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.EVAL_SETTINGS, "smoke",
                        {"n": 32, "autoattack_n": 8, "sanity": False, "embed_n": 20})
    monkeypatch.setattr(reproduce, "ABLATION", {"beta": (0.0,), "lam": (2.0,)})
    real = reproduce.run_one

    def dies_on_lam(cfg, run_dir, *a, **k):
        if run_dir.name.startswith("lam"):
            raise KeyboardInterrupt  # the slot's time is up
        return real(cfg, run_dir, *a, **k)

    monkeypatch.setattr(reproduce, "run_one", dies_on_lam)
    ds = data.synthetic(n_train=1024, n_test=64, size=16, seed=0)
    with pytest.raises(KeyboardInterrupt):
        reproduce.ablation("smoke", ("beta", "lam"), out=tmp_path, dataset=ds, data="synthetic",
                           width=4, proj_dim=16, train_subset=64, val_size=32, batch_size=64,
                           attack_steps=1, val_attack_steps=1, progress=False, attacks=("clean",),
                           log=lambda *_: None)
    checkpoint.verify(tmp_path / "ablation_summary.json")
    saved = json.loads((tmp_path / "ablation_summary.json").read_text())
    assert set(saved["params"]) == {"beta"} and saved["params"]["beta"]["chosen"] == "0.0"


def test_full_reproduction_chooses_missing_knobs_first(tmp_path, monkeypatch):
    """At the full profile a contrastive run with a knob at its default would be stale once the
    ablation chooses: the reproduction runs the missing ablation first, before anything trains,
    unless the defaults are meant."""
    events = []
    monkeypatch.setattr(reproduce, "dataset_for", lambda cfg: data.synthetic())  # runs are stubs
    monkeypatch.setattr(reproduce, "run_one", lambda cfg, run_dir, *a, **k: events.append(
        (run_dir.name, cfg.beta, cfg.lam, (k.get("knobs") or {}).get("beta"))) or {
        "run": run_dir.name, "status": "done"})

    def fake_ablation(profile, params, out, **kw):  # what an ablation leaves: a summary
        events.append(("ablation", params, kw["attacks"], kw["sanity"]))
        _summary(Path(out), beta=0.5, lam=2.0, temperature=0.2)

    monkeypatch.setattr(reproduce, "ablation", fake_ablation)
    reproduce.reproduce("full", ("pgd_at", "supcon_at", "anchor"), tmp_path, log=lambda *_: None)
    assert events[0] == ("ablation", ("beta", "lam", "temperature"),
                         reproduce.ABLATION_ATTACKS, False)
    assert [e[:3] for e in events[1:]] == [("full-pgd_at", 1.0, 1.0), ("full-supcon_at", 1.0, 2.0),
                                           ("full-anchor", 0.5, 2.0)]
    assert events[-1][3]["source"] == "validation"
    # Chosen now: a second call trains without another ablation; --default-knobs skips it.
    events.clear()
    reproduce.reproduce("full", ("anchor",), tmp_path, log=lambda *_: None)
    assert [e[0] for e in events] == ["full-anchor"]
    events.clear()
    reproduce.reproduce("full", ("anchor",), tmp_path / "fresh", log=lambda *_: None,
                        default_knobs=True)
    assert events == [("full-anchor", 1.0, 1.0, {"value": 1.0, "source": "default",
                                                  "note": "no ablation_summary.json yet"})]
    # With some knobs chosen, --default-knobs keeps those and leaves the others at their defaults.
    events.clear()
    _summary(tmp_path / "some", beta=0.5)
    reproduce.reproduce("full", ("anchor",), tmp_path / "some", log=lambda *_: None,
                        default_knobs=True)
    assert [e[:3] for e in events] == [("full-anchor", 0.5, 1.0)]


@pytest.mark.bad_input
def test_a_knob_the_ablation_could_not_choose_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "run_one", lambda *a, **k: pytest.fail("trained anyway"))
    def ablation(profile, params, out, **kw):  # ran every value, chose beta only
        _summary(Path(out), beta=0.5)
        return {"out_of_time": {}}

    monkeypatch.setattr(reproduce, "ablation", ablation)
    with pytest.raises(ValueError, match=r"the ablation chose no value of lam, temperature .*"
                                         r"--default-knobs"):
        reproduce.reproduce("full", ("anchor",), tmp_path, log=lambda *_: None)


def test_cli_default_knobs_flag(monkeypatch):
    from anchor_lib import cli

    calls = []
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: calls.append(k))
    assert cli.main(["reproduce", "--profile", "full", "--methods", "anchor",
                     "--default-knobs"]) == 0
    assert calls[-1]["default_knobs"] is True
    assert cli.main(["reproduce", "--profile", "full", "--methods", "anchor"]) == 0
    assert calls[-1]["default_knobs"] is False


def test_a_device_override_keeps_the_ablations_choice(tmp_path):
    """The device is no part of the configuration a choice was made for: a Python caller that
    passes ``device="cuda"`` (or "cpu") gets the ablation's values, not the defaults (which
    made ``reproduce("full", device=...)`` rerun the ablation and then fail)."""
    _summary(tmp_path, beta=0.5, overrides={"device": "cpu"})
    for device in ("cpu", "auto", "cuda"):
        knobs = reproduce.chosen_knobs(tmp_path, "full", "anchor", {"device": device})
        assert (knobs["beta"]["value"], knobs["beta"]["source"]) == (0.5, "validation"), device


def test_overrides_reach_every_run_trades_beta_included(tmp_path, monkeypatch):
    """``overrides`` apply to every run: TRADES' beta is 6 unless the caller overrides it."""
    seen = {}
    monkeypatch.setattr(reproduce, "dataset_for", lambda cfg: data.synthetic())  # runs are stubs
    monkeypatch.setattr(reproduce, "run_one", lambda cfg, run_dir, *a, **k: (
        seen.__setitem__(cfg.method, cfg.trades_beta), {"run": run_dir.name, "status": "done"})[1])
    reproduce.reproduce("smoke", ("trades",), tmp_path, log=lambda *a: None)
    assert seen == {"trades": 6.0}
    reproduce.reproduce("smoke", ("trades",), tmp_path, log=lambda *a: None, trades_beta=3.0)
    assert seen == {"trades": 3.0}


def test_the_ablation_grid_is_issue_5s():
    """β ∈ {0, 0.5, 1, 2} and the adversarial view in or out of the contrastive term (issue 5),
    besides λ, τ and the two-stage variant; every knob's list holds TrainConfig's default, so the
    default run is one of each ablation's (trained once, copied)."""
    from anchor_lib.train import TrainConfig

    assert reproduce.ABLATION["beta"] == (0.0, 0.5, 1.0, 2.0)
    assert set(reproduce.ABLATION["adv_in_contrastive"]) == {True, False}
    default = TrainConfig(method="anchor")
    for param, values in reproduce.ABLATION.items():
        assert getattr(default, param) in values, param


def test_one_reproduction_loads_the_data_once_and_not_for_runs_that_do_not_fit(tmp_path,
                                                                             monkeypatch):
    """The ablation that a full reproduction runs first shares the reproduction's data (one
    load, one fingerprint of CIFAR-10 per call), and values left out for time load nothing."""
    loads = []
    monkeypatch.setattr(reproduce, "dataset_for",
                        lambda cfg: loads.append(cfg.method) or data.synthetic())
    monkeypatch.setattr(reproduce, "run_one", lambda cfg, run_dir, settings, dataset, *a, **k: (
        _fake_finished_run(run_dir, cfg, dataset), {"run": run_dir.name, "status": "done"})[1])
    reproduce.reproduce("full", ("pgd_at", "anchor"), tmp_path, log=lambda *_: None)
    assert len(loads) == 1
    # A slot with no time for any value: nothing runs, nothing is loaded.
    loads.clear()
    monkeypatch.setattr(reproduce.Budget, "admits", lambda self, *a, **k: False)
    reproduce.ablation("smoke", ("lam",), tmp_path / "slot", log=lambda *_: None)
    assert loads == []


def _fake_finished_run(run_dir, cfg, dataset) -> None:
    """What a finished run leaves that the ablation reads: metrics.json with its validation."""
    checkpoint.write_json(run_dir / "metrics.json", {
        "config": dataclasses.asdict(cfg), "train_data": dataset.label,
        "train_data_fingerprint": dataset.fingerprint,
        "validation": {"val_clean": 0.5, "val_pgd": 0.3}})
