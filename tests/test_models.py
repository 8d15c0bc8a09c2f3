"""models.BatchNorm2d is nn.BatchNorm2d, with an eval-mode backward that keeps the layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from anchor_lib.models import BatchNorm2d, PreActResNet18, use_torch_batchnorm


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
