"""The non-local block of Wang et al., "Non-local Neural Networks" (CVPR 2018), for 2-D feature maps."""
import contextlib
import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from detectron2.layers import Conv2d, get_norm

__all__ = ["NonLocalBlock2d", "NonLocalArgumentError", "NONLOCAL_MODES", "NONLOCAL_NORMS"]

NONLOCAL_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
# detectron2's norm names (detectron2.layers.get_norm). "FrozenBN" is left out on purpose: a frozen
# norm whose scale starts at zero would keep the block an identity mapping forever.
NONLOCAL_NORMS = ("", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "GN", "LN")


class NonLocalBlock2d(nn.Module):
    """
    ``z = x + W_z(y)`` with ``y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j)`` (paper, eq. 1 and 6).

    Positions i run over the H x W input; positions j over the keys, which are the input's positions or,
    with ``sub_sample``, those of a 2x2 max-pool of phi(x) and g(x) (paper, section 3.3), or, with
    ``sub_sample_input`` as well, phi and g of a 2x2 max-pool of x (the authors' released code).
    ``mode`` picks the pairwise function f and its normaliser C(x) (paper, section 3.2):

    * ``embedded_gaussian``: softmax_j(theta(x_i)^T phi(x_j) * s), the paper's default.
    * ``gaussian``: softmax_j(x_i^T x_j * s), no theta/phi embeddings (keys still max-pooled).
    * ``dot_product``: theta(x_i)^T phi(x_j) / N', N' the number of keys.
    * ``concatenation``: ReLU(w_f^T [theta(x_i), phi(x_j)]) / N'.

    ``s`` is ``1/sqrt(d)`` (d: channels of the dot product) when ``use_scale``, else 1.

    Only ``gaussian`` on the CPU keeps an N x N' pairwise matrix for backward: ``embedded_gaussian``
    runs through :func:`torch.nn.functional.scaled_dot_product_attention` (its fused kernel recomputes
    the weights in backward; on CUDA, for embeddings over 256-d, so does a backward of ours that works
    through query chunks, see :func:`_slow_fused_backward`), ``dot_product`` computes
    ``theta (phi^T g) / N'`` (linear in N), and ``concatenation`` works through query chunks that are
    recomputed in backward. ``gaussian`` runs through SDPA on CUDA; on the CPU, whose fused kernel needs
    as many value as key channels, it compares x itself, C channels rather than C / reduction, so
    recomputing its logits in backward would cost more time than the materialising form; it keeps the
    softmax weights (one N x N' matrix, where autograd through matmul-softmax-matmul holds three to
    four) and runs its backward through query chunks. :meth:`pairwise_weights` materialises the matrix
    when one wants to see it.

    The block is an identity mapping at initialisation: W_z is zero when ``norm`` is empty, otherwise
    the scale of the norm after W_z is zero (paper, section 4.1).
    """

    # Upper bounds on the elements of one query chunk of the pairwise matrix. On the CPU 16 MiB in fp32,
    # cache-sized. On CUDA larger, since GPU kernels need large work items (at 16 MiB, concatenation was
    # 2-5x slower on an H100 for the launch overheads): 256 MiB for concatenation, 64 MiB for the softmax
    # modes' chunked backward, which holds a few such matrices at once.
    concat_chunk_elements = 1 << 22
    concat_chunk_elements_cuda = 1 << 26
    gaussian_chunk_elements = 1 << 22
    softmax_chunk_elements_cuda = 1 << 24

    def __init__(
        self,
        in_channels: int,
        *,
        mode: str = "embedded_gaussian",
        reduction: int = 2,
        sub_sample: bool = True,
        sub_sample_input: bool = False,
        use_scale: bool = True,
        norm: str = "",
    ):
        """
        Args:
            in_channels: channels C of the input (and output).
            mode: one of :data:`NONLOCAL_MODES`.
            reduction: theta, phi and g have ``in_channels // reduction`` channels (the paper: 2).
            sub_sample: 2x2 max-pool phi(x) and g(x), so there are ~4x fewer keys (the paper: yes).
            sub_sample_input: with ``sub_sample``, max-pool x before the phi and g convolutions
                instead of pooling their outputs: what the authors' code does (the paper's text pools
                after phi and g). Same key grid, a quarter of the phi/g multiply-adds, different values
                (max-pooling does not commute with a convolution).
            use_scale: scale the softmax logits by 1/sqrt(d). The paper does not; the authors'
                released code does, and unscaled logits of 512-d embeddings saturate the softmax (and
                overflow float16 wherever they are materialised), hence the default True. Only used by
                the softmax modes.
            norm: norm after W_z, by detectron2's name (one of :data:`NONLOCAL_NORMS`); "" for none.
        """
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_choice("mode", mode, NONLOCAL_MODES)
        _check_int("reduction", reduction)
        _check_choice("norm", norm, NONLOCAL_NORMS)
        _check_bool("sub_sample", sub_sample)
        _check_bool("sub_sample_input", sub_sample_input)
        if sub_sample_input and not sub_sample:
            raise NonLocalArgumentError(
                "sub_sample_input", sub_sample_input,
                "chooses where the subsampling max-pool goes, so it needs sub_sample=True "
                "(got sub_sample=False); valid choices here: False",
            )
        _check_bool("use_scale", use_scale)
        if in_channels % reduction != 0:
            raise NonLocalArgumentError(
                "reduction", reduction,
                f"must divide in_channels={in_channels} so that the inner channels "
                f"in_channels // reduction are a positive integer (here {in_channels / reduction:g}); "
                f"valid choices: {', '.join(str(d) for d in range(1, in_channels + 1) if in_channels % d == 0)}",
            )
        inner = in_channels // reduction
        if norm == "GN" and in_channels % 32 != 0:
            raise NonLocalArgumentError(
                "norm", norm, f"uses 32 groups, which must divide in_channels={in_channels}"
            )
        self.in_channels = in_channels
        self.inner_channels = inner
        self.mode = mode
        self.sub_sample = bool(sub_sample)
        self.sub_sample_input = bool(sub_sample_input)
        self.use_scale = bool(use_scale)

        # Gaussian compares the inputs themselves: theta and phi are the identity.
        embedded = mode != "gaussian"
        self.theta = nn.Conv2d(in_channels, inner, 1) if embedded else None
        self.phi = nn.Conv2d(in_channels, inner, 1) if embedded else None
        self.g = nn.Conv2d(in_channels, inner, 1)
        # w_f of the concatenation form, split as [w_theta, w_phi] so that
        # w_f^T [theta_i, phi_j] = w_theta^T theta_i + w_phi^T phi_j.
        self.concat_project = nn.Linear(2 * inner, 1, bias=False) if mode == "concatenation" else None
        self.w_z = Conv2d(inner, in_channels, 1, bias=not norm, norm=get_norm(norm, in_channels))

        # The authors' code: Gaussian(0, 0.01) weights, zero biases, zero-initialised output.
        for m in (self.theta, self.phi, self.g, self.concat_project):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if norm:
            nn.init.normal_(self.w_z.weight, std=0.01)
            nn.init.zeros_(self.w_z.norm.weight)
            nn.init.zeros_(self.w_z.norm.bias)
        else:
            nn.init.zeros_(self.w_z.weight)
            nn.init.zeros_(self.w_z.bias)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inner_channels={self.inner_channels}, "
            f"mode={self.mode}, sub_sample={self.sub_sample}, sub_sample_input={self.sub_sample_input}, "
            f"use_scale={self.use_scale}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, C, H, W) with C == in_channels.

        Returns:
            (B, C, H, W): ``x + W_z(y)``.
        """
        b, _, h, w = self._check_input(x).shape
        query, key, value = self._embed(x)
        y = self._aggregate(query, key, value)  # (B, H*W, inner)
        # In x's memory layout (the rows' transpose is channels-last), so that W_z's output, and so the
        # block's, keeps it: a channels-last output from an NCHW input would send every later layer down
        # other conv kernels, and the block would no longer be the exact identity at initialisation.
        y = _rows_to_map(y.contiguous(), (h, w))  # channels-last strides, a view
        out = self.w_z(_to_memory_format(y, _memory_format(x)))
        # In place into W_z's fresh output (no backward keeps it) instead of allocating another x-sized
        # tensor; out of place where autocast made it lower precision than x.
        return out.add_(x) if out.dtype == x.dtype else x + out

    @torch.no_grad()
    def pairwise_weights(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """
        The normalised pairwise weights f(x_i, x_j) / C(x) that :meth:`forward` applies, materialised.
        For inspection (e.g. tools/visualize_attention.py); only the gaussian mode builds it in forward.

        Args:
            x: (B, C, H, W), the block's input.

        Returns:
            weights: (B, H*W, N') with N' = Hk*Wk keys; rows sum to 1 in the softmax modes.
            (Hk, Wk): the key grid.
        """
        self._check_input(x)
        query, key, _ = self._embed(x)
        if query.dtype in (torch.float16, torch.bfloat16):  # keep float64 as it is
            query, key = query.float(), key.float()
        if self.mode in ("embedded_gaussian", "gaussian"):
            weights = torch.softmax(query @ key.transpose(1, 2) * self._scale(query), dim=-1)
        elif self.mode == "dot_product":
            weights = query @ key.transpose(1, 2) / key.shape[1]
        else:
            u, v = self._concat_terms(query, key)
            weights = F.relu(u[:, :, None] + v[:, None, :]) / key.shape[1]
        return weights, self.key_grid(x.shape[-2], x.shape[-1])

    def key_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(Hk, Wk): the key positions' grid for an input of ``height`` x ``width``."""
        if self.sub_sample:
            return math.ceil(height / 2), math.ceil(width / 2)
        return height, width

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"NonLocalBlock2d expects a 4-D input (B, C, H, W); got x with shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"NonLocalBlock2d was built with in_channels={self.in_channels}; "
                f"got x with {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        return x

    def _embed(self, x: torch.Tensor):
        """
        query (B, N, d), key (B, N', d) and value (B, N', inner): one row per position.

        theta, phi and g run as one 1x1 convolution (:func:`_pointwise_rows`), so that x is read once and
        gets one gradient instead of three (with ``sub_sample_input``, phi and g run on the pooled x). The
        convolution writes one contiguous row per position, so q/k/v are column slices of it, which
        SDPA's fused CPU kernel takes (it needs a unit stride along the channels, and otherwise falls back
        to the math path, which materialises the N x N' matrix). ``gaussian`` compares x itself: its
        q/k/v are views of x and g(x), which its batched matmuls take as they are.
        """
        # ceil_mode: odd-sized maps keep their last row/column as keys instead of dropping them.
        pool = lambda t: F.max_pool2d(t, 2, ceil_mode=True)  # noqa: E731
        if self.mode == "gaussian":
            if not self.sub_sample:
                key, value = x, self.g(x)
            elif self.sub_sample_input:
                key = pool(x)
                value = self.g(key)
            else:
                key, value = pool(x), pool(self.g(x))
            return _rows(x), _rows(key), _rows(value)
        d = self.inner_channels
        if not self.sub_sample:
            return _pointwise_rows(x, (self.theta, self.phi, self.g)).split(d, dim=-1)
        if self.sub_sample_input:
            # In inference, pool a channels-last copy of x, which theta's convolution then reads too: the
            # CPU's max-pool is ~20x faster in that layout (0.5 vs 8.6 ms at res4). With autograd the pool
            # would keep that copy for its backward (x itself is kept anyway): pool x then.
            source = x if torch.is_grad_enabled() else x.contiguous(memory_format=torch.channels_last)
            key, value = _pointwise_rows(pool(source), (self.phi, self.g)).split(d, dim=-1)
            return _pointwise_rows(source, (self.theta,)), key, value
        rows = _pointwise_rows(x, (self.theta, self.phi, self.g))
        # phi/g's columns seen as a (B, 2d, H, W) map (channels-last strides, no copy), pooled in that
        # layout, whose rows are then contiguous again.
        key_value = _rows(pool(_rows_to_map(rows[..., d:], x.shape[-2:]))).contiguous()
        return (rows[..., :d], *key_value.split(d, dim=-1))

    def _scale(self, query: torch.Tensor) -> float:
        return 1.0 / math.sqrt(query.shape[-1]) if self.use_scale else 1.0

    def _softmax_attention(self, query, key, value):
        """softmax(q k^T * s) v through SDPA, with the chunked backward where CUDA has no fast fused one."""
        scale = self._scale(query)
        if _slow_fused_backward(query):
            chunk = max(1, self.softmax_chunk_elements_cuda // (key.shape[0] * key.shape[1]))
            return _SdpaChunkedBackward.apply(query, key, value, scale, chunk)
        return _sdpa_rows(query, key, value, scale)

    def _concat_terms(self, query, key):
        w_theta, w_phi = self.concat_project.weight.to(query.dtype).chunk(2, dim=1)
        return (query @ w_theta.t()).squeeze(-1), (key @ w_phi.t()).squeeze(-1)

    def _aggregate(self, query, key, value):
        out_dtype = query.dtype
        num_keys = key.shape[1]
        if self.mode == "embedded_gaussian":
            # float16 as it is: SDPA's fused kernels (CPU and CUDA) accumulate the dot products and the
            # softmax in float32, so logits beyond float16's range do not overflow (tested).
            return self._softmax_attention(query, key, value)
        if self.mode == "gaussian":
            return self._gaussian_aggregate(query, key, value).to(out_dtype)
        # float16 cannot hold the dot products or sums over thousands of positions: compute in float32,
        # with autocast off (it would cast the matrix products back to float16).
        upcast = out_dtype == torch.float16
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        with torch.autocast(query.device.type, enabled=False) if upcast else contextlib.nullcontext():
            if self.mode == "dot_product":
                # (theta phi^T) g / N' == theta (phi^T g) / N': never forms the N x N' matrix.
                y = query @ (key.transpose(1, 2) @ value) / num_keys
            else:
                y = self._concat_aggregate(query, key, value)
        return y.to(out_dtype)

    def _gaussian_aggregate(self, query, key, value):
        # Under autocast x stays float32 while g(x) is bfloat16; the logits x_i . x_j are large (C terms),
        # so compute in float32 unless all of q/k/v are float64.
        dtype = torch.float64 if all(t.dtype == torch.float64 for t in (query, key, value)) else torch.float32
        query, key, value = (t.to(dtype) for t in (query, key, value))
        scale = self._scale(query)
        if _on_cuda(query):
            # CUDA's memory-efficient SDPA kernel takes C-channel logits against C/2-channel values (CPU's
            # fused kernel needs one channel count: there the padded values cost more time than the matrix).
            with torch.autocast("cuda", enabled=False):
                return self._softmax_attention(*(t.contiguous() for t in (query, key, value)))
        chunk = max(1, self.gaussian_chunk_elements // (key.shape[0] * key.shape[1]))
        with torch.autocast(query.device.type, enabled=False):
            if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
                # Without subsampling the keys are the queries (x itself): pass None for the symmetric form.
                block = max(1, math.isqrt(self.gaussian_chunk_elements // key.shape[0]))
                keys = None if not self.sub_sample else key
                return _SoftmaxAttentionKeepingWeights.apply(query, keys, value, scale, chunk, block)
            return _softmax_attention_by_chunks(query, key, value, scale, chunk)

    def _concat_aggregate(self, query, key, value):
        u, v = self._concat_terms(query, key)  # (B, N), (B, N')
        b, n = u.shape
        budget = self.concat_chunk_elements_cuda if value.is_cuda else self.concat_chunk_elements
        chunk = max(1, budget // (b * key.shape[1]))
        recompute = torch.is_grad_enabled() and any(
            t.requires_grad for t in (u, v, value)
        )
        outs = []
        for start in range(0, n, chunk):
            u_chunk = u[:, start : start + chunk]
            if recompute:
                # Recompute the chunk's pairwise matrix in backward instead of keeping all of them.
                outs.append(checkpoint(_concat_chunk, u_chunk, v, value, use_reentrant=False))
            else:
                outs.append(_concat_chunk(u_chunk, v, value))
        return torch.cat(outs, dim=1)


def _rows(t):
    """(B, C, H, W) -> (B, H*W, C), a view: one row per position."""
    return t.flatten(2).transpose(1, 2)


def _rows_to_map(rows, size):
    """(B, H*W, C) rows -> (B, C, H, W), a view (channels-last strides when the rows are contiguous)."""
    b, _, c = rows.shape
    return rows.transpose(1, 2).view(b, c, *size)


def _memory_format(t):
    """channels_last for a (B, C, H, W) tensor in that layout (and not NCHW-contiguous too), else NCHW's."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _to_memory_format(t, memory_format):
    """
    ``t`` (B, C, H, W) contiguous in ``memory_format``. From channels-last to NCHW on the CPU, one 2-D
    transposed copy per sample: torch's CPU copy runs those as a blocked transpose, ~5x faster than its
    strided copy of the 4-D tensor (x's size at res4, batch 2: 6.6 vs 29 ms).
    """
    if (memory_format != torch.contiguous_format or t.is_cuda or t.is_contiguous()
            or not t.is_contiguous(memory_format=torch.channels_last)):
        return t.contiguous(memory_format=memory_format)
    b, c, h, w = t.shape
    out, src = t.new_empty(b, c, h * w), t.flatten(2)  # src: strides (H*W*C, 1, C), a view
    for i in range(b):  # indexing, not iterating: autograd refuses in-place copies into unbind's views
        out[i].copy_(src[i])
    return out.view(b, c, h, w)


def _pointwise_rows(x, convs):
    """
    The 1x1 convolutions ``convs`` of x (B, C, H, W), stacked along their output channels, as rows
    (B, H*W, O), contiguous. They run on a channels-last copy of x: oneDNN's 1x1 kernels are fastest in
    that layout, and write one contiguous row per position (.contiguous() copies only should a kernel
    return another layout). The copy is not kept for backward (:class:`_PointwiseRows` makes it again
    there), and that Function is used only when a backward will run, so that inference stays plain tensor
    ops, which torch.jit.trace and ONNX export can save.
    """
    weight = torch.cat([conv.weight for conv in convs])  # (O, C, 1, 1)
    bias = torch.cat([conv.bias for conv in convs])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)):
        return _PointwiseRows.apply(x, weight, bias)
    return _conv1x1_rows(x, weight, bias)


def _conv1x1_rows(x, weight, bias):
    """conv2d(x, weight, bias) on a channels-last copy of x, as contiguous rows (B, H*W, O)."""
    return _rows(F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias)).contiguous()


class _PointwiseRows(torch.autograd.Function):
    """
    The autograd side of :func:`_pointwise_rows`. It keeps x itself (alive anyway: the layer before the
    block keeps it) rather than its channels-last copy, which backward makes again, and hands x's
    gradient back in x's own layout, so the layers before the block get the layout they produced.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.memory_format = _memory_format(x)
        return _conv1x1_rows(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad: (B, N, O)
        x, weight = ctx.saved_tensors
        b, _, h, w = x.shape
        x_cl = x.contiguous(memory_format=torch.channels_last)
        # Under autocast the forward ran in the lower precision of grad: so does its backward.
        x_cl, weight = x_cl.to(grad.dtype), weight.to(grad.dtype)
        grad_map = _rows_to_map(grad.contiguous(), (h, w))  # channels-last, as the conv's output was
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_map, x_cl, weight, [weight.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            list(ctx.needs_input_grad),
        )
        if grad_x is not None:
            grad_x = _to_memory_format(grad_x, ctx.memory_format)
        return grad_x, grad_weight, grad_bias


def _sdpa_rows(query, key, value, scale):
    """SDPA on (B, N, d) / (B, N', d) / (B, N', C') rows, as one attention head: (B, N, C')."""
    return F.scaled_dot_product_attention(
        query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), scale=scale
    ).squeeze(1)


def _on_cuda(t) -> bool:
    """Whether ``t`` is on CUDA, where the softmax modes take other paths (one place, for tests to force)."""
    return t.is_cuda


def _slow_fused_backward(query) -> bool:
    """
    Whether SDPA's backward would be slow: on CUDA, head dims over 256 (the 512-d embeddings of res4, x's
    channels for gaussian), which the flash and cuDNN kernels do not take, go to the memory-efficient
    kernel's variant for any head dim. Its backward took 5.6 ms of the res4 block's 6.7 ms of GPU time
    per forward+backward on an H100 (float16, batch 2, 800 x 1333), where the naive form's whole
    forward+backward took 1.5 ms. (At 256-d in float32, also the memory-efficient kernel, it took about
    the chunked backward's time with a quarter of its memory.)
    """
    return _on_cuda(query) and torch.is_grad_enabled() and query.shape[-1] > 256


class _SdpaChunkedBackward(torch.autograd.Function):
    """
    softmax(q k^T * scale) v for (B, N, d) queries, (B, N', d) keys and (B, N', C') values: forward through
    SDPA's fused kernel, which keeps nothing of size N x N'; backward over chunks of ``chunk`` query rows,
    each recomputing its rows of the softmax from q and k (a chunk holds whole rows, so its softmax is
    exact) and turning them into gradients with batched matrix products: the same work as the naive
    form's backward plus one product, with one chunk's matrices alive at a time. In float32 (float64 for
    float64 inputs), so that 16-bit logits cannot overflow.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale, chunk):
        out = _sdpa_rows(query, key, value, scale)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        q, k, v, out, grad_out = (t.to(dtype) for t in (query, key, value, out, grad_out))
        scale = ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            # d loss / d logits = P * (dL/dP - rowsum(P * dL/dP)), rowsum(P * dL/dP) = rowsum(dL/dout * out).
            row_dots = (grad_out * out).sum(dim=-1, keepdim=True)
            grad_q = torch.empty_like(q)
            grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
            k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
            for rows in _row_chunks(q.shape[1], ctx.chunk):
                probs = torch.softmax(torch.bmm(q[:, rows], k_t).mul_(scale), dim=-1)  # (B, n, N')
                grad_v.baddbmm_(probs.transpose(1, 2), grad_out[:, rows])
                grad_logits = torch.bmm(grad_out[:, rows], v_t).sub_(row_dots[:, rows]).mul_(probs).mul_(scale)
                grad_q[:, rows] = torch.bmm(grad_logits, k)
                grad_k.baddbmm_(grad_logits.transpose(1, 2), q[:, rows])
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None


def _row_chunks(num_rows, chunk):
    return [slice(start, start + chunk) for start in range(0, num_rows, chunk)]


def _softmax_attention_by_chunks(query, key, value, scale, chunk):
    """softmax(q k^T * scale) v one chunk of queries at a time, keeping nothing (inference)."""
    outs = []
    for rows in _row_chunks(query.shape[1], chunk):
        logits = torch.bmm(query[:, rows], key.transpose(1, 2)).mul_(scale)
        outs.append(torch.bmm(torch.softmax(logits, dim=-1), value))
    return torch.cat(outs, dim=1)


class _SoftmaxAttentionKeepingWeights(torch.autograd.Function):
    """
    softmax(q k^T * scale) v for (B, N, d) queries, (B, N', d) keys and (B, N', C') values: the matrix
    products of the materialising form, but one (B, N, N') matrix in all, and its element-wise passes
    run over chunks of ``chunk`` query rows that stay in cache. Backward turns the kept weights into the
    logits' gradient in place (so a second backward through the same graph fails loudly: the saved
    weights were modified).

    ``key`` None means the keys are the queries (gaussian without subsampling): q q^T is symmetric, so
    forward computes the blocks on and above its diagonal only, and backward gets the queries' gradient
    (dS + dS^T) q from one product instead of the two dS k and dS^T q.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale, chunk, block):
        if key is None:
            weights = _symmetric_gram(query, scale, block)
        else:
            weights = torch.bmm(query, (key * scale).transpose(1, 2))  # scale the smaller operand
        # Chunks of contiguous rows (of both batch elements): softmax would copy a strided chunk first.
        flat = weights.view(-1, weights.shape[-1])
        for rows in _row_chunks(flat.shape[0], chunk * weights.shape[0]):
            flat[rows] = torch.softmax(flat[rows], dim=-1)
        out = torch.bmm(weights, value)
        ctx.scale, ctx.chunk, ctx.block = scale, chunk, block
        ctx.save_for_backward(query, key, value, out, weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, weights = ctx.saved_tensors
        scale = ctx.scale
        with torch.autocast(query.device.type, enabled=False):
            # Each gradient is computed transposed, (B, channels, positions), and handed back as a
            # transposed view: the layout of q/k/v, which are views of NCHW maps, so the max-pool,
            # convolution and accumulation upstream get NCHW-contiguous gradients.
            grad_value = torch.bmm(grad_out.transpose(1, 2), weights).transpose(1, 2)
            # d loss / d (q k^T) = scale * P * (dL/dP - rowsum(P * dL/dP)) with dL/dP = dL/dout v^T, and
            # rowsum(P * dL/dP) = rowsum(dL/dout * out). The scale goes on the smallest operands.
            row_dots = (grad_out * out).sum(dim=-1, keepdim=True).mul_(scale)
            scaled_value_t = (value * scale).transpose(1, 2)
            for rows in _row_chunks(query.shape[1], ctx.chunk):
                grad_weights = torch.bmm(grad_out[:, rows], scaled_value_t).sub_(row_dots[:, rows])
                weights[:, rows].mul_(grad_weights)
            grad_logits = weights
            if key is None:
                grad_logits = _symmetrize_(grad_logits, ctx.block)  # dS + dS^T, symmetric
                grad_query = torch.bmm(query.transpose(1, 2), grad_logits).transpose(1, 2)
                grad_key = None
            else:
                grad_query = torch.bmm(key.transpose(1, 2), grad_logits.transpose(1, 2)).transpose(1, 2)
                grad_key = torch.bmm(query.transpose(1, 2), grad_logits).transpose(1, 2)
        return grad_query, grad_key, grad_value, None, None, None


def _symmetric_gram(rows, scale, block):
    """rows rows^T * scale, (B, N, N): the blocks on and above the diagonal, mirrored below it."""
    n = rows.shape[1]
    gram = rows.new_empty(rows.shape[0], n, n)
    spans = _row_chunks(n, block)
    for i, span_i in enumerate(spans):
        for span_j in spans[i:]:
            product = torch.bmm(rows[:, span_i], rows[:, span_j].transpose(1, 2)).mul_(scale)
            gram[:, span_i, span_j] = product
            if span_j != span_i:
                gram[:, span_j, span_i] = product.transpose(1, 2)
    return gram


def _symmetrize_(matrix, block):
    """matrix + matrix^T for (B, N, N), in place, block by block."""
    spans = _row_chunks(matrix.shape[1], block)
    for i, span_i in enumerate(spans):
        for span_j in spans[i:]:
            upper, lower = matrix[:, span_i, span_j], matrix[:, span_j, span_i]
            total = upper + lower.transpose(1, 2)
            upper.copy_(total)
            if span_j != span_i:
                lower.copy_(total.transpose(1, 2))
    return matrix


def _concat_chunk(u, v, value):
    """ReLU(u_i + v_j) / N' applied to value: (B, n), (B, N'), (B, N', C) -> (B, n, C)."""
    return F.relu(u[:, :, None] + v[:, None, :]) @ value / v.shape[1]


class NonLocalArgumentError(ValueError):
    """A bad argument of the non-local block or backbone; ``argument`` names it, ``value`` is what was given."""

    def __init__(self, argument: str, value, reason: str):
        self.argument, self.value, self.reason = argument, value, reason
        super().__init__(f"{argument}={value!r}: {reason}")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NonLocalArgumentError(name, value, "must be a positive integer")


def _check_bool(name, value):
    # Not bool(value): a string such as "False" would silently mean True.
    if not isinstance(value, (bool, np.bool_)):
        raise NonLocalArgumentError(name, value, "must be a bool; valid choices: True, False")


def _check_choice(name, value, choices):
    if value not in choices:
        raise NonLocalArgumentError(
            name, value, f"unknown value; valid choices: {', '.join(repr(c) for c in choices)}"
        )
