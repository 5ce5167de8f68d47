"""The non-local block's key subsampling: a 2x2 max-pool that keeps no indices for backward."""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["max_pool_2x2"]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """
    ``F.max_pool2d(x, 2, ceil_mode=True)``: odd-sized maps keep their last row/column as keys instead of
    dropping them. (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)). Under autograd it keeps only x, which the
    layers around it keep anyway, and finds the maxima again in backward, instead of keeping int64
    indices (twice the pooled map's float32 size, at the block's peak of memory).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2, ceil_mode=True)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 2, ceil_mode=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, indices = F.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], True, indices)
