"""The block's layout helpers (nl_detectron/layout.py): values and gradients unchanged, layouts as stated."""
import pytest
import torch

from nl_detectron.layout import for_convolutions, in_layout_of, residual_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_layout_of_turns_channels_last_into_nchw_and_back(dtype):
    t = torch.randn(2, 5, 7, 3, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    like = torch.empty(2, 5, 7, 3)
    out = in_layout_of(t, like)
    assert out.is_contiguous() and torch.equal(out, t)
    grad = torch.randn(out.shape, dtype=dtype)
    (grad_t,) = torch.autograd.grad(out, t, grad)
    assert torch.equal(grad_t, grad)
    assert grad_t.is_contiguous(memory_format=torch.channels_last)  # what the convolution's backward takes
    # Same layouts, or a channels-last like: t itself.
    assert in_layout_of(t, like.contiguous(memory_format=torch.channels_last)) is t
    nchw = t.detach().contiguous()
    assert in_layout_of(nchw, like) is nchw


def test_for_convolutions_casts_and_makes_channels_last_under_bfloat16_autocast():
    x = torch.randn(2, 6, 5, 3, requires_grad=True)
    assert for_convolutions(x, readers=1, num_keys=1) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = for_convolutions(x, readers=1, num_keys=1)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, x.detach().bfloat16())
    grad = torch.randn(out.shape).bfloat16()
    for given in (grad, grad.contiguous(memory_format=torch.channels_last)):
        (grad_x,) = torch.autograd.grad(out, x, given, retain_graph=True)
        assert grad_x.dtype == torch.float32 and grad_x.is_contiguous()  # x's dtype and layout
        assert torch.equal(grad_x, grad.float())
    x_last = x.detach().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert for_convolutions(x_last, readers=1, num_keys=1) is x_last  # already channels-last: autocast casts it


def test_for_convolutions_in_float32_copies_for_three_readers_and_four_keys_per_channel():
    x = torch.randn(2, 6, 5, 3, requires_grad=True)
    out = for_convolutions(x, readers=3, num_keys=24)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, x)
    grad = torch.randn(out.shape)
    for given in (grad, grad.contiguous(memory_format=torch.channels_last)):
        (grad_x,) = torch.autograd.grad(out, x, given, retain_graph=True)
        assert grad_x.is_contiguous() and torch.equal(grad_x, grad)
    assert for_convolutions(x, readers=2, num_keys=24) is x
    assert for_convolutions(x, readers=3, num_keys=23) is x
    x_last = x.detach().contiguous(memory_format=torch.channels_last)
    assert for_convolutions(x_last, readers=3, num_keys=24) is x_last
    with torch.autocast("cpu", dtype=torch.float16):  # 16-bit autocast but bfloat16: x itself
        assert for_convolutions(x, readers=3, num_keys=24) is x


def test_without_autograd_the_same_copies():
    t = torch.randn(2, 5, 7, 3).contiguous(memory_format=torch.channels_last)
    out = in_layout_of(t, torch.empty(2, 5, 7, 3))
    assert out.is_contiguous() and torch.equal(out, t)
    x = torch.randn(2, 6, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = for_convolutions(x, readers=1, num_keys=1)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, x.bfloat16())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("out_format", [torch.contiguous_format, torch.channels_last])
def test_residual_sum_is_x_plus_out_in_x_layout(out_dtype, x_format, out_format):
    x = torch.randn(2, 5, 7, 3).contiguous(memory_format=x_format).requires_grad_(True)
    out = torch.randn(2, 5, 7, 3).to(out_dtype).contiguous(memory_format=out_format).requires_grad_(True)
    z = residual_sum(x, out)
    assert z.dtype == torch.float32 and torch.equal(z, x + out)
    assert z.is_contiguous(memory_format=x_format)
    grad = torch.randn(z.shape)
    grad_x, grad_out = torch.autograd.grad(z, (x, out), grad)
    assert torch.equal(grad_x, grad) and torch.equal(grad_out, grad.to(out_dtype))
