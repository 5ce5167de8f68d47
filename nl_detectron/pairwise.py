"""
The non-local block's pairwise aggregation ``y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j)`` (paper, eq. 1),
one function per pairwise function f, on rows: queries (B, N, d), keys (B, N', d), values (B, N', C').

Each function's docstring states what it keeps for backward. The softmax modes and concatenation either
materialise the N x N' matrix once or never keep it, as the cost rule :func:`materialise_pairwise`
decides per call; dot product never forms it.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "materialise_pairwise", "softmax_attention", "gaussian_attention", "dot_product_attention",
    "concatenation_attention", "pairwise_chunk_elements", "recomputed_chunk_elements",
]

# Elements of one query chunk of the pairwise matrix, where a path works through chunks: on the CPU 4 MiB
# in float32, within the L3 cache, and small beside the matrix a chunk is part of (a chunk's temporaries
# are live at the block's peak of memory); on CUDA larger, since GPU kernels need large work items (at
# 16 MiB, concatenation was 2-5x slower on an H100 for the launch overheads).
pairwise_chunk_elements = {"cpu": 1 << 20, "cuda": 1 << 26}
# Query chunks recomputed in backward, where the matrix is not kept (above MATERIALISE_ELEMENTS:
# concatenation, and bfloat16 softmax on the CPU): fewer, larger ones cost less time on the CPU
# (concatenation at res4 with x pooled, 16 Mi elements: one chunk, 0.97 of the naive form's time; 1 Mi:
# 1.20), and a chunk's matrices are alive only while it is recomputed.
recomputed_chunk_elements = {"cpu": 1 << 24, "cuda": 1 << 26}
# The matrix is kept up to this many elements (1 GiB in float32) by concatenation (CPU and CUDA) and by
# bfloat16 softmax on the CPU: for concatenation on the CPU the size where recomputing its chunks became
# the faster path (res3 without subsampling, 0.56e9 elements at batch 2), see materialise_pairwise.
MATERIALISE_ELEMENTS = 1 << 28
# The softmax modes on CUDA keep the matrix, where SDPA's fused kernels have no fast backward, up to this
# many elements (4 GiB in float32: every case of the block benchmark at batch 2), see materialise_pairwise.
CUDA_MATERIALISE_ELEMENTS = 1 << 30
# float32 softmax on AVX-512 CPUs: the matrix is kept up to this many elements (res4 at batch 2; res3 with
# subsampling has 1.4e8), see materialise_pairwise.
CPU_FLOAT32_MATERIALISE_ELEMENTS = 1 << 26
# bfloat16 logits on the CPU (see _bfloat16_softmax_): rows whose largest centred, scaled logit l_max,
# times the weight not on it (1 - w_max), exceeds this have theirs computed again from float32 products. A
# row's centred logits average 0, and bfloat16 keeps 8 significant bits: below the bound the logits that
# carry weight (those near the largest) are off by at most 16 * 2^-8 = 1/16, logits far below the largest
# carry next to none, and a row that one key dominates shares that key's rounding in numerator and
# denominator (gaussian without subsampling, whose x_i . x_i is ~32 there). Measured: the benchmark's
# gaussian res4 (largest centred logits 11) 2.5e-3 relative error of the output against 2.0e-3 with float32
# products; tests/test_nonlocal_block.py's logits of +-256: 0.24 on bfloat16 logits, 4e-3 on float32 rows.
BFLOAT16_LOGIT_BOUND = 16.0


def materialise_pairwise(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fused: bool, recomputable: bool = False
) -> bool:
    """
    The cost rule of every pairwise function that forms the N x N' matrix: whether a forward+backward
    keeps the one (B, N, N') matrix of weights (``True``) or never keeps it (SDPA's fused kernel, which
    recomputes the weights in backward, or query chunks recomputed in backward). ``fused``: whether SDPA's
    fused kernels take these shapes at all (False for gaussian on the CPU: its flash kernel needs as many
    value as key channels, and gaussian compares C-channel x against C/2-channel g(x); False for
    concatenation, which is no softmax). ``recomputable``: whether the weights can be recomputed without
    a matrix product (concatenation's ReLU of a sum). Only the device (and the CPU's vector instructions),
    the dtype, the head dim d and the matrix's size matter:

    * CPU, softmax modes, bfloat16: keep it (:class:`_SoftmaxBfloat16`, bfloat16 products) up to
      ``MATERIALISE_ELEMENTS``, above that recompute bfloat16 chunks in backward
      (:class:`_SoftmaxBfloat16Recomputed`; gaussian keeps it at every size, its logits cost C-channel
      products). Attention alone, forward+backward, against the naive form's under autocast (2-core
      AVX-512 EPYC): res4 x pooled 0.80-0.85 (SDPA flash 2.5x), res3 subsampled 0.72 (flash 1.66), res3
      0.42 kept (flash 0.84; the whole block with flash took 1.12 of the naive time there).
    * CPU, softmax modes, float32: on AVX-512 CPUs keep it up to ``CPU_FLOAT32_MATERIALISE_ELEMENTS``
      (res4 at batch 2): the whole block took 0.950-0.962 of the naive form's time there against SDPA
      flash's 0.994-1.038 (11 alternating rounds, 2-core AVX-512 EPYC), and at res3 both took about 0.6,
      flash with nothing of size N x N' kept. Elsewhere (AVX2) keep it only where there is no fused
      kernel: forced, the materialised path took 1.079 of the naive time at res4 subsampled where flash
      took 1.010 (2-core AVX2 EPYC). Gaussian's materialised form beats recomputing its C-channel logits.
    * Concatenation, CPU and CUDA: keep it up to ``MATERIALISE_ELEMENTS``. Its attention alone,
      forward+backward, kept against recomputed (2-core AVX2 EPYC; ``benchmarks/concatenation_paths.py``):
      res4 x pooled 376 / 421 ms, res4 1366 / 1571 ms, res3 subsampled 2873 / 3821 ms, res3 17.1 / 16.3 s.
    * CUDA, softmax modes: keep it where the fused kernels have no fast backward, i.e. in float32 (the
      memory-efficient kernel) and for head dims over 256 (res4's 512-d embeddings, gaussian's x), up to
      ``CUDA_MATERIALISE_ELEMENTS``; above that, where memory is what runs out, SDPA's forward and a
      backward over query chunks. 16-bit with d <= 256 (res3's embeddings): SDPA (cuDNN). The whole
      block forced each way on an H200 (batch 2, ours / naive): kept 0.99-1.12 in float32, 1.04-1.39 at
      res4 and 0.60-0.92 at res3 in 16-bit; not kept 1.22-1.30 in float32, 1.31-4.17 where d > 256 in
      16-bit, and 0.46-0.83 for 16-bit res3 embeddings (SDPA cuDNN), where kept read 0.60-0.88.
    """
    elements = query.shape[0] * query.shape[1] * key.shape[1]
    small = elements <= MATERIALISE_ELEMENTS
    if recomputable:
        return small
    if not query.is_cuda:
        if _bfloat16_products(query):
            return small or not fused
        if query.dtype == torch.float32 and _cpu_capability() == "AVX512":
            return elements <= CPU_FLOAT32_MATERIALISE_ELEMENTS or not fused
        return not fused
    slow_fused = query.dtype == torch.float32 or query.shape[-1] > 256 or not fused
    return slow_fused and elements <= CUDA_MATERIALISE_ELEMENTS


@functools.lru_cache(maxsize=None)
def _cpu_capability() -> str:
    """The vector instructions ATen's CPU kernels dispatch to: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def _bfloat16_products(query) -> bool:
    """
    Whether the materialised softmax multiplies in bfloat16 itself (:class:`_SoftmaxBfloat16`): bfloat16
    rows on the CPU, whose products (oneDNN) accumulate in float32 but return bfloat16.
    """
    return not query.is_cuda and query.dtype == torch.bfloat16


def _row_chunks(num_rows, chunk):
    return [slice(start, start + chunk) for start in range(0, num_rows, chunk)]


def _chunk_rows(query, key, budgets=pairwise_chunk_elements) -> int:
    """Query rows per chunk: ``budgets``' elements of the pairwise matrix for the whole batch."""
    budget = budgets["cuda" if query.is_cuda else "cpu"]
    return max(1, budget // (key.shape[0] * key.shape[1]))


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _compute_dtype(*tensors):
    """float64 if every input is, else float32: the precision of logits, softmax and sums over positions."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _bmm(a, b, dtype):
    """
    a @ b with a result in ``dtype``, for (B, n, m) @ (B, m, p). 16-bit operands on CUDA and a float32
    ``dtype``: the tensor-core product itself, accumulated and returned in float32 (``out_dtype``);
    elsewhere the product of operands in ``dtype`` (the CPU has no out_dtype for bmm).
    """
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype and dtype == torch.float32:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(_cast(a, dtype), _cast(b, dtype))


def _cast(t, dtype):
    """
    ``t.to(dtype)`` without the call where t has that dtype: at res4 on CUDA the host's time per operator
    call, not the GPU's, sets the block's speed, and a no-op ``to`` costs about as much host time as a
    kernel's launch.
    """
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_off(t):
    """
    Autocast off on ``t``'s device for the ops of a ``with`` block; where it is off already (backward, float32
    training) a context that does nothing, since entering ``torch.autocast`` costs the host more than a
    small kernel's launch.
    """
    device = t.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def _bmm_like(a, b, like, dtype=None):
    """
    a @ b (B, n, p) in the layout of the rows ``like`` (B, n, p): for rows that view an NCHW map (unit
    stride along the positions) computed as (b^T a^T)^T, so that the gradient of a convolution's map comes
    out in the map's own layout (theta's backward at res4, batch 2, took 17-18 ms longer on a channels-last
    gradient, in float32 and in bfloat16).
    ``dtype``: as :func:`_bmm`'s, else the product in a's dtype.
    """
    transposed = like.stride(1) == 1 and like.stride(2) != 1
    if transposed:
        a, b = b.transpose(1, 2), a.transpose(1, 2)
    out = torch.bmm(a, b) if dtype is None else _bmm(a, b, dtype)
    return out.transpose(1, 2) if transposed else out


def _weights_dtype(query, dtype):
    """
    The dtype the materialised weights are kept in: 16-bit inputs' own on CUDA, whose tensor-core products
    take them and return float32 (``out_dtype``); elsewhere the float32 (float64) they are computed in.
    """
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    return dtype


def _softmax_(logits):
    """
    Softmax over the last dimension, in place: ATen's CPU and CUDA kernels read each row (into registers,
    shared memory, or by the thread that writes the element) before they write it.
    """
    return torch._softmax(logits, -1, False, out=logits)


def _sdpa_rows(query, key, value, scale):
    """
    SDPA on rows, as one attention head: (B, N, C'). Contiguous rows: SDPA's fused CPU kernel needs a unit
    stride along the channels, and otherwise falls back to the math path, which materialises the matrix.
    """
    q, k, v = (t.contiguous().unsqueeze(1) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).squeeze(1)


def _slow_fused_backward(query) -> bool:
    """
    Whether SDPA's backward is slow: on CUDA for head dims over 256 (res4's 512-d embeddings), which only
    the memory-efficient kernel takes, whose backward then uses generic kernels (5.6 ms of the res4
    block's 6.7 ms on an H100 in float16, where the naive form's whole forward+backward took 1.5 ms).
    """
    return query.is_cuda and query.shape[-1] > 256


def softmax_attention(query, key, value, scale: float, fused: bool = True):
    """
    ``softmax_j(q_i . k_j * scale) v_j``: the embedded Gaussian (q, k = theta(x), phi(x)) and the Gaussian
    (q, k = x itself) pairwise functions with their softmax normaliser. (B, N, d), (B, N', d), (B, N', C')
    -> (B, N, C') in ``query``'s dtype; logits, softmax and sums in float32 (float64 for float64 inputs),
    so 16-bit logits beyond float16's range do not overflow; bfloat16 on the CPU under autograd: products
    in bfloat16 of centred keys, guarded by ``BFLOAT16_LOGIT_BOUND`` (:class:`_SoftmaxBfloat16`).
    ``fused``: whether SDPA's fused kernels take these shapes (False for gaussian on the CPU, whose fused
    kernel needs C' == d).

    Memory for backward, by :func:`materialise_pairwise`:

    * materialised: one (B, N, N') matrix of weights (float32; bfloat16 for bfloat16 on the CPU and for
      16-bit on CUDA), whose elementwise passes run over cache-sized query chunks, and which backward
      turns into the logits' gradient in place;
    * fused: nothing of size N x N' (SDPA's fused kernel recomputes the weights in backward); on CUDA for
      head dims over 256, SDPA's forward and our backward over query chunks, one chunk's matrices at a time;
      bfloat16 on the CPU, bfloat16 chunks recomputed in backward (:class:`_SoftmaxBfloat16Recomputed`).

    Without autograd: SDPA where ``fused``, else query chunks, keeping nothing.
    """
    if _wants_grad(query, key, value):
        if materialise_pairwise(query, key, value, fused):
            if _bfloat16_products(query):
                return _SoftmaxBfloat16.apply(query, key, value, scale, _chunk_rows(query, key))
            return _SoftmaxKeepingWeights.apply(query, key, value, scale, _chunk_rows(query, key))
        if _bfloat16_products(query):
            chunk = _chunk_rows(query, key, recomputed_chunk_elements)
            return _SoftmaxBfloat16Recomputed.apply(query, key, value, scale, chunk)
        if _slow_fused_backward(query):
            return _SdpaChunkedBackward.apply(query, key, value, scale, _chunk_rows(query, key))
    if fused:
        return _sdpa_rows(query, key, value, scale)
    dtype = _compute_dtype(query, key, value)
    outs = []
    with _autocast_off(query):
        for rows in _row_chunks(query.shape[1], _chunk_rows(query, key)):
            weights = torch.softmax(_bmm(query[:, rows], key.transpose(1, 2), dtype).mul_(scale), dim=-1)
            outs.append(_bmm(weights, value, dtype))
    return torch.cat(outs, dim=1).to(query.dtype)


def gaussian_attention(x, keys, value, scale: float):
    """
    The Gaussian pairwise function, ``softmax_j(x_i . x_j * scale) g(x_j)``: :func:`softmax_attention` on
    the input's own rows. (B, N, C), (B, N', C), (B, N', C') -> (B, N, C'): in x's dtype, or under
    autocast in its 16-bit dtype, which W_z's convolution takes (no float32 copy).

    Under autocast x stays float32 while g(x) is 16-bit: one dtype for all three, autocast off. The logits
    x_i . x_j sum C terms: float32 (float64 if x is), or under autocast its 16-bit dtype on CUDA (whose
    products return float32 there) and bfloat16 on the CPU (products that the materialised softmax
    guards). SDPA's fused CPU kernel needs C' == C, so only CUDA runs it fused.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast and (device == "cuda" or torch.get_autocast_dtype(device) == torch.bfloat16):
        dtype = torch.get_autocast_dtype(device)
    with _autocast_off(x):
        q, k, v = (_cast(t, dtype) for t in (x, keys, value))
        y = softmax_attention(q, k, v, scale, fused=q.is_cuda)
    return y if autocast else _cast(y, x.dtype)


class _SoftmaxKeepingWeights(torch.autograd.Function):
    """
    softmax(q k^T * scale) v with one (B, N, N') matrix kept for backward, and nothing else of the
    forward's: the matrix products of the naive form, the softmax in place over chunks of ``chunk`` query
    rows (which stay in cache). Backward turns the kept weights into the logits' gradient in place, chunk
    by chunk (so a second backward through the same graph fails loudly: the saved weights were modified).
    """

    @staticmethod
    def forward(ctx, query, key, value, scale, chunk):
        dtype = _compute_dtype(query, key, value)
        with _autocast_off(query):
            # The scale on the keys, the smaller operand, rather than on the N x N' logits.
            logits = _bmm(query, (key * scale).transpose(1, 2), dtype)
            batch, num_rows = logits.shape[:2]
            if chunk >= num_rows:  # one chunk: one call
                _softmax_(logits)
            else:  # chunks of contiguous rows, of both batch elements
                flat = logits.view(-1, logits.shape[-1])
                for rows in _row_chunks(flat.shape[0], chunk * batch):
                    _softmax_(flat[rows])
                del flat
            weights = _cast(logits, _weights_dtype(query, dtype))
            del logits
            # In the weights' dtype: a 16-bit product accumulates in float32 and rounds once, as a float32
            # product cast to 16 bits would, in one kernel (on CUDA the launches are much of the time).
            out = _bmm(weights, value, weights.dtype)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(query, key, value, weights)
        return _cast(out, query.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, weights = ctx.saved_tensors
        store, scale = weights.dtype, ctx.scale
        with _autocast_off(query):
            grad_out = _cast(grad_out, store)
            # Every product in the weights' dtype (see forward). The gradients come out of the products
            # autograd's matmul backward uses (measured fastest on the CPU), in their layouts.
            grad_value = _bmm(weights.transpose(1, 2), grad_out, store)
            # d loss / d (q k^T) = scale * P * (dL/dP - rowsum(P * dL/dP)) with dL/dP = dL/dout v^T; the
            # scale goes on the values, the smaller operand. Per chunk: dL/dP, then softmax's own backward
            # kernel (float32 arithmetic) in place of P.
            scaled_value_t = (_cast(value, store) * scale).transpose(1, 2)
            for probs, grad, value_t in _softmax_chunks(weights, grad_out, scaled_value_t, ctx.chunk):
                _softmax_backward_(probs, grad, value_t)
            grad_logits = weights
            grad_query = _bmm_like(grad_logits, key, query, store)
            grad_key = _bmm(query.transpose(1, 2), grad_logits, store).transpose(1, 2)
        return _cast(grad_query, query.dtype), _cast(grad_key, key.dtype), _cast(grad_value, value.dtype), None, None


def _softmax_chunks(weights, grad_out, value_t, chunk):
    """
    (rows of the weights, of dL/dout, the values^T) of the backward's chunks, each of ``chunk`` rows per
    image (the forward's chunks of the matrix's elements): the whole batch at once where one chunk holds
    every row (fewer launches), else one image's contiguous rows at a time.
    """
    batch, num_rows = weights.shape[:2]
    if chunk * batch >= num_rows:
        return [(weights, grad_out, value_t)]
    return [
        (weights[b, rows], grad_out[b, rows], value_t[b])
        for b in range(batch) for rows in _row_chunks(num_rows, chunk * batch)
    ]


class _SoftmaxBfloat16(torch.autograd.Function):
    """
    softmax(q k^T * scale) v for bfloat16 rows on the CPU, with one bfloat16 (B, N, N') matrix kept for
    backward: the products in bfloat16 (float32 accumulation, bfloat16 results, as the naive form's under
    autocast), softmax and its gradient with float32 arithmetic in place over chunks of ``chunk`` query
    rows.

    Softmax is invariant to a shift of a row's logits, so the keys are centred on their mean (and the
    values, for the weights' gradient) before products are rounded to bfloat16: what is rounded is each
    logit's distance from its row's mean, not a large component that every pair shares (as ReLU features
    do). Rows whose rounding could still move their weights have their logits computed again from float32
    products (:func:`_bfloat16_softmax_`). The centring leaves the gradients as they are (each row of the
    logits' gradient sums to zero).
    """

    @staticmethod
    def forward(ctx, query, key, value, scale, chunk):
        with _autocast_off(query):
            key, value = _centred(key, scale), value.to(query.dtype)  # keys rounded once, with the scale
            weights = torch.bmm(query, key.transpose(1, 2))  # the scaled logits, then their softmax in place
            for batch in range(weights.shape[0]):
                for rows in _row_chunks(weights.shape[1], chunk):
                    _bfloat16_softmax_(weights[batch, rows], query[batch, rows], key[batch])
            out = torch.bmm(weights, value)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(query, key, value, weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, weights = ctx.saved_tensors  # key: centred and scaled
        with _autocast_off(query):
            grad_out = grad_out.to(weights.dtype)
            grad_value = torch.bmm(weights.transpose(1, 2), grad_out)
            value_t = _centred(value, 1.0).transpose(1, 2)
            for batch in range(weights.shape[0]):
                for rows in _row_chunks(weights.shape[1], ctx.chunk):
                    _softmax_backward_(weights[batch, rows], grad_out[batch, rows], value_t[batch])
            grad_query = _bmm_like(weights, key, query)
            grad_key = torch.bmm(query.transpose(1, 2), weights).transpose(1, 2).mul_(ctx.scale)
        return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


class _SoftmaxBfloat16Recomputed(torch.autograd.Function):
    """
    :class:`_SoftmaxBfloat16` without the matrix, for matrices beyond ``MATERIALISE_ELEMENTS``: forward
    and backward go over chunks of ``chunk`` query rows of one batch element, backward recomputing each
    chunk's weights (one more product than the naive form); nothing of size N x N' is kept, one chunk's
    matrices are alive at a time. The gradients of the keys and values are summed over chunks in float32.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale, chunk):
        with _autocast_off(query):
            key, value = _centred(key, scale), value.to(query.dtype)
            out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
            for batch in range(query.shape[0]):
                for rows in _row_chunks(query.shape[1], chunk):
                    q = query[batch, rows]
                    weights = _bfloat16_softmax_(q @ key[batch].t(), q, key[batch])
                    torch.mm(weights, value[batch], out=out[batch, rows])
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(query, key, value)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors  # key: centred and scaled
        with _autocast_off(query):
            grad_out = grad_out.to(query.dtype)
            value_t = _centred(value, 1.0).transpose(1, 2)
            grad_query = torch.empty_like(query)
            grad_key = torch.zeros(key.shape, dtype=torch.float32)
            grad_value = torch.zeros(value.shape, dtype=torch.float32)
            for batch in range(query.shape[0]):
                for rows in _row_chunks(query.shape[1], ctx.chunk):
                    q = query[batch, rows]
                    weights = _bfloat16_softmax_(q @ key[batch].t(), q, key[batch])
                    grad_value[batch] += weights.t() @ grad_out[batch, rows]
                    grad_logits = _softmax_backward_(weights, grad_out[batch, rows], value_t[batch])
                    torch.mm(grad_logits, key[batch], out=grad_query[batch, rows])
                    grad_key[batch] += grad_logits.t() @ q
        return grad_query, grad_key.mul_(ctx.scale).to(key.dtype), grad_value.to(value.dtype), None, None


def _bfloat16_softmax_(logits, query, key):
    """
    softmax in place of one chunk of bfloat16 scaled logits (n, N'), the products of ``query`` (n, d) and
    centred, scaled ``key`` (N', d). Rows where rounding could move the weights, those whose largest logit
    l_max exceeds ``BFLOAT16_LOGIT_BOUND`` after weighting by the weight not on it, (1 - w_max) * l_max,
    are computed again from float32 products: a row that one key dominates (gaussian's x_i . x_i without
    subsampling) shares that key's rounding in numerator and denominator.
    """
    high = torch.amax(logits, dim=-1).float()
    _softmax_(logits)
    large = (1 - torch.amax(logits, dim=-1).float()) * high > BFLOAT16_LOGIT_BOUND
    if large.any():
        exact = query[large].float() @ key.float().t()
        logits[large] = torch.softmax(exact, dim=-1).to(logits.dtype)
    return logits


def _softmax_backward_(weights, grad_out, value_t):
    """
    The gradient of one chunk's logits, in place of its softmax ``weights`` (n, N') or (B, n, N'):
    P * (dL/dP - rowsum(P * dL/dP)) with dL/dP = ``grad_out`` (n, C') @ ``value_t`` (C', N') in the
    weights' dtype; softmax's own backward kernel (float32 arithmetic for 16-bit weights), while the
    chunk is in cache. Values shifted by a constant per channel (the bfloat16 paths' centred values)
    shift each row of dL/dP by a constant that the rowsum takes back out.
    """
    grad_weights = grad_out @ value_t
    return torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype, grad_input=weights)


def _centred(rows, scale):
    """(rows - their mean over positions) * scale, computed in float32, in ``rows``' dtype: (B, M, C)."""
    rows32 = rows.float()
    return (rows32 - rows32.mean(dim=1, keepdim=True)).mul_(scale).to(rows.dtype)


class _SdpaChunkedBackward(torch.autograd.Function):
    """
    softmax(q k^T * scale) v: forward through SDPA's fused kernel, which keeps nothing of size N x N';
    backward over chunks of ``chunk`` query rows, each recomputing its rows of the softmax from q and k (a
    chunk holds whole rows, so its softmax is exact): the naive form's backward plus one product, one
    chunk's matrices alive at a time. For CUDA's head dims over 256, whose fused backward is slow.
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
        dtype, scale = _compute_dtype(query, key, value), ctx.scale
        with _autocast_off(query):
            grad_out, out = grad_out.to(dtype), out.to(dtype)
            row_dots = (grad_out * out).sum(dim=-1, keepdim=True)
            grad_q = torch.empty(query.shape, dtype=dtype, device=query.device)
            grad_k = torch.zeros(key.shape, dtype=dtype, device=key.device)
            grad_v = torch.zeros(value.shape, dtype=dtype, device=value.device)
            k_t, v_t = key.transpose(1, 2), value.transpose(1, 2)
            for rows in _row_chunks(query.shape[1], ctx.chunk):
                probs = torch.softmax(_bmm(query[:, rows], k_t, dtype).mul_(scale), dim=-1)  # (B, n, N')
                grad_v += _bmm(probs.transpose(1, 2), grad_out[:, rows], dtype)
                grad_logits = _bmm(grad_out[:, rows], v_t, dtype).sub_(row_dots[:, rows]).mul_(probs).mul_(scale)
                grad_q[:, rows] = _bmm(grad_logits, key, dtype)
                grad_k += _bmm(grad_logits.transpose(1, 2), query[:, rows], dtype)
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None


def dot_product_attention(query, key, value):
    """
    ``sum_j (q_i . k_j) v_j / N'`` computed as ``q (k^T v / N')`` (associativity): linear in N, never
    forms the N x N' matrix; keeps q, k, v and the (B, d, C') product for backward. In float32 for float16
    inputs, which cannot hold sums over thousands of positions. Without autograd: the two products as
    they are (which fvcore's FLOP count traces; it cannot see into an autograd Function).
    """
    dtype = query.dtype
    with _float32_for_float16(query) as upcast:
        query, key, value = (upcast(t) for t in (query, key, value))
        if _wants_grad(query, key, value):
            y = _DotProduct.apply(query, key, value)
        else:
            y = query @ (key.transpose(1, 2) @ value).div_(key.shape[1])
    return y.to(dtype)


class _DotProduct(torch.autograd.Function):
    """
    ``q (k^T v / N')`` with gradients in the layout of the maps the rows are views of: autograd's matmul
    backward returns row-contiguous gradients for q and v, which theta's and g's convolutions must copy
    back to an NCHW map's layout (3% of the block's time at res3 on the CPU). The output stays
    row-contiguous, which is what W_z's 1x1 convolution takes fastest.
    """

    @staticmethod
    def forward(ctx, query, key, value):
        keys_values = torch.bmm(key.transpose(1, 2), value).div_(key.shape[1])  # (B, d, C')
        ctx.save_for_backward(query, key, value, keys_values)
        return torch.bmm(query, keys_values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, keys_values = ctx.saved_tensors
        # Each gradient in the layout of the rows it is for: NCHW maps' (B, channels, positions), or the
        # channels-last maps' rows that the convolutions run on under bfloat16 autocast (layout.py).
        grad_query = _bmm_like(grad_out, keys_values.transpose(1, 2), query)
        grad_keys_values = torch.bmm(query.transpose(1, 2), grad_out).div_(key.shape[1])
        grad_key = _bmm_like(value, grad_keys_values.transpose(1, 2), key)
        grad_value = _bmm_like(key, grad_keys_values, value)
        return grad_query, grad_key, grad_value


@contextlib.contextmanager
def _float32_for_float16(query):
    """For float16 inputs: autocast off and a float32 cast (autocast would cast products back)."""
    if query.dtype != torch.float16:
        yield lambda t: t
        return
    with _autocast_off(query):
        yield lambda t: t.float()


def _concat_pairs(u, v, value):
    """ReLU(u_i + v_j) applied to value: (B, n), (B, N'), (B, N', C) -> (B, n, C)."""
    return torch.relu_(u[:, :, None] + v[:, None, :]) @ value


def concatenation_attention(query, key, value, w_theta, w_phi):
    """
    ``sum_j ReLU(w_theta . q_i + w_phi . k_j) v_j / N'`` (w_f^T [theta_i, phi_j] split in two), in float32
    for float16 inputs.

    Memory for backward, by :func:`materialise_pairwise`:

    * materialised: the one (B, N, N') matrix of ReLU'd pairs (the ReLU's mask is read off it), built
      over cache-sized query chunks; backward reduces the pairs' gradient chunk by chunk, never whole;
    * not materialised: nothing of size N x N'. It goes by query chunks of ``recomputed_chunk_elements``, each
      recomputed in backward (a ReLU of a sum, no matrix product).

    Without autograd: query chunks, keeping nothing.
    """
    dtype = query.dtype
    with _float32_for_float16(query) as upcast:
        query, key, value, w_theta, w_phi = (upcast(t) for t in (query, key, value, w_theta, w_phi))
        u = (query @ w_theta.to(query.dtype).t()).squeeze(-1)  # (B, N)
        v = (key @ w_phi.to(key.dtype).t()).squeeze(-1)  # (B, N')
        value = value / v.shape[1]  # the 1/N' normaliser once, not per chunk
        training = _wants_grad(u, v, value)
        if training and materialise_pairwise(query, key, value, fused=False, recomputable=True):
            return _ConcatKeepingPairs.apply(u, v, value, _chunk_rows(query, key)).to(dtype)
        chunk = _chunk_rows(query, key, recomputed_chunk_elements)
        return _concat_by_chunks(u, v, value, chunk, recompute=training).to(dtype)


def _concat_by_chunks(u, v, value, chunk, recompute=True):
    """ReLU(u_i + v_j) @ value by chunks of ``chunk`` query rows; ``recompute``: each in backward."""
    run = functools.partial(checkpoint, _concat_pairs, use_reentrant=False) if recompute else _concat_pairs
    return torch.cat([run(u[:, rows], v, value) for rows in _row_chunks(u.shape[1], chunk)], dim=1)


class _ConcatKeepingPairs(torch.autograd.Function):
    """
    ReLU(u_i + v_j) @ value with one (B, N, N') matrix, the ReLU'd pairs, kept for backward and nothing
    else of the forward's: the sum and the ReLU in one pass over each chunk of ``chunk`` query rows
    (which stays in cache). Backward forms the pairs' gradient one chunk at a time, masks it by the kept
    pairs (ReLU's derivative) and reduces it to the gradients of u and v while it is in cache.
    """

    @staticmethod
    def forward(ctx, u, v, value, chunk):
        dtype = torch.promote_types(torch.promote_types(u.dtype, v.dtype), value.dtype)
        with _autocast_off(u):
            u, v, value = u.to(dtype), v.to(dtype), value.to(dtype)
            pairs = u.new_empty(u.shape[0], u.shape[1], v.shape[1])
            for rows in _row_chunks(u.shape[1], chunk):
                torch.add(u[:, rows, None], v[:, None, :], out=pairs[:, rows]).relu_()
            out = torch.bmm(pairs, value)
        ctx.chunk = chunk
        ctx.save_for_backward(value, pairs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, pairs = ctx.saved_tensors
        grad_out = grad_out.to(value.dtype)
        grad_value = torch.bmm(pairs.transpose(1, 2), grad_out)
        grad_u = pairs.new_empty(pairs.shape[:2])
        grad_v = pairs.new_zeros(pairs.shape[0], pairs.shape[2])
        value_t = value.transpose(1, 2)
        for rows in _row_chunks(pairs.shape[1], ctx.chunk):
            grad_pairs = torch.bmm(grad_out[:, rows], value_t)
            torch.ops.aten.threshold_backward.grad_input(grad_pairs, pairs[:, rows], 0, grad_input=grad_pairs)
            grad_u[:, rows] = grad_pairs.sum(dim=-1)
            grad_v += grad_pairs.sum(dim=1)
        return grad_u, grad_v, grad_value, None
