"""Layout helpers of the non-local block: maps (B, C, H, W) as rows (B, H*W, C), and NCHW <-> channels-last."""
import torch

__all__ = ["rows", "rows_to_map", "in_layout_of", "residual_sum", "for_convolutions"]


def rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), a view: one row per position."""
    return t.flatten(2).transpose(1, 2)


def rows_to_map(t: torch.Tensor, size) -> torch.Tensor:
    """
    (B, H*W, C) rows -> (B, C, H, W): a view for contiguous rows (channels-last strides) and for the rows
    view of an NCHW map (NCHW strides); a copy otherwise.
    """
    b, _, c = t.shape
    return t.transpose(1, 2).reshape(b, c, *size)


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """
    (B, C, H, W) ``t`` in the memory layout of ``like``, for an elementwise op between the two: on the CPU a
    channels-last ``t`` beside an NCHW ``like`` becomes NCHW (by :func:`_to_nchw`; its gradient goes back
    channels-last), since ATen's elementwise kernels and 4-D copies read a mixed layout slowly (res4 at
    batch 2, bfloat16: x + t took 54 ms, the 2-D transposes and an NCHW sum 25 ms). Otherwise ``t`` itself.
    """
    if t.is_cuda or _tracing() or not like.is_contiguous() or not is_channels_last(t):
        return t
    return _ChannelsLastToNchw.apply(t)


def residual_sum(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """
    ``x + out`` in x's memory layout (by :func:`in_layout_of`) and in the dtype ``x + out`` has. Where out
    is the narrower dtype (bfloat16 under autocast) on the CPU, out is cast and x added to the cast in
    place: the CPU's mixed-dtype sum makes that cast as a temporary and then a result besides (res3,
    batch 2: 31 ms, in place 20 ms). CUDA's elementwise kernels cast as they read: one pass.
    """
    out = in_layout_of(out, x)
    wider = torch.promote_types(x.dtype, out.dtype)
    if out.is_cuda or out.dtype == wider or x.dtype != wider or out.stride() != x.stride():
        return x + out
    return out.to(wider).add_(x)


def for_convolutions(x: torch.Tensor, readers: int, num_keys: int) -> torch.Tensor:
    """
    ``x`` as the CPU's 1x1 convolutions take it fastest, for ``readers`` convolutions of it in a block with
    ``num_keys`` keys: an NCHW ``x`` copied channels-last (its gradient goes back to NCHW and x's dtype, see
    :func:`_to_nchw`), since oneDNN's convolution of an NCHW map reorders its input, output and gradients:

    * under bfloat16 autocast, cast to bfloat16 as well: theta at res4 (batch 2, forward+backward) took
      108 ms on the NCHW map, 77 ms on this one;
    * in float32, where the copy serves three convolutions (theta, phi and g) and there are at least four
      keys per channel of x (N' >= 4C). The block's forward+backward, batch 2, with the copy against
      without: dot product 0.80-0.84 at res3 (512 x 100 x 168), 0.95 at res4 without subsampling, 0.87
      at 512 x 50 x 84; embedded Gaussian 0.91 at res3, 0.98 at res4 without subsampling. A copy for one
      or two of the convolutions (x pooled for the keys; gaussian) read 1.02-1.04 at res4. The copy is
      held for backward beside x, a sizable part of the peak memory where the N x N' matrix is not much
      larger than x: res4 subsampled (1050 keys, 1024 channels) took 224 MB with it, 190 MB without, the
      naive form 207 MB.

    Otherwise (and on CUDA, and while traced or compiled) ``x`` itself.
    """
    if x.is_cuda or _tracing() or x.dtype != torch.float32 or not x.is_contiguous():
        return x
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return x
        return _NchwToChannelsLast.apply(x, torch.bfloat16)
    if readers < 3 or num_keys < 4 * x.shape[1]:
        return x
    return _NchwToChannelsLast.apply(x, torch.float32)


class _NchwToChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype, memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        if not is_channels_last(grad):
            grad = grad.contiguous(memory_format=torch.channels_last)
        return _to_nchw(grad), None  # autograd casts it to x's dtype


def _tracing():
    # Traced or compiled, the layout is the tracer's business, and FLOP counters see one operator fewer.
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out channels-last and not also NCHW-contiguous."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _to_nchw(t):
    """
    A channels-last ``t`` (B, C, H, W) copied to NCHW by one (H*W, C) -> (C, H*W) transpose per image. ATen's
    copy of a transposed 2-D matrix is blocked for the cache, its 4-D copy is not (res3, batch 2, float32:
    38 ms against 79). The other way, ``contiguous(memory_format=torch.channels_last)`` has a kernel of
    its own (24 ms against 36 for the per-image transposes; cast to bfloat16 on the way, 19 against 35).
    """
    b, c, h, w = t.shape
    out = torch.empty((b, c, h, w), dtype=t.dtype, device=t.device)
    for i in range(b):
        out[i].view(c, h * w).copy_(t[i].permute(1, 2, 0).reshape(h * w, c).t())
    return out


class _ChannelsLastToNchw(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return _to_nchw(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)
