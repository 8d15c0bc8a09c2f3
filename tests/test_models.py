"""models.BatchNorm2d is nn.BatchNorm2d, with an eval-mode backward that keeps the layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from anchor_lib.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BatchNorm2d,
    PreActResNet18,
    use_torch_batchnorm,
)


def _pair(channels: int = 6) -> tuple[nn.BatchNorm2d, BatchNorm2d]:
    """A reference nn.BatchNorm2d and ours with the same non-trivial weights and statistics."""
    ref, ours = nn.BatchNorm2d(channels), BatchNorm2d(channels)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2, channels))
        ref.bias.copy_(torch.linspace(-1, 1, channels))
        ref.running_mean.copy_(torch.linspace(-0.3, 0.3, channels))
        ref.running_var.copy_(torch.linspace(0.5, 3, channels))
    ours.load_state_dict(ref.state_dict())  # same parameters, buffers and keys
    return ref, ours


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("weights_require_grad", [True, False])
def test_eval_mode_matches_torch_forward_exactly_and_backward_to_rounding(layout,
                                                                          weights_require_grad):
    ref, ours = _pair()
    ref.eval(), ours.eval()
    for m in (ref, ours):
        m.requires_grad_(weights_require_grad)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=gen).contiguous(memory_format=layout)
    grad = torch.randn(4, 6, 5, 5, generator=gen).contiguous(memory_format=layout)
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert torch.equal(y_ref, y_ours)  # the forward pass is F.batch_norm's own
    y_ref.backward(grad)
    y_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # The point of the class: the input gradient keeps the gradient's memory layout.
    assert x_ours.grad.is_contiguous(memory_format=layout)
    for name in ("weight", "bias"):
        g_ref, g_ours = getattr(ref, name).grad, getattr(ours, name).grad
        if weights_require_grad:
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5)
        else:
            assert g_ref is None and g_ours is None
    assert torch.equal(ref.running_mean, ours.running_mean)  # eval mode updates nothing


def test_train_mode_and_no_grad_eval_are_torch_batchnorm():
    ref, ours = _pair()
    x = torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    ref.train(), ours.train()
    assert torch.equal(ref(x), ours(x))
    assert torch.equal(ref.running_var, ours.running_var)  # statistics updated alike
    assert torch.equal(ref.num_batches_tracked, ours.num_batches_tracked)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))


def test_eval_input_gradient_of_the_model_matches_torch_batchnorm():
    """What every attack step computes: the input gradient of the eval-mode model, weights
    frozen, equals the one of the same model built from nn.BatchNorm2d."""
    torch.manual_seed(0)
    model = PreActResNet18(width=4).eval()
    reference = use_torch_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, BatchNorm2d) for m in reference.modules())
    assert reference.state_dict().keys() == model.state_dict().keys()
    # Statistics a trained model would have, not the initial zeros and ones.
    with torch.no_grad():
        for a, b in zip(model.modules(), reference.modules(), strict=True):
            if isinstance(a, nn.BatchNorm2d):
                for buf in ("running_mean", "running_var"):
                    value = torch.rand_like(getattr(a, buf)) + 0.5
                    getattr(a, buf).copy_(value), getattr(b, buf).copy_(value)
    model.requires_grad_(False), reference.requires_grad_(False)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 4])
    grads = []
    for m in (model, reference):
        xr = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(m(xr), y)
        grads.append(torch.autograd.grad(loss, xr)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_first_and_second_derivatives_pass_gradcheck():
    """In float64 the hand-written backward is checked against finite differences, and so is its
    own derivative (gradients of gradients, e.g. for input-gradient penalties)."""
    _, ours = _pair(3)
    ours = ours.double().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    inputs = (x, ours.weight, ours.bias)

    from anchor_lib.models import _EvalBatchNormFn

    def bn(x, weight, bias):
        return _EvalBatchNormFn.apply(x, ours.running_mean, ours.running_var, weight, bias,
                                      ours.eps)

    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)


# --- the architecture, against a functional transcription of the reference ----------------------
#
# The reference is the PreAct ResNet-18 of Rice et al. (2020, "Overfitting in adversarially robust
# deep learning", preactresnet.py), which the robustness literature (and RobustBench) use: 1x1
# convolution shortcuts without BatchNorm that branch off after the first BN-ReLU, and a final
# BN-ReLU before 4x4 average pooling. Written out here with torch.nn.functional from the model's
# state_dict, so that a changed stride, padding, shortcut or residual sign cannot pass unnoticed.

def _bn(sd: dict, name: str, x: torch.Tensor, train: bool) -> torch.Tensor:
    return nn.functional.batch_norm(x, sd[f"{name}.running_mean"].clone(),
                                    sd[f"{name}.running_var"].clone(), sd[f"{name}.weight"],
                                    sd[f"{name}.bias"], train, 0.1, 1e-5)


def _reference(sd: dict, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, z) of the reference architecture for images ``x`` in [0, 1]."""
    f = nn.functional
    out = f.conv2d((x - sd["normalize.mean"]) / sd["normalize.std"], sd["conv1.weight"], padding=1)
    width = sd["conv1.weight"].shape[0]
    in_planes = width
    for stage, stride in enumerate((1, 2, 2, 2), start=1):
        planes = width * 2 ** (stage - 1)
        for block, s in enumerate((stride, 1)):
            p = f"layer{stage}.{block}."
            pre = f.relu(_bn(sd, p + "bn1", out, train))
            shortcut = (f.conv2d(pre, sd[p + "shortcut.weight"], stride=s)
                        if s != 1 or in_planes != planes else out)
            h = f.conv2d(pre, sd[p + "conv1.weight"], stride=s, padding=1)
            h = f.conv2d(f.relu(_bn(sd, p + "bn2", h, train)), sd[p + "conv2.weight"], padding=1)
            out, in_planes = h + shortcut, planes
    assert out.shape[-2:] == (4, 4), "a 32x32 image ends as a 4x4 map"
    feats = f.avg_pool2d(f.relu(_bn(sd, "bn", out, train)), 4).flatten(1)
    hidden = f.relu(f.linear(feats, sd["head.0.weight"], sd["head.0.bias"]))
    z = f.linear(hidden, sd["head.2.weight"], sd["head.2.bias"])
    return f.linear(feats, sd["linear.weight"], sd["linear.bias"]), f.normalize(z, dim=1)


@pytest.mark.parametrize("train", [False, True])
def test_model_is_the_reference_preact_resnet18(train):
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=7, width=4, proj_dim=5)
    with torch.no_grad():  # non-trivial statistics and affine parameters, so BN matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    shortcuts = {k for k in sd if "shortcut" in k}
    assert shortcuts == {f"layer{i}.0.shortcut.weight" for i in (2, 3, 4)}
    assert not any(k.endswith(".bias") and "conv" in k for k in sd), "convolutions have no bias"
    x = torch.rand(6, 3, 32, 32)
    model.train(train)
    logits, z = model.forward_all(x)
    want_logits, want_z = _reference(sd, x, train)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z, want_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.project(x), want_z, rtol=1e-4, atol=1e-5)
    assert model.features(x).shape == (6, 8 * 4) and model.feature_dim == 32

    # Eval mode's input gradient (every attack step) goes through the custom BatchNorm backward.
    if not train:
        xr = x.clone().requires_grad_(True)
        model(xr).logsumexp(1).sum().backward()
        xw = x.clone().requires_grad_(True)
        _reference(sd, xw, train)[0].logsumexp(1).sum().backward()
        torch.testing.assert_close(xr.grad, xw.grad, rtol=1e-4, atol=1e-6)


def test_normalisation_is_part_of_the_model():
    """An image at the dataset mean becomes zeros, one standard deviation above it ones."""
    model = PreActResNet18(width=1, proj_dim=1)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(mean), torch.zeros(2, 3, 4, 4))
    torch.testing.assert_close(model.normalize(mean + std), torch.ones(2, 3, 4, 4))


def test_defaults_are_the_standard_resnet18_with_a_128_d_head():
    """Rice et al.'s PreAct ResNet-18 for 10 classes has 11,172,170 parameters (Kuang Liu's
    version, without the final BatchNorm, 1,024 fewer); the head adds 512x512 + 512x128."""
    with torch.device("meta"):
        model = PreActResNet18()
    assert (model.num_classes, model.width, model.proj_dim) == (10, 64, 128)
    count = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 512 * 512 + 512 + 512 * 128 + 128
    assert count - head == 11_172_170
    two = PreActResNet18(num_classes=2, width=1, proj_dim=1).eval()
    assert two(torch.rand(1, 3, 8, 8)).shape == (1, 2)


def test_batchnorm_uses_the_custom_backward_only_for_eval_input_gradients():
    """The layout-keeping backward runs exactly where it is needed: eval mode with an input that
    requires grad. Train mode, and eval without grad, are PyTorch's own kernels."""
    _, ours = _pair(3)
    x = torch.randn(2, 3, 4, 4)
    assert "EvalBatchNormFn" in ours.eval()(x.requires_grad_(True)).grad_fn.name()
    assert "EvalBatchNormFn" not in ours.train()(x).grad_fn.name()
    with torch.no_grad():
        assert ours.eval()(x).grad_fn is None
    # Without an input gradient only the weights need one: PyTorch's backward computes those.
    assert "EvalBatchNormFn" not in ours.eval()(x.detach()).grad_fn.name()
