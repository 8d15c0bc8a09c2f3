"""Tests for anchor_lib.embeddings: views, the embeddings.npz artifact, cluster metrics, UMAP.

Metric tests use constructed embeddings whose answer is known by construction (one-hot class
centres, antipodal or orthogonal adversarial views) or written out by hand in a loop here.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anchor_lib import attacks, checkpoint, data, embeddings
from anchor_lib.models import PreActResNet18
from anchor_lib.train import METHODS, TrainConfig, build_model, draw_step_inputs, step_loss


@pytest.fixture(scope="module")
def model() -> PreActResNet18:
    torch.manual_seed(0)
    return PreActResNet18(num_classes=10, width=4, proj_dim=16).eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    ds = data.synthetic(n_train=20, n_test=24, seed=1)
    return ds.x_test, ds.y_test


@pytest.fixture(scope="module")
def emb(model, images) -> dict[str, np.ndarray]:
    x, y = images
    return embeddings.embed_views(model, x, y, steps=2, batch_size=10)


# --- embed_views ------------------------------------------------------------------------------


def test_embed_views_shapes_dtypes_and_unit_norm(emb, images):
    _, y = images
    n = len(y)
    for view in embeddings.VIEWS:
        # the default space is the backbone's features: 8 * width = 32 dimensions at width 4
        assert emb[view].shape == (n, 32) and emb[view].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb[view], axis=1), 1.0, atol=1e-5)
    assert emb["labels"].dtype == np.int64
    np.testing.assert_array_equal(emb["labels"], y.numpy())
    for key in ("pred_clean", "pred_aug", "pred_adv"):
        assert emb[key].shape == (n,) and emb[key].dtype == np.int64
        assert emb[key].min() >= 0 and emb[key].max() < 10
    # the three views are different images, so (for a random model) different embeddings
    assert not np.allclose(emb["clean"], emb["aug"])
    assert not np.allclose(emb["clean"], emb["adv"])


def test_embed_views_deterministic_keeps_rng_and_mode(model, images, emb):
    x, y = images
    model.train()
    state = torch.get_rng_state()
    try:
        again = embeddings.embed_views(model, x, y, steps=2, batch_size=10)
        rebatched = embeddings.embed_views(model, x, y, steps=2, batch_size=7)
    finally:
        assert model.training, "embed_views must restore the model's training flag"
        model.eval()
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG stream must be untouched"
    for view in embeddings.VIEWS:
        np.testing.assert_array_equal(again[view], emb[view])
    # clean and augmented views do not depend on the batching (PGD's random start does)
    for view in ("clean", "aug"):
        np.testing.assert_allclose(rebatched[view], emb[view], atol=1e-5)


def test_uint8_and_float_inputs_agree(model, images):
    x, y = images
    a = embeddings.embed_views(model, x[:6], y[:6], steps=1)
    b = embeddings.embed_views(model, data.to_float(x[:6]), y[:6], steps=1)
    for view in embeddings.VIEWS:
        np.testing.assert_allclose(a[view], b[view], atol=1e-6)


def test_no_attack_gives_adv_equal_clean(model, images):
    x, y = images
    for kw in ({"steps": 0}, {"eps": 0.0}):
        e = embeddings.embed_views(model, x[:5], y[:5], **kw)
        np.testing.assert_array_equal(e["adv"], e["clean"])
        np.testing.assert_array_equal(e["pred_adv"], e["pred_clean"])


def test_the_adversarial_view_is_pgd_of_the_clean_one(model, images):
    """adv is the embedding of attacks.pgd's image (its random start drawn after seeding with
    ``seed``), per batch; and the attack lowers the true class's margin, so it attacked."""
    x, y = images
    xf = data.to_float(x[:10])
    e = embeddings.embed_views(model, x[:10], y[:10], eps=16 / 255, alpha=4 / 255, steps=3,
                               seed=5, batch_size=10)
    torch.manual_seed(5)
    x_adv = attacks.pgd(model, xf, y[:10], eps=16 / 255, alpha=4 / 255, steps=3)
    with torch.no_grad():
        feats = F.normalize(model.features(x_adv), dim=1).numpy()
        clean_margin = attacks.margin_loss(model(xf), y[:10])
        adv_margin = attacks.margin_loss(model(x_adv), y[:10])
    np.testing.assert_allclose(e["adv"], feats, atol=1e-6)
    assert (adv_margin > clean_margin).all()


def test_feature_and_projection_spaces(model, images):
    x, y = images
    e = embeddings.embed_views(model, x[:5], y[:5], steps=1, space="features")
    assert e["clean"].shape == (5, model.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(e["adv"], axis=1), 1.0, atol=1e-5)
    z = embeddings.embed_views(model, x[:5], y[:5], steps=1, space="projection")
    with torch.no_grad():
        expected = model.project(data.to_float(x[:5])).numpy()
    np.testing.assert_allclose(z["clean"], expected, atol=1e-5)
    assert z["clean"].shape == (5, 16)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_contrastive_methods_train_the_projection_head(method):
    """Why embeddings are compared in the feature space: a standard, PGD-AT or TRADES step gives
    the head no gradient, so its z stays a random map of the features."""
    cfg = TrainConfig(method=method, width=4, proj_dim=16, attack_steps=1, device="cpu")
    torch.manual_seed(0)
    net = build_model(cfg)
    ds = data.synthetic(n_train=20, n_test=8, seed=1)
    inputs = draw_step_inputs(cfg, ds.x_test, torch.Generator().manual_seed(0))
    loss, _ = step_loss(net, cfg, False, ds.y_test, **inputs)
    loss.backward()
    head_trained = any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head.parameters())
    assert head_trained == (method in ("supcon_at", "anchor"))
    assert net.conv1.weight.grad.abs().sum() > 0  # every method trains the backbone


@pytest.mark.parametrize("kwargs, match", [
    ({"space": "pixels"}, "space"),
    ({"eps": -1.0}, "eps"),
    ({"steps": 1.5}, "steps"),
])
def test_embed_views_rejects_bad_arguments(model, images, kwargs, match):
    x, y = images
    with pytest.raises((ValueError, TypeError), match=match):
        embeddings.embed_views(model, x[:3], y[:3], **kwargs)


def test_embed_views_rejects_bad_images_and_labels(model, images):
    x, y = images
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        embeddings.embed_views(model, data.to_float(x[:3]) * 2, y[:3])
    with pytest.raises(ValueError, match="label"):
        embeddings.embed_views(model, x[:3], torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="shape"):
        embeddings.embed_views(model, x[:3], y[:2])


@pytest.mark.bad_input
@pytest.mark.parametrize("steps", [0, 2])
def test_embed_views_wants_the_labels_on_the_images_device(model, images, steps):
    """Refused up front, with or without an attack (the meta device stands in for a second
    device on a CPU)."""
    x, y = images
    with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
        embeddings.embed_views(model, x[:3], y[:3].to("meta"), steps=steps)


def test_balanced_indices_on_class_sorted_labels():
    y = torch.arange(4).repeat_interleave(5)  # sorted by class, like some CIFAR-10 copies
    idx = embeddings.balanced_indices(y, 6)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
    assert idx.tolist() == [0, 5, 10, 15, 1, 6]  # first items of each class, interleaved
    assert np.bincount(y[embeddings.balanced_indices(y, 20)].numpy()).tolist() == [5] * 4
    assert embeddings.balanced_indices(y.numpy(), 4).tolist() == [0, 5, 10, 15]
    with pytest.raises(ValueError, match="balanced"):
        embeddings.balanced_indices(torch.tensor([0, 0, 0, 1]), 4)
    with pytest.raises(ValueError, match="n must be"):
        embeddings.balanced_indices(y, 0)


# --- embeddings.npz ---------------------------------------------------------------------------


def test_npz_round_trip_with_sidecar(tmp_path, emb):
    path = tmp_path / "run" / "embeddings.npz"
    embeddings.save_embeddings(path, emb, {"method": "anchor", "data": "synthetic"})
    assert path.is_file() and (tmp_path / "run" / "embeddings.npz.sha256").is_file()
    with np.load(path, allow_pickle=False) as raw:  # the stored format (DESIGN §6)
        assert raw["clean"].dtype == np.float16 and raw["labels"].dtype == np.int64
        assert set(raw.files) >= {"clean", "aug", "adv", "labels", "meta"}
    back = embeddings.load_embeddings(path)
    for view in embeddings.VIEWS:
        assert back[view].dtype == np.float32
        np.testing.assert_allclose(back[view], emb[view], atol=2e-3)
    np.testing.assert_array_equal(back["labels"], emb["labels"])
    np.testing.assert_array_equal(back["pred_adv"], emb["pred_adv"])
    meta = back["meta"]
    assert meta["method"] == "anchor" and meta["n"] == len(emb["labels"]) and meta["dim"] == 32
    assert meta["format"] == embeddings.FORMAT


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar"])
def test_damaged_npz_is_refused_naming_the_file(tmp_path, emb, damage):
    path = tmp_path / "embeddings.npz"
    embeddings.save_embeddings(path, emb, {})
    raw = path.read_bytes()
    if damage == "flip":
        i = len(raw) // 2
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 3])
    else:
        (tmp_path / "embeddings.npz.sha256").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="embeddings.npz"):
        embeddings.load_embeddings(path)


def test_unreadable_npz_with_matching_sidecar_is_refused(tmp_path):
    path = tmp_path / "embeddings.npz"
    checkpoint.atomic_write_bytes(path, b"not a zip file")
    with pytest.raises(checkpoint.CheckpointError, match="embeddings.npz"):
        embeddings.load_embeddings(path)


def test_save_rejects_inconsistent_shapes(tmp_path, emb):
    bad = dict(emb, adv=emb["adv"][:-1])
    with pytest.raises(ValueError, match="adv"):
        embeddings.save_embeddings(tmp_path / "e.npz", bad, {})
    with pytest.raises(ValueError, match="labels"):
        embeddings.save_embeddings(tmp_path / "e.npz", {"clean": emb["clean"]}, {})


@pytest.mark.bad_input(cases=1)
def test_save_refuses_empty_labels(tmp_path):
    empty = {**{v: np.zeros((0, 4), np.float32) for v in embeddings.VIEWS},
             "labels": np.zeros(0, np.int64)}
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) with N >= 1"):
        embeddings.save_embeddings(tmp_path / "e.npz", empty, {})
    assert not (tmp_path / "e.npz").exists()


@pytest.mark.bad_input(cases=3)
def test_embed_views_refuses_fractional_counts(model, images):
    """Steps, batch size and seed are counts: 2.5 steps is refused, not rounded or run."""
    x, y = images[0][:4], images[1][:4]
    for name, value in (("steps", 2.5), ("batch_size", 1.5), ("seed", 0.5)):
        with pytest.raises(TypeError, match=f"{name} must be an int, got {value}"):
            embeddings.embed_views(model, x, y, **{name: value})


@pytest.mark.bad_input(cases=2)
def test_embed_views_names_a_seed_out_of_range(model, images):
    x, y = images[0][:4], images[1][:4]
    for seed in (-1, 2**64):  # 2**64 used to fail inside torch.manual_seed, naming no argument
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
            embeddings.embed_views(model, x, y, seed=seed)


def test_embed_views_in_float64(model, images):
    """A float64 model and images give float64 views all the way (augment keeps the dtype)."""
    x = data.to_float(images[0][:4]).double()
    out = embeddings.embed_views(copy.deepcopy(model).double(), x, images[1][:4], steps=1)
    assert all(np.isfinite(out[v]).all() for v in embeddings.VIEWS)


# --- cluster metrics --------------------------------------------------------------------------


def separated(n_per_class: int = 6, classes: int = 3, dim: int = 8, noise: float = 0.01,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Clusters around orthogonal one-hot centres: the ideal geometry, views = clean."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    clean = np.eye(dim)[labels] + noise * rng.standard_normal((len(labels), dim))
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    return {"clean": clean, "aug": clean.copy(), "adv": clean.copy(), "labels": labels}


def test_metrics_on_perfect_clusters():
    m = embeddings.cluster_metrics(separated())
    assert m["silhouette_clean"] > 0.95 and m["silhouette_all"] > 0.95
    assert m["clean_adv_distance"] == pytest.approx(0.0, abs=1e-12)
    assert m["clean_aug_distance"] == pytest.approx(0.0, abs=1e-12)
    assert m["intra_class_cos"] == pytest.approx(1.0, abs=1e-3)
    assert m["inter_class_cos"] == pytest.approx(0.0, abs=0.05)
    assert m["class_cos_gap"] > 0.9
    assert m["knn_clean"] == 1.0 and m["knn_adv_agreement"] == 1.0
    json.dumps(m, allow_nan=False)  # goes into metrics.json as is


def test_clean_adv_distance_known_values():
    e = separated()
    assert embeddings.cluster_metrics(dict(e, adv=-e["clean"]))["clean_adv_distance"] \
        == pytest.approx(2.0)
    # adv = the next class's centre: orthogonal to clean (distance ~1), and its nearest clean
    # neighbours all belong to the wrong class
    shifted = dict(e, adv=np.roll(e["clean"], 1, axis=1))
    m = embeddings.cluster_metrics(shifted)
    assert m["clean_adv_distance"] == pytest.approx(1.0, abs=0.05)
    assert m["knn_adv_agreement"] == 0.0 and m["knn_clean"] == 1.0


def test_intra_inter_against_a_loop():
    angles = [0.0, 20.0, 90.0, 100.0, 200.0]
    labels = np.array([0, 0, 1, 1, 0])
    z = np.stack([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    intra, inter = [], []
    for i in range(5):
        for j in range(5):
            if i != j:
                c = math.cos(math.radians(angles[i] - angles[j]))
                (intra if labels[i] == labels[j] else inter).append(c)
    m = embeddings.cluster_metrics({"clean": z, "aug": z, "adv": z, "labels": labels}, k=1)
    assert m["intra_class_cos"] == pytest.approx(sum(intra) / len(intra))
    assert m["inter_class_cos"] == pytest.approx(sum(inter) / len(inter))
    assert m["class_cos_gap"] == pytest.approx(m["intra_class_cos"] - m["inter_class_cos"])


def test_knn_leave_one_out_excludes_own_clean_view():
    # pairs of near-identical points with different labels: each point's nearest *other* point
    # is of the other class. With adv = clean, counting an image's own clean view would give
    # agreement 1; leave-one-out gives 0.
    angles = np.radians([0.0, 10.0, 180.0, 190.0])
    z = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    e = {"clean": z, "aug": z, "adv": z.copy(), "labels": np.array([0, 1, 1, 0])}
    m = embeddings.cluster_metrics(e, k=1)
    assert m["knn_clean"] == 0.0 and m["knn_adv_agreement"] == 0.0


def test_metrics_accuracy_and_undefined_cases():
    e = separated(n_per_class=4, classes=2)
    e["pred_clean"] = e["labels"].copy()
    e["pred_adv"] = 1 - e["labels"]
    m = embeddings.cluster_metrics(e)
    assert m["acc_clean"] == 1.0 and m["acc_adv"] == 0.0
    one = separated(n_per_class=5, classes=1)
    m1 = embeddings.cluster_metrics(one)
    assert m1["silhouette_clean"] is None and m1["inter_class_cos"] is None
    assert m1["class_cos_gap"] is None
    # one class: every kNN vote elects it, a perfect score that measures nothing
    assert m1["knn_clean"] is None and m1["knn_adv_agreement"] is None
    json.dumps(m1, allow_nan=False)


def test_float_labels_are_refused_not_truncated():
    e = separated(n_per_class=2, classes=2)
    for bad in (e["labels"] + 0.5, e["labels"].astype(bool)):
        with pytest.raises(ValueError, match="integer class indices, got dtype"):
            embeddings.cluster_metrics(dict(e, labels=bad))
    # whole numbers stored as floats are class indices all the same
    assert embeddings.cluster_metrics(dict(e, labels=e["labels"].astype(float))) \
        == embeddings.cluster_metrics(e)


def test_metrics_renormalise_float16_rows():
    e = separated()
    half = {k: (v.astype(np.float16) * 3 if k != "labels" else v) for k, v in e.items()}
    assert embeddings.cluster_metrics(half)["clean_adv_distance"] == pytest.approx(0.0, abs=1e-6)


def test_stack_views():
    e = separated(n_per_class=2, classes=2)
    points, labels, views = embeddings.stack_views(e)
    assert points.shape == (12, 8) and labels.shape == (12,) and views.shape == (12,)
    assert list(views[:4]) == ["clean"] * 4 and list(views[-4:]) == ["adv"] * 4
    np.testing.assert_array_equal(labels[4:8], e["labels"])


# --- UMAP -------------------------------------------------------------------------------------


@pytest.mark.slow  # the first umap-learn call compiles numba kernels (~10-30 s on a CPU)
def test_umap_2d_shape_determinism_and_separation():
    e = separated(n_per_class=15, classes=2, dim=8, noise=0.05)
    a = embeddings.umap_2d(e["clean"], n_neighbors=10, seed=0)
    b = embeddings.umap_2d(e["clean"], n_neighbors=10, seed=0)
    assert a.shape == (30, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # the two clusters stay apart in 2-D: every point's nearest neighbour is of its class
    d = np.linalg.norm(a[:, None] - a[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert (e["labels"][d.argmin(1)] == e["labels"]).all()


def test_umap_2d_rejects_bad_input():
    with pytest.raises(ValueError, match="N >= 4"):
        embeddings.umap_2d(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        embeddings.umap_2d(np.full((10, 3), np.nan))


def test_umap_2d_leaves_torch_threads_alone():
    """umap-learn's imports reset OpenMP's thread count; umap_2d puts the caller's back."""
    import numpy as np
    import torch

    from anchor_lib.embeddings import umap_2d

    before = torch.get_num_threads()
    umap_2d(np.random.default_rng(0).random((30, 4)).astype("float32"), n_neighbors=5)
    assert torch.get_num_threads() == before


@pytest.mark.bad_input(cases=5)
def test_knn_hits_refuses_what_it_cannot_vote_on():
    e = separated()
    assert embeddings.knn_hits(e).all() and embeddings.knn_hits(e, "clean", k=1).all()
    with pytest.raises(ValueError, match="view must be one of"):
        embeddings.knn_hits(e, "noisy")
    with pytest.raises(ValueError, match="k must be >= 1"):
        embeddings.knn_hits(e, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        embeddings.knn_hits(e, k=2.5)
    with pytest.raises(ValueError, match="at least 2 images"):
        embeddings.knn_hits({**{v: e[v][:1] for v in embeddings.VIEWS}, "labels": e["labels"][:1]})
    with pytest.raises(ValueError, match=r"labels \(N=17\) and the views \(18 rows\)"):
        embeddings.knn_hits({**e, "labels": e["labels"][:-1]})


@pytest.mark.bad_input(cases=2)
def test_cluster_metrics_refuses_k_below_one():
    """k = 0 would vote with no neighbours and elect the first class for every query."""
    e = separated()
    assert embeddings.cluster_metrics(e, k=1)["k"] == 1
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            embeddings.cluster_metrics(e, k=k)


def test_umap_2d_passes_its_documented_defaults(monkeypatch):
    """15 neighbours (capped at N - 1), min_dist 0.1, cosine metric, seed 0 reach umap-learn."""
    seen = []

    def fake_fit(points, n_neighbors, min_dist, metric, seed):
        seen.append((points.shape, n_neighbors, min_dist, metric, seed))
        return np.zeros((points.shape[0], 2))

    monkeypatch.setattr(embeddings, "_fit_umap", fake_fit)
    out = embeddings.umap_2d(np.ones((30, 3)))
    assert out.shape == (30, 2) and out.dtype == np.float32
    assert seen == [((30, 3), 15, 0.1, "cosine", 0)]


@pytest.mark.bad_input(cases=2)
def test_umap_2d_refuses_bad_knobs():
    points = np.random.default_rng(0).random((10, 3))
    with pytest.raises(TypeError, match="n_neighbors must be an int, got 7.5"):
        embeddings.umap_2d(points, n_neighbors=7.5)
    with pytest.raises(ValueError, match="min_dist must be >= 0.0, got -0.1"):
        embeddings.umap_2d(points, min_dist=-0.1)


@pytest.mark.fault
def test_umap_2d_restores_torch_threads_when_the_fit_fails(monkeypatch):
    import torch

    before = torch.get_num_threads()

    def failing_fit(*args):
        torch.set_num_threads(before + 1)  # what umap-learn's imports do, then a failure
        raise RuntimeError("the fit failed")

    monkeypatch.setattr(embeddings, "_fit_umap", failing_fit)
    with pytest.raises(RuntimeError, match="the fit failed"):
        embeddings.umap_2d(np.random.default_rng(0).random((30, 4)).astype("float32"))
    assert torch.get_num_threads() == before


def test_metrics_against_brute_force_on_random_embeddings():
    """Every metric written out the slow way on random (unstructured) embeddings, where no
    shortcut of the library's could agree by accident: distances as means of 1 - cos, kNN by a
    full sort with the documented tie rule, silhouette and class similarities by loops."""
    rng = np.random.default_rng(3)
    n, d, k = 40, 6, 5
    labels = rng.integers(0, 4, n)
    emb = {v: rng.standard_normal((n, d)) * (1 + rng.random((n, 1))) for v in embeddings.VIEWS}
    emb["labels"] = labels
    m = embeddings.cluster_metrics(emb, k=k)
    unit = {v: emb[v] / np.linalg.norm(emb[v], axis=1, keepdims=True) for v in embeddings.VIEWS}
    c = unit["clean"]
    for view, key in (("adv", "clean_adv_distance"), ("aug", "clean_aug_distance")):
        want = sum(1 - c[i] @ unit[view][i] for i in range(n)) / n
        assert m[key] == pytest.approx(want, abs=1e-9), key

    def knn(queries):
        return np.mean(knn_per_image(queries))

    def knn_per_image(queries, k=k):
        hits = []
        for i in range(n):
            others = sorted((j for j in range(n) if j != i), key=lambda j: -(queries[i] @ c[j]))
            near = others[:k]
            votes = {cl: sum(labels[j] == cl for j in near) for cl in set(labels[near])}
            best = max(votes.values())
            tied = [cl for cl, v in votes.items() if v == best]
            # ties go to the class whose neighbours are more similar in total
            winner = max(tied, key=lambda cl: sum(queries[i] @ c[j] for j in near if labels[j] == cl))
            hits.append(winner == labels[i])
        return hits

    assert m["knn_clean"] == pytest.approx(knn(c))
    assert m["knn_adv_agreement"] == pytest.approx(knn(unit["adv"]))
    # The per-image outcomes behind both, for paired comparisons of models on the same images.
    for view in embeddings.VIEWS:
        hits = embeddings.knn_hits(emb, view, k=k)
        assert hits.dtype == bool and hits.shape == (n,)
        assert hits.tolist() == knn_per_image(unit[view])
    assert embeddings.knn_hits(emb, "clean", k=k).mean() == m["knn_clean"]
    assert embeddings.knn_hits(emb).tolist() == knn_per_image(unit["adv"], k=5)  # the defaults
    # Every other image votes at k = N - 1, and a k beyond that is capped there.
    everyone = knn_per_image(c, k=n - 1)
    assert embeddings.knn_hits(emb, "clean", k=n - 1).tolist() == everyone
    assert embeddings.knn_hits(emb, "clean", k=10 * n).tolist() == everyone
    two = {v: e[:2] for v, e in emb.items()}  # the smallest sample: each image's one neighbour
    assert embeddings.knn_hits(two, "clean").tolist() == [labels[0] == labels[1]] * 2
    same = labels[:, None] == labels[None, :]
    pairs_in = [c[i] @ c[j] for i in range(n) for j in range(n) if i != j and same[i, j]]
    pairs_out = [c[i] @ c[j] for i in range(n) for j in range(n) if not same[i, j]]
    assert m["intra_class_cos"] == pytest.approx(np.mean(pairs_in))
    assert m["inter_class_cos"] == pytest.approx(np.mean(pairs_out))
    # k beyond the sample is capped at the N - 1 other images
    assert embeddings.cluster_metrics(emb, k=500)["knn_clean"] == \
        embeddings.cluster_metrics(emb, k=n - 1)["knn_clean"]


def test_metrics_that_a_sample_cannot_define_are_none():
    """One class, or as many classes as images: no silhouette; one image: no neighbours."""
    rng = np.random.default_rng(0)
    emb = {v: rng.standard_normal((6, 4)) for v in embeddings.VIEWS}
    m = embeddings.cluster_metrics({**emb, "labels": np.zeros(6, dtype=np.int64)})
    assert m["silhouette_clean"] is None and m["silhouette_all"] is None
    m = embeddings.cluster_metrics({**emb, "labels": np.arange(6)})
    assert m["silhouette_clean"] is None
    one = embeddings.cluster_metrics({**{v: e[:1] for v, e in emb.items()}, "labels": np.zeros(1)})
    assert one["knn_clean"] is None and one["knn_adv_agreement"] is None


def test_embed_views_defaults_are_the_books_budget(model, images):
    """The defaults are DESIGN §4's attack (8/255, 2/255, 10 steps) with seed 0; the smallest
    budgets are accepted (0 steps: adv is clean; batches of one give the batched answer's
    augmented views)."""
    x, y = images[0][:6], images[1][:6]
    default = embeddings.embed_views(model, x, y)
    explicit = embeddings.embed_views(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, seed=0,
                                      batch_size=500, space="features")
    for view in embeddings.VIEWS:
        np.testing.assert_array_equal(default[view], explicit[view])
    zero = embeddings.embed_views(model, x, y, steps=0)
    np.testing.assert_allclose(zero["adv"], zero["clean"], atol=1e-6)
    ones = embeddings.embed_views(model, x, y, steps=0, batch_size=1)
    np.testing.assert_allclose(ones["aug"], zero["aug"], atol=1e-5)


@pytest.mark.bad_input(cases=4)
def test_embed_views_and_loading_refuse_what_they_cannot_use(model, images, tmp_path):
    x, y = images
    for bad in (x[0], x[:0]):  # uint8 without the batch dimension, and an empty batch
        with pytest.raises(ValueError, match="x must be a non-empty batch"):
            embeddings.embed_views(model, bad, y[: len(bad)] if bad.dim() == 4 else y[:1])
    with pytest.raises(ValueError, match="alpha must be"):
        embeddings.embed_views(model, x[:2], y[:2], alpha=0.0)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        embeddings.load_embeddings(tmp_path / "missing.npz", verify_hash=False)


def test_the_smallest_accepted_sizes(images):
    """The documented lower bounds are inclusive: one balanced index, UMAP of 4 points with 2
    neighbours."""
    assert len(embeddings.balanced_indices(images[1], 1)) == 1
    coords = embeddings.umap_2d(np.random.default_rng(0).random((4, 3)), n_neighbors=2)
    assert coords.shape == (4, 2)
