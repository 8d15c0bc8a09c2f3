"""anchor_lib.budget: a run starts only when the finished runs say it fits in the time left.

GPU slots end hard, and a full-profile run cut short is lost whole; these tests build finished
runs with known timings (metrics.json and history.csv, as the trainer writes them) and check the
estimate, the decision and what reproduce and the ablation do with it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from anchor_lib import budget, checkpoint, data, provenance
from anchor_lib import reproduce as rep
from anchor_lib.train import TrainConfig

CPU = provenance.hardware("cpu")
ALL = ("clean", "fgsm", "pgd20", "cw", "autoattack")


def fake_run(folder: Path, cfg: TrainConfig, epoch_seconds: list[float], eval_seconds: float,
             *, attacks=ALL, sanity: bool = True, hardware: str = CPU,
             search: str | None = None, compiled: bool | None = None) -> Path:
    """A finished run of ``cfg`` in ``folder`` whose epochs and evaluation took these times
    (``search``: the eval_search it records; ``compiled``: whether it compiled; None for either:
    not recorded, as by runs before it was)."""
    rows = "".join(f"{i + 1},{s}\n" for i, s in enumerate(epoch_seconds))
    checkpoint.write_text(folder / "history.csv", "epoch,seconds\n" + rows)
    checkpoint.write_json(folder / "metrics.json", {
        "method": cfg.method, "profile": cfg.profile, "hardware": hardware,
        "config": dataclasses.asdict(cfg), "eval_seconds": eval_seconds,
        "accuracy": {a: {"value": 0.5, "n": 100} for a in attacks},
        "sanity": {"more_steps": {"passed": True}} if sanity else {},
        **({"eval_search": search} if search else {}),
        **({"compiled": compiled} if compiled is not None else {})})
    return folder


def full(method: str, **changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig.from_profile("full", method=method), **changes)


@pytest.fixture()
def results(tmp_path) -> Path:
    """Two ablation runs of anchor (15 epochs; the first compiled: 40 s first epoch) and the full
    PGD-AT run, timed like the H100 runs of 2026-11-27."""
    out = tmp_path / "results"
    fake_run(out / "ablation_beta" / "beta-1.0", full("anchor", epochs=15),
             [40.0, 6.0, 6.5, 6.0], 46.0, attacks=rep.ABLATION_ATTACKS, sanity=False)
    fake_run(out / "ablation_beta" / "beta-2.0", full("anchor", epochs=15, beta=2.0),
             [6.4, 6.3, 6.6], 47.0, attacks=rep.ABLATION_ATTACKS, sanity=False)
    fake_run(out / "full-pgd_at", full("pgd_at"), [11.6, 9.5, 9.6], 339.0)
    return out


#: What the fixture's runs give: the slowest first epoch, and the median over the runs of their
#: median later epoch (6.0 and 6.45).
FIRST, LATER = 40.0, (6.0 + 6.45) / 2


def test_estimate_takes_the_slowest_first_epoch_and_a_like_evaluation(results):
    guess = budget.estimate(results, full("anchor"), attacks=ALL, sanity=True, hardware=CPU)
    assert guess.seconds == pytest.approx((FIRST + 29 * LATER + 339) * budget.MARGIN)
    assert guess.basis == ("epochs timed by ablation_beta/beta-1.0, ablation_beta/beta-2.0; "
                           "evaluation by full-pgd_at")
    # supcon_at is anchor with beta = 0: the same passes, so the same epochs.
    same = budget.estimate(results, full("supcon_at"), attacks=ALL, sanity=True, hardware=CPU)
    assert same.seconds == pytest.approx(guess.seconds)
    # An ablation run: its own short evaluation, without AutoAttack and the sanity checks.
    short = budget.estimate(results, full("anchor", epochs=15, lam=2.0),
                            attacks=rep.ABLATION_ATTACKS, sanity=False, hardware=CPU)
    assert short.seconds == pytest.approx((FIRST + 14 * LATER + 47) * budget.MARGIN)


def test_estimate_prefers_the_same_methods_evaluation(results):
    fake_run(results / "full-anchor-seed1", full("anchor", seed=1), [40.0, LATER], 100.0)
    guess = budget.estimate(results, full("anchor"), attacks=ALL, sanity=True, hardware=CPU)
    assert "evaluation by full-anchor-seed1" in guess.basis
    assert guess.seconds == pytest.approx((FIRST + 29 * LATER + 100) * budget.MARGIN)


def test_a_tf32_search_is_timed_by_the_same_methods_tf32_evaluation_else_its_fp32_one(results):
    """Same method first (AutoAttack on a robust model is slow), then the same search; an fp32
    evaluation timing a TF32 one adds its PGD-20 (TF32 runs PGD-20 twice)."""
    def tf32(method):
        return budget.estimate(results, full(method), attacks=ALL, sanity=True, hardware=CPU,
                               search="tf32")
    pgd20 = 18.0  # full-pgd_at's PGD-20 seconds, set below
    metrics_path = results / "full-pgd_at" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["accuracy"]["pgd20"]["seconds"] = pgd20
    checkpoint.write_json(metrics_path, metrics)
    assert tf32("pgd_at").seconds == pytest.approx((11.6 + 29 * 9.55 + 339 + pgd20)
                                                   * budget.MARGIN)
    # A TF32 run of another method does not time pgd_at's AutoAttack-bound evaluation...
    fake_run(results / "full-standard", full("standard"), [3.0, 2.0], 20.0, search="tf32")
    assert "evaluation by full-pgd_at" in tf32("pgd_at").basis
    # ...but pgd_at's own TF32 run does, and then nothing is added.
    fake_run(results / "full-pgd_at-seed1", full("pgd_at", seed=1), [11.6, 9.5, 9.6], 120.0,
             search="tf32")
    guess = tf32("pgd_at")
    assert "evaluation by full-pgd_at-seed1" in guess.basis
    assert guess.seconds == pytest.approx((11.6 + 29 * 9.55 + 120) * budget.MARGIN)
    # A method with no run of its own is timed by the longest evaluation of any search: here
    # PGD-AT's fp32 one and its PGD-20, not the standard run's quick TF32 one.
    assert "evaluation by full-pgd_at;" in tf32("anchor").basis + ";"
    assert tf32("anchor").seconds == pytest.approx((FIRST + 29 * LATER + 339 + pgd20)
                                                   * budget.MARGIN)
    # supcon_at and anchor count as one method: anchor's TF32 run times supcon_at's.
    fake_run(results / "full-anchor", full("anchor"), [40.0, LATER], 150.0, search="tf32")
    assert "evaluation by full-anchor;" in tf32("supcon_at").basis + ";"
    # An fp32 evaluation is never timed by a TF32 one (older runs without the field are fp32).
    fp32 = budget.estimate(results, full("pgd_at"), attacks=ALL, sanity=True, hardware=CPU)
    assert "evaluation by full-pgd_at;" in fp32.basis + ";" and fp32.seconds == pytest.approx(
        (11.6 + 29 * 9.55 + 339) * budget.MARGIN)


def test_estimate_is_not_thrown_by_odd_runs(results):
    """A one-epoch run has no later epoch (its first, compiling one must not stand in for them);
    a run that records what it took beyond training and evaluation adds that; a compiled run
    does not time an uncompiled one."""
    fake_run(results / "ablation_x" / "one-epoch", full("anchor", epochs=1, lr=0.1), [500.0],
             40.0, attacks=rep.ABLATION_ATTACKS, sanity=False)
    guess = budget.estimate(results, full("anchor"), attacks=ALL, sanity=True, hardware=CPU)
    assert guess.seconds == pytest.approx((500 + 29 * LATER + 339) * budget.MARGIN)
    metrics = json.loads((results / "full-pgd_at" / "metrics.json").read_text())
    checkpoint.write_json(results / "full-pgd_at" / "metrics.json",
                          {**metrics, "train_seconds": 30.7, "run_seconds": 400.0})
    guess = budget.estimate(results, full("anchor"), attacks=ALL, sanity=True, hardware=CPU)
    assert guess.seconds == pytest.approx((500 + 29 * LATER + 339 + 30.3) * budget.MARGIN)
    # Of several runs' extra times, the largest counts (a run cut short is lost whole).
    run = results / "ablation_beta" / "beta-2.0"
    metrics = json.loads((run / "metrics.json").read_text())
    checkpoint.write_json(run / "metrics.json",
                          {**metrics, "train_seconds": 19.3, "run_seconds": 71.3})
    guess = budget.estimate(results, full("anchor"), attacks=ALL, sanity=True, hardware=CPU)
    assert guess.seconds == pytest.approx((500 + 29 * LATER + 339 + 30.3) * budget.MARGIN)
    for d in results.glob("ablation_*/*"):
        metrics = json.loads((d / "metrics.json").read_text())
        checkpoint.write_json(d / "metrics.json", {**metrics, "compiled": True})
    # On this CPU the full profile does not compile: no compiled run times it.
    assert budget.estimate(results, full("anchor"), attacks=ALL, sanity=True,
                           hardware=CPU) is None


def test_a_two_epoch_runs_second_epoch_times_the_later_epochs(tmp_path):
    """The one run that trains alike has two epochs: its second (not its compiling first) times
    each further epoch."""
    fake_run(tmp_path / "full-pgd_at", full("pgd_at"), [10.0, 4.0], 300.0)
    guess = budget.estimate(tmp_path, full("pgd_at"), attacks=ALL, sanity=True, hardware=CPU)
    assert guess.seconds == pytest.approx((10.0 + 29 * 4.0 + 300.0) * budget.MARGIN)


def test_an_older_runs_missing_fields_are_the_defaults_it_trained_with(results):
    """A run written before a config field existed trained with that field's default, whatever
    the run being timed asks for."""
    run = results / "ablation_beta" / "beta-2.0"
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["config"]["adv_in_contrastive"]
    checkpoint.write_json(run / "metrics.json", metrics)
    without = full("anchor", epochs=15, adv_in_contrastive=False)
    assert budget.estimate(results, without, attacks=rep.ABLATION_ATTACKS, sanity=False,
                           hardware=CPU) is None
    guess = budget.estimate(results, full("anchor", epochs=15), attacks=rep.ABLATION_ATTACKS,
                            sanity=False, hardware=CPU)
    assert "beta-2.0" in guess.basis


@pytest.mark.parametrize("case", ["other hardware", "other width", "other method",
                                  "other attacks", "other data"])
def test_no_estimate_without_a_like_run(results, case):
    cfg, kwargs = full("anchor"), {"attacks": ALL, "sanity": True, "hardware": CPU}
    if case == "other hardware":
        kwargs["hardware"] = "NVIDIA H100 80GB HBM3"
    elif case == "other width":
        cfg = full("anchor", width=32)
    elif case == "other data":  # the first of the cost keys after the method
        cfg = full("anchor", data="synthetic")
    elif case == "other method":
        cfg = full("trades")  # TRADES' epochs cost more than PGD-AT's: no precedent
    else:
        kwargs["attacks"] = ("clean", "pgd20")
    assert budget.estimate(results, cfg, **kwargs) is None


def test_a_damaged_run_is_not_a_precedent_nor_finished(results):
    (results / "full-pgd_at" / "metrics.json").write_text("{}")
    assert budget.estimate(results, full("anchor"), attacks=ALL, sanity=True,
                           hardware=CPU) is None
    assert [d.name for d, _ in budget.finished_runs(results)] == ["beta-1.0", "beta-2.0"]
    # run_one trains a damaged run again, so it is timed like any other, not waved through.
    tight = budget.Budget(1, results, lambda _: None)
    assert tight.judge(full("pgd_at"), results / "full-pgd_at", ALL, True) == "unknown"
    # Intact files (their hashes match) that are not a run's metrics are no run either.
    for not_metrics in ({"method": "pgd_at"}, {"config": "full"}, ["config"]):
        checkpoint.write_json(results / "full-pgd_at" / "metrics.json", not_metrics)
        assert [d.name for d, _ in budget.finished_runs(results)] == ["beta-1.0", "beta-2.0"]


def test_budget_admits_what_fits_and_says_why_not(results):
    logs: list[str] = []
    cfg = full("anchor")
    assert budget.Budget(None, results).admits(cfg, results / "full-anchor", ALL, True)
    tight = budget.Budget(500, results, logs.append)
    assert not tight.admits(cfg, results / "full-anchor", ALL, True)
    need = budget.estimate(results, cfg, attacks=ALL, sanity=True, hardware=CPU).seconds
    assert f"full-anchor: not started: it needs about {need:.0f} s" in logs[-1]
    assert "s of the time budget are left" in logs[-1]
    # A finished run is skipped, not trained: always admitted.
    assert tight.admits(full("pgd_at"), results / "full-pgd_at", ALL, True)
    # No precedent (and no bound: nothing is cheaper than standard): started while time is left.
    assert tight.admits(full("standard"), results / "full-standard", ALL, True)
    assert "no finished run on" in logs[-1] and "starting it with" in logs[-1]
    # No precedent and no time left: not started, and the log says so (it used to say nothing).
    spent = budget.Budget(500, results, logs.append)
    spent.deadline -= 501
    assert not spent.admits(full("standard"), results / "full-standard", ALL, True)
    assert logs[-1] == (f"full-standard: not started: the time budget is spent (and no finished "
                        f"run on {CPU} times it)")
    assert budget.Budget(700, results).admits(cfg, results / "full-anchor", ALL, True)
    with pytest.raises(ValueError, match="time_budget must be a number of seconds > 0, got 0"):
        budget.Budget(0, results)


@pytest.mark.parametrize("method", ["trades", "supcon_at", "anchor"])
def test_a_run_without_precedent_is_bounded_by_a_cheaper_methods(tmp_path, method):
    """TRADES, SupCon-AT and ANCHOR make PGD-AT's attack and more passes: with no precedent of
    their own, a like PGD-AT run that would not fit keeps them from starting blind (a dry run of a
    GPU slot saw such a run start with 105 s left, to be cut off)."""
    out = tmp_path / "results"
    fake_run(out / "full-pgd_at", full("pgd_at"), [11.6, 9.5, 9.6], 339.0, compiled=False)
    cfg = full(method, adv_in_contrastive=False) if method == "anchor" else full(method)
    bound = budget.lower_bound(out, cfg, attacks=ALL, sanity=True, hardware=CPU)
    pgd_at = budget.estimate(out, full("pgd_at"), attacks=ALL, sanity=True, hardware=CPU)
    assert budget.estimate(out, cfg, attacks=ALL, sanity=True, hardware=CPU) is None
    assert bound.seconds == pgd_at.seconds and "full-pgd_at" in bound.basis
    logs: list[str] = []
    short = budget.Budget(bound.seconds - 5, out, logs.append)
    assert short.judge(cfg, out / f"full-{method}", ALL, True) == "too long"
    assert not short.admits(cfg, out / f"full-{method}", ALL, True)
    assert logs[-1].startswith(f"full-{method}: not started: no finished run times it, but it "
                               f"trains at least as much as a pgd_at run, which needs about "
                               f"{bound.seconds:.0f} s (epochs timed by full-pgd_at")
    # Where the cheaper run would fit, the run still has no estimate of its own: started last.
    roomy = budget.Budget(bound.seconds + 60, out, logs.append)
    assert roomy.judge(cfg, out / f"full-{method}", ALL, True) == "unknown"
    assert roomy.admits(cfg, out / f"full-{method}", ALL, True)


def test_only_a_run_compiled_as_this_one_would_be_bounds_it(tmp_path):
    """An uncompiled PGD-AT epoch can take longer than a compiled ANCHOR one (6.8 s graphed
    against 6.3 to 6.7 s on the H100), so it bounds nothing of a compiled run, nor does a run that
    does not record compiling (the committed full PGD-AT run, which then bounded ANCHOR at 670 s
    above its own 619-s estimate)."""
    out, cfg = tmp_path / "results", full("trades")  # compiles on CUDA only: not here
    for compiled in (True, None):
        fake_run(out / "full-pgd_at", full("pgd_at"), [11.6, 9.5, 9.6], 339.0, compiled=compiled)
        assert budget.lower_bound(out, cfg, attacks=ALL, sanity=True, hardware=CPU) is None
        # estimate itself still lets an older run that records neither time either
        assert (budget.estimate(out, full("pgd_at"), attacks=ALL, sanity=True, hardware=CPU)
                is None) is (compiled is True)


@pytest.mark.parametrize("cfg", [full("standard"), full("anchor", epochs=10, pretrain_fraction=0.5)],
                         ids=["standard", "two-stage"])
def test_no_bound_for_standard_nor_the_two_stage_variant(tmp_path, cfg):
    """Standard training makes no attack, and the two-stage variant's pre-training may make none:
    neither costs at least PGD-AT, so a PGD-AT run bounds neither."""
    out = tmp_path / "results"
    fake_run(out / "full-pgd_at", full("pgd_at", epochs=cfg.epochs), [11.6, 9.5, 9.6], 339.0,
             compiled=False)
    assert budget.lower_bound(out, cfg, attacks=ALL, sanity=True, hardware=CPU) is None
    assert budget.Budget(1, out, lambda _: None).judge(cfg, out / "x", ALL, True) == "unknown"


def _huge_precedent(out: Path) -> None:
    """A finished full-profile anchor run timed at a day per epoch (another lr, so that the
    ablation does not take it for one of its own runs and copy it)."""
    fake_run(out / "ablation_old" / "slow", full("anchor", epochs=15, lr=0.1),
             [86400.0, 86400.0], 10.0, attacks=rep.ABLATION_ATTACKS, sanity=False)


def test_ablation_leaves_a_knob_unchosen_when_a_value_does_not_fit(tmp_path):
    out = tmp_path / "results"
    _huge_precedent(out)
    logs: list[str] = []
    summary = rep.ablation("full", ("temperature",), out, attacks=rep.ABLATION_ATTACKS,
                           sanity=False, log=logs.append, time_budget=600)
    assert "temperature" not in summary["params"]
    assert any("ablation_temperature: not chosen in this call (0.1, 0.2 did not fit" in line
               for line in logs), logs
    assert not (out / "ablation_temperature").exists()  # nothing was started


def test_reproduce_lets_the_methods_that_need_unchosen_knobs_wait(tmp_path):
    out = tmp_path / "results"
    _huge_precedent(out)
    logs: list[str] = []
    statuses = rep.reproduce("full", ("anchor", "supcon_at"), out, log=logs.append,
                             time_budget=600)
    assert statuses == [
        {"run": "full-anchor", "status": "not started (waits for beta, lam, temperature)"},
        {"run": "full-supcon_at", "status": "not started (waits for lam, temperature)"}]


def test_reproduce_skips_a_method_that_does_not_fit_and_runs_the_next(tmp_path, monkeypatch):
    monkeypatch.setitem(rep.EVAL_SETTINGS, "smoke",
                        {"n": 48, "autoattack_n": 16, "sanity": False, "embed_n": 40})
    out = tmp_path / "results"
    slow = dataclasses.replace(TrainConfig.from_profile("smoke", method="pgd_at", data="synthetic"),
                               lr=0.01)
    fake_run(out / "ablation_old" / "slow", slow, [86400.0], 1.0, attacks=("clean", "pgd20"),
             sanity=False)
    logs: list[str] = []
    statuses = rep.reproduce("smoke", ("pgd_at", "standard"), out, attacks=("clean", "pgd20"),
                             log=logs.append, time_budget=3600, data="synthetic", progress=False)
    assert statuses[0] == {"run": "smoke-pgd_at", "status": "not started (time budget)"}
    assert statuses[1]["run"] == "smoke-standard" and statuses[1]["status"].startswith("done in")
    assert not (out / "smoke-pgd_at").exists()
    assert json.loads((out / "smoke-standard" / "metrics.json").read_text())["method"] == "standard"


def test_reproduce_starts_the_timed_runs_first_and_the_untimed_last(tmp_path, monkeypatch):
    """Under a budget a run no finished run can time starts after those that can: cut by the
    slot's end, it would otherwise cost a run known to fit."""
    out = tmp_path / "results"
    quick = dataclasses.replace(TrainConfig.from_profile("smoke", method="pgd_at"), lr=0.01)
    fake_run(out / "ablation_old" / "quick", quick, [1.0, 1.0], 1.0)
    started = []

    def fake_run_one(cfg, run_dir, *args, **kwargs):
        started.append(run_dir.name)
        return {"run": run_dir.name, "status": "done in 0.0 s"}

    monkeypatch.setattr(rep, "run_one", fake_run_one)
    monkeypatch.setattr(rep, "dataset_for", lambda cfg: data.synthetic())  # the runs are stubs
    statuses = rep.reproduce("smoke", ("standard", "pgd_at"), out, log=lambda _: None,
                             time_budget=3600)
    assert started == ["smoke-pgd_at", "smoke-standard"]
    assert [s["run"] for s in statuses] == started
    # Without a budget, the order given.
    started.clear()
    rep.reproduce("smoke", ("standard", "pgd_at"), out, log=lambda _: None)
    assert started == ["smoke-standard", "smoke-pgd_at"]


def test_a_knob_unchosen_for_another_reason_than_time_is_an_error(tmp_path, monkeypatch):
    """The budget lets methods wait for knobs the ablation had no time for, not for knobs it
    ran and could not choose: that stays the error it is without a budget."""
    monkeypatch.setattr(rep, "ablation", lambda *a, **k: {"params": {}, "out_of_time": {
        "temperature": ["0.2"]}})
    with pytest.raises(ValueError, match=r"the ablation chose no value of beta, lam \(see"):
        rep.reproduce("full", ("anchor",), tmp_path, log=lambda _: None, time_budget=600)


def test_a_gpu_without_runs_of_its_own_is_timed_by_the_slowest_other_gpu(tmp_path):
    """The lent GPU changed from an H100 to an H200: the H100's runs time the H200's first slot,
    the slower of two other GPUs when there are two, and never a CPU's runs; a GPU's own runs
    come first."""
    out = tmp_path / "results"
    h100, a100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H200"
    fake_run(out / "full-pgd_at", full("pgd_at"), [11.6, 9.5, 9.6], 339.0, hardware=h100)

    def on(hardware):
        return budget.estimate(out, full("pgd_at", seed=1), attacks=ALL, sanity=True,
                               hardware=hardware)

    fast = on(h200)
    assert fast.seconds == pytest.approx((11.6 + 29 * 9.55 + 339) * budget.MARGIN)
    assert fast.basis.endswith(f"; on {h100}, since no finished run on {h200} times it")
    assert on(CPU) is None                               # a CPU is not timed by a GPU
    fake_run(out / "full-pgd_at-a100", full("pgd_at", seed=2), [20.0, 18.0], 500.0, hardware=a100)
    slow = on(h200)
    assert slow.seconds == pytest.approx((20.0 + 29 * 18.0 + 500) * budget.MARGIN)
    assert f"on {a100}," in slow.basis
    fake_run(out / "full-pgd_at-h200", full("pgd_at", seed=3), [9.0, 7.0], 300.0, hardware=h200)
    own = on(h200)
    assert own.seconds == pytest.approx((9.0 + 29 * 7.0 + 300) * budget.MARGIN)
    assert "since no finished run" not in own.basis
    # nor is a GPU timed by a CPU
    fake_run(tmp_path / "cpu" / "full-pgd_at", full("pgd_at"), [1.0, 1.0], 1.0)
    assert budget.estimate(tmp_path / "cpu", full("pgd_at", seed=1), attacks=ALL, sanity=True,
                           hardware=h200) is None
