"""anchor_lib.train on small synthetic tasks: methods work, robustness appears, resume is exact."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from tasks import contrastive_loss_by_definition

from anchor_lib import attacks, checkpoint, data, distributed, evaluate
from anchor_lib.train import (
    METHODS,
    NonFiniteLossError,
    TrainConfig,
    build_model,
    load_model,
    load_run_data,
    resume_differences,
    train,
    training_loss,
)


def tiny(method: str = "standard", **overrides) -> TrainConfig:
    base = dict(method=method, data="synthetic", width=4, proj_dim=16, epochs=1, batch_size=64,
                lr=0.05, train_subset=256, val_size=64, attack_steps=3, val_attack_steps=3,
                eps=8 / 255, alpha=3 / 255, progress=False, log_every=2, device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def small_data():
    return data.synthetic(n_train=1024, n_test=256, size=16, noise=0.1, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(method, small_data):
    history = train(tiny(method), dataset=small_data)
    row = history[-1]
    for key in ("loss", "ce", "train_acc", "val_clean", "val_pgd", "lr", "seconds"):
        assert key in row and row[key] == row[key], f"{key} missing or NaN"
    assert 0.0 <= row["val_pgd"] <= row["val_clean"] <= 1.0
    if method in ("supcon_at", "anchor"):
        assert row["con"] > 0


def test_pgd_at_is_more_robust_than_standard(small_data, tmp_path):
    """The point of adversarial training, on a task where eps is large enough to matter."""
    eps = 16 / 255
    kw = dict(epochs=4, lr=0.1, train_subset=512, eps=eps, alpha=eps / 3, attack_steps=3, width=8)
    x, y = data.to_float(small_data.x_test), small_data.y_test
    attack = partial(attacks.pgd, eps=eps, alpha=eps / 4, steps=10)
    robust = {}
    for method in ("standard", "pgd_at"):
        train(tiny(method, out_dir=str(tmp_path / method), **kw), dataset=small_data)
        model, _ = load_model(tmp_path / method / "best.pt")
        robust[method] = evaluate.robust_accuracy(model, x, y, attack)
    assert robust["pgd_at"] > robust["standard"] + 0.2, robust


def test_anchor_loss_falls(small_data):
    history = train(tiny("anchor", epochs=3, train_subset=512), dataset=small_data)
    assert history[-1]["con"] < history[0]["con"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_matches_uninterrupted_bit_for_bit(tmp_path, small_data):
    full = tiny("anchor", epochs=2, out_dir=str(tmp_path / "full"))
    train(full, dataset=small_data)
    half = tiny("anchor", epochs=2, out_dir=str(tmp_path / "resumed"))
    # Train one epoch by asking for a NaN at the start of epoch 2; the checkpoint of epoch 1 stays.
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 1"):
        train(half, dataset=small_data, fail_at=(1, 0))
    history = train(half, resume=True, dataset=small_data)
    assert [r["epoch"] for r in history] == [1, 2]
    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")["model"]
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_stops_with_epoch_and_step_and_keeps_last_good(tmp_path, small_data):
    cfg = tiny("pgd_at", epochs=2, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3.*last good checkpoint"):
        train(cfg, dataset=small_data, fail_at=(1, 2))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())
    # Without an output folder there is no checkpoint to point to, and the message says none.
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2\. Lower the learning rate"):
        train(tiny("pgd_at"), dataset=small_data, fail_at=(0, 1))


def test_resume_refuses_a_different_config(tmp_path, small_data):
    train(tiny("pgd_at", out_dir=str(tmp_path)), dataset=small_data)
    with pytest.raises(ValueError, match="differs in .*lr"):
        train(tiny("pgd_at", out_dir=str(tmp_path), lr=0.5), resume=True, dataset=small_data)


@pytest.mark.bad_input
def test_resume_refuses_other_data(tmp_path, small_data):
    """A run resumed on another copy of the data would mix two datasets in one model under one
    label: refused whether the label differs or only the images (the fingerprint)."""
    cfg = tiny("pgd_at", out_dir=str(tmp_path))
    train(cfg, dataset=small_data)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["data"] == small_data.label and state["data_fingerprint"] == small_data.fingerprint
    pixel = small_data.x_train.clone()
    pixel[0, 0, 0, 0] ^= 1  # one bit of one image
    same_label = data.CIFAR10(pixel, small_data.y_train, small_data.x_test, small_data.y_test,
                              small_data.label, "a copy")
    other_label = dataclasses.replace(small_data, label="CIFAR-10 (JPEG q75 copy)")
    for other in (same_label, other_label):
        with pytest.raises(ValueError, match=r"cannot resume .*: it was trained on .*fingerprint "
                                             r".*this run's data is .*ANCHOR_DATA_DIR"):
            train(cfg, resume=True, dataset=other)
    assert len(train(cfg, resume=True, dataset=small_data)) == 1  # its own data: nothing left


@pytest.mark.bad_input
def test_resume_refuses_another_process_count(tmp_path, small_data):
    """BatchNorm normalises each process's slice of the batch, so a run trained by two
    processes cannot be continued by one (nor the reverse) as if nothing changed."""
    cfg = tiny("pgd_at", out_dir=str(tmp_path))
    train(cfg, dataset=small_data)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["processes"] == 1
    checkpoint.save({**state, "processes": 2}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\), this run has 1 .*"
                                         r"torchrun --nproc_per_node=2"):
        train(cfg, resume=True, dataset=small_data)
    # And a one-process run continued under torchrun: told to resume without it.
    run = load_run_data(cfg, torch.device("cpu"), small_data)
    assert resume_differences(state, run, 2).endswith("resume it without torchrun")
    assert resume_differences(state, run, 1) == ""
    # Checkpoints written before the count was recorded count as one process's.
    checkpoint.save({k: v for k, v in state.items() if k != "processes"},
                    tmp_path / "checkpoint.pt")
    assert len(train(cfg, resume=True, dataset=small_data)) == 1


def test_a_resumed_run_records_who_trained_each_stretch_of_epochs(tmp_path, small_data,
                                                                  monkeypatch):
    """A run resumed across GPU slots may change commit (or hardware) between slots: the
    checkpoint and best.pt list each stretch of epochs with the commit that trained it."""
    cfg = tiny("pgd_at", epochs=3, out_dir=str(tmp_path))
    monkeypatch.setenv("ANCHOR_COMMIT", "aaaa")
    with pytest.raises(NonFiniteLossError):
        train(cfg, dataset=small_data, fail_at=(2, 0))  # epochs 1 and 2, then a stop
    monkeypatch.setenv("ANCHOR_COMMIT", "bbbb")
    train(cfg, resume=True, dataset=small_data)
    segments = checkpoint.load(tmp_path / "checkpoint.pt")["segments"]
    assert [(s["first_epoch"], s["last_epoch"], s["commit"], s["processes"]) for s in segments] \
        == [(1, 2, "aaaa", 1), (3, 3, "bbbb", 1)]
    assert all(s["hardware"] and s["torch"] == str(torch.__version__) for s in segments)
    best = checkpoint.load(tmp_path / "best.pt")
    assert best["segments"][-1]["last_epoch"] == best["epoch"] + 1  # up to the selected epoch
    assert best["processes"] == 1 and best["data_fingerprint"] == small_data.fingerprint


def test_each_process_holds_only_its_shard_of_the_training_split(small_data):
    """Under torchrun the training split is sharded before it moves to the device, so a process
    holds its share (not the whole set, as a strided view of it would)."""
    cfg = tiny("pgd_at")
    whole = load_run_data(cfg, torch.device("cpu"), small_data)
    for rank in (0, 1):
        ctx = distributed.Context(rank, 2, torch.device("cpu"))
        part = load_run_data(cfg, torch.device("cpu"), small_data, ctx)
        assert torch.equal(part.x_train, whole.x_train[rank::2])
        assert torch.equal(part.y_train, whole.y_train[rank::2])
        assert part.x_train.untyped_storage().nbytes() == part.x_train.numel()  # its own copy
        assert torch.equal(part.x_val, whole.x_val) and part.num_classes == whole.num_classes


def test_artifacts_written(tmp_path, small_data):
    train(tiny("standard", epochs=2, out_dir=str(tmp_path)), dataset=small_data)
    for name in ("checkpoint.pt", "best.pt", "history.csv"):
        checkpoint.verify(tmp_path / name)
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,loss,ce,con,train_acc,val_clean,val_pgd")
    assert len(lines) == 3
    model, state = load_model(tmp_path / "best.pt")
    assert not model.training and state["config"]["method"] == "standard"


def test_best_pt_keeps_which_validation_images_its_epoch_got_right(tmp_path, small_data):
    """The selected epoch's validation masks (for paired comparisons of runs, chapter 8) agree
    with the accuracies history.csv and best.pt state."""
    train(tiny("pgd_at", epochs=2, out_dir=str(tmp_path)), dataset=small_data)
    state = checkpoint.load(tmp_path / "best.pt")
    masks = state["val_correct"]
    assert set(masks) == {"val_clean", "val_pgd"}
    for key, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == (state["config"]["val_size"],)
        assert mask.float().mean().item() == pytest.approx(state["val"][key], abs=1e-12)
    assert not (masks["val_pgd"] & ~masks["val_clean"]).any()  # robust implies clean-correct
    last = checkpoint.load(tmp_path / "checkpoint.pt")
    assert last["val_correct"]["val_pgd"].float().mean().item() == pytest.approx(
        last["history"][-1]["val_pgd"], abs=1e-12)


def test_training_loss_parts_are_consistent(small_data):
    cfg = tiny("anchor", lam=0.5)
    model = build_model(cfg)
    x, y = small_data.x_train[:32], small_data.y_train[:32]
    loss, parts = training_loss(model, cfg, x, y, torch.Generator().manual_seed(0), False)
    assert torch.allclose(loss, parts["ce"] + 0.5 * parts["con"])
    assert 0 <= parts["correct"].item() <= 32


@pytest.mark.parametrize("bad, match", [
    (dict(method="nope"), "method must be one of"),
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(eps=-0.1), "eps must be a finite number >= 0"),
    (dict(temperature=0.0), "temperature and lr must be > 0"),
    (dict(batch_size=512, train_subset=100), "train_subset"),
    (dict(data="imagenet"), "data must be"),
    (dict(attack_bn="Train"), "attack_bn must be 'eval' or 'train'"),
    (dict(warmup_fraction=1.5), r"warmup_fraction must be in \[0, 1\]"),
    (dict(lr=0), "temperature and lr must be > 0"),
    (dict(alpha=0.0), r"alpha must be a finite number > 0, got 0\.0"),
    (dict(alpha=0), r"alpha must be a finite number > 0, got 0$"),
    (dict(alpha=-1 / 255), r"alpha must be a finite number > 0, got -0\.0039"),
    (dict(train_subset=64.0), "train_subset must be None or an int, got 64.0"),
    (dict(train_subset=True), "train_subset must be None or an int, got True"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(seed=2**64), r"seed must be an int in \[0, 2\*\*63\), got 18446744073709551616"),
    (dict(seed="0"), r"seed must be an int in \[0, 2\*\*63\), got '0'"),
])
@pytest.mark.bad_input
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"method": "standard", **bad})


@pytest.mark.bad_input
def test_alpha_zero_is_refused_for_every_method():
    """alpha = 0 used to pass (checked >= 0), and the run died after its first epoch, when
    validation called PGD with a zero step; even for "standard", whose training never attacks."""
    for method in METHODS:
        with pytest.raises(ValueError, match=r"^alpha must be a finite number > 0, got 0\.0$"):
            tiny(method, alpha=0.0)


@pytest.mark.bad_input
def test_an_unwritable_out_dir_is_refused_before_training(tmp_path, monkeypatch):
    """Not when the first epoch's checkpoint is saved."""
    import anchor_lib.train as train_module

    def no_work(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "load_run_data", no_work)
    a_file = tmp_path / "history.csv"
    a_file.write_text("epoch\n")
    for out, says in ((a_file, f"out_dir {a_file} is a file; expected a folder"),
                      (a_file / "run", f"out_dir {a_file / 'run'} cannot be written: expected "
                                       f"{a_file} to be a folder, got a file")):
        with pytest.raises(ValueError) as err:
            train(tiny(out_dir=str(out)))
        assert says in str(err.value)
    assert list(tmp_path.iterdir()) == [a_file]


# --- loading a checkpoint whose parts do not fit -----------------------------------------------

def _save_tiny(path, weights=None, **config):
    """A checkpoint of ``tiny()``'s untrained model (weights and config replaceable)."""
    cfg = tiny()
    state = {"model": build_model(cfg).state_dict() if weights is None else weights,
             "config": {**dataclasses.asdict(cfg), **config}}
    return checkpoint.save(state, path)


@pytest.mark.bad_input(cases=9)
def test_load_model_says_briefly_what_does_not_fit(tmp_path):
    """A width mismatch was a 14 KB "line" of size mismatches; a missing config "'config'"; a
    DataParallel state_dict "'linear.weight'". Each is now a CheckpointError naming the file,
    what was expected and what came, on one short line."""
    from anchor_lib.models import PreActResNet18

    weights = build_model(tiny()).state_dict()  # width 4, proj_dim 16
    cases = {
        "wider_config": (dict(width=8), "its weights are width 4 but its config says width 8"),
        "other_proj_dim": (dict(proj_dim=32),
                           "its weights are proj_dim 16 but its config says proj_dim 32"),
        "no_config": (dict(state={"model": weights}), "has no 'config' entry; expected the dict "
                                                      "of the TrainConfig"),
        "config_not_a_dict": (dict(state={"model": weights, "config": [1]}),
                              "has a list as 'config'; expected the dict of the TrainConfig"),
        "invalid_config": (dict(alpha=0.0), "has an invalid config: alpha must be a finite "
                                            "number > 0"),
        "some_keys_wrapped": (dict(weights={("module." if i % 2 else "") + k: v
                                            for i, (k, v) in enumerate(weights.items())}),
                              f"{len(weights) // 2} of its {len(weights)} weights' names start "
                              f"with 'module.'"),
        "no_classifier": (dict(weights={k: v for k, v in weights.items() if k != "linear.weight"}),
                          "expected a PreActResNet18 state_dict with 'linear.weight'"),
        "missing_stage": (dict(weights={k: v for k, v in weights.items() if "layer4" not in k}),
                          "do not fit the model of its config (width 4, proj_dim 16, 10 classes): "
                          "missing layer4.0.bn1.weight, layer4.0.bn1.bias, "
                          "layer4.0.bn1.running_mean and 22 more"),
        "not_tensors": (dict(weights={"linear.weight": [[1.0]]}),
                        "expected the model's state_dict (a dict of tensors by name), got a dict "
                        "whose entry 'linear.weight' is of type list"),
    }
    assert len(PreActResNet18(width=4, proj_dim=16).layer4.state_dict()) == 25
    for name, (kwargs, says) in cases.items():
        path = tmp_path / f"{name}.pt"
        if "state" in kwargs:
            checkpoint.save(kwargs["state"], path)
        else:
            _save_tiny(path, **kwargs)
        with pytest.raises(checkpoint.CheckpointError) as err:
            load_model(path)
        message = str(err.value)
        assert str(path) in message and says in message, (name, message)
        assert "\n" not in message and len(message) < 300, (name, len(message))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_load_model_takes_a_wrapped_models_state_dict(tmp_path, prefix):
    """DistributedDataParallel / DataParallel (``module.``) and torch.compile (``_orig_mod.``)
    prefix every key: the same weights, loaded without the prefix."""
    weights = build_model(tiny()).state_dict()
    _save_tiny(tmp_path / "wrapped.pt", weights={prefix + k: v for k, v in weights.items()})
    wrapped, _ = load_model(tmp_path / "wrapped.pt")
    assert wrapped.state_dict().keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(wrapped.state_dict()[k], v), k


@pytest.mark.bad_input
def test_train_subset_beyond_the_data_is_refused(small_data):
    """1,024 synthetic images less 64 for validation leave 960: asking for more is an error,
    not a silently smaller run."""
    with pytest.raises(ValueError, match=r"train_subset 961 asks for more training images than "
                                         r"the data leave after the 64 of val_size: expected "
                                         r"at most 960"):
        load_run_data(tiny(train_subset=961), torch.device("cpu"), small_data)
    assert len(load_run_data(tiny(train_subset=960), torch.device("cpu"), small_data).y_train) == 960


@pytest.mark.parametrize("edge", [
    dict(val_size=0), dict(attack_steps=0), dict(val_attack_steps=0),  # no validation, no attack
    dict(warmup_fraction=1.0), dict(warmup_fraction=0.0),  # the ends of [0, 1]
    dict(batch_size=32, train_subset=32),  # exactly one step per epoch
    dict(seed=0), dict(seed=2**63 - 1),
    # alpha, PGD's step, has no zero edge: every method runs the validation attack.
    dict(eps=0.0, alpha=1e-6, beta=0.0, lam=0.0, momentum=0.0, weight_decay=0.0, trades_beta=0),
])
def test_config_accepts_the_edges_of_each_range(edge):
    cfg = tiny(**{"method": "standard", **edge})
    assert all(getattr(cfg, k) == v for k, v in edge.items())


def test_profiles(monkeypatch):
    monkeypatch.setenv("ANCHOR_PROFILE", "smoke")
    cfg = TrainConfig.from_profile(method="anchor")
    assert cfg.profile == "smoke" and cfg.width == 8 and cfg.epochs == 1
    assert TrainConfig.from_profile("full").width == 64
    monkeypatch.setenv("ANCHOR_PROFILE", "huge")
    with pytest.raises(ValueError, match="ANCHOR_PROFILE"):
        TrainConfig.from_profile()


def test_cudnn_benchmark_is_scoped_to_the_block():
    import torch

    from anchor_lib.train import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before
    with pytest.raises(RuntimeError), cudnn_benchmark(not before):
        raise RuntimeError("boom")
    assert torch.backends.cudnn.benchmark is before, "restored even when the block raises"


def test_default_amp_needs_native_bf16(monkeypatch):
    """bf16 autocast by default on Ampere and later only; a T4 (emulated bf16) trains in fp32."""
    from anchor_lib.train import default_amp

    assert default_amp(torch.device("cpu")) is False
    asked = []

    def native(including_emulation=True):
        asked.append(including_emulation)
        return not including_emulation and GPU_HAS_BF16[0]

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native)
    GPU_HAS_BF16 = [True]
    assert default_amp(torch.device("cuda")) is True
    GPU_HAS_BF16[0] = False
    assert default_amp(torch.device("cuda:0")) is False
    assert asked == [False, False]  # emulation never counts


def test_trades_attacks_in_the_batchnorm_mode_asked_for(small_data):
    """attack_bn applies to every robust method, TRADES included."""
    x, y = small_data.x_train[:32], small_data.y_train[:32]
    out = {}
    for mode in ("eval", "train"):
        cfg = tiny("trades", attack_bn=mode)
        torch.manual_seed(0)
        model = build_model(cfg)
        loss, _ = training_loss(model, cfg, x, y, torch.Generator().manual_seed(0), False)
        out[mode] = (loss.item(), model.layer1[0].bn1.running_mean.clone())
    # Train-mode attack passes update the running statistics and see other activations.
    assert not torch.equal(out["eval"][1], out["train"][1])
    assert out["eval"][0] != out["train"][0]


def test_without_validation_best_pt_is_the_last_epoch(tmp_path, small_data):
    history = train(tiny("pgd_at", epochs=2, val_size=0, out_dir=str(tmp_path)), dataset=small_data)
    assert [r["best"] for r in history] == [True, True]
    _, state = load_model(tmp_path / "best.pt")
    assert state["epoch"] == 1


@pytest.mark.fault
def test_a_kill_between_checkpoint_and_best_pt_is_repaired_on_resume(tmp_path, small_data,
                                                                      monkeypatch):
    """checkpoint.pt is written before best.pt; a kill in between (here: at the last epoch's
    best.pt) leaves best.pt an epoch behind, and resuming brings it up to the checkpoint."""
    cfg = tiny("pgd_at", epochs=2, val_size=0, out_dir=str(tmp_path))  # every epoch is "best"
    real = checkpoint.save

    def killed_at_the_last_best(obj, path):
        if path.name == "best.pt" and obj["epoch"] == 1:
            raise KeyboardInterrupt("killed")  # as if the process died here
        return real(obj, path)

    monkeypatch.setattr(checkpoint, "save", killed_at_the_last_best)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, dataset=small_data)
    monkeypatch.setattr(checkpoint, "save", real)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 0  # one behind
    history = train(cfg, resume=True, dataset=small_data)  # nothing left to train
    assert [r["epoch"] for r in history] == [1, 2]
    best, last = checkpoint.load(tmp_path / "best.pt"), checkpoint.load(tmp_path / "checkpoint.pt")
    assert best["epoch"] == 1 and all(torch.equal(best["model"][k], last["model"][k])
                                      for k in last["model"])
    assert set(best["val"]) == {"val_clean", "val_pgd"}
    model, _ = load_model(tmp_path / "best.pt")  # a loadable best.pt, as before
    assert not model.training


def test_resume_restores_rng_states_saved_anywhere(tmp_path, small_data, monkeypatch):
    """train() loads checkpoint.pt onto the CPU: the RNG setters take CPU tensors only (a GPU
    run that loaded them onto the GPU could not resume)."""
    cfg = tiny("pgd_at", epochs=2, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError):
        train(cfg, dataset=small_data, fail_at=(1, 0))
    where = []
    real = checkpoint.load
    monkeypatch.setattr(checkpoint, "load",
                        lambda path, **kw: where.append(kw.get("map_location")) or real(path, **kw))
    history = train(cfg, resume=True, dataset=small_data)
    assert where and set(where) == {"cpu"} and [r["epoch"] for r in history] == [1, 2]


def test_history_lr_is_the_rate_the_last_step_used(small_data):
    """One-cycle: the last epoch's last step trains at a small positive rate, never at 0."""
    cfg = tiny("standard", epochs=2, val_attack_steps=0)
    history = train(cfg, dataset=small_data)
    steps = cfg.train_subset // cfg.batch_size * cfg.epochs
    warm = max(1, round(cfg.warmup_fraction * steps))
    expected = [cfg.lr * (steps - (s - 1)) / (steps - warm) for s in (steps // 2, steps)]
    assert [r["lr"] for r in history] == pytest.approx(expected)


def test_learning_rate_is_one_cycle_per_stage():
    """Linear warm-up over ``warmup_fraction`` of the steps to the peak, then linear decay to 0
    at the end; the two-stage variant's second stage gets a cycle of its own."""
    from anchor_lib.train import _schedule

    one = _schedule(100, 0.2)
    assert [one(s) for s in range(20)] == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert [one(s) for s in range(20, 101)] == pytest.approx([(100 - s) / 80 for s in range(20, 101)])
    two = _schedule(100, 0.2, restart=40)
    first, second = _schedule(40, 0.2), _schedule(60, 0.2)
    assert [two(s) for s in range(40)] == pytest.approx([first(s) for s in range(40)])
    assert [two(s) for s in range(40, 100)] == pytest.approx([second(s) for s in range(60)])
    assert two(39) == pytest.approx(1 / 32) and two(40) == pytest.approx(1 / 12)  # warm-up again
    assert _schedule(10, 0.0)(0) == 1.0  # no warm-up: the peak at the first step


def test_optimiser_is_nesterov_sgd_with_the_configs_settings(small_data, monkeypatch):
    seen = {}

    class Recording(torch.optim.SGD):
        def __init__(self, params, **kwargs):
            seen.update(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    train(tiny("standard", lr=0.07, momentum=0.8, weight_decay=1e-3, val_attack_steps=0),
          dataset=small_data)
    assert seen == dict(lr=0.07, momentum=0.8, nesterov=True, weight_decay=1e-3)


def test_device_auto_is_cuda_where_there_is_one(monkeypatch):
    from anchor_lib.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")  # a named device is taken as named


def test_a_config_names_its_dataset(monkeypatch):
    """``data="synthetic"`` trains on the synthetic task (with room for the validation split);
    ``"cifar10"`` loads CIFAR-10 the usual way."""
    from anchor_lib.train import dataset_for

    d = dataset_for(tiny("standard", val_size=2500))
    assert d.label == "synthetic" and len(d.y_train) == 5000 and len(d.y_test) == 1000
    assert len(dataset_for(tiny("standard")).y_train) == 4000
    monkeypatch.setattr(data, "load_cifar10", lambda: "loaded")
    assert dataset_for(tiny("standard", data="cifar10")) == "loaded"


def test_every_epoch_draws_its_own_views_and_starts():
    """Each (seed, epoch) seeds its own random stream: an epoch that repeated the last one's
    crops, flips and PGD starts would train on fewer distinct views than it claims."""
    from anchor_lib.train import _epoch_seed

    seeds = {_epoch_seed(seed, epoch) for seed in range(4) for epoch in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 - 1 for s in seeds)
    assert _epoch_seed(2**62, 10**6) < 2**63 - 1  # any int seed fits torch.manual_seed


def test_a_training_split_of_exactly_one_batch_trains():
    cfg = tiny("standard", train_subset=None, val_size=64, batch_size=64, val_attack_steps=0)
    history = train(cfg, dataset=data.synthetic(n_train=128, n_test=16, size=8))
    assert len(history) == 1 and build_model(cfg).num_classes == 10


def test_the_model_has_as_many_logits_as_the_data_have_classes(tmp_path):
    cfg = tiny("standard", train_subset=None, val_size=16, batch_size=32, val_attack_steps=0,
               out_dir=str(tmp_path))
    train(cfg, dataset=data.synthetic(n_train=96, n_test=16, num_classes=4, size=8))
    model, _ = load_model(tmp_path / "best.pt")
    assert model.num_classes == 4
    # A class that only one split holds counts too: the classes are those of either split.
    few = data.synthetic(n_train=96, n_test=16, num_classes=4, size=8)
    few = dataclasses.replace(few, y_test=few.y_test % 2)
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "few")), dataset=few)
    assert load_model(tmp_path / "few" / "best.pt")[0].num_classes == 4


def test_without_resume_a_run_starts_over(tmp_path, small_data):
    """Resuming is asked for, never assumed: a second run into the same folder trains again
    (here it meets the NaN injected at its first step) instead of returning the saved run."""
    cfg = tiny("standard", out_dir=str(tmp_path), val_attack_steps=0)
    train(cfg, dataset=small_data)
    with pytest.raises(NonFiniteLossError):
        train(cfg, dataset=small_data, fail_at=(0, 0))
    assert len(train(cfg, dataset=small_data, resume=True, fail_at=(0, 0))) == 1  # all done


def test_every_run_is_selected_on_the_same_validation_images(small_data):
    """The validation split is seeded apart from the run's seed: runs of different seeds and
    methods are selected on the same images."""
    from anchor_lib.train import load_run_data

    _, val_idx = data.train_val_split(len(small_data.y_train), 64, seed=0)
    for seed in (0, 7):
        run = load_run_data(tiny("pgd_at", seed=seed), torch.device("cpu"), small_data)
        assert torch.equal(run.x_val, small_data.x_train[val_idx])
        assert torch.equal(run.y_val, small_data.y_train[val_idx])


def test_the_training_split_is_the_data_less_the_validation_images(small_data):
    """Training never sees a validation image: the split's training rows, in its order, then
    the first train_subset of them."""
    for subset in (None, 256):
        cfg = tiny("pgd_at", train_subset=subset)
        run = load_run_data(cfg, torch.device("cpu"), small_data)
        train_idx, val_idx = data.train_val_split(len(small_data.y_train), cfg.val_size, seed=0)
        assert not set(train_idx.tolist()) & set(val_idx.tolist())
        train_idx = train_idx if subset is None else train_idx[:subset]
        assert torch.equal(run.x_train, small_data.x_train[train_idx])
        assert torch.equal(run.y_train, small_data.y_train[train_idx])


def test_selection_scores_the_validation_split_under_the_configs_pgd(small_data, monkeypatch,
                                                                    tmp_path):
    """val_pgd, which selects every robust run, is accuracy under PGD with the config's eps,
    alpha and val_attack_steps, not clean accuracy under another name."""
    from anchor_lib.train import validate

    cfg = tiny("pgd_at", eps=16 / 255, alpha=4 / 255, val_attack_steps=3)
    # a model that classifies well enough for the attack to have something to break
    train(tiny("standard", epochs=2, train_subset=512, out_dir=str(tmp_path)), dataset=small_data)
    model, _ = load_model(tmp_path / "best.pt")
    run = load_run_data(cfg, torch.device("cpu"), small_data)
    calls, real = [], attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    scores, masks = validate(model, cfg, run.x_val, run.y_val)
    assert calls and all((k["eps"], k["alpha"], k["steps"]) == (cfg.eps, cfg.alpha, 3) for k in calls)
    torch.manual_seed(0)
    expected = evaluate.correct(model, data.to_float(run.x_val), run.y_val,
                                partial(real, eps=cfg.eps, alpha=cfg.alpha, steps=3), batch_size=500)
    assert torch.equal(masks["val_pgd"], expected) and scores["val_pgd"] == expected.float().mean()
    assert scores["val_pgd"] < scores["val_clean"]  # the attack breaks some images: it ran


def test_standard_training_without_a_validation_attack_reports_no_robust_accuracy(small_data):
    history = train(tiny("standard", val_attack_steps=0), dataset=small_data)
    assert history[0]["val_clean"] > 0 and history[0]["val_pgd"] != history[0]["val_pgd"]  # NaN


def test_attacks_run_with_the_weights_frozen_and_their_flags_come_back():
    from anchor_lib.train import CompiledPasses, _frozen

    model = build_model(tiny("standard"))
    model.linear.weight.requires_grad_(False)  # a flag that was off before stays off after
    before = [p.requires_grad for p in model.parameters()]
    with _frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == before
    with pytest.raises(ValueError, match="compile mode needs the inductor backend"):
        CompiledPasses(model, "aot_eager", mode="max-autotune")


def test_history_rows_are_the_means_of_the_epochs_steps(small_data, monkeypatch):
    """history.csv's loss, ce and con are means over the epoch's steps, train_acc the share of
    its training inputs classified correctly (what chapter 8's curves plot)."""
    import anchor_lib.train as train_module

    steps = []
    real = train_module.step_loss

    def recording(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        steps.append([loss.item(), parts["ce"].item(), parts["con"].item(),
                      parts["correct"].item()])
        return loss, parts

    monkeypatch.setattr(train_module, "step_loss", recording)
    cfg = tiny("anchor", val_attack_steps=1)
    row, = train(cfg, dataset=small_data)
    done = torch.tensor(steps, dtype=torch.float64)
    assert len(done) == cfg.train_subset // cfg.batch_size
    for i, name in enumerate(("loss", "ce", "con")):
        assert row[name] == pytest.approx(done[:, i].mean().item(), rel=1e-5), name
    assert row["train_acc"] == pytest.approx(done[:, 3].sum().item() / (len(done) * cfg.batch_size))


def test_best_is_the_highest_validation_score_so_far(small_data, monkeypatch):
    import anchor_lib.train as train_module

    scores = iter([0.5, 0.3, 0.6, 0.6])
    monkeypatch.setattr(train_module, "validate",
                        lambda *a: ({"val_clean": 0.9, "val_pgd": next(scores)}, {}))
    history = train(tiny("pgd_at", epochs=4), dataset=small_data)
    # A later epoch that only matches the best does not replace it (the README's full PGD-AT
    # run kept epoch 25, which epoch 30 matched).
    assert [row["best"] for row in history] == [True, False, True, False]


def test_amp_on_a_cpu_is_refused(small_data):
    with pytest.raises(ValueError, match=r"amp=True \(bf16 autocast\) needs a CUDA device"):
        train(tiny("pgd_at", amp=True), dataset=small_data)


# --- the two-stage variant (DESIGN §3) -----------------------------------------------------------


def test_two_stage_pretrains_the_encoder_then_probes_with_it_frozen(tmp_path, small_data,
                                                                     monkeypatch):
    import anchor_lib.train as train_module

    initial = []
    real_build = train_module.build_model

    def recording_build(cfg, *args):
        model = real_build(cfg, *args)
        initial.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    cfg = tiny("anchor", epochs=2, pretrain_fraction=0.5, out_dir=str(tmp_path / "split"))
    # Stop after the pre-training epoch (a NaN at the first probe step), then resume the probe.
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 1"):
        train(cfg, dataset=small_data, fail_at=(1, 0))
    after_pretrain = checkpoint.load(tmp_path / "split" / "checkpoint.pt")["model"]
    history = train(cfg, resume=True, dataset=small_data)
    final = checkpoint.load(tmp_path / "split" / "checkpoint.pt")["model"]

    def changed(a, b):
        return {k for k in a if not torch.equal(a[k], b[k])}

    # Stage 1 trains the encoder and projection, never the classifier.
    assert changed(initial[0], after_pretrain) and not any(
        k.startswith("linear.") for k in changed(initial[0], after_pretrain))
    # Stage 2 trains the classifier alone: weights and BatchNorm statistics stay put.
    assert changed(after_pretrain, final) == {"linear.weight", "linear.bias"}
    one, two = history
    assert one["ce"] == 0 and one["con"] > 0 and one["best"] is False
    assert one["val_clean"] != one["val_clean"]  # NaN: no classifier to validate yet
    assert two["con"] == 0 and two["ce"] > 0 and two["best"] is True
    assert two["lr"] == pytest.approx(one["lr"])  # each stage has its own one-cycle schedule
    assert checkpoint.load(tmp_path / "split" / "best.pt")["epoch"] == 1
    # Resuming at the stage boundary changes nothing.
    train(tiny("anchor", epochs=2, pretrain_fraction=0.5, out_dir=str(tmp_path / "whole")),
          dataset=small_data)
    assert not changed(final, checkpoint.load(tmp_path / "whole" / "checkpoint.pt")["model"])


def test_pretraining_attacks_the_contrastive_term(small_data):
    from anchor_lib.train import draw_step_inputs, step_loss

    # Train-mode BatchNorm in the attack, as in the loss: on an untrained model the eval-mode
    # statistics are far from the batch's, and the attack's gain would hardly show.
    cfg = tiny("anchor", pretrain_fraction=0.5, epochs=2, attack_bn="train")
    model = build_model(cfg)
    x, y = small_data.x_train[:64], small_data.y_train[:64]
    inputs = draw_step_inputs(cfg, x, torch.Generator().manual_seed(0))
    con = {}
    for steps in (0, 5):  # 0: the random start only
        attacked = dataclasses.replace(cfg, attack_steps=steps)
        loss, parts = step_loss(model, attacked, False, y, stage="pretrain", **inputs)
        con[steps] = loss.item()
        assert parts["ce"].item() == 0 and loss.item() == parts["con"].item()
    assert con[5] > con[0] + 0.5, con
    # With the adversarial view out of the contrastive term, pre-training is on clean views only:
    # no attack, so its steps change nothing.
    clean_only = {steps: step_loss(model, dataclasses.replace(cfg, attack_steps=steps,
                                                              adv_in_contrastive=False),
                                   False, y, stage="pretrain", **inputs)[0].item()
                  for steps in (0, 5)}
    assert clean_only[0] == clean_only[5] != con[0]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, match", [
    (dict(method="pgd_at", pretrain_fraction=0.5, epochs=2), "needs a contrastive method"),
    (dict(pretrain_fraction=0.5, epochs=1), "each stage needs at least one"),
    (dict(pretrain_fraction=0.1, epochs=5), "each stage needs at least one"),
    (dict(pretrain_fraction=1.0, epochs=4), r"in \[0, 1\)"),
    (dict(pretrain_fraction=True, epochs=4), r"in \[0, 1\)"),
])
def test_two_stage_config_is_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"method": "anchor", **overrides})


def test_a_field_added_later_takes_its_default_when_resuming_older_configs():
    from dataclasses import asdict

    from anchor_lib.train import config_differences

    cfg = tiny("anchor")
    older = {k: v for k, v in asdict(cfg).items() if k != "pretrain_fraction"}
    assert config_differences(older, cfg) == []
    assert config_differences(older, dataclasses.replace(cfg, pretrain_fraction=0.5,
                                                         epochs=2)) == ["epochs",
                                                                        "pretrain_fraction"]


def test_pretrain_epochs_count_exactly_and_stages_follow():
    cfg = tiny("anchor", pretrain_fraction=0.29, epochs=100)
    assert cfg.pretrain_epochs == 29  # 0.29 * 100 is 28.999... in floating point
    assert [cfg.stage(e) for e in (0, 28, 29, 99)] == ["pretrain", "pretrain", "probe", "probe"]
    assert tiny("anchor").stage(0) == "joint"


def test_compile_default_is_on_for_cuda_at_the_full_profile_only():
    """compile=None compiles where 30 epochs repay it (CUDA, full profile); an explicit value
    wins everywhere. Only the device's type is read, so no GPU is needed here."""
    from anchor_lib.train import use_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    full = TrainConfig.from_profile("full", method="pgd_at")
    assert full.compile is None
    assert use_compile(full, cuda) is True
    assert use_compile(full, cpu) is False
    for profile in ("smoke", "demo", "tutorial"):
        assert use_compile(TrainConfig.from_profile(profile, method="pgd_at"), cuda) is False
    assert use_compile(dataclasses.replace(full, compile=False), cuda) is False
    assert use_compile(TrainConfig.from_profile("smoke", method="pgd_at", compile=True), cpu)
    with pytest.raises(ValueError, match="compile must be True or False or None, got 'yes'"):
        TrainConfig(compile="yes")


@pytest.mark.parametrize("method", ["anchor", "trades"])
def test_compiled_passes_train_as_the_eager_trainer(method, small_data, tmp_path):
    """TrainConfig.compile (aot_eager on a CPU: traced, no code generation) trains the same
    model as the eager trainer, through every pass a method uses (the forward, forward_all and
    project; TRADES' KL attack); the weights are frozen during the attack and restored after.
    It only changes how the passes run, so a run resumes across it."""
    cfg = tiny(method, train_subset=128, out_dir=str(tmp_path / "compiled"), compile=True)
    plain = train(tiny(method, train_subset=128, out_dir=str(tmp_path / "plain")),
                  dataset=small_data)
    assert checkpoint.load(tmp_path / "plain" / "checkpoint.pt")["compiled"] is False
    compiled = train(cfg, dataset=small_data)
    for key in ("loss", "ce", "con", "train_acc", "val_clean", "val_pgd"):
        assert compiled[-1][key] == pytest.approx(plain[-1][key], rel=1e-4, abs=1e-6), key
    state = checkpoint.load(tmp_path / "compiled" / "checkpoint.pt")
    assert state["config"]["compile"] is True and state["compiled"] is True
    assert checkpoint.load(tmp_path / "compiled" / "best.pt")["compiled"] is True
    # The finished run, resumed without compiling: compile is not part of the computation's
    # config, so this is the same run (nothing left to train), not a refused one.
    resumed = train(dataclasses.replace(cfg, compile=False), resume=True, dataset=small_data)
    assert [r["epoch"] for r in resumed] == [1]


# --- each method's step, written out from its definition ------------------------------------------

def _pgd_written_out(model, loss_of, a1, y, start, cfg):
    """L-inf PGD from ``start``: sign steps of ``alpha``, projected on the eps-ball and [0, 1]."""
    x = torch.min(torch.max(start, a1 - cfg.eps), a1 + cfg.eps).clamp(0, 1)
    for _ in range(cfg.attack_steps):
        x = x.detach().requires_grad_(True)
        grad, = torch.autograd.grad(loss_of(model(x)), x)
        x = torch.min(torch.max(x + cfg.alpha * grad.sign(), a1 - cfg.eps), a1 + cfg.eps).clamp(0, 1)
    return x.detach()


def _definition(model, cfg, y, a1, start=None, a2=None):
    """(loss, ce, con) of one step: DESIGN §3 for supcon_at / anchor, Madry et al. for pgd_at,
    Zhang et al.'s official TRADES code (KL summed over the batch, divided by its size)."""
    from torch.nn import functional as f

    zero = torch.zeros(())
    if cfg.method == "standard":
        model.train()
        ce = f.cross_entropy(model(a1), y)
        return ce, ce, zero
    model.eval()  # attack_bn="eval": the attack sees running statistics
    if cfg.method == "trades":
        with torch.no_grad():
            p_clean = f.softmax(model(a1), dim=1)
        x_adv = _pgd_written_out(model, lambda out: f.kl_div(f.log_softmax(out, 1), p_clean,
                                                             reduction="sum"), a1, y, start, cfg)
        model.train()
        out_clean, out_adv = model(a1), model(x_adv)
        ce = f.cross_entropy(out_clean, y)
        kl = f.kl_div(f.log_softmax(out_adv, 1), f.softmax(out_clean, 1), reduction="sum") / len(y)
        return ce + cfg.trades_beta * kl, ce, cfg.trades_beta * kl
    x_adv = _pgd_written_out(model, lambda out: f.cross_entropy(out, y, reduction="sum"), a1, y,
                             start, cfg)
    if cfg.method == "pgd_at":
        model.train()
        ce = f.cross_entropy(model(x_adv), y)
        return ce, ce, zero
    return contrastive_loss_by_definition(model, cfg, y, a1, a2, x_adv)


@pytest.mark.parametrize("method, overrides", [
    ("standard", {}), ("pgd_at", {}), ("trades", {}), ("supcon_at", dict(beta=1.0)),
    ("anchor", dict(beta=0.7, lam=0.4, temperature=0.2)),
    ("anchor", dict(adv_in_contrastive=False, lam=2.0)),
])
def test_each_methods_step_is_its_definition_written_out(method, overrides, small_data):
    """step_loss against the definitions above, on the same drawn views and random start. Also
    checks what draw_step_inputs draws: augmented views, and a start inside the eps-ball."""
    from anchor_lib.train import draw_step_inputs, step_loss

    cfg = tiny(method, **overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = small_data.x_train[:24], small_data.y_train[:24]
    inputs = draw_step_inputs(cfg, x, torch.Generator().manual_seed(1))
    assert set(inputs) == {"standard": {"a1"}, "pgd_at": {"a1", "start"},
                           "trades": {"a1", "start"}}.get(method, {"a1", "start", "a2"})
    assert not torch.equal(inputs["a1"], data.to_float(x)), "a1 is an augmented view"
    if "start" in inputs:
        assert (inputs["start"] - inputs["a1"]).abs().max() <= cfg.eps + 1e-6
        assert not torch.equal(inputs["start"], inputs["a1"])
    if "a2" in inputs:
        assert not torch.equal(inputs["a1"], inputs["a2"])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    # The classifier's last output is the one the step scores (a1 for standard, the adversarial
    # view otherwise; its last rows after forward_all): "correct" counts its right answers.
    scored = []
    hook = model.linear.register_forward_hook(lambda mod, inp, out: scored.append(out.detach()))
    try:
        loss, parts = step_loss(model, cfg, False, y, **inputs)
    finally:
        hook.remove()
    assert int(parts["correct"]) == int((scored[-1][-len(y):].argmax(1) == y).sum())
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # the same BatchNorm statistics for the written-out step
    want, want_ce, want_con = _definition(model, cfg, y, **inputs)

    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"], want_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["con"], want_con.detach(), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():  # the same BatchNorm updates, in the same modes
        torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert model.training, "the step leaves the model in train mode"
    # The gradients the optimiser will use are the definition's.
    params = [p for p in model.parameters() if p.requires_grad]
    model.load_state_dict(state)
    got = torch.autograd.grad(step_loss(model, cfg, False, y, **inputs)[0], params,
                              allow_unused=True)
    model.load_state_dict(state)
    ref = torch.autograd.grad(_definition(model, cfg, y, **inputs)[0], params, allow_unused=True)
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
