"""The non-local block's key subsampling: a 2x2 max-pool that keeps no indices for backward."""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .layout import is_channels_last

__all__ = ["max_pool_2x2"]

# The four positions of a 2x2 cell, in the order max_pool2d scans them (its first maximum wins).
_CELL = ((0, 0), (0, 1), (1, 0), (1, 1))


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """
    ``F.max_pool2d(x, 2, ceil_mode=True)``: odd-sized maps keep their last row/column as keys instead of
    dropping them. (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)), NCHW. Under autograd it keeps only x,
    which the layers around it keep anyway, and finds the maxima again in backward, instead of keeping
    int64 indices (twice the pooled map's float32 size, at the block's peak of memory). Without autograd,
    while traced or compiled, and on CUDA, it is ``max_pool2d`` itself: one operator for export and FLOP
    counters, without the strided quarters' guards on the parity of dynamic sizes; on CUDA one kernel each
    way, where the block at res4 takes longer to launch its kernels than to run them (H200, the Table 5
    case: 1.3 ms of GPU time per forward+backward, 3-4 ms of wall time), and the indices are 17 MB there.
    """
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if torch.is_grad_enabled() and x.requires_grad and not tracing and not x.is_cuda:
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2, ceil_mode=True)


def _cell_maxima(x):
    """
    The maxima of the 2x2 cells as three elementwise maxima of x's four strided quarters: on an NCHW map
    3-4x faster than max_pool2d's CPU kernel (which also computes indices, 20 ms at res4 on a 2-core EPYC).
    NaNs propagate as in max_pool2d.
    """
    out = x[..., 0::2, 0::2].clone(memory_format=torch.contiguous_format)
    for row, col in _CELL[1:]:
        quarter = x[..., row::2, col::2]  # one row/column short of out where H/W is odd
        target = out[..., : quarter.shape[-2], : quarter.shape[-1]]
        torch.maximum(target, quarter, out=target)
    return out


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _cell_maxima(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        # Gradient and indices in one layout: max_pool2d's backward kernel for a channels-last gradient
        # (what a convolution's backward hands over) of an NCHW map took 5x as long as for an NCHW one.
        # 16-bit maps on the CPU go through channels-last, whose kernels are the fast ones there (res4's
        # bfloat16 phi(x): 10.9 ms against 16.0 in NCHW, copies included; float32: 83 against 40).
        work = torch.channels_last if x.dtype in (torch.bfloat16, torch.float16) and not x.is_cuda else layout
        x = x.contiguous(memory_format=work)
        _, indices = F.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
        grad = grad.contiguous(memory_format=work)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], True, indices)
        return grad_x.contiguous(memory_format=layout)
